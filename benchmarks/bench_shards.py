"""Shard-building throughput against the plain-loop floor (SPEC §8).

    python benchmarks/bench_shards.py [--images 1200] [--image-size 512] [--repeats 1]

Generates (once, cached under benchmarks/results/) a synthetic MIMIC-CXR-JPG corpus of about `--images`
films of 1024-2500 px with `data_tools.synth_corpus`, then measures images/s of:

- floor: the per-image work alone (decode + resize + encode with `encode_image`, the function the tool's
  workers run) over the same files in one plain loop, no tar, no reports, no processes;
- naive: full-resolution Pillow decode + resize + encode (no DCT-scaled decoding), for reference;
- build_shards with 1 worker and with 2 workers: the whole tool (scan, fingerprint, encode, tar + index
  writing, sha256, manifest) timed end to end.

Targets: 1 worker >= 0.85 x floor; 2 workers >= 1.7 x 1 worker (this needs 2 idle cores). Prints a table
and writes benchmarks/results/bench_shards.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.build_shards import build_shards  # noqa: E402
from data_tools.sources_images import ImageOptions, encode_image, target_size  # noqa: E402
from data_tools.synth_corpus import generate_corpus  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
IMAGES_PER_STUDY = 1.6  # synth_corpus: PA/AP plus a lateral in ~60 % of studies


def corpus_for(images: int, seed: int, workers: int) -> Path:
    """The cached benchmark corpus (generated on first use)."""
    studies = max(1, math.ceil(images / IMAGES_PER_STUDY))
    path = RESULTS / f"bench_shards_corpus_s{studies}_seed{seed}"
    if not (path / "synth_corpus.json").is_file():
        print(f"generating {studies} studies (~{images} films of 1024-2500 px) in {path} ...", flush=True)
        generate_corpus(path, studies, seed, min_size=1024, max_size=2500, workers=workers, progress=True)
    return path


def floor_loop(paths: list[Path], opts: ImageOptions) -> float:
    t0 = time.perf_counter()
    for path in paths:
        encode_image(path, opts)
    return time.perf_counter() - t0


def naive_loop(paths: list[Path], opts: ImageOptions) -> float:
    t0 = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            img = img.convert("L")
            img = img.resize(target_size(*img.size, opts.image_size), Image.Resampling.BICUBIC)
            img.save(io.BytesIO(), format="JPEG", quality=opts.jpeg_quality)
    return time.perf_counter() - t0


def tool_run(corpus: Path, out: Path, workers: int, image_size: int) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = build_shards(
        "mimic-cxr",
        corpus,
        out,
        image_size=image_size,
        workers=workers,
        views=None,
        shard_size=500,
        progress=False,
    )
    return time.perf_counter() - t0, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1200, help="films in the generated corpus (about)")
    p.add_argument("--image-size", type=int, default=512, help="shorter side of the stored JPEGs")
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant; the best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-naive", action="store_true", help="do not time the naive full-decode loop")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)

    corpus = corpus_for(args.images, args.seed, workers=os.cpu_count() or 1)
    paths = sorted((corpus / "files").rglob("*.jpg"))
    n = len(paths)
    for path in paths:  # page cache warm for every variant
        path.read_bytes()
    opts = ImageOptions(image_size=args.image_size)
    out = RESULTS / "bench_shards_out"

    times: dict[str, float] = {}
    written = None
    for _ in range(args.repeats):
        times["floor"] = min(times.get("floor", math.inf), floor_loop(paths, opts))
        if not args.skip_naive:
            times["naive"] = min(times.get("naive", math.inf), naive_loop(paths, opts))
        for workers in (1, 2):
            seconds, summary = tool_run(corpus, out, workers, args.image_size)
            times[f"w{workers}"] = min(times.get(f"w{workers}", math.inf), seconds)
            written = summary["written"]
    shutil.rmtree(out, ignore_errors=True)
    assert written == n, f"the tool wrote {written} of {n} images"

    rate = {k: n / v for k, v in times.items()}
    rows = [("floor: encode_image plain loop", "floor", None)]
    if "naive" in rate:
        rows.append(("naive: full decode+resize+encode", "naive", rate["naive"] / rate["floor"]))
    rows += [
        ("build_shards --workers 1", "w1", rate["w1"] / rate["floor"]),
        ("build_shards --workers 2", "w2", rate["w2"] / rate["floor"]),
    ]
    print(f"\nshard building, {n} films 1024-2500 px -> {args.image_size} px, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'variant':36s} {'seconds':>8s} {'images/s':>9s} {'x floor':>8s}")
    for label, key, ratio in rows:
        print(f"{label:36s} {times[key]:8.2f} {rate[key]:9.1f} {'1.00' if ratio is None else f'{ratio:.2f}':>8s}")
    r1, r21 = rate["w1"] / rate["floor"], rate["w2"] / rate["w1"]
    print(f"1 worker / floor    = {r1:.2f}  (target >= 0.85: {'met' if r1 >= 0.85 else 'NOT met'})")
    print(f"2 workers / 1 worker = {r21:.2f}  (target >= 1.70: {'met' if r21 >= 1.7 else 'NOT met'})")

    result = {
        "benchmark": "bench_shards",
        "images": n,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "seconds": times,
        "images_per_s": rate,
        "ratio_w1_over_floor": r1,
        "ratio_w2_over_w1": r21,
        "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    (RESULTS / "bench_shards.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'bench_shards.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
