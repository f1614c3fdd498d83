"""Zero-shot CheXpert classification from label prompts, and the reference it is scored against.

**Prompt ensembles** (CheXzero / CXR-CLIP style; this table is the one place they are defined). Each label has
several positive phrasings (how a report states the finding) and several negative ones (how a report rules it
out), in the words of MIMIC-CXR reports, which the synthetic corpus imitates. A label's positive (negative)
embedding is the mean of its positive (negative) phrasings' L2-normalised text embeddings, normalised again;
an image's score for the label is cosine(image, positive) - cosine(image, negative). Averaging phrasings
takes out the wording a single prompt happens to use (one side, one lobe, one size) and leaves the finding.

**Reference and which labels count.** When every evaluated sample carries the synthetic corpus's `truth`
(`data_tools.shard_format.TRUTH_FIELD`), a label is positive where the finding is drawn and negative elsewhere
(`reference_targets`); otherwise the report-derived CheXpert labels are used, blank (not mentioned) and
uncertain (-1) left out. A label is scored only with at least ``min_count`` positives *and* negatives (default
`DEFAULT_MIN_COUNT`): with 3 positives one AUROC moves the mean by chance, not by skill. The labels left out
are listed with the reason (``zeroshot_labels_left_out``); when none qualifies the mean is NaN and
``zeroshot_note`` says why — never a number made up from too few samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from data_tools.shard_format import CHEXPERT_LABELS, TRUTH_FIELD
from mpma_ds.eval.classification import (
    Resampler,
    apply_uncertain_policy,
    as_numpy,
    multilabel_auroc,
    multilabel_auroc_resampler,
)

DEFAULT_MIN_COUNT = 20
"""A label enters the zero-shot AUROC with at least this many positives and this many negatives."""

PATHOLOGIES: tuple[str, ...] = tuple(n for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices"))
"""The findings that make a study abnormal (Support Devices are not a pathology, as in CheXpert)."""

Prompts = tuple[tuple[str, ...], tuple[str, ...]]

CHEXPERT_PROMPTS: dict[str, Prompts] = {
    "Atelectasis": (
        ("Bibasilar atelectasis.", "Linear atelectasis at the left lung base.", "Right basilar atelectasis."),
        ("No atelectasis.", "There is no atelectasis."),
    ),
    "Cardiomegaly": (
        (
            "Moderate cardiomegaly.",
            "The heart is mildly enlarged.",
            "The cardiac silhouette is severely enlarged.",
        ),
        ("Heart size is normal.", "No cardiomegaly."),
    ),
    "Consolidation": (
        (
            "Focal consolidation in the right lower lobe.",
            "There is consolidation of the left upper lobe.",
            "Dense consolidation is present in the lingula.",
        ),
        ("No focal consolidation.", "The lungs are clear without focal consolidation."),
    ),  # fmt: skip
    "Edema": (
        (
            "Moderate pulmonary edema.",
            "Mild pulmonary edema with perihilar haziness.",
            "There is severe pulmonary edema.",
        ),
        ("No pulmonary edema.", "There is no pulmonary edema."),
    ),  # fmt: skip
    "Enlarged Cardiomediastinum": (
        ("The superior mediastinum is widened.", "Widening of the mediastinum."),
        ("The mediastinal contours are normal.",),
    ),
    "Fracture": (
        ("Fracture of the right sixth posterior rib.", "There is a displaced fracture of the left fifth rib."),
        ("No displaced rib fracture.",),
    ),
    "Lung Lesion": (
        (
            "A 2.1 cm nodule is seen in the right upper lobe.",
            "4.5 cm mass in the left lower lobe.",
            "A nodule is seen in the lingula.",
        ),
        ("No suspicious nodule.", "There is no suspicious nodule."),
    ),  # fmt: skip
    "Lung Opacity": (
        ("Patchy opacity in the right lower lobe.", "Patchy opacities are seen in the left upper lobe."),
        ("No focal opacity.", "There is no focal opacity."),
    ),
    "No Finding": (
        ("No acute cardiopulmonary process.", "The lungs are clear."),
        ("Acute cardiopulmonary abnormality.", "There is an acute cardiopulmonary process."),
    ),
    "Pleural Effusion": (
        (
            "Moderate right pleural effusion.",
            "There are small bilateral pleural effusions.",
            "A large left-sided pleural effusion is present.",
        ),
        ("No pleural effusion.", "There is no pleural effusion."),
    ),  # fmt: skip
    "Pleural Other": (
        ("Right apical pleural thickening.", "There is a left apical cap."),
        ("No pleural thickening.",),
    ),
    "Pneumonia": (
        (
            "Right lower lobe pneumonia.",
            "Findings are consistent with pneumonia in the left upper lobe.",
            "Airspace disease in the lingula, consistent with pneumonia.",
        ),
        ("No evidence of pneumonia.",),
    ),  # fmt: skip
    "Pneumothorax": (
        (
            "Small left apical pneumothorax.",
            "There is a moderate right pneumothorax.",
            "A large left pneumothorax is present.",
        ),
        ("No pneumothorax.", "There is no pneumothorax."),
    ),  # fmt: skip
    "Support Devices": (
        (
            "Endotracheal tube terminates 4 cm above the carina.",
            "Enteric tube courses below the diaphragm into the stomach.",
            "Right internal jugular central venous catheter ends in the superior vena cava.",
            "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
        ),
        ("No lines or tubes.",),
    ),  # fmt: skip
}
"""Label -> (positive phrasings, negative phrasings): the prompt ensembles of the zero-shot classifier."""


def prompts_for(label_names: Sequence[str], prompts: Mapping[str, Any] | None = None) -> list[Prompts]:
    """The (positives, negatives) ensemble of each label; ``prompts`` overrides entries (a bare string or a
    (positive, negative) pair of strings is one phrasing each); unknown labels get a generic pair."""
    table = {**CHEXPERT_PROMPTS, **(prompts or {})}
    out = []
    for name in label_names:
        pos, neg = table.get(name, (f"There is {name.lower()}.", f"There is no {name.lower()}."))
        out.append(
            ((pos,) if isinstance(pos, str) else tuple(pos), (neg,) if isinstance(neg, str) else tuple(neg))
        )
    return out


def ensemble_embeddings(
    encode: Callable[[list[str]], torch.Tensor], ensembles: Sequence[Sequence[str]]
) -> torch.Tensor:
    """(C, D) one embedding per ensemble: the mean of its phrasings' L2-normalised embeddings, normalised again.

    Args:
        encode: texts -> (n, D) embeddings (called once with every phrasing).
        ensembles: C lists of phrasings.
    """
    flat = [text for group in ensembles for text in group]
    emb = torch.nn.functional.normalize(encode(flat).float(), dim=-1)  # (sum n_c, D)
    out, start = [], 0
    for group in ensembles:
        out.append(emb[start : start + len(group)].mean(0))
        start += len(group)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)  # (C, D)


def prompt_scores(image_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor) -> torch.Tensor:
    """(N, C) zero-shot scores: cosine(image, positive prompt) - cosine(image, negative prompt).

    Args:
        image_emb: (N, D) L2-normalised image embeddings.
        pos_emb: (C, D) embeddings of each label's positive prompt (ensemble).
        neg_emb: (C, D) embeddings of each label's negative prompt (ensemble).
    """
    return image_emb.float() @ pos_emb.float().T - image_emb.float() @ neg_emb.float().T  # (N, C)


def _truth_target(entry: Mapping[str, Any] | None) -> float:
    return math.nan if not entry else (1.0 if entry.get("present") else 0.0)


def reference_targets(
    labels: Any, truths: Sequence[Mapping[str, Any] | None] | None, label_names: Sequence[str] = CHEXPERT_LABELS
) -> tuple[np.ndarray, str]:
    """The zero-shot reference: ``(targets (N, C) float 1 / 0 / NaN, "truth" | "labels")``.

    The synthetic ground truth when every sample has one (1 where ``present``, else 0); otherwise the CheXpert
    labels with blank (NaN) and uncertain (-1) left out (NaN).

    Args:
        labels: (N, C) report labels 1 / 0 / -1 / NaN.
        truths: per sample, ``meta["truth"]`` or None.
    """
    y = as_numpy(labels)
    if truths is not None and len(truths) == len(y) and len(y) and all(t for t in truths):
        # a label the truth does not mention is unknown for that sample (NaN), as a blank report label is
        return truth_targets([{TRUTH_FIELD: t} for t in truths], label_names), "truth"
    return apply_uncertain_policy(y, "ignore"), "labels"


def abnormal_rows(
    labels: Any, truths: Sequence[Mapping[str, Any] | None] | None, label_names: Sequence[str] = CHEXPERT_LABELS
) -> np.ndarray:
    """(N,) bool: the sample has at least one pathology (`PATHOLOGIES`) present — by its truth when every sample
    has one, else by a positive (1) report label."""
    targets, _ = reference_targets(labels, truths, label_names)
    cols = [i for i, n in enumerate(label_names) if n in PATHOLOGIES]
    return (targets[:, cols] == 1).any(axis=1) if cols else np.zeros(len(targets), dtype=bool)


def truths_of(metas: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any] | None]:
    """Each sample json's `truth` (None where it has none)."""
    return [m.get(TRUTH_FIELD) if isinstance(m, Mapping) else None for m in metas]


