"""MPMA forward+backward throughput, achieved FLOP/s vs the measured matmul peak, and peak memory (SPEC §8).

    python benchmarks/bench_model.py [--models mpma_tiny mpma_small] [--steps 5] [--dtypes fp32 bf16]

For each model and precision (fp32, bf16 autocast) it measures samples/s of one training step
(forward + backward + AdamW step) of:

- efficient: the defaults (SDPA attention, masked-only MLM head, visible-only ViT, masked-only MAE
  prediction), activation checkpointing off;
- baseline: the same model with those switches off (eager attention, full-vocabulary MLM head, ViT on all
  patches, MAE prediction on all patches).

Model FLOPs per sample are counted with `torch.utils.flop_counter.FlopCounterMode` on the efficient model
(`mpma_ds.models.flops.training_flops_per_sample`); both variants are credited with that same useful work,
so "achieved" is model FLOP/s (as in MFU) and the ratio is the throughput ratio. The peak is the best
(N x N) @ (N x N) matmul rate measured in the same run, per precision. Peak memory of one step with
activation checkpointing on vs off is measured in a fresh subprocess each (CPU: growth of the kernel's
high-water RSS over the step, reset before it; CUDA: `torch.cuda.max_memory_allocated`).

Kernels (issue 14), fp32, on a batch of ragged reports (lengths drawn in [L/3, L]): "today" =
``kernel_impl="reference"`` with the text padded to L; "kernels" = ``kernel_impl="auto"`` (chunked on CPU,
Triton on CUDA) with the text cut to the batch's longest report rounded up to 8 (dynamic padding); with
``--compile`` also "kernels+compile" (per-block ``torch.compile``, the first steps compile). Same weights,
same batch; the settings take turns step by step and each reports the median step (load drift on a shared
machine then hits them alike). Writes benchmarks/results/bench_model.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mpma_ds.models import create_model, get_model_config
from mpma_ds.models.flops import training_flops_per_sample

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BASELINE = dict(attn_impl="eager", mlm_masked_only=False, encoder_visible_only=False, mim_masked_only=False)
# batch shape per model: (batch size, text length)
SHAPES = {"mpma_tiny": (16, 64), "mpma_small": (8, 128), "mpma_base": (4, 128)}


def make_batch(model_name: str, device: torch.device, batch_size: int | None = None) -> dict:
    cfg = get_model_config(model_name)
    b, length = SHAPES.get(model_name, (8, 64))
    b = batch_size or b
    length = min(length, cfg.max_text_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.vocab_size, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    selected = torch.rand(b, length, generator=g) < 0.15
    selected[:, 0] = selected[:, -1] = False
    batch = {
        "image": torch.randn(b, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g),
        "input_ids": ids.masked_fill(selected, 4),
        "attention_mask": torch.ones(b, length, dtype=torch.long),
        "mlm_labels": torch.where(selected, ids, torch.full_like(ids, -100)),
    }
    return {k: v.to(device) for k, v in batch.items()}


def ragged_batch(model_name: str, device: torch.device) -> tuple[dict, dict]:
    """(fixed, dynamic): one batch of reports of random lengths in [L/3, L], padded to L and cut to the
    longest rounded up to 8 (what the loader gives with ``data.dynamic_padding``)."""
    batch = make_batch(model_name, device)
    b, length = batch["input_ids"].shape
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(length // 3, length + 1, (b,), generator=g).to(device)
    real = torch.arange(length, device=device)[None, :] < lengths[:, None]
    fixed = {
        "image": batch["image"],
        "input_ids": batch["input_ids"].masked_fill(~real, 0),
        "attention_mask": real.long(),
        "mlm_labels": batch["mlm_labels"].masked_fill(~real, -100),
    }
    width = min(length, -(-int(lengths.max()) // 8) * 8)
    dynamic = {k: (v[:, :width].contiguous() if v.ndim == 2 else v) for k, v in fixed.items()}
    return fixed, dynamic


def kernel_rows(name: str, device: torch.device, steps: int, compile_too: bool) -> list[dict]:
    """Samples/s of today's code vs the kernels (+ dynamic padding, + compile) on the same ragged batch."""
    from mpma_ds.training.compile import compile_blocks

    fixed, dynamic = ragged_batch(name, device)
    today = create_model(name, grad_checkpointing=False, kernel_impl="reference").to(device)
    settings = [
        ("today", today, fixed),
        ("kernels", create_model(name, grad_checkpointing=False).to(device), dynamic),
    ]
    if compile_too:
        compiled = create_model(name, grad_checkpointing=False).to(device)
        compile_blocks(compiled, True)
        settings.append(("kernels+compile", compiled, dynamic))
    for _, model, _ in settings[1:]:
        model.load_state_dict(today.state_dict())
    # the settings take turns step by step (median of each), so a load change on a shared machine hits all alike
    opts = {setting: torch.optim.AdamW(model.parameters(), lr=1e-4) for setting, model, _ in settings}
    times: dict[str, list[float]] = {setting: [] for setting, _, _ in settings}
    gen = torch.Generator(device=device).manual_seed(0)
    warmup = 2 if compile_too else 1  # compiled blocks compile (forward, then backward) in the first steps
    for i in range(steps + warmup):
        for setting, model, batch in settings:
            sync(device)
            t0 = time.perf_counter()
            model(batch, generator=gen)["loss"].backward()
            opts[setting].step()
            opts[setting].zero_grad(set_to_none=True)
            sync(device)
            if i >= warmup:
                times[setting].append(time.perf_counter() - t0)
    rows = []
    for setting, _, batch in settings:
        sps = batch["image"].shape[0] / statistics.median(times[setting])
        rows.append({"model": name, "setting": setting, "text_len": batch["input_ids"].shape[1], "samples_s": sps})
        print(f"  {name} {setting}: {sps:.2f} samples/s (text length {batch['input_ids'].shape[1]})", flush=True)
    for r in rows:
        r["vs_today"] = r["samples_s"] / rows[0]["samples_s"]
    return rows


def autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: str, device: torch.device, n: int = 1024, seconds: float = 2.0) -> float:
    """Best achieved FLOP/s of an (n x n) @ (n x n) matmul in `dtype` (bf16 = bf16 inputs)."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def time_steps(model, batch: dict, dtype: str, device: torch.device, steps: int) -> float:
    """Samples/s of full training steps (forward, backward, AdamW), best of `steps` after one warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    best = float("inf")
    for i in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        with autocast(dtype, device):
            loss = model(batch, generator=gen)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i > 0:  # step 0 is the warm-up
            best = min(best, time.perf_counter() - t0)
    return batch["image"].shape[0] / best


def peak_memory_child(model_name: str, checkpointing: bool, device_name: str) -> None:
    """Run in a subprocess: print the extra peak memory (bytes) of one training step as JSON."""
    device = torch.device(device_name)
    model = create_model(model_name, grad_checkpointing=checkpointing).to(device)
    batch = make_batch(model_name, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    loss = model(batch, generator=torch.Generator(device=device).manual_seed(0))["loss"]
    loss.backward()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    print(json.dumps({"peak_bytes": peak}))


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(model_name: str, checkpointing: bool, device: torch.device) -> float:
    cmd = [sys.executable, __file__, "--_memory-child", model_name, str(int(checkpointing)), str(device)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_info(device: torch.device) -> dict:
    """Where a benchmark ran: device, CPU, torch version and threads (the head of each results JSON)."""
    return {
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mpma_tiny", "mpma_small"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (best is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_model.json")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernels vs today comparison")
    parser.add_argument("--only-kernels", action="store_true", help="run only the kernels vs today comparison")
    parser.add_argument("--compile", action="store_true", help="kernels comparison: add per-block torch.compile")
    parser.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        name, ckpt, device_name = args._memory_child
        peak_memory_child(name, ckpt == "1", device_name)
        return

    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    peaks = {d: matmul_peak(d, device) for d in args.dtypes}
    for d, p in peaks.items():
        print(f"measured matmul peak {d}: {p / 1e9:.1f} GFLOP/s", flush=True)

    krows = []
    if not args.no_kernels:
        for name in args.models:
            krows += kernel_rows(name, device, args.steps, args.compile)
        print(f"\n{'model':<12} {'setting':<16} {'text len':>8} {'smp/s':>8} {'vs today':>8}")
        for r in krows:
            print(
                f"{r['model']:<12} {r['setting']:<16} {r['text_len']:>8} {r['samples_s']:>8.2f} {r['vs_today']:>7.2f}x"
            )
    if args.only_kernels:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = args.out.with_name(args.out.stem + "_kernels.json")
        out.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "kernels": krows,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nwrote {out}")
        return

    rows = []
    for name in args.models:
        batch = make_batch(name, device)
        fast = create_model(name, grad_checkpointing=False).to(device)
        slow = create_model(name, grad_checkpointing=False, **BASELINE).to(device)
        slow.load_state_dict(fast.state_dict())
        flops = training_flops_per_sample(fast, batch)
        counts = fast.parameter_counts()
        for dtype in args.dtypes:
            sps_fast = time_steps(fast, batch, dtype, device, args.steps)
            sps_slow = time_steps(slow, batch, dtype, device, args.steps)
            row = {
                "model": name,
                "dtype": dtype,
                "batch": list(batch["input_ids"].shape),
                "params_M": counts["total"] / 1e6,
                "flops_per_sample_G": flops / 1e9,
                "samples_s": sps_fast,
                "baseline_samples_s": sps_slow,
                "speedup": sps_fast / sps_slow,
                "achieved_GFLOPs": sps_fast * flops / 1e9,
                "frac_of_peak": sps_fast * flops / peaks[dtype],
                "baseline_frac_of_peak": sps_slow * flops / peaks[dtype],
            }
            rows.append(row)
            print(f"  {name} {dtype}: {sps_fast:.2f} samples/s vs baseline {sps_slow:.2f}", flush=True)
        del fast, slow

    mem = []
    for name in args.models:
        off, on = peak_memory(name, False, device), peak_memory(name, True, device)
        mem.append(
            {"model": name, "peak_MiB_ckpt_off": off / 2**20, "peak_MiB_ckpt_on": on / 2**20, "ratio": on / off}
        )

    print()
    print(
        "model FLOPs by torch.utils.flop_counter.FlopCounterMode (fwd+bwd, efficient model); peak = measured matmul"
    )
    head = (
        f"{'model':<12} {'dtype':<5} {'batch':>9} {'params':>8} {'GFLOP/smp':>9} {'smp/s':>8} {'base smp/s':>10} "
    )
    head += f"{'speedup':>7} {'GFLOP/s':>8} {'of peak':>8} {'base of peak':>12}"
    print(head)
    for r in rows:
        print(
            f"{r['model']:<12} {r['dtype']:<5} {'x'.join(map(str, r['batch'])):>9} {r['params_M']:>7.1f}M "
            f"{r['flops_per_sample_G']:>9.2f} {r['samples_s']:>8.2f} {r['baseline_samples_s']:>10.2f} "
            f"{r['speedup']:>6.2f}x {r['achieved_GFLOPs']:>8.1f} {r['frac_of_peak']:>8.1%} {r['baseline_frac_of_peak']:>12.1%}"
        )
    print()
    print(f"{'model':<12} {'peak MiB ckpt off':>17} {'peak MiB ckpt on':>16} {'on/off':>7}")
    for m in mem:
        print(
            f"{m['model']:<12} {m['peak_MiB_ckpt_off']:>17.1f} {m['peak_MiB_ckpt_on']:>16.1f} {m['ratio']:>7.2f}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **run_info(device),
        "flop_count": "torch.utils.flop_counter.FlopCounterMode, forward+backward of the efficient model",
        "matmul_peak_flops": peaks,
        "throughput": rows,
        "memory": mem,
        "kernels": krows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
