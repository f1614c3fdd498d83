"""Image <-> report retrieval recall@K over L2-normalised embeddings (pure functions, no model)."""

from __future__ import annotations

from collections.abc import Sequence

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

    Args:
        scores: (Q, Q) similarity of query q to candidate c.
    Returns:
        (Q,) int64 ranks.
    """
    n = scores.shape[0]
    if scores.ndim != 2 or scores.shape[1] != n:
        raise ValueError(f"scores must be square (queries x their paired candidates), got {tuple(scores.shape)}")
    correct = scores.diagonal().unsqueeze(1)  # (Q, 1)
    at_least = (scores >= correct).sum(dim=1)  # (Q,) includes the correct candidate itself
    return at_least - 1


def recall_at_k(scores: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose correct candidate (the diagonal) ranks within the top k, for each k."""
    ranks = correct_ranks(scores)
    return {k: float((ranks < k).float().mean()) for k in ks}


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """R@K in both directions for paired embeddings (row i of each is pair i), as fractions in [0, 1].

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (N, D) report embeddings of the same pairs (same order).
    Returns:
        ``{"i2t_R@1": ..., "i2t_R@5": ..., "t2i_R@1": ..., ..., "retrieval_pairs": N}``.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(
            f"paired embeddings must have equal (N, D) shapes: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}"
        )
    if image_emb.shape[0] == 0:
        raise ValueError("no pairs to evaluate retrieval on")
    sim = image_emb.float() @ text_emb.float().T  # (N_img, N_txt)
    out: dict[str, float] = {}
    for name, scores in (("i2t", sim), ("t2i", sim.T)):
        for k, value in recall_at_k(scores, ks).items():
            out[f"{name}_R@{k}"] = value
    out["retrieval_pairs"] = float(image_emb.shape[0])
    return out
