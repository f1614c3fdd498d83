"""Does the MLM head read finding words off the image? Masked finding-word accuracy beside its text-only control,
for pretraining settings of the smallest model (issue 25's "MLM budget").

Each ``--arm NAME=KEY=VALUE[,KEY=VALUE...]`` is a pretraining of the demo recipe (`pretrain_tiny`: `mpma_tiny`)
with those recipe overrides, at ``--steps`` and one seed, run by the sweep library (`mpma_ds.sweep`: equal budget,
the same data order); each ``--model NAME=DIR`` is an exported model evaluated as it is. Every model is scored
on the validation split by `mlm.MaskedTokenAccuracy` with its image control: the accuracy on masked finding words
(`mlm.FINDING_WORDS`: the findings, sides, sizes and zones a report can only know from the film) beside the
study's own image, and beside *another* study's image (the batch rolled by one) with the same masked report.
What the head gets right beside the wrong image it read off the report's text; the **gain** (own - other, with
a paired bootstrap 95 % interval over the studies) is what it read off the image.

    python benchmarks/bench_mlm_budget.py --shards <shards> --tokenizer <tokenizer> --steps 300 \\
        --arm default= --arm mask50=data.mlm_probability=0.5
    python benchmarks/bench_mlm_budget.py --shards <shards> --model demo=demo_runs/exported
    python benchmarks/bench_mlm_budget.py --shards <shards> --model demo=demo_runs/exported \\
        --eval-set data.mlm_finding_probability=0.5

A second table splits the finding words by class (`data.masking.FINDING_CLASSES`): finding names, sides, extent,
zones. Side words can only come from the film, so their gain is the clearest sign of reading it.

Writes ``--out-dir/bench_mlm_budget.json`` (default benchmarks/results/) and prints the markdown table. The
evaluation masks each model's reports with its own recipe's ``data.mlm_probability`` (deterministically), so
the gain is paired within a model; across settings the masked tokens differ. ``--eval-set`` gives every ``--model``
the same evaluation masking instead (an ``--arm``'s exported model can be scored again that way).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from mpma_ds.data.masking import FINDING_CLASSES
from mpma_ds.runner.export import load_run_recipe
from mpma_ds.sweep import SweepConfig
from mpma_ds.sweep.config import SweepEvalConfig
from mpma_ds.sweep.runner import evaluate_exported, run_sweep
from mpma_ds.tracking.params import json_safe

COLUMNS = (
    ("mlm_acc", "masked tokens"),
    ("mlm_acc_findings", "finding words, own image"),
    ("mlm_acc_findings_shuffled", "finding words, other image"),
    ("mlm_findings_image_gain", "gain (own - other)"),
    ("mlm_tokens_findings", "finding tokens"),
    ("mlm_image_changed", "masked guesses the other image changes"),
)


CLASS_COLUMNS = (
    ("mlm_acc_findings_{}", "own image"),
    ("mlm_acc_findings_shuffled_{}", "other image"),
    ("mlm_findings_image_gain_{}", "gain (own - other)"),
    ("mlm_tokens_findings_{}", "tokens"),
)
"""The per-class table (`data.masking.FINDING_CLASSES`: finding names, sides, extent, zones)."""


def parse_named(values: list[str], what: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}`` (the first ``=`` splits)."""
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"{what} {value!r}: expected NAME=...")
        out[name] = rest
    return out


def arm_tree(overrides: str) -> dict[str, Any]:
    """``"data.mlm_probability=0.5,data.mlm_finding_classes=[side,extent]"`` -> the sweep's dotted-key recipe tree
    (values as YAML; a comma inside ``[...]`` belongs to the value)."""
    import yaml

    tree = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", overrides)):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"arm override {item!r}: expected KEY=VALUE")
        tree[key] = yaml.safe_load(value)
    return tree


def cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None or value != value:
        return "n/a"
    if key.startswith("mlm_tokens"):
        return f"{int(value)}"
    ci = metrics.get(f"{key}_ci95")
    text = f"{value:+.3f}" if "gain" in key else f"{value:.3f}"
    return text + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and None not in ci else "")


