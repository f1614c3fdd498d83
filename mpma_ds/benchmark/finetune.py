"""Protocols that train: a suite entry run as a fine-tuning task through the ``Trainer`` (no second loop).

- **vqa** (VQA-RAD, SLAKE): the dataset folder is built into VQA shards once (``build_shards --format
  vqa-rad|slake``, cached under ``CACHE/shards/``: a finished build is reused), then the ``vqa`` task fine-tunes
  the model on the ``train`` split (best checkpoint by validation accuracy where the set has a validation file)
  and the Trainer's final test gives accuracy overall / CLOSED / OPEN with 95 % bootstrap intervals and the
  per-question predictions (``test_predictions.pt``) that pair two models question by question.

The fine-tuning recipe is the entry's ``recipe`` (a shipped name or a path; default `DEFAULT_RECIPES`) with the
entry's ``set`` overrides (``train.epochs=2``) on top; the model, tokenizer and eval preprocessing are the
benchmarked model's, whatever the recipe says: its architecture goes in as ``model.overrides`` (so the recipe's own
``model.name`` cannot refuse it), ``init.from`` is its folder, and a ``random:`` twin is ``init.from: random`` built
with the twin's seed — the same weights the other protocols evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.benchmarks import BenchmarkData
from data_tools.build_shards import build_shards
from mpma_ds.benchmark.model import BenchModel
from mpma_ds.benchmark.protocols import EntryResult
from mpma_ds.benchmark.suite import SuiteEntry
from mpma_ds.config import apply_overrides, build_with_overrides, load_yaml
from mpma_ds.data.transforms import eval_resize_size
from mpma_ds.eval.vqa import vqa_accuracy
from mpma_ds.recipes import find_recipe
from mpma_ds.training.ds_config import find_ds_config
from mpma_ds.training.recipe import FinetuneRecipe
from mpma_ds.training.run_folder import PREDICTIONS_FILE

DEFAULT_RECIPES: dict[str, str] = {"vqa": "finetune_vqa_tiny"}
"""The fine-tuning recipe of a protocol when the entry names none."""

VQA_KEYS = ("accuracy_overall", "accuracy_closed", "accuracy_open")


def task_shards(data: BenchmarkData, folder: Path, cache_dir: Path, *, image_size: int, lang: str) -> Path:
    """The dataset's shards, built once under ``CACHE/shards/<dataset>-<version>-<lang>-<px>`` (the key holds the
    split files' fingerprint: a changed download builds anew; a finished build is reused as it is)."""
    out = cache_dir / "shards" / f"{data.dataset}-{data.version()}-{lang}-{image_size}px"
    # min_size as the streamed protocols decode (features.RecordImages): any film the model can take
    summary = build_shards(data.dataset, folder, out, image_size=image_size, min_size=16, vqa_lang=lang,
                           progress=False)  # fmt: skip
    if not summary["splits"].get("train") or not summary["splits"].get("test"):
        raise ValueError(
            f"{data.dataset}: the shards built from {folder} hold no train or no test questions "
            f"({summary['splits']}); see {out / 'rejects.jsonl'}"
        )
    return out


