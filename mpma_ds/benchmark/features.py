"""Images of a benchmark split, streamed: each record decoded through ``build_shards``'s rules
(``data_tools.sources.images.encode_image``: PNG, JPEG or DICOM, windowing, grey, resize), then the model's eval
transform — in DataLoader workers, a batch at a time, so no dataset is held in memory. An image that cannot be
decoded is a per-image problem (``image_rejected``), never a crash.

**Feature cache.** Image embeddings of a split are written to ``CACHE/<model fingerprint>/<dataset>-<split
checksum>.npz``; a suite run again (or another protocol on the same split) reads them instead of decoding and
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
           rejected: dict[int, str]) -> Iterator[Batch]:  # fmt: skip
    """Batches of decoded images in record order; ``rejected`` receives ``{position: reason}`` of those that did
    not decode."""
    loader = torch.utils.data.DataLoader(
        RecordImages(records, data_cfg), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )  # fmt: skip
    for items in loader:
        good = [item for item in items if item[1] is not None]
        rejected.update({item[0]: item[4] for item in items if item[1] is None})
        if good:
            yield Batch([g[0] for g in good], torch.stack([g[1] for g in good]), [g[2] for g in good],
                        [g[3] for g in good])  # fmt: skip


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


@torch.no_grad()
def image_features(
    model: Any, records: Sequence[BenchRecord], *, dataset: str, cache_dir: Path | None, batch_size: int = 64,
    workers: int = 2, device: Any = "cpu",
) -> Features:  # fmt: skip
    """The image embeddings of ``records`` (from the cache when it holds them)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / model.fingerprint / f"{dataset}-{split_checksum(records)}-{len(records)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                rejected = {int(i): str(w) for i, w in zip(z["rejected_index"], z["rejected_reason"])}
                return Features(z["emb"], z["index"], rejected, 0.0, True)
    net = model.net.to(device)
    dtype = next(net.parameters()).dtype
    start = time.perf_counter()
    embs, index, rejected = [], [], {}
    for batch in stream(records, model.data_cfg, batch_size=batch_size, workers=workers, rejected=rejected):
        emb = net.encode_image(batch.images.to(device=device, dtype=dtype)).float()  # (B, D)
        embs.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        index.extend(batch.index)
    seconds = time.perf_counter() - start
    emb = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
    feats = Features(emb.astype(np.float32), np.asarray(index, dtype=np.int64), rejected, seconds, False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        keys = sorted(rejected)
        np.savez(tmp, emb=feats.emb, index=feats.index, rejected_index=np.asarray(keys, dtype=np.int64),
                 rejected_reason=np.asarray([rejected[k] for k in keys], dtype=str))  # fmt: skip
        tmp.replace(path)
    return feats
