"""The downstream metrics of one arm x seed: the linear probe at a small label fraction (CheXpert macro AUROC) and
VQA with the backbone frozen (CLOSED / OPEN accuracy).

Each is a fine-tuning run of the arm's exported model by the Trainer, from the shipped recipe `make demo` uses
(``finetune_linear_probe_tiny``: features extracted once, a linear head on the ``label_fraction`` patient-level
subset; ``finetune_vqa_frozen_tiny``: the fused image + question features extracted once, the answer head
trained). The runs' per-sample test outputs (``test_predictions.pt``) are kept as rows, so
`arm_eval.paired_table` compares two arms on the same test images and questions with a paired interval, as it
does the pretraining evaluation's metrics. Every fine-tuning run is nested under the arm's pretraining run in
MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mpma_ds.sweep.config import SweepConfig

LINEAR_PROBE_RECIPE = "finetune_linear_probe_tiny"
VQA_RECIPE = "finetune_vqa_frozen_tiny"


def downstream_recipe(recipe_name: str, model_dir: Path, shards: Path, out_dir: Path, pretrain_recipe: Any,
                      extra: list[str], tags: dict[str, str], cfg_set: list[str]) -> Any:  # fmt: skip
    """The fine-tuning recipe ``recipe_name`` of the exported ``model_dir`` on the shard build ``shards``
    (``train/``, ``validate/``, ``test/``), writing to ``out_dir``, tracked like the arm's pretraining; ``extra``
    and then ``cfg_set`` (`SweepEvalConfig.finetune_set`) override the recipe.

    The recipe's ``model`` is the arm's (``model.name`` and ``model.overrides`` of ``pretrain_recipe``): the
    shipped recipes name ``mpma_tiny``, and `runner.init` refuses an exported model of other parameter shapes
    than the recipe names (an arm without the memory, or with an ITM head)."""
    from mpma_ds.recipes import find_recipe
    from mpma_ds.training.recipe import FinetuneRecipe, load_recipe

    tok_dir = model_dir / "text_encoder"
    tok = tok_dir if (tok_dir / "tokenizer.json").is_file() else Path(pretrain_recipe.data.tokenizer)
    t = pretrain_recipe.tracking
    overrides = [
        f"init.from={json.dumps(str(model_dir))}",
        f"model.name={json.dumps(pretrain_recipe.model.name)}",
        *(f"model.overrides.{k}={json.dumps(v)}" for k, v in pretrain_recipe.model.overrides.items()),
        *(f"data.{split}_shards={json.dumps(str(shards / name))}"
          for split, name in (("train", "train"), ("val", "validate"), ("test", "test"))),
        f"data.tokenizer={json.dumps(str(tok))}",
        f"data.image_size={pretrain_recipe.data.image_size}",
        f"train.output_dir={json.dumps(str(out_dir))}",
        f"tracking.enabled={str(t.enabled).lower()}",
        f"tracking.experiment={json.dumps(t.experiment)}",
        f"tracking.run_name={json.dumps(f'{t.run_name}-{out_dir.name}')}",
        *([f"tracking.uri={json.dumps(t.uri)}"] if t.uri else []),
        "tracking.system_metrics=false",
        *extra,
        *cfg_set,
    ]  # fmt: skip
    recipe = load_recipe(find_recipe(recipe_name), overrides, cls=FinetuneRecipe)
    recipe.tracking.tags = {**recipe.tracking.tags, **tags}
    return recipe


def _finetune(recipe: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``recipe`` to the end; its test metrics and its per-sample test outputs."""
    from mpma_ds.runner.trainer import train
    from mpma_ds.training.run_folder import PREDICTIONS_FILE

    summary = train(recipe, overwrite=True)
    predictions = torch.load(Path(recipe.train.output_dir) / PREDICTIONS_FILE, weights_only=False)
    return summary.get("test") or {}, predictions


def downstream_rows(model_dir: Path, pretrain_recipe: Any, cfg: SweepConfig, shards: Path, out_dir: Path,
                    tags: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The linear probe (``evaluation.linear_probe_fraction`` > 0) and frozen VQA (``evaluation.vqa_shards``
    set) of one exported arm.

    Returns:
        ``metrics``: ``linear_probe_auroc`` (+ ``_ci95``), ``vqa_accuracy_closed`` / ``_open`` / ``_overall``
        (+ ``_ci95``); ``rows``: ``linear_probe`` (scores, targets, names, keys, min_each) and ``vqa``
        (predicted, gold, types, answer_vocab, keys), what `arm_eval.paired_table` pairs.
    """
    ev = cfg.evaluation
    metrics: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    if ev.linear_probe_fraction > 0:
        extra = [
            f"data.label_fraction={ev.linear_probe_fraction}",
            f"task.linear_probe.cache_dir={json.dumps(str(out_dir / 'feature_cache'))}",
            f"task.cls.min_label_count={ev.linear_probe_min_label_count}",
        ]
        recipe = downstream_recipe(LINEAR_PROBE_RECIPE, model_dir, shards, out_dir / "linear_probe",
                                   pretrain_recipe, extra, tags, ev.finetune_set)  # fmt: skip
        test, pred = _finetune(recipe)
        metrics["linear_probe_auroc"] = test.get("test/auroc_macro")
        metrics["linear_probe_auroc_ci95"] = test.get("test/auroc_macro_ci95")
        rows["linear_probe"] = {"scores": pred["scores"].numpy(), "targets": pred["targets"].numpy(),
                                "names": list(pred["names"]), "keys": list(pred["keys"]),
                                "min_each": ev.linear_probe_min_label_count}  # fmt: skip
    if ev.vqa_shards:
        extra = [f"task.vqa.cache_dir={json.dumps(str(out_dir / 'feature_cache'))}"]
        recipe = downstream_recipe(VQA_RECIPE, model_dir, Path(ev.vqa_shards), out_dir / "vqa_frozen",
                                   pretrain_recipe, extra, tags, ev.finetune_set)  # fmt: skip
        test, pred = _finetune(recipe)
        for kind in ("overall", "closed", "open"):
            metrics[f"vqa_accuracy_{kind}"] = test.get(f"test/accuracy_{kind}")
            metrics[f"vqa_accuracy_{kind}_ci95"] = test.get(f"test/accuracy_{kind}_ci95")
        rows["vqa"] = {k: list(pred[k]) if isinstance(pred[k], list | tuple) else pred[k]
                       for k in ("predicted", "gold", "types", "answer_vocab", "keys")}  # fmt: skip
    return metrics, rows
