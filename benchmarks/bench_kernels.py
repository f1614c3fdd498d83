"""Time and peak memory of each `mpma_ds.kernels` implementation against its reference, over sizes.

    python benchmarks/bench_kernels.py [--batches 16 32 64 128] [--rows 256 614 1024] [--repeats 2]

- late interaction: the local loss (symmetric InfoNCE of 0.5 * (t2p + p2t)) forward + backward at the base
  recipe's shapes (L 128 tokens, K 72 visible patches, E 256) for B = 16 .. 128;
- MLM cross-entropy: ``linear_cross_entropy`` forward + backward at vocab 50,265, D 768 (mpma_base's tied
  head) for N masked tokens (614 = the base recipe's per-GPU batch 32 x 128 tokens x 15 %).

Implementations: ``reference`` and ``chunked`` everywhere, ``triton`` on CUDA. Each row reports the best time
of ``--repeats`` runs, the peak memory the run allocated beyond its inputs, and the largest difference of the
loss and the input gradients from the reference (equal results). Peak memory — CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; CPU: ``torch.profiler`` with
``profile_memory=True``: every allocation and free of torch's CPU allocator is an event with its byte count,
their running sum in time order is the live memory and its maximum is the peak (exact, unlike RSS, which
glibc's caching and the OS's paging blur; tracemalloc does not see torch's allocator). Writes
benchmarks/results/bench_kernels.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpma_ds.kernels import late_interaction_scores, linear_cross_entropy

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory ``fn()`` allocates beyond what is live when it starts (module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def late_case(batch: int, device: torch.device, dtype: torch.dtype, length=128, patches=72, dim=256):
    g = torch.Generator().manual_seed(batch)
    text = F.normalize(torch.randn(batch, length, dim, generator=g), dim=-1).to(device, dtype)
    image = F.normalize(torch.randn(batch, patches, dim, generator=g), dim=-1).to(device, dtype)
    lengths = torch.randint(length // 3, length, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(device)

    def run(impl: str):
        t = text.detach().requires_grad_()
        p = image.detach().requires_grad_()
        t2p, p2t = late_interaction_scores(t, mask, p, None, impl=impl)
        logits = (0.5 * (t2p + p2t)).float() / 0.07
        target = torch.arange(batch, device=device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        loss.backward()
        return [loss.detach().float(), t.grad.float(), p.grad.float()]

    return run


def ce_case(rows: int, device: torch.device, dtype: torch.dtype, vocab=50265, dim=768):
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, dim, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=g) * 0.02).to(device, dtype)
    bias = torch.zeros(vocab).to(device, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)

    def run(impl: str):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        b = bias.detach().requires_grad_()
        loss = linear_cross_entropy(h, w, b, labels, impl=impl)
        loss.backward()
        return [loss.detach().float(), h.grad.float(), w.grad.float(), b.grad.float()]

    return run


def measure(
    kernel: str, size: int, run, impls: list[str], device: torch.device, repeats: int, given_bytes: int = 0
) -> list[dict]:
    """Rows of one kernel at one size; ``given_bytes``: memory every implementation must allocate (the
    weight gradient it returns), reported apart as ``work_MiB`` = peak - given."""
    ref = run("reference")
    rows = []
    for impl in impls:
        got = ref if impl == "reference" else run(impl)
        diff = max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True))
        del got
        seconds = best_seconds(lambda impl=impl: run(impl), device, repeats)
        peak = peak_bytes(lambda impl=impl: run(impl), device)
        rows.append({"kernel": kernel, "size": size, "impl": impl, "ms": seconds * 1e3, "peak_MiB": peak / 2**20,
                     "work_MiB": (peak - given_bytes) / 2**20, "max_abs_diff": diff})  # fmt: skip
        print(f"  {kernel} {size} {impl}: {seconds * 1e3:.1f} ms, peak {peak / 2**20:.1f} MiB, diff {diff:.1e}",
              flush=True)  # fmt: skip
    del ref
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="*", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--rows", nargs="*", type=int, default=[256, 614, 1024])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is kept)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_kernels.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    impls = ["reference", "chunked"] + (["triton"] if device.type == "cuda" else [])
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}", flush=True
    )

    rows = []
    for b in args.batches:
        rows += measure("late_interaction", b, late_case(b, device, dtype), impls, device, args.repeats)
    for n in args.rows:
        # the (V, D) weight gradient is returned by every implementation (and a tied embedding holds one anyway)
        grad_bytes = 50265 * 768 * (2 if dtype == torch.bfloat16 else 4)
        rows += measure("linear_ce", n, ce_case(n, device, dtype), impls, device, args.repeats, grad_bytes)

    ref = {(r["kernel"], r["size"]): r for r in rows if r["impl"] == "reference"}
    prev: dict[tuple[str, str], dict] = {}
    for r in rows:
        base = ref[(r["kernel"], r["size"])]
        r["time_vs_ref"] = r["ms"] / base["ms"]
        r["mem_vs_ref"] = r["peak_MiB"] / base["peak_MiB"] if base["peak_MiB"] else float("nan")
        r["work_vs_ref"] = r["work_MiB"] / base["work_MiB"] if base["work_MiB"] > 0 else float("nan")
        before = prev.get((r["kernel"], r["impl"]))
        # growth of the peak from the previous size: ~2 when linear in a doubled B, ~4 when quadratic
        r["mem_growth"] = r["peak_MiB"] / before["peak_MiB"] if before and before["peak_MiB"] else None
        prev[(r["kernel"], r["impl"])] = r

    print()
    print("late_interaction: local loss fwd+bwd, L 128, K 72, E 256 (size = B); linear_ce: vocab 50265, D 768 "
          "(size = rows). peak = torch.profiler allocator events (CPU) / max_memory_allocated (CUDA)")  # fmt: skip
    print("work = peak - the (V, D) weight gradient every CE implementation returns (late interaction: = peak)")
    head = f"{'kernel':<17} {'size':>5} {'impl':<9} {'ms':>9} {'x ref':>6} {'peak MiB':>9} {'x ref':>6}"
    print(head + f" {'work MiB':>9} {'x ref':>6} {'growth':>7} {'max|diff|':>9}")
    for r in rows:
        growth = f"{r['mem_growth']:.2f}" if r["mem_growth"] else "-"
        print(f"{r['kernel']:<17} {r['size']:>5} {r['impl']:<9} {r['ms']:>9.1f} {r['time_vs_ref']:>6.2f} "
              f"{r['peak_MiB']:>9.1f} {r['mem_vs_ref']:>6.3f} {r['work_MiB']:>9.1f} {r['work_vs_ref']:>6.3f} "
              f"{growth:>7} {r['max_abs_diff']:>9.1e}")  # fmt: skip

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "peak_memory": "CUDA: max_memory_allocated; CPU: torch.profiler profile_memory allocator events",
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
