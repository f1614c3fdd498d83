"""Image <-> report retrieval recall@K over L2-normalised embeddings (pure functions, no model)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def normalise_report(text: str) -> str:
    """The form under which two reports count as the same report (whitespace and case folded)."""
    return " ".join(text.split()).lower()


def first_pair_per_report(texts: Sequence[str]) -> list[int]:
    """Indices of the first sample of each distinct report, in order.

    Retrieval is evaluated as the papers do, one image per report: a study's lateral view (same report)
    or another study with word-for-word the same report would otherwise make several "correct" answers.
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


def _paired(image_emb, text_emb, texts: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked float32 (N', D) image and report embeddings, one pair per distinct report when ``texts`` is given."""
    image_emb = torch.as_tensor(image_emb).detach().float().cpu()
    text_emb = torch.as_tensor(text_emb).detach().float().cpu()
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(
            f"paired embeddings must have equal (N, D) shapes: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}"
        )
    if texts is not None:
        if len(texts) != image_emb.shape[0]:
            raise ValueError(f"{len(texts)} report texts for {image_emb.shape[0]} embedding pairs")
        keep = torch.tensor(first_pair_per_report(texts), dtype=torch.long)
        image_emb, text_emb = image_emb[keep], text_emb[keep]
    if image_emb.shape[0] == 0:
        raise ValueError("no pairs to evaluate retrieval on")
    return image_emb, text_emb


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    texts: Sequence[str] | None = None,
) -> dict[str, float]:
    """R@K in both directions for paired embeddings (row i of each is pair i), as fractions in [0, 1].

    Args:
        image_emb: (N, D) image embeddings (torch or numpy).
        text_emb: (N, D) report embeddings of the same pairs (same order).
        ks: the K of each R@K.
        texts: the N report texts, when the pairs may repeat a report (a study's PA and lateral view, or two
            studies with word-for-word the same report): only the first pair of each distinct report is kept,
            as ``first_pair_per_report`` does, so a duplicate is never a second "correct" candidate.
    Returns:
        ``{"i2t_R@1": ..., "i2t_R@5": ..., "t2i_R@1": ..., ..., "retrieval_pairs": N'}`` (N' = pairs kept).
    """
    image_emb, text_emb = _paired(image_emb, text_emb, texts)
    sim = image_emb @ text_emb.T  # (N_img, N_txt)
    out: dict[str, float] = {}
    for name, scores in (("i2t", sim), ("t2i", sim.T)):
        for k, value in recall_at_k(scores, ks).items():
            out[f"{name}_R@{k}"] = value
    out["retrieval_pairs"] = float(image_emb.shape[0])
    return out


def retrieval_metrics_resampler(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    texts: Sequence[str] | None = None,
):
    """``retrieval_metrics``'s R@K for many weightings of the *queries* at once: ``weights (R, N) -> {key: (R,)}``.

    The bootstrap resamples queries against the fixed gallery of all N' candidates: resampling the pairs
    themselves would put duplicate candidates in the gallery, which tie with the correct one and (ties count
    against the query) bias R@K down. With ``texts``, N is the number of pairs *before* de-duplication and
    the weights of a dropped duplicate are ignored.
    """
    n_rows = None
    keep = None
    if texts is not None:
        n_rows = len(texts)
        keep = np.asarray(first_pair_per_report(texts), dtype=np.int64)
    image_emb, text_emb = _paired(image_emb, text_emb, texts)
    sim = image_emb @ text_emb.T  # (N', N')
    hits = {
        f"{name}_R@{k}": (correct_ranks(scores) < k).double().numpy()  # (N',) per-query hit
        for name, scores in (("i2t", sim), ("t2i", sim.T))
        for k in ks
    }

    def resample(weights: np.ndarray) -> dict[str, np.ndarray]:
        if n_rows is not None:
            if weights.shape[1] != n_rows:
                raise ValueError(f"weights cover {weights.shape[1]} rows, texts {n_rows}")
            weights = weights[:, keep]  # (R, N')
        total = weights.sum(1)  # (R,)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                key: np.where(total > 0, weights @ h / np.where(total > 0, total, 1.0), np.nan)
                for key, h in hits.items()
            }

    return resample
