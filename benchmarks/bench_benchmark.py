"""The benchmark suite's costs on this machine: parse time of every real label table, evaluation images/s (the
benchmark's streamed decode + eval transform) beside the pretraining loader's (webdataset shards, train
transforms) at the same image size and workers, and a suite's wall time cold vs from the feature cache.

Reads the real tables from torchxrayvision's data folder (installed ``--no-deps``), lays out NIH / CheXpert 5x200 /
RSNA for ``--images`` real ids with synthetic films of ``--film`` px, and runs ``cxr-core`` on ``--model`` (an
exported folder; default: a freshly initialised ``mpma_tiny`` export) and its random twin. JSON goes to
``benchmarks/results/bench_benchmark.json``.

    python benchmarks/bench_benchmark.py [--images 200] [--film 512] [--workers 2] [--model exported/tiny]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_loader import loader_rate

from data_tools.benchmarks import read_benchmark
from data_tools.build_shards import build_shards
from data_tools.synth.bench_layout import layout_all
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer
from mpma_ds import create_model, load_tokenizer
from mpma_ds.benchmark.features import stream
from mpma_ds.benchmark.model import load_model
from mpma_ds.benchmark.runner import run_benchmark
from mpma_ds.benchmark.suite import load_suite
from mpma_ds.data import DataConfig

RESULTS = Path(__file__).resolve().parent / "results"


def tables() -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "torchxrayvision is not installed (pip install --no-deps torchxrayvision): no real tables"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def parse_times(folder: Path) -> list[dict]:
    cases = [
        ("nih-cxr14", {}), ("nih-cxr14", {"labels": "google2019"}),
        ("chexpert", {"train": str(folder / "chexpert_train.csv.gz"), "frontal_only": False, "labels": "all"}),
        ("rsna-pneumonia", {"table": str(folder / "kaggle_stage_2_train_labels.csv.zip")}),
        ("siim-pneumothorax", {"table": str(folder / "siim-pneumothorax-train-rle.csv.gz")}),
        ("vindr-cxr", {"train": str(folder / "vinbigdata-train.csv.gz")}),
        ("padchest", {"projections": ["PA", "AP", "AP_horizontal", "L", "COSTAL", "EXCLUDE", "UNK"]}),
    ]  # fmt: skip
    rows = []
    for dataset, opts in cases:
        start = time.perf_counter()
        data = read_benchmark(dataset, folder, {**opts, "check_images": False})
        rows.append({"dataset": dataset, "options": opts.get("labels", ""), "rows": len(data.records) + len(data.problems),
                     "seconds": time.perf_counter() - start})  # fmt: skip
    return rows


def eval_rate(records, data_cfg, batch_size: int, workers: int) -> float:
    """Images/s of the benchmark's stream (decode through encode_image + eval transform), no model."""
    start = time.perf_counter()
    n = sum(len(b.index) for b in stream(records, data_cfg, batch_size=batch_size, workers=workers, rejected={}))
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--film", type=int, default=512, help="film size of the laid-out images (px)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", help="exported folder (default: a fresh mpma_tiny export)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_benchmark.json")
    args = p.parse_args(argv)
    folder = tables()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"machine": platform.platform(), "device": device, "torch_threads": torch.get_num_threads()}
    result["parse"] = parse_times(folder)
    for r in result["parse"]:
        print(f"parse {r['dataset']:<18} {r['options']:<10} {r['rows']:>7} rows  {r['seconds']:6.2f} s")
    with tempfile.TemporaryDirectory(prefix="bench-benchmark-") as tmp:
        tmp = Path(tmp)
        layout_all(folder, tmp / "data", n=args.images, size=args.film)
        generate_corpus(
            tmp / "corpus", args.images // 2, 0, min_size=args.film, max_size=args.film, lateral_fraction=0.0
        )
        build_shards("mimic-cxr", tmp / "corpus", tmp / "shards", shard_size=64, image_size=args.film, views=None,
                     val_fraction=0.0, test_fraction=0.0, progress=False)  # fmt: skip
        model_dir = args.model
        if model_dir is None:
            train_tokenizer(tmp / "shards", tmp / "tok", vocab_size=1000, min_frequency=1)
            torch.manual_seed(0)
            create_model("mpma_tiny", vocab_size=len(load_tokenizer(tmp / "tok"))).save_pretrained(
                tmp / "exported"
            )
            shutil.copytree(tmp / "tok", tmp / "exported" / "text_encoder", dirs_exist_ok=True)
            model_dir = str(tmp / "exported")
        models = [load_model(model_dir), load_model(f"random:{model_dir}", seed=1)]
        cfg = models[0].data_cfg
        nih = read_benchmark("nih-cxr14", tmp / "data" / "nih-cxr14").records
        ev = eval_rate(nih, cfg, args.batch_size, args.workers)
        train_cfg = DataConfig(backend="wds", train_shards=str(tmp / "shards" / "train"), image_size=cfg.image_size,
                               max_text_len=64, num_workers=args.workers, shuffle_buffer=64)  # fmt: skip
        batches = max(2, (args.images // 2) // args.batch_size - 3)
        tr = loader_rate(train_cfg, models[0].tokenizer, args.batch_size, batches)
        result["loader"] = {"eval_images_per_s": ev, "pretrain_loader_images_per_s": tr, "image_size": cfg.image_size,
                            "film": args.film, "workers": args.workers}  # fmt: skip
        print(f"benchmark stream (PNG decode + eval transform): {ev:.1f} images/s; pretraining loader (wds shards, "
              f"train transforms): {tr:.1f} images/s ({cfg.image_size} px, {args.workers} workers)")  # fmt: skip
        suite = load_suite("cxr-core")
        walls = []
        for label in ("cold", "cached"):
            start = time.perf_counter()
            run_benchmark(models, suite, tmp / "data", tmp / "out", cache_dir=tmp / "cache", workers=args.workers,
                          device=device, n_resamples=1000, min_count=3, mlflow=False, say=lambda s: None)  # fmt: skip
            walls.append(time.perf_counter() - start)
            print(f"cxr-core, 2 models, {args.images} images per dataset: {label} {walls[-1]:.1f} s")
        result["suite"] = {"cold_s": walls[0], "cached_s": walls[1], "images_per_dataset": args.images}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
