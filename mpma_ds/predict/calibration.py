"""Calibrated probabilities for zero-shot scores: a Platt (or temperature) scaling per label, fitted on labelled
shards, saved beside the model and reused.

A zero-shot score (cosine to the positive prompt minus cosine to the negative one) ranks films but is no
probability. The model's own reading of it — the softmax over (positive, negative) at its learnt contrastive
temperature, ``sigmoid(logit_scale * score)`` — is what we call the **uncalibrated** probability; it is what
calibration is measured against. Per label, on the validation split of the user's shards:

- ``platt`` (default): ``p = sigmoid(a * score + b)``, a and b by maximum likelihood (Platt 1999);
- ``temperature``: ``p = sigmoid(a * score)`` (one scale, no shift: keeps 0 as the 50 % point).

A label needs at least ``min_count`` positives and negatives (default 10) to be fitted; one with fewer is left
out (its probability null) with the reason. The reference is the evaluation's (`eval.zeroshot.reference_targets`:
the synthetic ground truth when every sample has one, else the report labels with blank and uncertain left out).
The expected calibration error (ECE: 10 equal-width bins, the gap between mean probability and positive rate,
weighted by the bin's share, over every (film, label) the fit covered) is reported before and after, on the
fitting split and, when the shards have one, on a held-out split (``test``).

``calibration.json`` (beside the model; ``Predictor(calibration="auto")`` reads it) records the model's
fingerprint, the labels and prompts: a calibration of another model or other prompts is not applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpma_ds.eval.zeroshot import reference_targets, truths_of
from mpma_ds.runner.evaluate import one_pass, split_folder

if TYPE_CHECKING:
    from mpma_ds.predict.predictor import Predictor

CALIBRATION_FILE = "calibration.json"
METHODS = ("platt", "temperature")
DEFAULT_MIN_COUNT = 10
ECE_BINS = 10


class CalibrationError(ValueError):
    """Shards that cannot calibrate (no labels, too few positives), or a calibration file that does not fit."""


def model_fingerprint(folder: str | Path) -> str:
    """A short hash of the model's identity: config.json, and the weights' size and first 4 MiB (an exported
    folder), or the run's newest checkpoint tag (a run folder) — cheap even for the base model."""
    folder = Path(folder)
    h = hashlib.sha256()
    weights = folder / "model.safetensors"
    if weights.is_file():
        h.update((folder / "config.json").read_bytes())
        h.update(str(weights.stat().st_size).encode())
        with open(weights, "rb") as f:
            h.update(f.read(4 << 20))
    else:
        from mpma_ds.runner.export import find_tag_dir

        tag = find_tag_dir(folder)
        h.update(tag.name.encode())
        h.update((tag / "complete.json").read_bytes() if (tag / "complete.json").is_file() else b"")
    return h.hexdigest()[:16]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def fit_platt(scores: np.ndarray, targets: np.ndarray, *, method: str = "platt") -> tuple[float, float]:
    """``(a, b)`` of ``sigmoid(a * s + b)`` maximising the likelihood of 1 / 0 ``targets`` (``temperature``: b = 0),
    by Newton's method on the (convex) negative log-likelihood with a tiny ridge (1e-6) that keeps separable
    data finite."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    s, y = np.asarray(scores, np.float64), np.asarray(targets, np.float64)
    x = np.stack([s, np.ones_like(s)], 1) if method == "platt" else s[:, None]  # (N, P)
    w = np.zeros(x.shape[1])
    ridge = 1e-6 * len(s)
    for _ in range(100):
        p = sigmoid(x @ w)
        grad = x.T @ (p - y) + ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1]) if method == "platt" else 0.0


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over the non-NaN (probability, target) pairs: ``sum_b n_b / N * |mean p_b - positive rate_b|`` over
    ``bins`` equal-width bins of [0, 1] (the last one closed)."""
    p, y = np.asarray(probs, np.float64).ravel(), np.asarray(targets, np.float64).ravel()
    keep = ~(np.isnan(p) | np.isnan(y))
    p, y = p[keep], y[keep]
    if not len(p):
        return math.nan
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() / len(p) * abs(p[sel].mean() - y[sel].mean())
    return float(total)


