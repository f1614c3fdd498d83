"""Loader throughput vs the training step it feeds: is the loader ever the bottleneck?

Builds a small real shard set (synthetic MIMIC-CXR corpus → data_tools.build_shards at the SPEC's 512 px),
trains a tokenizer on it, then measures in this one run:

- samples/s of each backend (``synthetic``, ``wds``, ``dali``) at 1 and 2 workers/threads, at the tiny
  recipe's image size (128 px) and at 288 px (train transforms on: crop, rotation, jitter);
- the training-step rate (forward + backward + AdamW step) of ``mpma_tiny`` at the same image sizes;

and prints a table with the ratio loader / model (> 1: the loader keeps up). On a GPU machine the DALI
rows decode on ``mixed`` (nvJPEG) and the model steps on the GPU. JSON goes to
``benchmarks/results/bench_loader.json``.

    python benchmarks/bench_loader.py [--studies 80] [--batches 20] [--sizes 128,288] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer
from mpma_ds import create_model, load_tokenizer
from mpma_ds.data import DataConfig, build_loader

RESULTS = Path(__file__).resolve().parent / "results"


def loader_rate(cfg: DataConfig, tokenizer, batch_size: int, batches: int) -> float:
    """Samples/s of the train loader after 2 warm-up batches (worker start-up excluded)."""
    info = build_loader(cfg, 0, 1, batch_size=batch_size, tokenizer=tokenizer, seed=0, train=True)
    it = iter(info.loader)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        if batch["image"].is_cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    info.close()
    return batches * batch_size / seconds


def model_rate(image_size: int, vocab: int, tokenizer, batch_size: int, steps: int, device: torch.device) -> float:
    """Samples/s of mpma_tiny's training step (forward + backward + AdamW) on fixed synthetic batches."""
    model = create_model("mpma_tiny", image_size=image_size, vocab_size=vocab).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = DataConfig(backend="synthetic", image_size=image_size, max_text_len=64, synthetic_samples=batch_size * 2)
    info = build_loader(cfg, 0, 1, batch_size=batch_size, tokenizer=tokenizer, seed=0)
    batch = next(iter(info.loader))
    info.close()
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def step() -> None:
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=80, help="synthetic studies in the shard set")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch (the tiny recipe's)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per loader measurement")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model measurement")
    parser.add_argument("--sizes", default="128,288", help="image sizes, comma-separated")
    parser.add_argument("--workers", default="1,2", help="worker / thread counts, comma-separated")
    parser.add_argument("--backends", default="synthetic,wds,dali", help="backends, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_loader.json", help="JSON result file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    backends = [b for b in args.backends.split(",") if b != "dali" or dali_available()]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        print(f"building {args.studies} synthetic studies → shards at 512 px ...", file=sys.stderr)
        generate_corpus(Path(tmp) / "corpus", args.studies, 0, min_size=640, max_size=900)
        summary = build_shards(
            "mimic-cxr", Path(tmp) / "corpus", Path(tmp) / "shards", shard_size=32, image_size=512,
            views=None, val_fraction=0.0, test_fraction=0.0, progress=False,
        )  # fmt: skip
        train_tokenizer(Path(tmp) / "shards", Path(tmp) / "tok", vocab_size=1000, min_frequency=1)
        tokenizer = load_tokenizer(Path(tmp) / "tok")
        samples = summary["splits"]["train"]
        rows = []
        for size in sizes:
            model_sps = model_rate(size, len(tokenizer), tokenizer, args.batch_size, args.steps, device)
            rows.append({"what": f"mpma_tiny train step ({device.type})", "size": size, "workers": "-",
                         "samples_per_s": model_sps, "vs_model": 1.0})  # fmt: skip
            for backend in backends:
                for n in workers if backend != "synthetic" else [0]:
                    cfg = DataConfig(
                        backend=backend, train_shards=str(Path(tmp) / "shards" / "train"), image_size=size,
                        max_text_len=64, num_workers=n, shuffle_buffer=64, rotation_degrees=5.0, brightness=0.1,
                        contrast=0.1, synthetic_samples=samples,
                    )  # fmt: skip
                    sps = loader_rate(cfg, tokenizer, args.batch_size, args.batches)
                    label = backend
                    if backend == "dali":
                        label += " (mixed decode)" if device.type == "cuda" else " (cpu decode)"
                    rows.append({"what": label, "size": size, "workers": n, "samples_per_s": sps,
                                 "vs_model": sps / model_sps})  # fmt: skip
    header = f"{'what':<34} {'px':>4} {'workers':>7} {'samples/s':>10} {'loader/model':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['what']:<34} {r['size']:>4} {r['workers']!s:>7} {r['samples_per_s']:>10.1f} {r['vs_model']:>12.2f}"
        )
    bottleneck = [r for r in rows if "train step" not in r["what"] and r["vs_model"] < 1.0]
    print(f"\nloader slower than the step it feeds in {len(bottleneck)} of {len(rows) - len(sizes)} rows")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "shard_samples": samples,
        "batch_size": args.batch_size,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
