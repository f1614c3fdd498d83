"""The benchmark suite's costs on this machine: parse time of every real label table, evaluation images/s (the
benchmark's streamed decode + eval transform) beside the pretraining loader's (webdataset shards, train
transforms) at the same image size and workers, and a suite's wall time cold vs from the feature cache.

Reads the real tables from torchxrayvision's data folder (installed ``--no-deps``), lays out NIH / CheXpert 5x200 /
RSNA for ``--images`` real ids with synthetic films of ``--film`` px, and runs ``cxr-core`` on ``--model`` (an
exported folder; default: a freshly initialised ``mpma_tiny`` export) and its random twin. JSON goes to
``benchmarks/results/bench_benchmark.json``.

    python benchmarks/bench_benchmark.py [--images 200] [--film 512] [--workers 2] [--model exported/tiny]

``--ranks 1 2`` measures instead how the evaluation stream scales over ranks: NIH laid out for ``--images`` ids,
then for each rank count ``deepspeed --num_gpus R`` runs this script's ``--rank-worker`` (2 gloo CPU processes here),
which times, between barriers (the launcher's start not counted), the stream alone (decode + eval transform, each
rank its share) and the benchmark's feature pass (``features.image_features``: stream + image encoder + gather to
rank 0). JSON goes to ``benchmarks/results/bench_benchmark_ranks.json``.

    python benchmarks/bench_benchmark.py --ranks 1 2 [--images 200] [--film 512] [--workers 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
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
from mpma_ds.benchmark.features import image_features, stream
from mpma_ds.benchmark.model import load_model
from mpma_ds.benchmark.runner import run_benchmark
from mpma_ds.benchmark.suite import load_suite
from mpma_ds.data import DataConfig
from mpma_ds.distributed import barrier, free_port, init_distributed, world_info

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


def export_tiny(tmp: Path, images: int, film: int) -> str:
    """A freshly initialised ``mpma_tiny`` exported with a tokenizer trained on a small synthetic corpus."""
    generate_corpus(tmp / "corpus", max(8, images // 2), 0, min_size=film, max_size=film, lateral_fraction=0.0)
    build_shards("mimic-cxr", tmp / "corpus", tmp / "shards", shard_size=64, image_size=film, views=None,
                 val_fraction=0.0, test_fraction=0.0, progress=False)  # fmt: skip
    train_tokenizer(tmp / "shards", tmp / "tok", vocab_size=1000, min_frequency=1)
    torch.manual_seed(0)
    create_model("mpma_tiny", vocab_size=len(load_tokenizer(tmp / "tok"))).save_pretrained(tmp / "exported")
    shutil.copytree(tmp / "tok", tmp / "exported" / "text_encoder", dirs_exist_ok=True)
    return str(tmp / "exported")


def rank_worker(folder: Path, model_dir: str, batch_size: int, workers: int) -> None:
    """One rank of ``--ranks``: the stream alone, then the feature pass, each timed between barriers."""
    rank, world, _ = world_info()
    if world > 1:
        init_distributed()
    model = load_model(model_dir)
    records = read_benchmark("nih-cxr14", folder / "data" / "nih-cxr14").records
    timed = {}
    for label in ("stream", "features"):
        barrier()
        start = time.perf_counter()
        if label == "stream":
            n = sum(len(b.index) for b in stream(records, model.data_cfg, batch_size=batch_size, workers=workers,
                                                 rejected={}, rank=rank, world_size=world))  # fmt: skip
        else:
            feats = image_features(model, records, dataset="nih-cxr14", cache_dir=None, batch_size=batch_size,
                                   workers=workers, rank=rank, world_size=world)  # fmt: skip
        barrier()  # the slowest rank's share ends the pass
        timed[label] = time.perf_counter() - start
    if rank == 0:
        assert len(feats.index) == len(records)  # every image, gathered in record order
        out = {"ranks": world, "images": len(records), **{f"{k}_s": v for k, v in timed.items()}, "rank0_share": n}
        (folder / f"ranks-{world}.json").write_text(json.dumps(out), encoding="utf-8")
    sys.stdout.flush()
    os._exit(0)  # leave without interpreter teardown under the launcher (cli.common.ends_without_teardown)


def rank_scaling(args: argparse.Namespace) -> dict:
    """Images/s of the evaluation stream and the feature pass at each of ``args.ranks`` (deepspeed launcher)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-benchmark-ranks-") as tmp:
        tmp = Path(tmp)
        layout_all(tables(), tmp / "data", n=args.images, size=args.film)
        model_dir = args.model or export_tiny(tmp, 40, 256)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
        for ranks in args.ranks:
            cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), __file__,
                   "--rank-worker", str(tmp), "--model", model_dir, "--workers", str(args.workers),
                   "--batch-size", str(args.batch_size)]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{ranks} ranks failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            rows.append(json.loads((tmp / f"ranks-{ranks}.json").read_text()))
    base = rows[0]
    print(f"{'ranks':>5} {'images':>6} {'stream img/s':>13} {'x':>5} {'features img/s':>15} {'x':>5}")
    for r in rows:
        r["stream_images_per_s"] = r["images"] / r["stream_s"]
        r["features_images_per_s"] = r["images"] / r["features_s"]
        print(f"{r['ranks']:>5} {r['images']:>6} {r['stream_images_per_s']:>13.1f} "
              f"{base['stream_s'] / r['stream_s']:>5.2f} {r['features_images_per_s']:>15.1f} "
              f"{base['features_s'] / r['features_s']:>5.2f}")  # fmt: skip
    print(f"({args.film} px films evaluated at the model's size, {args.workers} decode workers per rank, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    return {"machine": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "film": args.film, "workers": args.workers, "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--film", type=int, default=512, help="film size of the laid-out images (px)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", help="exported folder (default: a fresh mpma_tiny export)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/bench_benchmark*.json)"
    )
    p.add_argument("--ranks", type=int, nargs="+", help="measure the stream's scaling over these rank counts")
    p.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)  # one rank of --ranks (under deepspeed)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = p.parse_args(argv)
    if args.rank_worker:
        rank_worker(args.rank_worker, args.model, args.batch_size, args.workers)
    if args.ranks:
        out = args.out or RESULTS / "bench_benchmark_ranks.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rank_scaling(args), indent=2), encoding="utf-8")
        print(f"wrote {out}")
        return 0
    args.out = args.out or RESULTS / "bench_benchmark.json"
    folder = tables()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"machine": platform.platform(), "device": device, "torch_threads": torch.get_num_threads()}
    result["parse"] = parse_times(folder)
    for r in result["parse"]:
        print(f"parse {r['dataset']:<18} {r['options']:<10} {r['rows']:>7} rows  {r['seconds']:6.2f} s")
    with tempfile.TemporaryDirectory(prefix="bench-benchmark-") as tmp:
        tmp = Path(tmp)
        layout_all(folder, tmp / "data", n=args.images, size=args.film)
        model_dir = export_tiny(tmp, args.images, args.film)  # its shards also feed the loader comparison
        model_dir = args.model or model_dir
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