@dataclass
class Calibration:
    """Per-label scaling of zero-shot scores (`apply`), with what it was fitted on and how well."""

    method: str
    labels: list[str]
    params: dict[str, list[float] | None]
    """label -> ``[a, b]``, or None for a label left out (see ``left_out``)."""
    logit_scale: float
    """The model's contrastive logit scale (the uncalibrated probability is sigmoid(logit_scale * score))."""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    fitted_on: dict[str, Any] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    ece: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{split: {"before": ..., "after": ..., "pairs": n}}``."""

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """(N, C) scores in ``labels`` order -> (N, C) probabilities; NaN for a label left out."""
        s = np.asarray(scores, np.float64)
        out = np.full(s.shape, math.nan)
        for j, name in enumerate(self.labels):
            ab = self.params.get(name)
            if ab is not None:
                out[:, j] = sigmoid(ab[0] * s[:, j] + ab[1])
        return out

    def uncalibrated(self, scores: np.ndarray) -> np.ndarray:
        return sigmoid(self.logit_scale * np.asarray(scores, np.float64))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")
        return path


def load_calibration(path: str | Path, predictor: Predictor, *, missing_ok: bool = False) -> Calibration | None:
    """A saved calibration (a file, or a folder holding ``calibration.json``) checked against ``predictor``'s
    model, labels and prompts.

    Raises:
        CalibrationError: it was fitted for another model, other labels or other prompts (with ``missing_ok``,
            as for a missing file: None).
    """
    path = Path(path)
    path = path / CALIBRATION_FILE if path.is_dir() else path
    if not path.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(
            f"calibration file {path} does not exist; fit one with mpma-predict --calibrate SHARDS"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    cal = Calibration(**data)
    if cal.fingerprint != predictor.fingerprint():
        if missing_ok:
            return None
        raise CalibrationError(
            f"{path} was fitted for another model, labels or prompts; refit it with mpma-predict --calibrate SHARDS"
        )
    return cal


@torch.no_grad()
def collect_scores(predictor: Predictor, shards: str | Path, split: str, *, batch_size: int = 32,
                   max_batches: int | None = None) -> tuple[np.ndarray, np.ndarray, str, int]:  # fmt: skip
    """Zero-shot scores and reference targets of one split through the evaluation loader: ``(scores (N, C),
    targets (N, C) 1 / 0 / NaN, reference "truth" | "labels", N)``."""
    from data_tools.shard_format import CHEXPERT_LABELS

    shard_dir = split_folder(shards, split)
    # the model's own preprocessing, every split pointed at this folder, read whole, through the wds loader
    cfg = dataclasses.replace(predictor.data_cfg, train_shards=str(shard_dir), val_shards=str(shard_dir),
                              test_shards=str(shard_dir), label_fraction=1.0, backend="wds",
                              tokenizer=str(predictor.source.tokenizer_dir))  # fmt: skip
    scores, labels, metas = [], [], []
    with one_pass(
        cfg, predictor.tokenizer, split=split, batch_size=batch_size, max_batches=max_batches
    ) as batches:
        for batch in batches:
            keep = torch.as_tensor(batch.get("valid", [True] * len(batch["image"])), dtype=torch.bool)
            scores.append(predictor.scores_of(batch["image"])[keep])
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.float32)[keep])
            metas.extend(m for m, ok in zip(batch.get("meta") or [{}] * len(keep), keep.tolist()) if ok)
    if not scores:
        raise CalibrationError(f"{shard_dir} yielded no samples")
    label_idx = [CHEXPERT_LABELS.index(n) if n in CHEXPERT_LABELS else -1 for n in predictor.labels]
    if any(i < 0 for i in label_idx):
        unknown = [n for n, i in zip(predictor.labels, label_idx) if i < 0]
        raise CalibrationError(f"labels {unknown} are not CheXpert labels: shards carry only the CheXpert 14")
    targets, reference = reference_targets(torch.cat(labels), truths_of(metas), CHEXPERT_LABELS)
    return torch.cat(scores).numpy(), targets[:, label_idx], reference, len(metas)


def fit_calibration(
    predictor: Predictor,
    shards: str | Path,
    *,
    split: str = "validate",
    heldout_split: str | None = "test",
    method: str = "platt",
    min_count: int = DEFAULT_MIN_COUNT,
    batch_size: int = 32,
) -> Calibration:
    """Fit one scaling per label on ``split`` of ``shards`` (see the module docstring), ECE before / after on it
    and on ``heldout_split`` when the shards have it.

    Raises:
        CalibrationError: no label has ``min_count`` positives and negatives.
    """
    scores, targets, reference, n = collect_scores(predictor, shards, split, batch_size=batch_size)
    params: dict[str, list[float] | None] = {}
    left_out: dict[str, str] = {}
    for j, name in enumerate(predictor.labels):
        t = targets[:, j]
        keep = ~np.isnan(t)
        pos, neg = int((t[keep] == 1).sum()), int((t[keep] == 0).sum())
        if pos < min_count or neg < min_count:
            params[name] = None
            left_out[name] = f"{pos} positives and {neg} negatives in {split} (needs {min_count} of each)"
            continue
        params[name] = list(fit_platt(scores[keep, j], t[keep], method=method))
    if all(v is None for v in params.values()):
        raise CalibrationError(
            f"no label of {split_folder(shards, split)} has >= {min_count} positives and negatives ({n} samples); "
            "calibrate on more labelled films or lower --calibration-min-count"
        )
    cal = Calibration(method, list(predictor.labels), params, predictor.logit_scale, predictor.fingerprint(),
                      {"shards": str(Path(shards).resolve()), "split": split, "samples": n, "reference": reference,
                       "min_count": min_count}, left_out)  # fmt: skip
    cal.ece[split] = calibration_report(cal, scores, targets)
    if heldout_split and heldout_split != split:
        try:
            split_folder(shards, heldout_split)
        except FileNotFoundError:
            return cal
        h_scores, h_targets, _, h_n = collect_scores(predictor, shards, heldout_split, batch_size=batch_size)
        cal.ece[heldout_split] = calibration_report(cal, h_scores, h_targets)
        cal.fitted_on[f"{heldout_split}_samples"] = h_n
    return cal


def calibration_report(cal: Calibration, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """ECE before (`Calibration.uncalibrated`) and after (`Calibration.apply`) over the labels fitted, and the
    number of (film, label) pairs."""
    cols = [j for j, n in enumerate(cal.labels) if cal.params.get(n) is not None]
    after = cal.apply(scores)[:, cols]
    before = cal.uncalibrated(scores)[:, cols]
    t = targets[:, cols]
    return {"before": expected_calibration_error(before, t), "after": expected_calibration_error(after, t),
            "pairs": int((~np.isnan(t)).sum())}  # fmt: skip


def format_calibration(cal: Calibration) -> str:
    """Lines for the terminal: the method, what it was fitted on, ECE before / after per split, labels left out."""
    fitted = sum(v is not None for v in cal.params.values())
    on = cal.fitted_on
    lines = [f"calibration ({cal.method}, {fitted} of {len(cal.labels)} labels) fitted on {on.get('split')} of "
             f"{on.get('shards')}: {on.get('samples')} films, reference {on.get('reference')}"]  # fmt: skip
    for split, e in cal.ece.items():
        lines.append(f"  ECE on {split} ({e['pairs']} film-label pairs): uncalibrated {e['before']:.3f} -> "
                     f"calibrated {e['after']:.3f}")  # fmt: skip
    lines += [f"  left out: {name}: {why}" for name, why in cal.left_out.items()]
    return "\n".join(lines)
