"""How two runs of one task are compared sample by sample: *paired statistics*, registered by name.

A task names its pairing (``Task.pairing``); the Trainer writes it as the run's ``mpma.pairing`` tag beside its
headline metrics (``mpma.headline_metrics``), and the comparison report looks the statistic up here — so a new
task (a plugin's too) brings its own pairing by registering a function, and nothing in ``tracking`` lists tasks.

A paired statistic takes both runs' per-sample test outputs (``test_predictions.pt``: the same samples in the
same order), the metric key (``auroc_macro``), the run's flattened recipe parameters and the resample count, and
returns ``paired_difference``'s ``{key: {"difference", "difference_ci95"}}`` — or ``None`` where the outputs do
not allow it (then the report falls back to the two runs' own intervals).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from data_tools.registry import Registry
from mpma_ds.eval.bootstrap import paired_difference
from mpma_ds.eval.classification import multilabel_auroc
from mpma_ds.eval.vqa import vqa_accuracy

__all__ = ["PAIRED_STATISTICS", "PairedStatistic"]

PairedStatistic = Callable[[Mapping[str, Any], Mapping[str, Any], str, Mapping[str, str], int], "dict | None"]

PAIRED_STATISTICS: Registry[PairedStatistic] = Registry("paired statistic", "mpma_ds.tasks")
"""Paired statistics by name (``Task.pairing``). Plugins register theirs in the module of their task."""


@PAIRED_STATISTICS.register("vqa_accuracy")
def paired_vqa_accuracy(
    pre: Mapping[str, Any], rnd: Mapping[str, Any], key: str, params: Mapping[str, str], n_resamples: int
) -> dict | None:
    """VQA accuracy (overall / closed / open) over the same questions, when both runs share the answer set."""
    if not key.startswith("accuracy_") or "predicted" not in pre:
        return None
    if list(pre["answer_vocab"]) != list(rnd["answer_vocab"]):
        return None
    arrays = [(p["predicted"], p["gold"], p["types"]) for p in (pre, rnd)]
    return paired_difference(
        vqa_accuracy, *arrays, keys=[key], n_resamples=n_resamples, answer_vocab=pre["answer_vocab"]
    )


@PAIRED_STATISTICS.register("multilabel_auroc")
def paired_multilabel_auroc(
    pre: Mapping[str, Any], rnd: Mapping[str, Any], key: str, params: Mapping[str, str], n_resamples: int
) -> dict | None:
    """Macro AUROC over the same images (labels with too few positives or negatives left out, as the run did)."""
    if key != "auroc_macro" or not pre.get("multilabel", True) or "scores" not in pre:
        return None
    min_each = int(float(params.get("task.cls.min_label_count", 1)))
    arrays = [(p["scores"].numpy(), p["targets"].numpy()) for p in (pre, rnd)]
    return paired_difference(
        multilabel_auroc, *arrays, keys=[key], n_resamples=n_resamples, names=pre["names"], min_each=min_each
    )
