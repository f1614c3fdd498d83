"""Evaluate an exported MPMA model (or a randomly initialised twin) on a shard split: image<->report retrieval
R@1/5/10 both ways (identical reports merged; also on abnormal studies only) and zero-shot CheXpert AUROC (prompt
ensembles; labels with >= --min-label-count positives and negatives), each with a bootstrap 95 % interval; with
--grounding N also the pointing game of finding-phrase maps against the shards' ground-truth boxes, and N overlay
PNGs. Prints a table, writes results.json + metrics.jsonl to
--out-dir and logs an "eval" run to MLflow tagged with what it evaluated.

    python launch/evaluate.py --model exported/tiny --shards data/shards
    python launch/evaluate.py --random-init mpma_tiny --recipe runs/tiny/recipe.yaml --shards data/shards
    python launch/evaluate.py --model exported/tiny --shards demo_runs/shards --grounding 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpma_ds.cli.common import prog_name
from mpma_ds.eval.attribution import MAPS
from mpma_ds.eval.grounding import BEST_MAP
from mpma_ds.runner.evaluate import GROUNDING_ROWS, TABLE_ROWS, format_grounding, format_table, run_evaluation


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog_name("evaluate.py"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model", help="exported model folder (launch/export.py --out) or a pretraining run folder"
    )
    which.add_argument("--random-init", metavar="NAME", help="a randomly initialised model of this architecture")
    p.add_argument(
        "--shards", required=True, help="shard build folder (holding validate/ ...) or one split folder"
    )
    p.add_argument("--split", default="validate", help="split to evaluate (default: validate)")
    p.add_argument(
        "--recipe",
        help="training recipe YAML: preprocessing and, with --random-init, model overrides "
        "(default: the model folder's recipe.yaml)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: MODEL/text_encoder, else the recipe's)")
    p.add_argument("--backend", choices=("wds", "dali"), help="loader backend (default: the recipe's, else wds)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = the whole split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument(
        "--min-label-count",
        type=int,
        default=20,
        metavar="N",
        help="zero-shot AUROC only over labels with >= N positives and N negatives (default 20)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="R",
        help="bootstrap resamples of the 95 %% intervals beside each metric (0 = none; default 1000)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--out-dir", help="where results.json and metrics.jsonl go (default: eval_results/<name>-<split>)"
    )
    p.add_argument("--name", help="name of this evaluation (table column, MLflow run name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the recipe's tracking.experiment)")
    p.add_argument("--no-mlflow", action="store_true", help="only write the local files")
    p.add_argument(
        "--grounding",
        type=int,
        metavar="N",
        help="also play the pointing game against the shards' ground-truth boxes (sample json 'truth', synthetic "
        "corpus) and write N overlay PNGs (finding phrase map on the film, truth box) to OUT_DIR/grounding/",
    )
    p.add_argument(
        "--grounding-map",
        default=BEST_MAP,
        choices=MAPS,
        help=f'which map points (docs/model.md, "Grounding maps"; default: {BEST_MAP})',
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog_name('evaluate.py')}: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    result = run_evaluation(
        shards=args.shards,
        model=args.model,
        random_init=args.random_init,
        split=args.split,
        recipe=args.recipe,
        tokenizer=args.tokenizer,
        backend=args.backend,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        seed=args.seed,
        device=args.device,
        out_dir=args.out_dir,
        name=args.name,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        mlflow=not args.no_mlflow,
        min_count=args.min_label_count,
        n_resamples=args.bootstrap,
        grounding=args.grounding,
        grounding_map=args.grounding_map,
    )
    metrics = result["metrics"]
    played = "pointing_game" in metrics
    print(format_table({result["name"]: metrics}, TABLE_ROWS + (GROUNDING_ROWS if played else ())))
    if played:
        print(format_grounding(metrics))
        n = len(result.get("grounding_examples", []))
        print(f"grounding overlays: {n} in {Path(result['out_dir']) / 'grounding'}")
    run = f"  (MLflow run {result['run_id']})" if result["run_id"] else ""
    print(f"results: {Path(result['out_dir']) / 'results.json'}{run}")
    return 0
