"""What the bf16 matmul peak is at the GEMM shapes the base step runs, beside the 1024² peak bench_step divides by.

    python benchmarks/bench_gemm_shapes.py [--threads N] [--seconds 0.5]

For each linear layer shape of ``mpma_base``'s bench step (batch 8: 8 x 82 visible-patch tokens in the ViT, 8 x 64
text tokens, 8 x 325 tokens in the MAE decoder, 80 masked tokens x an 8192-word chunk of the MLM head) and of
open_clip ViT-B/16's (8 x 197 image tokens, 8 x 77 text tokens at width 512), it times the three GEMMs a training
step runs per layer — forward ``x @ W.T``, input gradient ``dY @ W``, weight gradient ``dY.T @ x`` — on bf16
operands, and the forward as autocast runs it over an fp32 weight (the weight's cast to bf16 included), plus the
attention score matmuls. Best of repeated calls (a shared machine's load only slows calls down). Figures are
GFLOP/s and the fraction of the 1024² peak measured in the same run. Writes benchmarks/results/bench_gemm_shapes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

LINEARS = {  # name: (rows M, in K, out N)
    "mpma ViT qkv (656 x 768 -> 2304)": (656, 768, 2304),
    "mpma ViT fc1 (656 x 768 -> 3072)": (656, 768, 3072),
    "mpma ViT fc2 (656 x 3072 -> 768)": (656, 3072, 768),
    "mpma text fc1 (512 x 768 -> 3072)": (512, 768, 3072),
    "mpma text q/k/v (512 x 768 -> 768)": (512, 768, 768),
    "mpma decoder fc1 (2600 x 512 -> 2048)": (2600, 512, 2048),
    "mpma decoder fc2 (2600 x 2048 -> 512)": (2600, 2048, 512),
    "mpma MLM chunk (80 x 768 -> 8192)": (80, 768, 8192),
    "open_clip ViT fc1 (1576 x 768 -> 3072)": (1576, 768, 3072),
    "open_clip ViT fc2 (1576 x 3072 -> 768)": (1576, 3072, 768),
    "open_clip text fc1 (616 x 512 -> 2048)": (616, 512, 2048),
}
ATTENTION = {  # name: (batch x heads, query len, key len, head dim)
    "mpma ViT q @ k.T (96 x 82 x 82 x 64)": (96, 82, 82, 64),
    "mpma decoder q @ k.T (128 x 325 x 325 x 32)": (128, 325, 325, 32),
    "open_clip ViT q @ k.T (96 x 197 x 197 x 64)": (96, 197, 197, 64),
}


def best_rate(fn: Callable[[], object], flops: float, seconds: float) -> float:
    """FLOP/s of the fastest call of ``fn`` within ``seconds`` (after one warm-up call)."""
    fn()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def linear_rates(m: int, k: int, n: int, seconds: float) -> dict[str, float]:
    """FLOP/s of forward, input gradient, weight gradient (bf16) and autocast's forward over an fp32 weight."""
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    dy = torch.randn(m, n, dtype=torch.bfloat16)
    x32, w32, b32 = x.float(), w.float(), torch.zeros(n)
    flops = 2.0 * m * k * n

    def autocast_fwd() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.linear(x32, w32, b32)

    return {
        "fwd": best_rate(lambda: F.linear(x, w), flops, seconds),
        "dgrad": best_rate(lambda: dy @ w, flops, seconds),
        "wgrad": best_rate(lambda: dy.t() @ x, flops, seconds),
        "autocast_fwd": best_rate(autocast_fwd, flops, seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_gemm_shapes.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    peak = best_rate(lambda: a @ a, 2.0 * 1024**3, 2 * args.seconds)
    print(f"threads {torch.get_num_threads()}, 1024² bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s")
    print(f"\n{'linear layer':<42} {'fwd':>12} {'dgrad':>12} {'wgrad':>12} {'autocast fwd':>13}")
    rows = {}
    for name, (m, k, n) in LINEARS.items():
        rows[name] = r = linear_rates(m, k, n, args.seconds)
        cells = " ".join(f"{r[c] / 1e9:>6.0f} {r[c] / peak:>4.0%}" for c in ("fwd", "dgrad", "wgrad"))
        print(f"{name:<42} {cells} {r['autocast_fwd'] / 1e9:>7.0f} {r['autocast_fwd'] / peak:>4.0%}")
    print(f"\n{'attention scores (bf16 bmm)':<42} {'GFLOP/s':>12}")
    for name, (bh, lq, lk, hd) in ATTENTION.items():
        q, kk = torch.randn(bh, lq, hd, dtype=torch.bfloat16), torch.randn(bh, lk, hd, dtype=torch.bfloat16)
        rate = best_rate(lambda q=q, kk=kk: q @ kk.transpose(1, 2), 2.0 * bh * lq * lk * hd, args.seconds)
        rows[name] = {"fwd": rate}
        print(f"{name:<42} {rate / 1e9:>6.0f} {rate / peak:>4.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"threads": torch.get_num_threads(), "peak_1024_bf16_flops": peak, "flops_per_s": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
