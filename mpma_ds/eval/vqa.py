"""Medical VQA (VQA-RAD, SLAKE) as classification over an answer set: the answer vocabulary, BCE targets, and
accuracy overall / on CLOSED / on OPEN questions, with test answers outside the vocabulary counted wrong.

M3AE's recipe: answers are classes; the answer set is built from the training split (our default) or from
all splits (``mode="all"``, what M3AE ships, which lets test-only answers be predicted); the head is trained
with binary cross-entropy against (soft) answer targets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mpma_ds.eval.classification import Resampler

ANSWER_TYPES: tuple[str, ...] = ("CLOSED", "OPEN")


def normalize_answer(text: str) -> str:
    """The form under which two answers are the same: surrounding space stripped, lower-cased, runs of
    whitespace collapsed to one space (``"  Left  Lung "`` -> ``"left lung"``). Punctuation is kept."""
    return " ".join(str(text).split()).lower()


def build_answer_vocab(
    answers_by_split: Mapping[str, Sequence[str]], *, mode: str = "train", train_split: str = "train"
) -> list[str]:
    """The answer set (class list) of a VQA head, normalised, most frequent first, ties by text.

    Args:
        answers_by_split: split name -> that split's gold answers (one per question).
        mode: ``"train"``: the answers of ``train_split`` only (test answers never seen in training cannot be
            predicted and are counted wrong); ``"all"``: every split's answers (M3AE's answer set), with
            frequencies counted over all splits.
        train_split: the name of the training split in ``answers_by_split``.
    Returns:
        The distinct normalised answers sorted by (frequency descending, text ascending): deterministic.
    Raises:
        ValueError: unknown ``mode``, or ``mode="train"`` without ``train_split``.
    """
    if mode == "train":
        if train_split not in answers_by_split:
            raise ValueError(
                f"answer set mode 'train' needs a {train_split!r} split; got splits {sorted(answers_by_split)}"
            )
        answers: list[str] = list(answers_by_split[train_split])
    elif mode == "all":
        answers = [a for split in answers_by_split.values() for a in split]
    else:
        raise ValueError(f"unknown answer set mode {mode!r}; choose 'train' or 'all'")
    counts = Counter(normalize_answer(a) for a in answers)
    return sorted(counts, key=lambda a: (-counts[a], a))


def answer_indices(answers: Sequence[str], answer_vocab: Sequence[str]) -> np.ndarray:
    """(N,) int64 index of each (normalised) answer in ``answer_vocab``, -1 for an answer outside it."""
    index = {normalize_answer(a): i for i, a in enumerate(answer_vocab)}
    return np.array([index.get(normalize_answer(a), -1) for a in answers], dtype=np.int64)


def soft_answer_targets(
    answers: Sequence[str | Sequence[str]], answer_vocab: Sequence[str], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """BCE targets over the answer set: 1.0 for every valid answer of a question, 0.0 elsewhere.

    VQA-RAD and SLAKE give one answer per question, so a row is one-hot; a question may also list several valid
    answers (each gets 1.0). A question whose answers are all outside the vocabulary gets an all-zero row (it
    still trains the head towards "none of these", and is counted wrong at test time).

    Args:
        answers: N items, each an answer string or a sequence of valid answer strings.
        answer_vocab: the V answers of the head, in column order.
        dtype: the target dtype.
    Returns:
        (N, V) targets.
    """
    index = {normalize_answer(a): i for i, a in enumerate(answer_vocab)}
    targets = torch.zeros(len(answers), len(answer_vocab), dtype=dtype)  # (N, V)
    for row, item in enumerate(answers):
        for answer in (item,) if isinstance(item, str) else item:
            col = index.get(normalize_answer(answer))
            if col is not None:
                targets[row, col] = 1.0
    return targets


def _predicted_answers(predicted: Any, answer_vocab: Sequence[str]) -> list[str]:
    """Predicted answers as normalised strings; integer ids are looked up in ``answer_vocab``."""
    if isinstance(predicted, torch.Tensor | np.ndarray):
        values = predicted.tolist()
    else:
        values = list(predicted)
    if values and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        bad = [v for v in values if not 0 <= v < len(answer_vocab)]
        if bad:
            raise ValueError(f"predicted answer ids must lie in [0, {len(answer_vocab)}); found {bad[:5]}")
        return [normalize_answer(answer_vocab[v]) for v in values]
    if not all(isinstance(v, str) for v in values):
        raise ValueError("predicted must be all answer strings or all integer ids into answer_vocab")
    return [normalize_answer(v) for v in values]


def vqa_correctness(
    predicted: Any, gold: Sequence[str], answer_types: Sequence[str], *, answer_vocab: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-question parts of ``vqa_accuracy``.

    Returns:
        ``correct`` (N,) bool (normalised prediction == normalised gold, and gold in the vocabulary),
        ``closed`` (N,) bool (answer type CLOSED; else OPEN), ``unseen`` (N,) bool (gold not in the vocabulary).
    Raises:
        ValueError: lengths disagree, an answer type is neither CLOSED nor OPEN, or an id is out of range.
    """
    pred = _predicted_answers(predicted, answer_vocab)
    if not len(pred) == len(gold) == len(answer_types):
        raise ValueError(
            f"predicted ({len(pred)}), gold ({len(gold)}) and answer_types ({len(answer_types)}) differ in length"
        )
    types = [str(t).strip().upper() for t in answer_types]
    odd = sorted({t for t in types if t not in ANSWER_TYPES})
    if odd:
        raise ValueError(f"answer types must be CLOSED or OPEN; found {odd[:5]}")
    vocab = {normalize_answer(a) for a in answer_vocab}
    gold_n = [normalize_answer(g) for g in gold]
    unseen = np.array([g not in vocab for g in gold_n], dtype=bool)
    correct = np.array([p == g for p, g in zip(pred, gold_n)], dtype=bool) & ~unseen
    closed = np.array([t == "CLOSED" for t in types], dtype=bool)
    return correct, closed, unseen


