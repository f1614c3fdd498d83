"""Evaluate one model of a study and keep what a *paired* comparison with another model needs, row by row.

The pretraining evaluation (`split_eval`: retrieval, zero-shot AUROC, the pointing game) reports each model with
its own bootstrap interval. Two arms of an ablation are better compared on the same rows: the difference of a
metric with a paired interval (`bootstrap.mean_paired_difference`), which is much narrower when both models err
on the same hard studies. `evaluate_rows` runs the same deterministic pass as `split_eval` and keeps per row: the
embeddings and report texts (retrieval), the zero-shot scores and targets, each grounding map's pointing hits
(`grounding_maps`), and the masked finding-word counts of the MLM head (`mlm.MaskedTokenAccuracy`); the sweep
joins the linear probe's and the frozen VQA's per-sample test outputs (`sweep.downstream`). `paired_table` turns
two such evaluations into differences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.eval.alignment import evaluate_alignment
from mpma_ds.eval.bootstrap import mean_paired_difference, with_intervals
from mpma_ds.eval.classification import multilabel_auroc
from mpma_ds.eval.retrieval import retrieval_metrics
from mpma_ds.eval.vqa import vqa_accuracy
from mpma_ds.eval.zeroshot import abnormal_rows, reference_targets, zero_shot_auroc

RETRIEVAL_KEYS = ("i2t_R@10", "t2i_R@10", "i2t_R@10_abnormal")
"""The retrieval metrics a study compares (identical reports merged; ``_abnormal``: abnormal studies only)."""


@dataclass
class RowOutputs:
    """What `evaluate_rows` kept of one model's pass: ``metrics`` (each with its own interval) and the rows."""

    metrics: dict[str, Any]
    rows: dict[str, Any] = field(default_factory=dict)


def pointing_accuracy(hits: Any) -> dict[str, float]:
    """``{"pointing_game": mean hit}`` of (P,) 0/1 hits (a paired statistic's metric function)."""
    return {"pointing_game": float(np.mean(np.asarray(hits, dtype=np.float64)))}


def finding_word_accuracy(counts: Any) -> dict[str, float]:
    """``{"mlm_acc_findings": correct / masked}`` of (N, 2) per-sample (correct, masked) finding-word counts."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 2)
    total = c[:, 1].sum()
    return {"mlm_acc_findings": float(c[:, 0].sum() / total) if total else float("nan")}


def finding_word_gain(counts: Any, shuffled: Any) -> dict[str, float]:
    """``{"mlm_findings_image_gain": accuracy with the study's own image - with another study's}`` of (N, 2)
    per-sample finding-word counts of both reads (`mlm.MaskedTokenAccuracy` with ``image_control``): what the MLM
    head read off the image rather than the report's text."""
    own = finding_word_accuracy(counts)["mlm_acc_findings"]
    other = finding_word_accuracy(shuffled)["mlm_acc_findings"]
    return {"mlm_findings_image_gain": own - other}


def image_gains(mlm: Any, *, n_resamples: int = 1000) -> dict[str, Any]:
    """``mlm_findings_image_gain`` (+ ``_ci95``: paired bootstrap over the samples) of a pass of
    `mlm.MaskedTokenAccuracy` with ``image_control``, and ``mlm_findings_image_gain_<class>`` for each of its
    ``classes`` that had a masked token; {} when no finding word was masked."""
    out: dict[str, Any] = {}
    for suffix in ("", *(f"_{c}" for c in mlm.classes)):
        own, other = mlm.per_sample(f"findings{suffix}"), mlm.per_sample(f"findings_shuffled{suffix}")
        if not own[:, 1].sum():
            continue
        gain = with_intervals(finding_word_gain, own, other, n_resamples=max(n_resamples, 1))
        if suffix:  # only the class's gain and interval (the bootstrap's counts are the overall gain's)
            gain = {
                k.replace("gain", f"gain{suffix}", 1): v for k, v in gain.items() if k.startswith("mlm_findings")
            }
        out.update(gain)
    return out


