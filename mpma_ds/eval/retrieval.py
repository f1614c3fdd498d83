"""Image <-> report retrieval recall@K over L2-normalised embeddings (pure functions, no model).

**Identical reports merged** (as CXR-CLIP evaluates): given the report texts, reports identical after
`normalise_report` are one candidate. Image -> report: every image is a query, the gallery holds each distinct
report once, and a query hits when its own report's text ranks in the top K (so an image retrieving a report
word-for-word the same as its own counts). Report -> image: each distinct report is a query, the gallery holds
every image, and a query hits when any image with that report ranks in the top K (a study's PA and lateral, or
two normal studies with the same one-line report). Without texts the pairs are taken as distinct (row i of each
is the only correct candidate of the other).

**Abnormal studies only** (``abnormal`` given): the same R@K with the queries restricted to images of abnormal
studies (and the reports of those studies), against the same full gallery — ``i2t_R@1_abnormal`` etc. Normal
studies have near-identical reports, which caps R@1 for a perfect model when each counts as distinct and
hides whether the model tells findings apart; the abnormal queries are where retrieval says something.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def normalise_report(text: str) -> str:
    """The form under which two reports count as the same report (whitespace and case folded)."""
    return " ".join(text.split()).lower()


def first_pair_per_report(texts: Sequence[str]) -> list[int]:
    """Indices of the first sample of each distinct report, in order.

    (`retrieval_metrics` merges identical reports instead, keeping every image as a query.)
    """
    seen: set[str] = set()
    keep: list[int] = []
    for i, text in enumerate(texts):
        key = normalise_report(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def correct_ranks(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of the correct candidate for each query, where query i's correct candidate is column i.

    Ties are broken against the query: every other candidate scoring at least as high as the correct one
    ranks before it, so a model that gives everything the same score gets the worst rank, never a lucky one.
    NaN counts against the query too (a NaN correct score gets the worst rank; a NaN candidate ranks before the
    correct one): a diverged model must not get a perfect recall because ``NaN >= x`` is False.

    Args:
        scores: (Q, Q) similarity of query q to candidate c.
    Returns:
        (Q,) int64 ranks.
    """
    n = scores.shape[0]
    if scores.ndim != 2 or scores.shape[1] != n:
        raise ValueError(f"scores must be square (queries x their paired candidates), got {tuple(scores.shape)}")
    correct = scores.diagonal().unsqueeze(1)  # (Q, 1)
    before = (scores >= correct) | scores.isnan() | correct.isnan()  # (Q, Q) includes the correct candidate
    return before.sum(dim=1) - 1