def _fraction(hits: float, total: float) -> float:
    return hits / total if total else math.nan


def vqa_accuracy(
    predicted: Any, gold: Sequence[str], answer_types: Sequence[str], *, answer_vocab: Sequence[str]
) -> dict[str, Any]:
    """VQA accuracy overall, on CLOSED and on OPEN questions (fractions in [0, 1]).

    An answer is right when its normalised text (``normalize_answer``) equals the gold one. A gold answer outside
    ``answer_vocab`` can never be predicted by a classifier over that vocabulary: it is counted wrong (it stays
    in every denominator) and counted in ``unseen_answers``. A split without OPEN (or CLOSED) questions has NaN
    for that accuracy and a count of 0.

    Args:
        predicted: N answer strings, or N integer ids into ``answer_vocab`` (list, numpy or torch).
        gold: N gold answer strings.
        answer_types: N of ``"CLOSED"`` / ``"OPEN"`` (case and surrounding space ignored).
        answer_vocab: the answer set the model chooses from.
    Returns:
        ``{"accuracy_overall", "accuracy_closed", "accuracy_open": float, "questions", "questions_closed",
        "questions_open", "unseen_answers", "unseen_closed", "unseen_open": int}``.
    """
    correct, closed, unseen = vqa_correctness(predicted, gold, answer_types, answer_vocab=answer_vocab)
    opened = ~closed
    return {
        "accuracy_overall": _fraction(int(correct.sum()), len(correct)),
        "accuracy_closed": _fraction(int((correct & closed).sum()), int(closed.sum())),
        "accuracy_open": _fraction(int((correct & opened).sum()), int(opened.sum())),
        "questions": len(correct),
        "questions_closed": int(closed.sum()),
        "questions_open": int(opened.sum()),
        "unseen_answers": int(unseen.sum()),
        "unseen_closed": int((unseen & closed).sum()),
        "unseen_open": int((unseen & opened).sum()),
    }


def vqa_accuracy_resampler(
    predicted: Any, gold: Sequence[str], answer_types: Sequence[str], *, answer_vocab: Sequence[str]
) -> Resampler:
    """``vqa_accuracy``'s three accuracies for many row weightings at once: ``weights (R, N) -> {key: (R,)}``
    (NaN where a resample draws no question of that type)."""
    correct, closed, _ = vqa_correctness(predicted, gold, answer_types, answer_vocab=answer_vocab)
    c = correct.astype(np.float64)
    is_closed = closed.astype(np.float64)

    def resample(weights: np.ndarray) -> dict[str, np.ndarray]:
        n = weights.sum(1)  # (R,)
        n_closed = weights @ is_closed  # (R,)
        hits_closed = weights @ (c * is_closed)
        hits = weights @ c
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "accuracy_overall": hits / n,
                "accuracy_closed": np.where(n_closed > 0, hits_closed / n_closed, np.nan),
                "accuracy_open": np.where(n - n_closed > 0, (hits - hits_closed) / (n - n_closed), np.nan),
            }

    return resample
