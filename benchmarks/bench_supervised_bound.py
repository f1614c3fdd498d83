"""What can the demo's image encoder reach on the synthetic films when it is taught the answer directly? (one process)

The supervised bound of the demo's zero-shot AUROC (`mpma_ds.runner.supervised_bound`, what `make demo` measures
and caches for its own budget): the pretraining recipe's image encoder (``--recipe``, default ``pretrain_tiny``,
with each ``--stems`` patch stem), from random weights, and a linear head trained by the Trainer with binary
cross-entropy on the synthetic ground truth (``task.cls.labels: truth``, the reference of the zero-shot metric) on
the same shards, loader, augmentation, batch and schedule, for each ``--steps`` budget, and scored on the
validation split as the zero-shot metric is (labels with >= ``--min-count`` positives and negatives of the
truth, 95 % bootstrap interval). A supervised encoder trained on the labels is an upper bound of what report
supervision buys in the same number of updates: if it stays under a target at the demo's step budget, the
target is out of reach for that encoder and budget, whatever the alignment objective.

    python benchmarks/bench_supervised_bound.py --shards demo_runs/shards --tokenizer demo_runs/tokenizer
    python benchmarks/bench_supervised_bound.py --shards ... --tokenizer ... --stems linear conv --steps 900 1800

Measurements are cached where the demo caches its own (``--cache``), so the demo's budget measured here is not
measured again by ``make demo`` on the same shards. Writes benchmarks/results/bench_supervised_bound.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mpma_ds.eval.zeroshot import DEFAULT_MIN_COUNT
from mpma_ds.recipes import find_recipe
from mpma_ds.runner.supervised_bound import supervised_bound
from mpma_ds.training.recipe import Recipe, load_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard build folder with train/ and validate/ (with truth)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (the loader tokenises the reports)")
    p.add_argument("--recipe", default="pretrain_tiny", help="the pretraining recipe whose encoder and budget")
    p.add_argument("--stems", nargs="+", default=["linear", "conv"], choices=["linear", "conv"])
    p.add_argument("--steps", nargs="+", type=int, default=[900], help="step budgets (default: the demo's 900)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT)
    p.add_argument("--cache", default=None, help="cache folder (default: the demo's)")
    p.add_argument("--out", default="benchmarks/results/bench_supervised_bound.json")
    args = p.parse_args()
    if min(args.steps) < 1:
        p.error("--steps must be >= 1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bound-") as work:
        for stem in args.stems:
            for steps in args.steps:
                sets = [f"train.max_steps={steps}", f"model.overrides.patch_stem={stem}",
                        f"data.image_size={args.image_size}", f"data.tokenizer={args.tokenizer}",
                        f"train.output_dir={Path(work) / 'pretrain'}"]  # fmt: skip
                recipe = load_recipe(find_recipe(args.recipe), sets, cls=Recipe, check_files=False)
                results[f"{stem}@{steps}"] = supervised_bound(
                    args.shards, args.tokenizer, recipe, out_dir=Path(work) / f"{stem}-{steps}",
                    min_count=args.min_count, cache_dir=args.cache, tracking=["tracking.enabled=false"],
                )  # fmt: skip
    budget = next(iter(results.values()))["inputs"]["budget"]
    print(f"\n{args.recipe} image encoder + linear head, BCE on the truth, batch {budget['global_batch_size']}, "
          f"lr {budget['lr']}; validation labels with >= {args.min_count} positives and negatives")  # fmt: skip
    print(f"{'patch stem':<12}{'steps':>7}{'AUROC':>8}{'95 % interval':>18}{'labels':>8}{'train s':>9}  measured")
    for name, r in results.items():
        stem, steps = name.split("@")
        lo, hi = r["ci95"]
        when = f"cached {r['measured_at']}" if r["cached"] else "now"
        print(f"{stem:<12}{steps:>7}{r['auroc']:>8.3f}   [{lo:.3f}, {hi:.3f}]{r['labels']:>8}"
              f"{r['train_seconds']:>9.0f}  {when}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
