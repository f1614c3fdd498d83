"""JPEG decode images/s of shard JPEGs: DALI (``mixed`` = nvJPEG on the GPU, or ``cpu``) and, on CUDA,
``torchvision.io.decode_jpeg(device="cuda")`` as the baseline. Part of ``benchmarks/gpu_check.sh``.

    python benchmarks/bench_decode.py SHARD_FOLDER [--device mixed|cpu] [--batch 64] [--seconds 10]

Reads every ``.jpg`` of the folder's ``shard-*.tar`` into memory first (the decode is measured, not the disk),
then decodes batches of ``--batch`` for ``--seconds`` after one warm-up batch. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import numpy as np


def shard_jpegs(folder: Path) -> list[bytes]:
    out = []
    for tar in sorted(folder.glob("shard-*.tar")) or sorted(folder.glob("*/shard-*.tar")):
        with tarfile.open(tar) as t:
            out += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]
    if not out:
        raise SystemExit(f"bench_decode: no .jpg in {folder}/[split/]shard-*.tar; build shards first")
    return out


def dali_rate(jpegs: list[bytes], device: str, batch: int, seconds: float) -> float:
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(j, dtype=np.uint8) for j in jpegs]
    state = {"i": 0}

    def source():
        i = state["i"]
        state["i"] = (i + batch) % len(arrays)
        return [arrays[(i + k) % len(arrays)] for k in range(batch)]

    @pipeline_def(
        batch_size=batch, num_threads=4, device_id=0 if device == "mixed" else None, prefetch_queue_depth=2
    )
    def pipe():
        data = fn.external_source(source=source, dtype=types.UINT8)
        return fn.decoders.image(data, device=device, output_type=types.GRAY)

    p = pipe()
    p.build()
    p.run()  # warm-up (nvJPEG / thread start-up)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.run()  # returns once the batch is decoded (the output stays on the GPU for "mixed")
        done += batch
    return done / (time.perf_counter() - t0)


def torchvision_rate(jpegs: list[bytes], batch: int, seconds: float) -> float:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    chunk = [tensors[k % len(tensors)] for k in range(batch)]
    decode_jpeg(chunk, device="cuda", mode=ImageReadMode.GRAY)
    torch.cuda.synchronize()
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = [tensors[(i + k) % len(tensors)] for k in range(batch)]
        decode_jpeg(chunk, device="cuda", mode=ImageReadMode.GRAY)
        torch.cuda.synchronize()
        i += batch
        done += batch
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--device", choices=["mixed", "cpu"], default="mixed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    jpegs = shard_jpegs(args.shards)
    result = {"images": len(jpegs), "mean_kB": sum(map(len, jpegs)) / len(jpegs) / 1e3, "batch": args.batch}
    try:
        result[f"dali_{args.device}_img_s"] = dali_rate(jpegs, args.device, args.batch, args.seconds)
    except ImportError as err:
        result[f"dali_{args.device}_img_s"] = None
        result["dali_error"] = f"DALI not importable: {err}"
    if args.device == "mixed":
        result["torchvision_cuda_img_s"] = torchvision_rate(jpegs, args.batch, args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
