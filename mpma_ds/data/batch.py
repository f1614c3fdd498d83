"""The batch contract (docs/architecture.md, "Batches") as a type, and the one function that builds it.

Every backend collates its samples with `make_batch`, so the three of them return the same keys, dtypes and
shapes by construction; `Batch` is what their type hints and the model's callers see.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

import numpy as np
import torch

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.data.masking import ReportEncoder


class Batch(TypedDict, total=False):
    """One batch from `build_loader`. The model reads the first four keys; the rest are extra.

    ``total=False``: a consumer may pop or ignore keys (the model takes a dict without ``key``/``text``/
    ``meta``), but every batch a backend makes holds all of them.
    """

    image: torch.Tensor
    """(B, C, H, W) float32, normalised with ``image_mean`` / ``image_std``; on the GPU after DALI ``mixed``
    decode."""

    input_ids: torch.Tensor
    """(B, L) int64 token ids, ``[CLS] ... [SEP]``, truncated to ``max_text_len`` and padded to it, or with
    ``dynamic_padding`` to the batch's longest report rounded up to ``pad_to``; MLM-corrupted where chosen."""

    attention_mask: torch.Tensor
    """(B, L) int64, 1 on real tokens, 0 on padding."""

    mlm_labels: torch.Tensor
    """(B, L) int64, the original token where chosen for MLM, -100 elsewhere (all -100 when
    ``mlm_probability`` is 0)."""

    labels: torch.Tensor
    """(B, 14) float32 CheXpert labels in ``CHEXPERT_LABELS`` order (1 / 0 / -1), NaN where blank."""

    valid: torch.Tensor
    """(B,) bool: False on remainder padding and on repeats that stand in for a skipped corrupt sample."""

    key: list[str]
    """The sample keys (``<key>.jpg`` in the shard)."""

    text: list[str]
    """The report text (for VQA shards: the question)."""

    meta: list[dict[str, Any]]
    """The sample JSON: source, subject/study/image ids, view, split, labels; VQA: question, answer, ..."""


def labels_vector(meta: dict[str, Any]) -> np.ndarray:
    """(14,) float32 CheXpert labels in `CHEXPERT_LABELS` order; NaN where blank or unknown."""
    labels = meta.get("labels") or {}
    out = np.full(len(CHEXPERT_LABELS), np.nan, dtype=np.float32)
    for i, name in enumerate(CHEXPERT_LABELS):
        value = labels.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[i] = float(value)
    return out


def make_batch(
    images: list[torch.Tensor] | torch.Tensor,
    texts: list[str],
    metas: list[dict[str, Any]],
    keys: list[str],
    valid: list[bool],
    encoder: ReportEncoder,
    generator: torch.Generator,
) -> Batch:
    """Stack a batch: ``image`` (B, C, H, W) float32, text tensors (B, L) int64, ``labels`` (B, 14)
    float32, ``valid`` (B,) bool, and ``key`` / ``text`` / ``meta`` lists."""
    stacked = images if isinstance(images, torch.Tensor) else torch.stack(images)
    text = encoder(texts, generator)
    return Batch(
        image=stacked.contiguous(),  # (B, C, H, W)
        input_ids=text["input_ids"],  # (B, L)
        attention_mask=text["attention_mask"],  # (B, L)
        mlm_labels=text["mlm_labels"],  # (B, L)
        labels=torch.from_numpy(np.stack([labels_vector(m) for m in metas])),  # (B, 14)
        valid=torch.tensor(valid, dtype=torch.bool),  # (B,)
        key=list(keys),
        text=list(texts),
        meta=list(metas),
    )


def sample_batch(data_cfg: Any, model_cfg: Any, tokenizer: Any, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """A batch of the shapes training sees (for counting FLOPs before the engine exists): full-length text with
    ``mlm_probability`` of the tokens masked."""
    length = data_cfg.max_text_len
    size = data_cfg.image_size
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, max(6, len(tokenizer)), (batch_size, length), generator=gen)
    mlm_labels = torch.full_like(input_ids, -100)
    chosen = torch.rand(batch_size, length, generator=gen) < data_cfg.mlm_probability
    chosen[:, 1] = True  # at least one masked token
    mlm_labels[chosen] = input_ids[chosen]
    return {
        "image": torch.randn(batch_size, model_cfg.in_chans, size, size, generator=gen),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mlm_labels": mlm_labels,
    }