def recall_at_k(scores: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose correct candidate (the diagonal) ranks within the top k, for each k."""
    ranks = correct_ranks(scores)
    return {k: float((ranks < k).double().mean()) for k in ks}


def _groups(texts: Sequence[str] | None, n: int) -> np.ndarray:
    """(N,) group id per row: rows whose reports are identical share one (first-seen order); all distinct
    without texts."""
    if texts is None:
        return np.arange(n)
    if len(texts) != n:
        raise ValueError(f"{len(texts)} report texts for {n} embedding pairs")
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(normalise_report(t), len(ids)) for t in texts], dtype=np.int64)


def group_ranks(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-scoring correct candidate among the candidates that are not correct.

    ``correct_ranks`` generalised to several correct candidates per query; the same tie and NaN rules: every
    wrong candidate scoring at least as high as the best correct one (or NaN) ranks before it, and a query whose
    correct candidates are all NaN gets the worst rank.

    Args:
        scores: (Q, C) similarity of query q to candidate c.
        correct: (Q, C) bool, at least one True per row.
    Returns:
        (Q,) int64 ranks.
    """
    if scores.shape != correct.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and correct {tuple(correct.shape)} must be equal (Q, C)")
    if not bool(correct.any(dim=1).all()):
        raise ValueError("every query needs at least one correct candidate")
    masked = torch.where(correct & ~scores.isnan(), scores, torch.full_like(scores, -math.inf))
    best = masked.max(dim=1, keepdim=True).values  # (Q, 1)
    wrong = ~correct
    before = wrong & ((scores >= best) | scores.isnan())  # (Q, C)
    ranks = before.sum(dim=1)
    all_nan = ~(correct & ~scores.isnan()).any(dim=1)
    return torch.where(all_nan, wrong.sum(dim=1), ranks)  # behind every wrong candidate


def _checked(image_emb, text_emb) -> tuple[torch.Tensor, torch.Tensor]:
    image_emb = torch.as_tensor(image_emb).detach().float().cpu()
    text_emb = torch.as_tensor(text_emb).detach().float().cpu()
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(
            f"paired embeddings must have equal (N, D) shapes: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}"
        )
    if image_emb.shape[0] == 0:
        raise ValueError("no pairs to evaluate retrieval on")
    return image_emb, text_emb


def _per_query_hits(image_emb, text_emb, ks, texts, abnormal):
    """The per-query hit vectors and the query sets: ``(hits {key: (Q,)}, group (N,), first (G,), abnormal (N,))``.

    i2t keys have one entry per image (N), t2i keys one per distinct report (G)."""
    image_emb, text_emb = _checked(image_emb, text_emb)
    n = image_emb.shape[0]
    group = _groups(texts, n)  # (N,)
    first = np.unique(group, return_index=True)[1]  # (G,) the first row of each report
    reports = text_emb[torch.from_numpy(first)]  # (G, D) identical texts: one candidate
    correct = torch.from_numpy(group[:, None] == np.arange(len(first))[None, :])  # (N, G)
    i2t = group_ranks(image_emb @ reports.T, correct)  # (N,)
    t2i = group_ranks(reports @ image_emb.T, correct.T)  # (G,)
    hits = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            hits[f"{name}_R@{k}"] = (ranks < k).double().numpy()
    if abnormal is not None:
        abnormal = np.asarray(torch.as_tensor(abnormal).cpu(), dtype=bool)
        if abnormal.shape != (n,):
            raise ValueError(f"abnormal must be ({n},) bool, got shape {abnormal.shape}")
    return hits, group, first, abnormal


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    texts: Sequence[str] | None = None,
    abnormal: Any = None,
) -> dict[str, Any]:
    """R@K in both directions (fractions in [0, 1]) for N image-report pairs, identical reports merged.

    Args:
        image_emb: (N, D) image embeddings (torch or numpy).
        text_emb: (N, D) report embeddings of the same pairs (same order).
        ks: the K of each R@K.
        texts: the N report texts: reports identical after `normalise_report` become one candidate (module
            docstring); without them every pair is distinct.
        abnormal: (N,) bool, the image's study has a finding: adds ``*_abnormal`` keys over those queries.
    Returns:
        ``{"i2t_R@1": ..., ..., "t2i_R@10": ..., "retrieval_images": N, "retrieval_pairs": G (distinct
        reports)}`` and with ``abnormal`` ``{"i2t_R@1_abnormal": ..., ..., "retrieval_abnormal_images": int,
        "retrieval_abnormal_reports": int}`` (NaN recalls when no query is abnormal).
    """
    hits, group, first, abnormal = _per_query_hits(image_emb, text_emb, ks, texts, abnormal)
    out: dict[str, Any] = {key: float(h.mean()) for key, h in hits.items()}
    out["retrieval_images"] = int(len(group))
    out["retrieval_pairs"] = int(len(first))
    if abnormal is not None:
        ab_reports = abnormal[first]  # (G,) a report's study is abnormal when its first image's is
        for key, h in hits.items():
            rows = abnormal if key.startswith("i2t") else ab_reports
            out[f"{key}_abnormal"] = float(h[rows].mean()) if rows.any() else math.nan
        out["retrieval_abnormal_images"] = int(abnormal.sum())
        out["retrieval_abnormal_reports"] = int(ab_reports.sum())
    return out


def retrieval_metrics_resampler(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    texts: Sequence[str] | None = None,
    abnormal: Any = None,
):
    """``retrieval_metrics``'s R@K for many weightings of the *queries* at once: ``weights (R, N) -> {key: (R,)}``.

    The bootstrap resamples queries against the fixed gallery: resampling the gallery would put duplicate
    candidates in it, which tie with the correct one and (ties count against the query) bias R@K down. Image
    queries take their row's weight; a distinct report's query takes the weight of its first row (the other
    rows with the same report are the same query).
    """
    hits, group, first, abnormal = _per_query_hits(image_emb, text_emb, ks, texts, abnormal)
    n = len(group)

    def mean(weights: np.ndarray, h: np.ndarray) -> np.ndarray:
        total = weights.sum(1)  # (R,)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, weights @ h / np.where(total > 0, total, 1.0), np.nan)

    def resample(weights: np.ndarray) -> dict[str, np.ndarray]:
        if weights.shape[1] != n:
            raise ValueError(f"weights cover {weights.shape[1]} rows, the embeddings {n}")
        by_report = weights[:, first]  # (R, G)
        out = {}
        for key, h in hits.items():
            w = weights if key.startswith("i2t") else by_report
            out[key] = mean(w, h)
            if abnormal is not None:
                rows = abnormal if key.startswith("i2t") else abnormal[first]
                out[f"{key}_abnormal"] = mean(w * rows, h)
        return out

    return resample
