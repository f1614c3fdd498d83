"""What can the demo's image encoder reach on the synthetic films when it is taught the answer directly? (one process)

Issue 10 asks `make demo`'s pretrained model for a zero-shot CheXpert AUROC >= 0.85. Zero-shot learns from the
reports; here the same image encoder (`--model`, default `mpma_tiny`, with its `patch_stem`) is trained with
binary cross-entropy on the synthetic ground truth itself (`truth[label].present`, the reference of the zero-shot
metric) from the same shards, loader, augmentation and batch size, for each `--steps` budget, and scored on the
validation split exactly as the zero-shot metric is (`zero_shot_auroc`: labels with >= 20 positives and negatives
of the truth, 95 % bootstrap interval). A supervised encoder trained on the labels is an upper bound of what
report supervision buys in the same number of updates: if it stays under a target at the demo's step budget,
the target is out of reach for that encoder and budget, whatever the alignment objective.

    python benchmarks/bench_supervised_bound.py --shards demo_runs/shards --tokenizer demo_runs/tokenizer
    python benchmarks/bench_supervised_bound.py --shards ... --tokenizer ... --stems linear conv --steps 900 1800

Writes benchmarks/results/bench_supervised_bound.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mpma_ds import create_model, load_tokenizer
from mpma_ds.data import build_loader
from mpma_ds.data.config import DataConfig
from mpma_ds.eval.bootstrap import with_intervals
from mpma_ds.eval.zeroshot import CHEXPERT_LABELS, reference_targets, truths_of, zero_shot_auroc


def targets_of(batch: dict) -> torch.Tensor:
    """(B, C) float 1 / 0 / NaN from the batch's `truth` (NaN where a sample's truth does not name a label)."""
    truths = truths_of(batch["meta"])
    if any(t is None for t in truths):
        raise SystemExit("samples without 'truth': build the shards from data_tools.synth_corpus")
    y, _ = reference_targets(np.zeros((len(truths), len(CHEXPERT_LABELS))), truths)
    return torch.as_tensor(y, dtype=torch.float32)


def train_and_score(stem: str, steps: int, args: argparse.Namespace, cfg: DataConfig, tok) -> dict:
    torch.manual_seed(args.seed)
    model = create_model(args.model, patch_stem=stem)
    encoder = model.image_encoder
    head = torch.nn.Linear(model.config.vision_width, len(CHEXPERT_LABELS))
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    warmup = max(1, steps // 30)  # the demo's 30 warm-up steps of 900
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    stream = iter(build_loader(cfg, 0, 1, batch_size=args.batch_size, tokenizer=tok, seed=args.seed).loader)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(stream)
        keep = torch.as_tensor(batch["valid"]).bool()
        y = targets_of(batch)[keep]
        logits = head(model.image_features(batch["image"][keep]))
        known = ~torch.isnan(y)
        loss = F.binary_cross_entropy_with_logits(logits[known], y[known])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    scores, targets = [], []
    val = build_loader(cfg, 0, 1, split="validate", batch_size=64, tokenizer=tok, seed=0, train=False)
    with torch.no_grad():
        for batch in val.loader:
            keep = torch.as_tensor(batch["valid"]).bool()
            scores.append(head(model.image_features(batch["image"][keep])))
            targets.append(targets_of(batch)[keep])
    s, t = torch.cat(scores).numpy(), torch.cat(targets).numpy()
    res = with_intervals(zero_shot_auroc, s, t, n_resamples=args.bootstrap, reference="truth")
    return {"auroc": res["zeroshot_auroc_mean"], "ci95": res["zeroshot_auroc_mean_ci95"],
            "labels": res["zeroshot_labels"], "images": len(s), "train_seconds": seconds,
            "per_label": {k.split("/", 1)[1]: v for k, v in res.items()
                          if k.startswith("zeroshot_auroc/") and not k.endswith("_ci95")}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard build folder with train/ and validate/ (with truth)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (the loader tokenises the reports)")
    p.add_argument("--model", default="mpma_tiny")
    p.add_argument("--stems", nargs="+", default=["linear", "conv"], choices=["linear", "conv"])
    p.add_argument("--steps", nargs="+", type=int, default=[900], help="step budgets (default: the demo's 900)")
    p.add_argument("--batch-size", type=int, default=32, help="default: the demo's global batch")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4, help="default: the demo's")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/bench_supervised_bound.json")
    args = p.parse_args()
    if min(args.steps) < 1:
        p.error("--steps must be >= 1")
    shards = Path(args.shards)
    cfg = DataConfig(backend="wds", train_shards=str(shards / "train"), val_shards=str(shards / "validate"),
                     tokenizer=args.tokenizer, image_size=args.image_size, max_text_len=64, num_workers=1,
                     augment=True)  # fmt: skip
    tok = load_tokenizer(args.tokenizer)
    results = {f"{stem}@{steps}": train_and_score(stem, steps, args, cfg, tok)
               for stem in args.stems for steps in args.steps}  # fmt: skip
    some = next(iter(results.values()))
    print(f"\n{args.model} image encoder + linear head, BCE on the truth, batch {args.batch_size}, lr {args.lr}; "
          f"validation: {some['images']} images, {some['labels']} labels with >= 20 positives and negatives")  # fmt: skip
    print(f"{'patch stem':<12}{'steps':>7}{'AUROC':>8}{'95 % interval':>18}{'train s':>9}")
    for name, r in results.items():
        stem, steps = name.split("@")
        lo, hi = r["ci95"]
        print(f"{stem:<12}{steps:>7}{r['auroc']:>8.3f}   [{lo:.3f}, {hi:.3f}]{r['train_seconds']:>9.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