def truth_targets(
    metas: Sequence[Mapping[str, Any]], label_names: Sequence[str] = CHEXPERT_LABELS, *, strict: bool = True
) -> np.ndarray:
    """(N, C) float 1 / 0 / NaN from each sample json's synthetic `truth` (the zero-shot reference of
    `reference_targets`): what a classifier taught the answer itself trains on (``task.cls.labels: truth``).
    With ``strict=False`` a sample without `truth` (a row a batch skipped as unreadable) is all NaN.

    Raises:
        ValueError: ``strict`` and a sample without `truth` (shards not built from ``data_tools.synth_corpus``).
    """
    truths = truths_of(metas)
    if strict and any(not t for t in truths):
        raise ValueError(
            f"{sum(not t for t in truths)} of {len(truths)} samples have no '{TRUTH_FIELD}' in their json: "
            "truth targets need shards built from a synthetic corpus (python -m data_tools.synth_corpus)"
        )
    out = [[_truth_target(t.get(name)) if t else math.nan for name in label_names] for t in truths]
    return np.array(out, dtype=np.float64).reshape(len(truths), len(label_names))


def zero_shot_auroc(
    scores: Any,
    targets: Any,
    label_names: Sequence[str] = CHEXPERT_LABELS,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    reference: str = "labels",
) -> dict[str, Any]:
    """Per-label AUROC of zero-shot scores over the labels with >= ``min_count`` positives and negatives.

    Args:
        scores: (N, C) higher = more likely positive.
        targets: (N, C) float 1 / 0 / NaN (NaN rows are left out of that label); uncertain -1 is left out too.
        label_names: the C names.
        min_count: the fewest positives and negatives a label needs.
        reference: what ``targets`` are (``"truth"`` or ``"labels"``), reported back.
    Returns:
        ``{"zeroshot_auroc/<label>": ..., "zeroshot_auroc_mean": float (NaN when no label qualifies),
        "zeroshot_labels": int, "zeroshot_labels_left_out": {label: reason}, "zeroshot_reference": str,
        "zeroshot_min_count": int}`` and, when no label qualifies, ``"zeroshot_note"``.
    """
    s, t = as_numpy(scores), apply_uncertain_policy(as_numpy(targets), "ignore")
    if s.shape != t.shape or s.ndim != 2 or s.shape[1] != len(label_names):
        raise ValueError(
            f"scores {s.shape}, targets {t.shape} and {len(label_names)} label names do not agree as (N, C)"
        )
    m = multilabel_auroc(s, t, label_names, min_each=min_count, prefix="zeroshot_auroc")
    out: dict[str, Any] = {k: v for k, v in m.items() if k.startswith("zeroshot_auroc/")}
    out["zeroshot_auroc_mean"] = m["zeroshot_auroc_macro"]
    out["zeroshot_labels"] = int(m["labels_used"])
    out["zeroshot_labels_left_out"] = dict(m["labels_left_out"])
    out["zeroshot_reference"] = reference
    out["zeroshot_min_count"] = int(min_count)
    if math.isnan(out["zeroshot_auroc_mean"]):
        out["zeroshot_note"] = (
            f"no label has >= {min_count} positives and >= {min_count} negatives among {len(s)} samples "
            f"(reference: {reference}); zero-shot AUROC not computed — evaluate on more samples or lower the "
            "minimum count"
        )
    return out


def zero_shot_auroc_resampler(
    scores: Any,
    targets: Any,
    label_names: Sequence[str] = CHEXPERT_LABELS,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    reference: str = "labels",
) -> Resampler:
    """``zero_shot_auroc`` for many row weightings at once (``mpma_ds.eval.bootstrap.with_intervals``).

    Every resample scores the labels the point estimate scored (those with ``min_count`` of each class in the
    full set), so the mean's interval is over one fixed set of labels; a label is NaN only in a resample that
    draws no positive or no negative of it."""
    s, t = as_numpy(scores), apply_uncertain_policy(as_numpy(targets), "ignore")
    point = multilabel_auroc(s, t, label_names, min_each=min_count)
    cols = [i for i, name in enumerate(label_names) if name not in point["labels_left_out"]]
    names = [label_names[i] for i in cols]
    inner = multilabel_auroc_resampler(s[:, cols], t[:, cols], names, min_each=1, prefix="zeroshot_auroc")

    def resample(weights: np.ndarray) -> dict[str, np.ndarray]:
        out = inner(weights)
        out["zeroshot_auroc_mean"] = out.pop("zeroshot_auroc_macro")
        return out

    return resample