def tables(results: dict[str, dict[str, Any]]) -> str:
    """The markdown tables of ``results`` ({model: metrics}): the finding words together, then per word class."""
    lines = ["| setting | " + " | ".join(t for _, t in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(m, k) for k, _ in COLUMNS) + " |")
    lines += ["", "| setting | word class | " + " | ".join(t for _, t in CLASS_COLUMNS) + " |",
              "|---" * (len(CLASS_COLUMNS) + 2) + "|"]  # fmt: skip
    for name, m in results.items():
        for c in FINDING_CLASSES:
            lines.append(f"| {name} | {c} | " + " | ".join(cell(m, k.format(c)) for k, _ in CLASS_COLUMNS) + " |")
    return "\n".join(lines)


def eval_recipe(folder: Path, shards: Path, overrides: dict[str, Any]):
    """An exported model's recipe, evaluated on ``shards``/validate with ``overrides`` (``data.<field>`` only: the
    evaluation's masking, e.g. ``data.mlm_finding_probability``)."""
    recipe = load_run_recipe(folder / "recipe.yaml")
    recipe.data.val_shards = str(shards / "validate")
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section != "data" or not hasattr(recipe.data, name):
            raise SystemExit(f"--eval-set {key}: only data.<field> of the recipe")
        setattr(recipe.data, name, value)
    recipe.data.validate()
    return recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard build folder (train/ and validate/ inside)")
    p.add_argument("--tokenizer", help="tokenizer folder of the pretrainings (--arm)")
    p.add_argument("--arm", action="append", default=[], help="NAME=KEY=VALUE[,KEY=VALUE...] (repeatable)")
    p.add_argument("--model", action="append", default=[], help="NAME=DIR of an exported model (repeatable)")
    p.add_argument(
        "--eval-set",
        default="",
        help="data.KEY=VALUE[,...]: the --model evaluations' masking instead of "
        "each recipe's own (e.g. data.mlm_finding_probability=0.5: more finding tokens scored)",
    )
    p.add_argument("--steps", type=int, default=300, help="pretraining steps of every --arm (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=0, help="evaluate only this many batches (0 = all)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args()
    if not args.arm and not args.model:
        raise SystemExit("nothing to measure: give --arm and/or --model")
    out = Path(args.out_dir)
    shards = Path(args.shards)
    evaluation = SweepEvalConfig(maps=[], linear_probe_fraction=0.0, bootstrap=args.bootstrap,
                                 batch_size=args.batch_size, max_batches=args.max_batches)  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    arms = {name: arm_tree(o) for name, o in parse_named(args.arm, "--arm").items()}
    if arms:
        if not args.tokenizer:
            raise SystemExit("--arm needs --tokenizer")
        shared = {
            "data": {"train_shards": str(shards / "train"), "val_shards": str(shards / "validate"),
                     "tokenizer": args.tokenizer},
            "train": {"max_steps": args.steps, "warmup_steps": max(1, min(30, args.steps // 10)), "save_every": 0,
                      "eval_every": 0},
            "tracking": {"enabled": False},
        }  # fmt: skip
        cfg = SweepConfig(name="mlm_budget", base="pretrain_tiny", shared=shared, arms=arms,
                          reference=next(iter(arms)), seeds=[args.seed], output_dir=str(out / "bench_mlm_budget"),
                          evaluation=evaluation)  # fmt: skip
        start = time.perf_counter()
        found = run_sweep(cfg)
        print(f"{len(arms)} arm(s) of {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
        results.update({arm: rows[0].metrics for arm, rows in found["results"].items()})
    for name, folder in parse_named(args.model, "--model").items():
        recipe = eval_recipe(Path(folder), shards, arm_tree(args.eval_set))
        cfg = SweepConfig(name="mlm_budget", arms={name: {}}, reference=name, evaluation=evaluation)
        results[name] = evaluate_exported(Path(folder), recipe, cfg, out / "bench_mlm_budget" / name).metrics
    print(tables(results))
    record = {"args": vars(args), "results": results}
    (out / "bench_mlm_budget.json").write_text(json.dumps(json_safe(record), indent=1) + "\n")
    print(f"results: {out / 'bench_mlm_budget.json'}")


if __name__ == "__main__":
    main()
