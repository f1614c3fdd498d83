"""One sample's bytes → checked text and metadata, and a list of samples → a batch (the batch contract)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.data.masking import ReportEncoder


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_text(data: bytes | None) -> str:
    """UTF-8 report text, whitespace-normalised; empty or undecodable text is a `SampleError`."""
    if data is None:
        raise SampleError("missing_txt")
    try:
        text = " ".join(bytes(data).decode("utf-8").split())
    except UnicodeDecodeError as err:
        raise SampleError("bad_txt", str(err)) from err
    if not text:
        raise SampleError("empty_txt")
    return text


def decode_meta(data: bytes | None) -> dict[str, Any]:
    """The sample JSON (``{}`` when the member is absent); invalid JSON is a `SampleError`."""
    if data is None or len(data) == 0:
        return {}
    try:
        meta = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError("bad_json", str(err)) from err
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "not an object")
    return meta


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
) -> dict[str, Any]:
    """Stack a batch: ``image`` (B, C, H, W) float32, text tensors (B, L) int64, ``labels`` (B, 14)
    float32, ``valid`` (B,) bool, and ``key`` / ``text`` / ``meta`` lists."""
    stacked = images if isinstance(images, torch.Tensor) else torch.stack(images)
    batch: dict[str, Any] = {"image": stacked.contiguous()}  # (B, C, H, W)
    batch.update(encoder(texts, generator))
    batch["labels"] = torch.from_numpy(np.stack([labels_vector(m) for m in metas]))  # (B, 14)
    batch["valid"] = torch.tensor(valid, dtype=torch.bool)  # (B,)
    batch["key"] = list(keys)
    batch["text"] = list(texts)
    batch["meta"] = list(metas)
    return batch
