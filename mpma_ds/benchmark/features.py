"""Images of a benchmark split, streamed: each record decoded through ``build_shards``'s rules
(``data_tools.sources.images.encode_image``: PNG, JPEG or DICOM, windowing, grey, resize), then the model's eval
transform — in DataLoader workers, a batch at a time, so no dataset is held in memory. An image that cannot be
decoded is a per-image problem (``image_rejected``), never a crash.

**Several ranks** (``deepspeed --num_gpus N`` / ``torchrun``): each rank streams a disjoint share of a split's
images (positions ``rank``, ``rank + N`` ...); the per-sample outputs are gathered to rank 0 in record order
(``mpma_ds.tasks.features.extract_once``, the fine-tuning tasks' own path), so 1 and N ranks give the same rows.

**Feature cache.** Image embeddings of a split are written (by rank 0, whole or not at all) to ``CACHE/<model
fingerprint>/<dataset>-<split checksum>-<n>.pt``; a suite run again (or another protocol on the same split) reads them instead of decoding and
encoding the images again. The key holds the weights' hash, the eval preprocessing and the exact image list, so a
changed model, preprocessing or dataset never reads a stale file.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_tools.benchmarks.common import BenchRecord, split_checksum
from data_tools.sources.common import ImageRejected
from data_tools.sources.images import ImageOptions, encode_image
from mpma_ds.data.transforms import XrayTransform, eval_resize_size
from mpma_ds.tasks.features import extract_once


class RecordImages(torch.utils.data.Dataset):
    """Record i -> ``(i, image (C, S, S) or None, (width, height) decoded, (width, height) of the file, reason)``."""

    def __init__(self, records: Sequence[BenchRecord], data_cfg: Any) -> None:
        self.paths = [r.image for r in records]
        self.transform = XrayTransform(data_cfg, train=False)
        # decode at the eval resize size (the eval transform resizes there anyway); any size a film comes in
        self.opts = ImageOptions(image_size=eval_resize_size(data_cfg), min_size=16, max_aspect=4.0,
                                 modalities=None, body_parts=None)  # fmt: skip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, tuple[int, int], tuple[int, int], str]:
        try:
            encoded = encode_image(self.paths[i], self.opts)
        except ImageRejected as err:
            return i, None, (0, 0), (0, 0), f"{err.reason}: {err.detail}"
        image = Image.open(io.BytesIO(encoded.jpeg))
        image.load()
        return i, self.transform(image), image.size, (encoded.width, encoded.height), ""


def _collate(items: list) -> list:
    return items


@dataclass
class Batch:
    index: list[int]
    """Positions in the record list."""
    images: torch.Tensor
    """(B, C, S, S) eval-transformed."""
    sizes: list[tuple[int, int]]
    """(width, height) of each decoded image (before the eval transform): the frame boxes are scaled to."""
    originals: list[tuple[int, int]]
    """(width, height) of each file: the frame of boxes given in the file's pixels."""


def stream(records: Sequence[BenchRecord], data_cfg: Any, *, batch_size: int, workers: int,
           rejected: dict[int, str], rank: int = 0, world_size: int = 1) -> Iterator[Batch]:  # fmt: skip
    """Batches of decoded images of this rank's share of ``records`` (positions ``rank``, ``rank + world_size``
    ...; a rank beyond the records gets none), in record order; ``Batch.index`` holds positions in ``records``
    and ``rejected`` receives ``{position: reason}`` of those that did not decode."""
    share = records[rank::world_size]
    loader = torch.utils.data.DataLoader(
        RecordImages(share, data_cfg), batch_size=batch_size, num_workers=workers if share else 0,
        collate_fn=_collate, persistent_workers=False, prefetch_factor=4 if workers and share else None,
    )  # fmt: skip
    for items in loader:
        good = [item for item in items if item[1] is not None]
        rejected.update({rank + world_size * item[0]: item[4] for item in items if item[1] is None})
        if good:
            yield Batch([rank + world_size * g[0] for g in good], torch.stack([g[1] for g in good]),
                        [g[2] for g in good], [g[3] for g in good])  # fmt: skip


def merge_by_position(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' shares of a split as one, in record order (so 1 and 2 ranks give the same): ``index`` (N,)
    positions with ``emb`` (N, D) rows beside them, ``rejected_index`` / ``rejected_reason`` the images that did
    not decode."""
    full = [p for p in parts if len(p["index"])]
    index = torch.cat([p["index"] for p in full]) if full else torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(index)
    emb = torch.cat([p["emb"] for p in full])[order] if full else torch.zeros(0, 0)
    rejected = sorted((i, w) for p in parts for i, w in zip(p["rejected_index"].tolist(), p["rejected_reason"]))
    return {"emb": emb.contiguous(), "index": index[order],
            "rejected_index": torch.tensor([i for i, _ in rejected], dtype=torch.int64),
            "rejected_reason": [w for _, w in rejected]}  # fmt: skip


@dataclass
class Features:
    emb: np.ndarray
    """(N, D) float32 L2-normalised image embeddings, rows for the records that decoded."""
    index: np.ndarray
    """(N,) positions of those records in the split."""
    rejected: dict[int, str]
    seconds: float
    """Wall time of decoding + encoding (0 when read from the cache)."""
    cached: bool


def image_features(
    model: Any, records: Sequence[BenchRecord], *, dataset: str, cache_dir: Path | None, batch_size: int = 64,
    workers: int = 2, device: Any = "cpu", rank: int = 0, world_size: int = 1,
) -> Features | None:  # fmt: skip
    """The image embeddings of ``records`` (from the cache when it holds them).

    Collective under a process group (``extract_once``, as the fine-tuning tasks' frozen features): every rank
    encodes its share, rank 0 gets the ``Features`` in record order and writes the cache; the others get None."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / model.fingerprint / f"{dataset}-{split_checksum(records)}-{len(records)}.pt"
    start = time.perf_counter()

    @torch.no_grad()
    def extract() -> dict[str, Any]:
        net = model.net.to(device)
        dtype = next(net.parameters()).dtype
        embs, index, rejected = [], [], {}
        for batch in stream(records, model.data_cfg, batch_size=batch_size, workers=workers, rejected=rejected,
                            rank=rank, world_size=world_size):  # fmt: skip
            emb = net.encode_image(batch.images.to(device=device, dtype=dtype)).float()  # (B, D)
            embs.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
            index.extend(batch.index)
        keys = sorted(rejected)
        return {"emb": torch.cat(embs) if embs else torch.zeros(0, 0), "index": torch.tensor(index, dtype=torch.int64),
                "rejected_index": torch.tensor(keys, dtype=torch.int64), "rejected_reason": [rejected[k] for k in keys]}  # fmt: skip

    found, cached = extract_once(path, extract, merge_by_position, rank=rank)
    if found is None:
        return None
    rejected = {int(i): str(w) for i, w in zip(found["rejected_index"].tolist(), found["rejected_reason"])}
    emb = found["emb"].numpy().astype(np.float32)
    seconds = 0.0 if cached else time.perf_counter() - start
    return Features(emb, found["index"].numpy(), rejected, seconds, cached)
