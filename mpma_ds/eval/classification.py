"""Classification metrics for the downstream tasks: CheXpert-style multi-label AUROC (with the uncertain-label
policy applied first) and multi-class accuracy / F1 / one-vs-rest AUROC.

Point estimates use scikit-learn (``roc_auc_score``, ``f1_score``). Each metric also has a *resampler*
(``*_resampler``): the same metric for many bootstrap resamples at once, written as row weights (a resample
drawn with replacement is a count per original row), so ``mpma_ds.eval.bootstrap.with_intervals`` does not
call scikit-learn a thousand times. The two are tested against each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score

UNCERTAIN_POLICIES: tuple[str, ...] = ("zeros", "ones", "ignore")

Resampler = Callable[[np.ndarray], dict[str, np.ndarray]]


def as_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """``x`` (numpy array, torch tensor on any device / dtype, or nested list) as a numpy array of ``dtype``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x  # bf16 / fp16 have no numpy twin
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def apply_uncertain_policy(targets: Any, policy: str) -> Any:
    """Map CheXpert's uncertain label (-1) by ``policy``; blank (NaN) stays NaN (not labelled) in every policy.

    Args:
        targets: (N, C) labels 1 / 0 / -1 / NaN, numpy or torch.
        policy: ``"zeros"`` (-1 -> 0, U-Zeros), ``"ones"`` (-1 -> 1, U-Ones) or ``"ignore"`` (-1 -> NaN).
    Returns:
        (N, C) float, the same kind of array as ``targets`` (torch stays torch, on its device), values 1 / 0 / NaN.
    Raises:
        ValueError: an unknown policy, or a value other than 1, 0, -1 or NaN.
    """
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"unknown uncertain-label policy {policy!r}; choose one of {', '.join(UNCERTAIN_POLICIES)}"
        )
    replacement = {"zeros": 0.0, "ones": 1.0, "ignore": math.nan}[policy]
    if isinstance(targets, torch.Tensor):
        t = targets.float() if not targets.is_floating_point() else targets.clone()
        bad = ~(t.isnan() | (t == 0) | (t == 1) | (t == -1))
        if bool(bad.any()):
            raise ValueError(f"labels must be 1, 0, -1 or NaN; found {t[bad][:5].tolist()}")
        t[t == -1] = replacement
        return t
    t = np.array(targets)  # a copy
    t = t if np.issubdtype(t.dtype, np.floating) else t.astype(np.float64)
    bad = ~(np.isnan(t) | (t == 0) | (t == 1) | (t == -1))
    if bad.any():
        raise ValueError(f"labels must be 1, 0, -1 or NaN; found {t[bad][:5].tolist()}")
    t[t == -1] = replacement
    return t


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one binary problem under many row weightings at once (vectorised Mann-Whitney U).

    With integer weights (bootstrap counts) this equals ``sklearn.metrics.roc_auc_score`` on the resampled rows:
    each (positive, negative) pair counts 1 when the positive scores higher and 1/2 on a tie.

    Args:
        scores: (N,) finite scores, higher = more likely positive.
        positive: (N,) bool.
        weights: (R, N) non-negative row weights, one weighting per row of the result.
    Returns:
        (R,) AUROC; NaN where a weighting leaves no positive or no negative weight.
    """
    negative = ~positive
    neg_rows = np.flatnonzero(negative)[np.argsort(scores[negative], kind="stable")]  # (N_neg,) by score
    pos_rows = np.flatnonzero(positive)  # (N_pos,)
    neg_scores = scores[neg_rows]
    below = np.searchsorted(neg_scores, scores[pos_rows], side="left")  # (N_pos,) negatives scoring lower
    up_to = np.searchsorted(neg_scores, scores[pos_rows], side="right")  # (N_pos,) ... lower or tied
    neg_cum = np.zeros((len(weights), len(neg_rows) + 1))  # (R, N_neg + 1) negative weight of the lowest j
    np.cumsum(weights[:, neg_rows], axis=1, out=neg_cum[:, 1:])
    pos_w = weights[:, pos_rows]  # (R, N_pos)
    # a positive beats the negatives below it and half-beats those it ties: (below + up_to) / 2
    wins = 0.5 * (pos_w * (neg_cum[:, below] + neg_cum[:, up_to])).sum(axis=1)  # (R,)
    pairs = pos_w.sum(axis=1) * neg_cum[:, -1]  # (R,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def _check_multilabel(scores: Any, targets: Any, names: Sequence[str], min_each: int):
    s = as_numpy(scores)
    t = as_numpy(targets)
    if s.ndim != 2 or s.shape != t.shape or s.shape[1] != len(names):
        raise ValueError(
            f"scores {s.shape}, targets {t.shape} and {len(names)} label names must agree as (N, C), (N, C), C"
        )
    if min_each < 1:
        raise ValueError(f"min_each must be >= 1, got {min_each}")
    labelled = ~np.isnan(t)
    if (t[labelled] == -1).any():
        raise ValueError(
            "targets hold -1 (uncertain): map them with apply_uncertain_policy(targets, policy) first"
        )
    if not np.isin(t[labelled], (0.0, 1.0)).all():
        raise ValueError("targets must be 1, 0 or NaN (not labelled)")
    if not np.isfinite(s[labelled]).all():
        raise ValueError("scores hold NaN or Inf on labelled rows")
    return s, t, labelled


def _label_left_out(n_pos: int, n_neg: int, min_each: int) -> str | None:
    """Why a label gets no AUROC, or None when it has one."""
    if n_pos >= min_each and n_neg >= min_each:
        return None
    if n_pos + n_neg == 0:
        return "no labelled rows"
    return f"{n_pos} positive and {n_neg} negative labelled rows (needs >= {min_each} of each)"


def multilabel_auroc(
    scores: Any, targets: Any, names: Sequence[str], *, min_each: int = 1, prefix: str = "auroc"
) -> dict[str, Any]:
    """Per-label and macro AUROC of a multi-label classifier (CheXpert-14), over each label's labelled rows.

    Uses ``sklearn.metrics.roc_auc_score`` per label. A label enters the macro mean only when its labelled rows
    hold at least ``min_each`` positives and ``min_each`` negatives; the others (all NaN in this split, or a
    single class) get no ``auroc/<name>`` key and are listed, with the reason, in ``labels_left_out``.

    Args:
        scores: (N, C) scores or logits, higher = more likely positive (monotone transforms do not matter).
        targets: (N, C) float 1 / 0 / NaN (NaN = not labelled, ignored). Uncertain labels (-1) must be mapped
            first with ``apply_uncertain_policy``; a -1 here is an error.
        names: the C label names, in column order.
        min_each: the fewest positives and negatives a label needs to be scored.
        prefix: key prefix (``auroc`` -> ``auroc/<name>``, ``auroc_macro``).
    Returns:
        ``{"auroc/<name>": float, ..., "auroc_macro": float (NaN when no label is scored), "labels_used": int,
        "labels_left_out": {name: reason}}`` (dict in column order; ``list(...)`` gives the names).
    """
    s, t, labelled = _check_multilabel(scores, targets, names, min_each)
    out: dict[str, Any] = {}
    used: list[float] = []
    left_out: dict[str, str] = {}
    for c, name in enumerate(names):
        keep = labelled[:, c]
        y = t[keep, c]
        reason = _label_left_out(int((y == 1).sum()), int((y == 0).sum()), min_each)
        if reason is not None:
            left_out[name] = reason
            continue
        out[f"{prefix}/{name}"] = float(roc_auc_score(y.astype(np.int64), s[keep, c]))
        used.append(out[f"{prefix}/{name}"])
    out[f"{prefix}_macro"] = float(np.mean(used)) if used else math.nan
    out["labels_used"] = len(used)
    out["labels_left_out"] = left_out
    return out


def multilabel_auroc_resampler(
    scores: Any, targets: Any, names: Sequence[str], *, min_each: int = 1, prefix: str = "auroc"
) -> Resampler:
    """``multilabel_auroc`` for many row weightings at once: a function ``weights (R, N) -> {key: (R,)}``.

    A label undefined in a resample (fewer than ``min_each`` positives or negatives drawn) is NaN there and left
    out of that resample's macro mean; the macro is NaN where no label is defined.
    """
    s, t, labelled = _check_multilabel(scores, targets, names, min_each)
    columns = []
    for c, name in enumerate(names):
        keep = np.flatnonzero(labelled[:, c])
        y = t[keep, c] == 1
        if _label_left_out(int(y.sum()), int((~y).sum()), min_each) is None:
            columns.append((name, keep, s[keep, c], y))

    def resample(weights: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, keep, score, y in columns:
            w = weights[:, keep]  # (R, N_labelled)
            auc = weighted_auroc(score, y, w)
            enough = ((w * y).sum(1) >= min_each) & ((w * ~y).sum(1) >= min_each)
            out[f"{prefix}/{name}"] = np.where(enough, auc, np.nan)
        stacked = np.stack(list(out.values()), axis=1) if out else np.full((len(weights), 1), np.nan)  # (R, C')
        defined = ~np.isnan(stacked)
        with np.errstate(invalid="ignore"):
            out[f"{prefix}_macro"] = np.where(defined, stacked, 0.0).sum(1) / defined.sum(1)  # NaN when none
        return out

    return resample


def _class_probs(logits_or_probs: np.ndarray, probs: bool | None) -> np.ndarray:
    """Rows as probabilities: kept when they already are (or ``probs=True``), else a softmax of logits."""
    x = logits_or_probs
    if probs is None:
        probs = bool(((x >= 0) & (x <= 1)).all() and np.allclose(x.sum(1), 1.0, atol=1e-4))
    if probs:
        return x
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _check_multiclass(logits_or_probs: Any, targets: Any, class_names: Sequence[str], probs: bool | None):
    x = as_numpy(logits_or_probs)
    y = as_numpy(targets, None)
    k = len(class_names)
    if x.ndim != 2 or x.shape[1] != k or y.shape != (x.shape[0],):
        raise ValueError(f"logits {x.shape}, targets {y.shape} and {k} class names must agree as (N, K), (N,), K")
    if x.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.equal(np.mod(y, 1), 0).all():
            raise ValueError("multi-class targets must be integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"targets must lie in [0, {k}); found {int(y.min())}..{int(y.max())}")
    if not np.isfinite(x).all():
        raise ValueError("logits hold NaN or Inf")
    return _class_probs(x, probs), y


def multiclass_metrics(
    logits_or_probs: Any, targets: Any, class_names: Sequence[str], *, probs: bool | None = None
) -> dict[str, Any]:
    """Accuracy, macro / per-class F1 and macro one-vs-rest AUROC of a single-label K-class classifier.

    F1 is ``sklearn.metrics.f1_score`` over the classes that occur among the targets or the predictions
    (scikit-learn's default label set; a class in neither has no F1 and is left out). One-vs-rest AUROC is
    ``roc_auc_score(targets == k, p[:, k])`` on softmax probabilities, for the classes with both outcomes among
    the targets; it equals scikit-learn's ``multi_class="ovr"`` macro when every class is present.

    Args:
        logits_or_probs: (N, K) logits, or probabilities (rows in [0, 1] summing to 1, detected, or say so with
            ``probs``); the prediction is the arg-max (ties -> lowest index).
        targets: (N,) int class indices in [0, K).
        class_names: the K class names, in column order.
        probs: True: inputs are probabilities; False: logits (softmaxed); None: detect.
    Returns:
        ``{"accuracy", "f1_macro", "f1/<name>" (classes present), "auroc/<name>", "auroc_macro" (NaN when no class
        has both outcomes): float, "classes_used": int (classes in the AUROC macro),
        "classes_left_out": {name: reason} (classes without an AUROC)}``.
    """
    p, y = _check_multiclass(logits_or_probs, targets, class_names, probs)
    pred = p.argmax(axis=1)  # (N,)
    out: dict[str, Any] = {"accuracy": float((pred == y).mean())}
    present = np.union1d(y, pred)
    f1 = f1_score(y, pred, labels=present, average=None, zero_division=0)  # (K',)
    out["f1_macro"] = float(f1.mean())
    for k, value in zip(present.tolist(), f1.tolist()):
        out[f"f1/{class_names[k]}"] = float(value)
    used: list[float] = []
    left_out: dict[str, str] = {}
    for k, name in enumerate(class_names):
        reason = _label_left_out(int((y == k).sum()), int((y != k).sum()), 1)
        if reason is not None:
            left_out[name] = reason
            continue
        out[f"auroc/{name}"] = float(roc_auc_score(y == k, p[:, k]))
        used.append(out[f"auroc/{name}"])
    out["auroc_macro"] = float(np.mean(used)) if used else math.nan
    out["classes_used"] = len(used)
    out["classes_left_out"] = left_out
    return out


def multiclass_metrics_resampler(
    logits_or_probs: Any, targets: Any, class_names: Sequence[str], *, probs: bool | None = None
) -> Resampler:
    """``multiclass_metrics`` for many row weightings at once: a function ``weights (R, N) -> {key: (R,)}``.

    Per resample, F1 of a class that neither occurs nor is predicted is NaN and left out of the macro F1
    (scikit-learn's default label set on the resampled rows); AUROC likewise per class with both outcomes.
    """
    p, y = _check_multiclass(logits_or_probs, targets, class_names, probs)
    k = len(class_names)
    pred = p.argmax(axis=1)
    truth = np.eye(k)[y]  # (N, K) one-hot targets
    guess = np.eye(k)[pred]  # (N, K) one-hot predictions
    present = np.union1d(y, pred)
    scored = [c for c in range(k) if 0 < (y == c).sum() < len(y)]

    def resample(weights: np.ndarray) -> dict[str, np.ndarray]:
        total = weights.sum(1)  # (R,)
        out = {"accuracy": (weights @ (pred == y).astype(np.float64)) / total}
        tp = weights @ (truth * guess)  # (R, K)
        wrong = weights @ (truth + guess - 2 * truth * guess)  # (R, K) false positives + false negatives
        denom = 2 * tp + wrong
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), np.nan)  # (R, K)
        out["f1_macro"] = np.nanmean(f1, axis=1)  # a resample has rows, so at least one class is present
        for c in present.tolist():
            out[f"f1/{class_names[c]}"] = f1[:, c]
        aucs = [weighted_auroc(p[:, c], y == c, weights) for c in scored]
        for c, auc in zip(scored, aucs):
            out[f"auroc/{class_names[c]}"] = auc
        stacked = np.stack(aucs, axis=1) if aucs else np.full((len(weights), 1), np.nan)  # (R, K')
        defined = ~np.isnan(stacked)
        with np.errstate(invalid="ignore"):
            out["auroc_macro"] = np.where(defined, stacked, 0.0).sum(1) / defined.sum(1)
        return out

    return resample