def finetune_recipe(
    model: BenchModel, entry: SuiteEntry, *, task: str, shards: Path, out_dir: Path, n_resamples: int, workers: int,
    tracking: dict[str, Any],
) -> FinetuneRecipe:  # fmt: skip
    """The entry's fine-tuning recipe for ``model`` on ``shards`` (see the module docstring)."""
    path = find_recipe(entry.recipe or DEFAULT_RECIPES[entry.protocol])
    tree = load_yaml(path, what="recipe", hint="the suite entry's recipe: a shipped name or a YAML path")
    arch = {k: v for k, v in model.net.config.to_dict().items() if not k.endswith("_init_from")}
    tree["model"] = {"overrides": arch}  # the model's own architecture, whatever the recipe names
    tree.setdefault("task", {})["name"] = task
    tree["task"]["bootstrap"] = n_resamples
    tree["init"] = {"from": "random" if model.kind == "random" else model.spec}
    cfg = model.data_cfg
    has_val = (shards / "validate").is_dir()
    tree.setdefault("data", {}).update(
        backend="wds", train_shards=str(shards / "train"), val_shards=str(shards / "validate") if has_val else "",
        test_shards=str(shards / "test"), tokenizer=model.tokenizer_dir, image_size=cfg.image_size,
        in_chans=cfg.in_chans, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        eval_crop_fraction=cfg.eval_crop_fraction, num_workers=workers, label_fraction=1.0,
        max_text_len=min(int(tree["data"].get("max_text_len", cfg.max_text_len)), cfg.max_text_len),
    )  # fmt: skip
    train = tree.setdefault("train", {})
    train.update(output_dir=str(out_dir), seed=int(model.info.get("seed", train.get("seed", 0))))
    if not has_val:  # no validation file (VQA-RAD as often shipped): the last weights are tested
        train.update(eval_every=0, eval_every_epochs=0, best_metric="", early_stopping=0)
    tree["tracking"] = {**tree.get("tracking", {}), **tracking}
    apply_overrides(tree, entry.set)
    recipe = build_with_overrides(FinetuneRecipe, tree, entry.set, source=str(path), what="recipe")
    recipe.deepspeed_config = str(find_ds_config(recipe.deepspeed_config, recipe_dir=Path(path).parent))
    return recipe


def run_finetune(recipe: FinetuneRecipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train ``recipe`` through the Trainer; ``(summary, the final test's per-sample predictions)``."""
    from mpma_ds.runner.trainer import train

    summary = train(recipe, overwrite=True)
    predictions = Path(recipe.train.output_dir) / PREDICTIONS_FILE
    if not predictions.is_file():
        raise ValueError(f"the fine-tuning run {recipe.train.output_dir} wrote no test predictions")
    return summary, torch.load(predictions, weights_only=True)


def vqa(
    model: BenchModel, data: BenchmarkData, entry: SuiteEntry, *, folder: Path, cache_dir: Path, out_dir: Path,
    n_resamples: int, workers: int, tracking: dict[str, Any],
) -> EntryResult:  # fmt: skip
    """VQA accuracy overall / CLOSED / OPEN of ``model`` fine-tuned on the dataset's train split."""
    lang = str(entry.options.get("lang", "en"))
    shards = task_shards(data, folder, cache_dir, image_size=eval_resize_size(model.data_cfg), lang=lang)
    recipe = finetune_recipe(model, entry, task="vqa", shards=shards, out_dir=out_dir, n_resamples=n_resamples,
                             workers=workers, tracking=tracking)  # fmt: skip
    summary, kept = run_finetune(recipe)
    metrics = {k.removeprefix("test/"): v for k, v in (summary.get("test") or {}).items()}
    vocab = list(kept["answer_vocab"])
    predicted = np.asarray([vocab[i] for i in kept["predicted"]], dtype=str)
    arrays = [predicted, np.asarray(kept["gold"], dtype=str), np.asarray(kept["types"], dtype=str)]
    pair = {"fn": vqa_accuracy, "arrays": arrays, "keys": list(VQA_KEYS), "kwargs": {"answer_vocab": tuple(vocab)},
            "rows": list(kept["keys"])}  # fmt: skip
    info = {
        "run_dir": str(out_dir), "mlflow_run_id": summary.get("mlflow_run_id"), "steps": summary.get("step"),
        "recipe": entry.recipe or DEFAULT_RECIPES["vqa"], "set": list(entry.set),
        "answers": len(vocab), "questions_read": summary.get("questions_read"), "best": summary.get("best"),
        "shards": str(shards), "build_rejects": json.loads((shards / "manifest.json").read_text()).get("rejects"),
    }  # fmt: skip
    return EntryResult(metrics, "accuracy_overall", pair, info)
