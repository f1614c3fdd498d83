"""The data path at cluster scale, measured in one run on loopback stores:

- **loader throughput** from an S3-compatible server (moto's server mode, its own process) and from
  ``python -m http.server`` vs local disk, ``wds`` and ``dali`` (CPU pipeline), train transforms on:
  samples/s of one rank after warm-up, the ratio to local disk, and the seconds from building the loader to
  its first batch (where the DALI cache path fetches the rank's shards of the epoch). For ``dali`` over S3
  both ways are measured: our node cache (``data.dali_remote=cache``) and DALI's own S3 client
  (``direct``);
- **a 3-source mixture** at weights 6:3:1 over 10k samples per epoch: each source's share, and whether a
  loader resumed at a random step reproduces the uninterrupted sample sequence;
- **a split build**: 2 parts + the merge (the second part writes the manifest) vs one machine, wall time and
  byte identity.

    python benchmarks/bench_remote.py [--studies 60] [--batches 12] [--workers 2]

JSON goes to ``benchmarks/results/bench_remote.json``; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from data_tools import remote
from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer
from mpma_ds import load_tokenizer
from mpma_ds.data import DataConfig, build_loader
from mpma_ds.data.config import TrainSource
from mpma_ds.data.mixture import Mixture, mixture_stream
from mpma_ds.data.shards import load_shard_index

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()  # noqa: S310 - loopback
            return proc
        except OSError as err:
            if getattr(err, "code", None):
                return proc
            time.sleep(0.1)
    raise RuntimeError(f"{cmd[0]} did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def rate(cfg: DataConfig, tokenizer, batch_size: int, batches: int) -> tuple[float, float]:
    """``(samples/s, first batch s)`` of rank 0 of 1: the rate over ``batches`` train batches after 2 warm-up
    batches, and the seconds from building the loader to its first batch."""
    t0 = time.perf_counter()
    info = build_loader(cfg, 0, 1, batch_size=batch_size, tokenizer=tokenizer, seed=0)
    it = iter(info.loader)
    next(it)
    first = time.perf_counter() - t0
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    info.close()
    return batches * batch_size / seconds, first


def mixture_figures(shards: Path, tokenizer) -> dict:
    """6:3:1 over 10k samples: shares from the plan; exact resume of the loader at a random step."""
    counts = [100] * 7 + [150, 150] + [90]
    mix = Mixture(("a", "b", "c"), (6.0, 3.0, 1.0), ((0, 7), (7, 9), (9, 10)))
    starts = np.cumsum([0] + counts)
    stream = mixture_stream(counts, mix, epoch=0, seed=1, epoch_length=10_000)
    sources = mix.source_of_shard()[np.searchsorted(starts, stream, side="right") - 1]
    share = (np.bincount(sources, minlength=3) / len(stream)).round(4).tolist()
    tars = [str(p) for p in load_shard_index(str(shards / "train")).paths]
    third = max(1, len(tars) // 3)
    srcs = [TrainSource(name=n, shards=",".join(p), weight=w) for n, p, w in
            zip("abc", (tars[:third], tars[third : 2 * third], tars[2 * third :]), (6, 3, 1))]  # fmt: skip
    cfg = DataConfig(backend="wds", train_sources=srcs, image_size=64, max_text_len=48, num_workers=0)

    def keys(info, n):
        it = iter(info.loader)
        return [tuple(next(it)["key"]) for _ in range(n)]

    full = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=3)
    total = full.steps_per_epoch * 2
    reference = keys(full, total)
    full.close()
    step = int(np.random.default_rng().integers(1, total - 1))
    first = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=3)
    keys(first, step)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=3)
    resumed.load_state_dict(state)
    same = keys(resumed, total - step) == reference[step:]
    resumed.close()
    return {"target": [0.6, 0.3, 0.1], "share": share, "max_error": float(np.abs(np.array(share) - [0.6, 0.3, 0.1]).max()),
            "resume_step": step, "resume_identical": same}  # fmt: skip


def split_build_figures(corpus: Path, tmp: Path, size: int) -> dict:
    opts = dict(shard_size=8, image_size=size, views=None, progress=False)
    t0 = time.perf_counter()
    build_shards("mimic-cxr", corpus, tmp / "one", **opts)
    one = time.perf_counter() - t0
    times = []
    for rank in (1, 0):
        t0 = time.perf_counter()
        build_shards("mimic-cxr", corpus, tmp / "parts", num_nodes=2, node_rank=rank, **opts)
        times.append(time.perf_counter() - t0)

    def files(root: Path) -> dict:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    return {"one_machine_s": round(one, 2), "part_s": [round(t, 2) for t in times],
            "parallel_wall_s": round(max(times), 2), "byte_identical": files(tmp / "one") == files(tmp / "parts")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=60, help="synthetic studies in the shard set")
    parser.add_argument("--image-size", type=int, default=256, help="stored JPEG size of the shards")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=2, help="wds DataLoader workers / DALI threads")
    parser.add_argument("--backends", default="wds,dali")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_remote.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus"
        generate_corpus(corpus, args.studies, 7, min_size=args.image_size + 32, max_size=args.image_size + 96)
        shards = tmp / "shards"
        build_shards("mimic-cxr", corpus, shards, shard_size=16, image_size=args.image_size, views=None,
                     progress=False)  # fmt: skip
        train_tokenizer(shards, tmp / "tok", vocab_size=500, min_frequency=1)
        tokenizer = load_tokenizer(tmp / "tok")

        s3_port, http_port = free_port(), free_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
        moto = start(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(s3_port)], s3_port
        )
        http = start([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1", "--directory",
                      str(shards)], http_port)  # fmt: skip
        rows = []
        try:
            fs, _ = remote.filesystem("s3://bench")
            fs.mkdir("bench")
            for path in sorted(shards.rglob("*")):
                if path.is_file():
                    remote.upload(path, f"s3://bench/shards/{path.relative_to(shards).as_posix()}")
            n = len(load_shard_index(str(shards / "train")).paths)
            stores = {
                "local": str(shards / "train"),
                "s3": "s3://bench/shards/train/",
                "http": f"http://127.0.0.1:{http_port}/train/shard-{{000000..{n - 1:06d}}}.tar",
            }
            runs = [(b, store, "cache") for b in args.backends.split(",") for store in stores]
            if "dali" in args.backends.split(","):
                runs.append(("dali", "s3", "direct"))
            for backend, store, how in runs:
                cache = tmp / f"cache-{backend}-{store}"
                cfg = DataConfig(backend=backend, train_shards=stores[store], image_size=224, max_text_len=64,
                                 num_workers=args.workers, shard_cache=str(cache), dali_decode="cpu",
                                 dali_remote=how, rotation_degrees=5.0)  # fmt: skip
                try:
                    value, first = rate(cfg, tokenizer, args.batch_size, args.batches)
                except ImportError as err:
                    print(f"skip {backend}: {err}", file=sys.stderr)
                    continue
                name = store if backend == "wds" or store == "local" else f"{store} ({how})"
                rows.append({"backend": backend, "store": name, "samples_per_s": round(value, 1),
                             "first_batch_s": round(first, 2)})  # fmt: skip
                print(rows[-1], file=sys.stderr)
        finally:
            stop(http)
            stop(moto)
        local = {r["backend"]: r["samples_per_s"] for r in rows if r["store"] == "local"}
        for r in rows:
            r["vs_local"] = round(r["samples_per_s"] / local[r["backend"]], 3)
        mixture = mixture_figures(shards, tokenizer)
        split = split_build_figures(corpus, tmp, args.image_size)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "throughput": rows,
        "mixture": mixture,
        "split_build": split,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| backend | store | samples/s | vs local | first batch s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['store']} | {r['samples_per_s']} | {r['vs_local']:.2f}x | {r['first_batch_s']} |"
        )
    print(f"\nmixture 6:3:1 over 10k: shares {mixture['share']} (max error {mixture['max_error']:.4f}); "
          f"resume at step {mixture['resume_step']}: identical={mixture['resume_identical']}")  # fmt: skip
    print(f"split build: one machine {split['one_machine_s']} s; parts {split['part_s']} s (parallel wall "
          f"{split['parallel_wall_s']} s); byte identical={split['byte_identical']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
