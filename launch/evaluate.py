#!/usr/bin/env python
"""Evaluate an exported MPMA model (or a randomly initialised twin) on a shard split: image<->report retrieval
R@1/5/10 both ways and zero-shot CheXpert AUROC. Prints a table, writes results.json + metrics.jsonl to
--out-dir and logs an "eval" run to MLflow tagged with what it evaluated.

    python launch/evaluate.py --model exported/tiny --shards data/shards
    python launch/evaluate.py --random-init mpma_tiny --recipe runs/tiny/recipe.yaml --shards data/shards
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="exported model folder (launch/export.py --out)")
    which.add_argument("--random-init", metavar="NAME", help="a randomly initialised model of this architecture")
    p.add_argument(
        "--shards", required=True, help="shard build folder (holding validate/ ...) or one split folder"
    )
    p.add_argument("--split", default="validate", help="split to evaluate (default: validate)")
    p.add_argument("--recipe", help="training recipe YAML: preprocessing and, with --random-init, model overrides "
                   "(default: the model folder's recipe.yaml)")  # fmt: skip
    p.add_argument("--tokenizer", help="tokenizer folder (default: MODEL/text_encoder, else the recipe's)")
    p.add_argument("--backend", choices=("wds", "dali"), help="loader backend (default: the recipe's, else wds)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = the whole split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--out-dir", help="where results.json and metrics.jsonl go (default: eval_results/<name>-<split>)"
    )
    p.add_argument("--name", help="name of this evaluation (table column, MLflow run name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the recipe's tracking.experiment)")
    p.add_argument("--no-mlflow", action="store_true", help="only write the local files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from mpma_ds import MPMA, create_model, load_tokenizer
    from mpma_ds.eval.split_eval import (
        RECIPE_FILE,
        data_config_for,
        evaluate_on_split,
        format_table,
        read_recipe_tree,
        split_folder,
    )
    from mpma_ds.models import check_tokenizer_vocab
    from mpma_ds.tracking import TrackingConfig, build_logger

    model_dir = Path(args.model) if args.model else None
    recipe_path = Path(args.recipe) if args.recipe else (model_dir / RECIPE_FILE if model_dir else None)
    if args.recipe and not recipe_path.is_file():
        raise FileNotFoundError(f"--recipe {recipe_path} does not exist")
    recipe = read_recipe_tree(recipe_path) if recipe_path and recipe_path.is_file() else None

    if model_dir is not None:
        model = MPMA.from_pretrained(model_dir)
        evaluated = str(model_dir.resolve())
        default_name = model_dir.name
    else:
        section = (recipe or {}).get("model") or {}
        overrides = dict(section.get("overrides") or {}) if section.get("name") == args.random_init else {}
        torch.manual_seed(args.seed)
        model = create_model(args.random_init, **overrides)
        evaluated = f"random-init:{args.random_init}:seed={args.seed}"
        default_name = f"random-{args.random_init}"
    name = args.name or default_name

    tok_dir = args.tokenizer
    if tok_dir is None and model_dir is not None and (model_dir / "text_encoder" / "tokenizer.json").is_file():
        tok_dir = model_dir / "text_encoder"
    if tok_dir is None:
        tok_dir = ((recipe or {}).get("data") or {}).get("tokenizer")
    if not tok_dir:
        raise ValueError("no tokenizer: pass --tokenizer DIR (or --recipe with data.tokenizer)")
    tokenizer = load_tokenizer(tok_dir)
    check_tokenizer_vocab(model, tokenizer)

    shards = split_folder(args.shards, args.split)
    data_cfg = data_config_for(model.config, recipe=recipe, shards=shards, tokenizer=tok_dir, backend=args.backend)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    metrics = evaluate_on_split(
        model, tokenizer, data_cfg, split=args.split, batch_size=args.batch_size, device=device,
        max_batches=args.max_batches or None,
    )  # fmt: skip

    out_dir = Path(args.out_dir or Path("eval_results") / f"{name}-{args.split}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking = TrackingConfig(**((recipe or {}).get("tracking") or {}))
    tracking.enabled = tracking.enabled and not args.no_mlflow
    tracking.uri = args.tracking_uri or tracking.uri
    tracking.experiment = args.experiment or tracking.experiment
    tracking.run_name = f"eval-{name}-{args.split}"
    tags = {"mpma.kind": "eval", "mpma.eval_of": evaluated, "mpma.split": args.split, "mpma.shards": str(shards)}
    step = 0
    info_file = model_dir / "export_info.json" if model_dir else None
    if info_file is not None and info_file.is_file():
        info = json.loads(info_file.read_text())
        step = int(info.get("step") or 0)
        tags.update({"mpma.checkpoint": str(info.get("checkpoint")), "mpma.step": str(step)})
    logger = build_logger(tracking, rank=0, run_dir=out_dir, tags=tags)
    logger.log_params({"eval": {"model": evaluated, "split": args.split, "shards": str(shards),
                                "tokenizer": str(tok_dir), "batch_size": args.batch_size}})  # fmt: skip
    logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    result = {
        "name": name,
        "evaluated": evaluated,
        "split": args.split,
        "metrics": metrics,
        "run_id": logger.run_id,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.log_artifact(out_dir / "results.json")
    logger.close()

    print(format_table({name: metrics}))
    print(f"results: {out_dir / 'results.json'}" + (f"  (MLflow run {logger.run_id})" if logger.run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
