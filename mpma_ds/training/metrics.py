"""Throughput, model FLOP utilisation, data-wait and memory figures of the training loop."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

from data_tools import remote
from mpma_ds.data.plan import BYTES, RETRIES
from mpma_ds.distributed import all_reduce_sum

# Dense bf16 tensor-core peaks (no sparsity) in FLOP/s, by a fragment of torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "V100": 125e12,
}
_CPU_PEAK: float | None = None


def measure_cpu_matmul_flops(size: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of fp32 ``size × size`` matmuls on this process's CPU threads (the CPU's practical peak)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2.0 * size**3 * n / (time.perf_counter() - t0)


def device_peak_flops(device: torch.device) -> float:
    """The peak FLOP/s utilisation is measured against: a known dense bf16 GPU peak (H100: 989 TFLOP/s), or
    on CPU a matmul measured once per process."""
    global _CPU_PEAK
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_PEAK_FLOPS.items():
            if fragment in name:
                return peak
        return 989e12
    if _CPU_PEAK is None:
        _CPU_PEAK = measure_cpu_matmul_flops()
    return _CPU_PEAK


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def source_counters(loaders: list[Any], sources: list[Any]) -> dict[str, float]:
    """For a mixture (``data.train_sources``), ``data/samples/<name>``: the samples drawn from each source so
    far, summed over a rank's streams and over ranks (collective; every rank has the same sources)."""
    if not sources:
        return {}
    stats = [loader.stats() for loader in loaders]
    keys = [f"samples/{s.name}" for s in sources]
    counts = all_reduce_sum(torch.tensor([float(sum(st.get(k, 0) for st in stats)) for k in keys])).tolist()
    return {f"data/{k}": n for k, n in zip(keys, counts)}


def remote_counters(loaders: list[Any]) -> dict[str, float]:
    """For remote shards, ``data/remote_retries`` and ``data/remote_bytes``: the transient store faults retried
    and the bytes read from the store while making the training batches so far, summed over a rank's streams
    and over ranks (collective; every rank reads the same kind of shards)."""
    indexes = [getattr(loader.loader, "index", None) for loader in loaders]
    if not any(remote.is_remote(p) for index in indexes if index is not None for p in index.paths):
        return {}
    stats = [loader.stats() for loader in loaders]
    keys = (RETRIES, BYTES)
    counts = all_reduce_sum(torch.tensor([float(sum(st.get(k, 0) for st in stats)) for k in keys])).tolist()
    return {f"data/{k}": n for k, n in zip(keys, counts)}


class StepMeter:
    """Rates since the last ``rates()`` call: samples/s, tokens/s, model FLOP/s, MFU, data-wait fraction."""

    def __init__(self, *, flops_per_sample: float, peak_flops: float) -> None:
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0.0
        self.tokens = 0.0
        self.wait = 0.0

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds

    def add_samples(self, samples: float, tokens: float) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        flops = self.flops_per_sample * self.samples / elapsed
        out = {
            "samples_per_s": self.samples / elapsed,
            "tokens_per_s": self.tokens / elapsed,
            "model_flops_per_s": flops,
            "mfu": flops / self.peak_flops if self.peak_flops else 0.0,
            "data_wait_frac": min(1.0, self.wait / elapsed),
        }
        self._reset()
        return out
