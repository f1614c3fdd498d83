"""How fast does MPMA learn image-report alignment under each GLA setting? (one process, CPU or GPU)

Trains `mpma_tiny` from scratch for `--steps` AdamW steps on built shards (e.g. the demo's) once per
variant, then evaluates retrieval R@K and zero-shot CheXpert AUROC on the validation split. The first
variant ([CLS] pooling, alignment on the masked pass: M3AE's setting) is the baseline of the table.

    python benchmarks/bench_alignment.py --shards demo_runs/shards --tokenizer demo_runs/tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mpma_ds import create_model, load_tokenizer
from mpma_ds.data import build_loader
from mpma_ds.data.config import DataConfig
from mpma_ds.eval.alignment import evaluate_alignment

VARIANTS = {
    "cls+masked (baseline)": {"global_pool": "cls", "align_on": "masked"},
    "mean+masked": {"global_pool": "mean", "align_on": "masked"},
    "mean+full": {"global_pool": "mean", "align_on": "full"},
}
COLUMNS = ("i2t_R@10", "t2i_R@10", "zeroshot_auroc_mean")


def run_variant(overrides: dict, args: argparse.Namespace, cfg: DataConfig, tok) -> dict:
    torch.manual_seed(args.seed)
    model = create_model(args.model, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup, steps = max(1, args.steps // 10), args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    stream = iter(build_loader(cfg, 0, 1, batch_size=args.batch_size, tokenizer=tok, seed=args.seed).loader)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(next(stream))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    val = build_loader(cfg, 0, 1, split="validate", batch_size=64, tokenizer=tok, seed=0, train=False)
    res = evaluate_alignment(model, val.loader, tokenizer=tok, device="cpu", max_text_len=cfg.max_text_len)
    return {**{k: res[k] for k in COLUMNS}, "train_seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard build folder holding train/ and validate/")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--model", default="mpma_tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/bench_alignment.json")
    args = p.parse_args()

    shards = Path(args.shards)
    cfg = DataConfig(
        backend="wds",
        train_shards=str(shards / "train"),
        val_shards=str(shards / "validate"),
        tokenizer=args.tokenizer,
        image_size=128,
        max_text_len=64,
        num_workers=1,
        augment=True,
    )
    tok = load_tokenizer(args.tokenizer)
    results = {name: run_variant(VARIANTS[name], args, cfg, tok) for name in args.variants}

    base = results[args.variants[0]]
    print(f"\n{args.model}, {args.steps} steps x batch {args.batch_size}, lr {args.lr}; validation split")
    print(f"{'variant':<24}" + "".join(f"{c:>22}" for c in COLUMNS) + f"{'train s':>10}")
    for name, r in results.items():
        cells = "".join(f"{r[c]:>14.3f} ({r[c] / max(base[c], 1e-9):4.2f}x)" for c in COLUMNS)
        print(f"{name:<24}{cells}{r['train_seconds']:>10.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
