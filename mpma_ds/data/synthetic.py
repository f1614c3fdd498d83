"""The ``synthetic`` backend: correlated image–report pairs made in memory, for tests and benchmarks.

Each sample has a random set of findings (CheXpert names). Every finding draws a bright blob at its own
place in the image and adds its phrase to the report, and sets its label to 1 — so images, reports and
labels agree, and a model can learn retrieval and MLM from them. Samples depend only on the split and
their index; epochs, ranks, resume and padding follow the same plan as the shard backends (`plan.py`).
Every `IMAGES_PER_PATIENT` consecutive samples share a patient (``subject_id``), so a label fraction
(`subsets.py`) keeps or drops them together, as it does on real shards.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.data.backends import BACKENDS
from mpma_ds.data.batch import make_batch
from mpma_ds.data.config import DataConfig
from mpma_ds.data.plan import EpochStream, MadeBatch, epoch_batches, seeded_rng, steps_per_epoch
from mpma_ds.data.stream import encoder_from_config, mask_generator
from mpma_ds.data.subsets import split_subset

# finding → (phrase, blob centre (y, x) as fractions of the image, blob radius fraction)
FINDINGS: dict[str, tuple[str, tuple[float, float], float]] = {
    "Atelectasis": ("bibasilar atelectasis", (0.78, 0.5), 0.10),
    "Cardiomegaly": ("the heart is enlarged", (0.6, 0.55), 0.18),
    "Consolidation": ("right upper lobe consolidation", (0.3, 0.3), 0.09),
    "Edema": ("mild pulmonary edema", (0.45, 0.5), 0.14),
    "Lung Opacity": ("patchy opacity in the left mid lung", (0.5, 0.72), 0.08),
    "Pleural Effusion": ("small left pleural effusion", (0.85, 0.8), 0.09),
    "Pneumothorax": ("small right apical pneumothorax", (0.15, 0.25), 0.07),
    "Support Devices": ("an endotracheal tube is in place", (0.12, 0.5), 0.05),
}
SPLIT_SALT = {"train": 11, "validate": 12, "val": 12, "valid": 12, "test": 13}
PSEUDO_SHARD = 64  # samples per pseudo-shard, so the shard-order shuffle has something to shuffle
IMAGES_PER_PATIENT = 2


def synthetic_subject(index: int, split: str) -> str:
    """The patient of sample ``index`` of ``split``."""
    return f"{split}-p{index // IMAGES_PER_PATIENT:07d}"


@functools.lru_cache(maxsize=8)
def _chest(size: int) -> np.ndarray:
    """A dim 'chest' with two lung fields, (S, S) float32 — the same for every sample of a size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (S, S)
    image = 0.25 + 0.1 * np.exp(-(((xx - 0.3) / 0.18) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    image += 0.1 * np.exp(-(((xx - 0.7) / 0.18) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    return image.astype(np.float32)


def synthetic_sample(index: int, split: str, size: int) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Sample ``index`` of ``split``: (H, W) float32 image in [0, 1], report text, metadata JSON."""
    rng = seeded_rng(SPLIT_SALT.get(split, 19), index)
    names = [n for n in FINDINGS if rng.random() < 0.3]
    image = _chest(size) + rng.normal(0.0, 0.03, size=(size, size)).astype(np.float32)
    for name in names:
        _, (cy, cx), radius = FINDINGS[name]
        cy, cx = (cy + rng.normal(0, 0.02)) * size, (cx + rng.normal(0, 0.02)) * size
        r = radius * size
        # the blob only within 3 radii of its centre: cheap at any image size
        y0, y1 = max(0, int(cy - 3 * r)), min(size, int(cy + 3 * r) + 1)
        x0, x1 = max(0, int(cx - 3 * r)), min(size, int(cx + 3 * r) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        image[y0:y1, x0:x1] += 0.45 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    image = np.clip(image, 0.0, 1.0)
    if names:
        text = "FINDINGS: " + ". ".join(FINDINGS[n][0] for n in names) + "."
    else:
        text = "FINDINGS: the lungs are clear. no acute cardiopulmonary process."
    labels = {n: (1 if n in names else 0) for n in FINDINGS}
    labels.update({n: None for n in CHEXPERT_LABELS if n not in FINDINGS})
    labels["No Finding"] = 0 if names else 1
    meta = {
        "source": "synthetic",
        "subject_id": synthetic_subject(index, split),
        "image_id": f"{split}-{index:07d}",
        "split": split,
        "labels": labels,
    }
    return image, text, meta


@BACKENDS.register("synthetic")
class SyntheticStream(EpochStream):
    """In-memory batches with the exact batch contract; see the module docstring."""

    backend = "synthetic"

    makes_own_samples = True  # build_loader passes no shards

    def __init__(
        self,
        cfg: DataConfig,
        shards: str = "",
        *,
        split: str,
        rank: int,
        world_size: int,
        batch_size: int,
        tokenizer: PreTrainedTokenizerFast,
        seed: int,
        train: bool,
        label_fraction: float = 1.0,
        label_fraction_seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.split = split
        self.batch_size = batch_size
        # the samples of the split (a label fraction keeps a patient-level subset), grouped in pseudo-shards
        self.samples, subset = self._subset(cfg.synthetic_samples, label_fraction, label_fraction_seed)
        shards = np.arange(0, cfg.synthetic_samples, PSEUDO_SHARD)  # first sample of each pseudo-shard
        self.counts = np.diff(np.searchsorted(self.samples, [*shards, cfg.synthetic_samples])).tolist()
        total = len(self.samples)
        super().__init__(
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            steps=steps_per_epoch(total, world_size, batch_size),
            num_samples=total,
            subset=subset,
        )
        self.encoder = encoder_from_config(cfg, tokenizer)
        mean, std = cfg.channel_stats()
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)  # (1, C, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)  # (1, C, 1, 1)

    def _subset(self, total: int, fraction: float, seed: int) -> tuple[np.ndarray, dict[str, Any] | None]:
        """Sample indices kept by the label fraction, ascending, and the subset's summary."""
        if fraction == 1.0:
            return np.arange(total, dtype=np.int64), None
        subjects = [synthetic_subject(i, self.split) for i in range(total)]
        keep, summary = split_subset(subjects, fraction, seed, split=self.split)
        return np.flatnonzero(keep), summary

    def _epoch_iter(self, epoch: int, start_batch: int) -> Iterator[MadeBatch]:
        ids, valid = epoch_batches(
            self.counts,
            epoch=epoch if self.train else 0,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            train=self.train,
            shuffle_buffer=self.cfg.shuffle_buffer,
        )
        size = self.cfg.image_size
        for number in range(start_batch, len(ids)):
            pixels = np.empty((self.batch_size, 1, size, size), dtype=np.float32)  # (B, 1, S, S)
            texts, metas = [], []
            for slot, index in enumerate(self.samples[ids[number]].tolist()):
                pixels[slot, 0], text, meta = synthetic_sample(index, self.split, size)
                texts.append(text)
                metas.append(meta)
            # normalise in numpy, one tensor per batch (no per-sample torch ops)
            images = torch.from_numpy((pixels - self.mean) / self.std)  # (B, C, S, S)
            keys = [m["image_id"] for m in metas]
            gen = mask_generator(self.seed, epoch, self.rank, number, self.train)
            yield make_batch(images, texts, metas, keys, valid[number].tolist(), self.encoder, gen), {}