def evaluate_rows(
    model: torch.nn.Module,
    tokenizer: Any,
    data_cfg: Any,
    *,
    split: str = "validate",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    min_count: int = 20,
    n_resamples: int = 1000,
    maps: Sequence[str] = (),
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> RowOutputs:
    """One deterministic pass of ``split`` through `evaluate_alignment` (with the MLM head's finding-word
    accuracy counted on the same batches), then, with ``maps``, one pass through `grounding_maps` (``sizes``:
    the stored JPEG sizes, `grounding.stored_sizes`).

    Returns:
        ``metrics``: alignment metrics with intervals, ``mlm_acc_findings`` / ``mlm_acc``,
        ``mlm_acc_findings_shuffled`` (the same masked reports beside another study's image) and
        ``mlm_findings_image_gain`` (own - other, with its interval), the same per word class
        (`data.masking.FINDING_CLASSES`: ``mlm_acc_findings_side``, ``mlm_findings_image_gain_side``, ...), and per map
        ``pointing_game[<map>]`` (+ ``cnr``, ``miou``, shifted baselines, ``chance``); ``rows``: what
        `paired_table` needs.
    """
    from mpma_ds.eval.grounding_maps import collect_map_pairs, map_metrics
    from mpma_ds.eval.mlm import FINDING_CLASSES, MaskedTokenAccuracy
    from mpma_ds.runner.evaluate import one_pass

    model.to(device)
    mlm = MaskedTokenAccuracy(model, tokenizer, device, image_control=True, classes=FINDING_CLASSES)
    kept: dict[str, Any] = {}
    with one_pass(data_cfg, tokenizer, split=split, batch_size=batch_size, max_batches=max_batches) as batches:
        metrics = evaluate_alignment(
            model, mlm.stream(batches), tokenizer=tokenizer, device=device, max_text_len=data_cfg.max_text_len,
            min_count=min_count, n_resamples=n_resamples, keep_embeddings=kept,
        )  # fmt: skip
    metrics.update(mlm.result())
    rows: dict[str, Any] = {"image": kept["image"], "text": kept["text"], "texts": list(kept["texts"]),
                            "mlm_findings": mlm.per_sample("findings"),
                            "mlm_findings_shuffled": mlm.per_sample("findings_shuffled")}  # fmt: skip
    metrics.update(image_gains(mlm, n_resamples=n_resamples))
    if "scores" in kept:
        targets, reference = reference_targets(kept["labels"], kept["truths"], CHEXPERT_LABELS)
        rows.update(scores=kept["scores"], targets=targets, reference=reference,
                    abnormal=abnormal_rows(kept["labels"], kept["truths"], CHEXPERT_LABELS))  # fmt: skip
    if maps:
        if sizes is None:
            raise ValueError("grounding maps need the stored image sizes (grounding.stored_sizes)")
        with one_pass(data_cfg, tokenizer, split=split, batch_size=batch_size, max_batches=max_batches) as batches:
            pairs = collect_map_pairs(model, batches, tokenizer=tokenizer, data_cfg=data_cfg, sizes=sizes,
                                      maps=maps, device=device)  # fmt: skip
        per_map = map_metrics(pairs, n_resamples=max(n_resamples, 1))
        metrics["grounding_maps"] = per_map
        rows["pairs"] = [(k, f) for k, f in zip(pairs.keys, pairs.findings)]
        rows["hits"] = {m: pairs.scores(m)[:, 0] for m in pairs.grids}
    return RowOutputs(metrics, rows)


def paired_table(
    arm: Sequence[RowOutputs], reference: Sequence[RowOutputs], *, min_count: int = 20, n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Differences arm - reference of the study's metrics, averaged over seeds (``arm[s]`` pairs with
    ``reference[s]``: the same seed's data order), each with its paired 95 % interval over the evaluation rows.

    Returns:
        ``{metric: mean_paired_difference's entry}`` for the retrieval keys, ``zeroshot_auroc_mean``,
        ``mlm_acc_findings``, ``pointing_game[<map>]`` of each map both evaluated, and where both were
        fine-tuned downstream (`sweep.downstream`) ``linear_probe_auroc`` and ``vqa_accuracy_closed`` / ``_open``
        / ``_overall`` over the fine-tuning runs' test rows.

    Raises:
        ValueError: the two were not evaluated on the same rows (another split, another order).
    """
    if len(arm) != len(reference) or not arm:
        raise ValueError(f"{len(arm)} evaluations of the arm against {len(reference)} of the reference")
    for a, b in zip(arm, reference):
        if a.rows["texts"] != b.rows["texts"] or a.rows.get("pairs") != b.rows.get("pairs"):
            raise ValueError("the arm and the reference were not evaluated on the same rows")
    first = reference[0].rows
    kw = dict(n_resamples=n_resamples, seed=seed)
    out: dict[str, dict[str, Any]] = {}
    pairs = [
        ((a.rows["image"], a.rows["text"]), (b.rows["image"], b.rows["text"])) for a, b in zip(arm, reference)
    ]
    keys = [k for k in RETRIEVAL_KEYS if "abnormal" not in k or first.get("abnormal") is not None]
    out.update(mean_paired_difference(retrieval_metrics, pairs, keys=keys, texts=first["texts"],
                                      abnormal=first.get("abnormal"), **kw))  # fmt: skip
    if "scores" in first:
        pairs = [((a.rows["scores"], a.rows["targets"]), (b.rows["scores"], b.rows["targets"]))
                 for a, b in zip(arm, reference)]  # fmt: skip
        out.update(mean_paired_difference(zero_shot_auroc, pairs, keys=["zeroshot_auroc_mean"],
                                          label_names=CHEXPERT_LABELS, min_count=min_count,
                                          reference=first["reference"], **kw))  # fmt: skip
    pairs = [((a.rows["mlm_findings"],), (b.rows["mlm_findings"],)) for a, b in zip(arm, reference)]
    out.update(mean_paired_difference(finding_word_accuracy, pairs, keys=["mlm_acc_findings"], **kw))
    if all("mlm_findings_shuffled" in r.rows for r in (*arm, *reference)):
        pairs = [((a.rows["mlm_findings"], a.rows["mlm_findings_shuffled"]),
                  (b.rows["mlm_findings"], b.rows["mlm_findings_shuffled"])) for a, b in zip(arm, reference)]  # fmt: skip
        out.update(mean_paired_difference(finding_word_gain, pairs, keys=["mlm_findings_image_gain"], **kw))
    out.update(_downstream_differences(arm, reference, **kw))
    common = set(first.get("hits", {}))
    for r in (*arm, *reference):
        common &= set(r.rows.get("hits", {}))
    for m in sorted(common):
        pairs = [((a.rows["hits"][m],), (b.rows["hits"][m],)) for a, b in zip(arm, reference)]
        out[f"pointing_game[{m}]"] = mean_paired_difference(
            pointing_accuracy, pairs, keys=["pointing_game"], **kw
        )["pointing_game"]
    return out


def _downstream_differences(
    arm: Sequence[RowOutputs], reference: Sequence[RowOutputs], *, n_resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Paired differences of the linear probe's macro AUROC and the frozen VQA accuracies, where every
    evaluation of both has them (the same test rows: the same keys, the same answer set)."""
    out: dict[str, dict[str, Any]] = {}
    everyone = (*arm, *reference)
    kw = dict(n_resamples=n_resamples, seed=seed)
    if all("linear_probe" in r.rows for r in everyone):
        runs = [r.rows["linear_probe"] for r in everyone]
        if any(p["keys"] != runs[0]["keys"] for p in runs):
            raise ValueError("the arm and the reference were not linear-probed on the same test images")
        lp = [(a.rows["linear_probe"], b.rows["linear_probe"]) for a, b in zip(arm, reference)]
        pairs = [((a["scores"], a["targets"]), (b["scores"], b["targets"])) for a, b in lp]
        found = mean_paired_difference(multilabel_auroc, pairs, keys=["auroc_macro"], names=runs[0]["names"],
                                       min_each=runs[0]["min_each"], **kw)  # fmt: skip
        out["linear_probe_auroc"] = found["auroc_macro"]
    if all("vqa" in r.rows for r in everyone):
        runs = [r.rows["vqa"] for r in everyone]
        if any(p["keys"] != runs[0]["keys"] or p["answer_vocab"] != runs[0]["answer_vocab"] for p in runs):
            raise ValueError("the arm and the reference were not VQA-tested on the same questions and answers")
        vqa = [(a.rows["vqa"], b.rows["vqa"]) for a, b in zip(arm, reference)]
        pairs = [
            ((a["predicted"], a["gold"], a["types"]), (b["predicted"], b["gold"], b["types"])) for a, b in vqa
        ]
        keys = [f"accuracy_{kind}" for kind in ("overall", "closed", "open")]
        found = mean_paired_difference(vqa_accuracy, pairs, keys=keys, answer_vocab=runs[0]["answer_vocab"], **kw)
        out.update({f"vqa_{k}": found[k] for k in keys})
    return out
