"""The ``wds`` backend: webdataset shards → PIL decode → torch DataLoader workers.

The epoch plan (`plan.py`) fixes every batch's samples before anything is read; workers take batches
round-robin, read each sample's members at the offsets of the shard's ``.idx`` (one seek and one read per
sample, the members of a sample being adjacent), decode with PIL, transform, tokenise and mask. So:

- batch ``j`` of an epoch is the same whatever ``num_workers`` is, and resume at batch ``k`` reads nothing
  before it (webdataset's streaming tar iterator cannot seek, which is why reads go through the index;
  shard lists and brace patterns are expanded by webdataset);
- a corrupt image, text or JSON is skipped and counted, its slot filled with a repeat of a good sample
  of the batch flagged ``valid = False``, so the batch count per rank never changes.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerFast

from mpma_ds.data.config import DataConfig
from mpma_ds.data.masking import ReportEncoder, batch_generator
from mpma_ds.data.plan import EpochStream, epoch_batches, seeded_rng, steps_per_epoch
from mpma_ds.data.samples import SampleError, decode_meta, decode_text, make_batch
from mpma_ds.data.shards import SampleRef, ShardIndex, load_shard_index
from mpma_ds.data.transforms import XrayTransform

EVAL_MASK_SALT = 0xE7A1


def mask_generator(seed: int, epoch: int, rank: int, batch: int, train: bool) -> torch.Generator:
    """Masking RNG of one batch; eval ignores the epoch so every validation pass masks alike."""
    return (
        batch_generator(seed, epoch, rank, batch) if train else batch_generator(seed, EVAL_MASK_SALT, rank, batch)
    )


def encoder_from_config(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> ReportEncoder:
    return ReportEncoder(
        tokenizer,
        cfg.max_text_len,
        probability=cfg.mlm_probability,
        mask_fraction=cfg.mlm_mask_fraction,
        random_fraction=cfg.mlm_random_fraction,
        whole_word=cfg.whole_word_mask,
    )


class SampleReader:
    """Reads a sample's members from its shard at the ``.idx`` offsets; keeps shard files open."""

    def __init__(self, index: ShardIndex) -> None:
        self.paths = index.paths
        self._files: dict[int, Any] = {}

    def read(self, ref: SampleRef) -> dict[str, bytes]:
        handle = self._files.get(ref.shard)
        if handle is None:
            handle = self._files[ref.shard] = open(self.paths[ref.shard], "rb")  # noqa: SIM115
        start, end = ref.span()
        handle.seek(start)
        data = handle.read(end - start)
        if len(data) != end - start:
            raise SampleError("truncated", f"{self.paths[ref.shard].name}: {ref.key}")
        return {ext: data[off - start : off - start + size] for ext, off, size in ref.members}

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def decode_image(data: bytes | None, key: str) -> Image.Image:
    if data is None:
        raise SampleError("missing_jpg", key)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for corrupt data
        raise SampleError("bad_jpg", f"{key}: {err}") from err
    return image


class ShardStream(EpochStream):
    """What both shard backends (wds, dali) share: the shard index, the epoch length (declared when
    resampled), the per-rank step count, the report encoder and the image transform."""

    def __init__(
        self,
        cfg: DataConfig,
        shards: str,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        tokenizer: PreTrainedTokenizerFast,
        seed: int,
        train: bool,
    ) -> None:
        self.cfg = cfg
        self.index = load_shard_index(shards)
        self.batch_size = batch_size
        self.resample_to = (cfg.epoch_length or self.index.num_samples) if (cfg.resampled and train) else 0
        total = self.resample_to or self.index.num_samples
        super().__init__(
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            steps=steps_per_epoch(total, world_size, batch_size),
            num_samples=total,
        )
        self.encoder = encoder_from_config(cfg, tokenizer)
        self.transform = XrayTransform(cfg, train)

    def _base_skipped(self) -> Counter:
        return Counter(self.index.skipped)


class _BatchRun(IterableDataset):
    """Batches from ``(epoch, start_batch)`` on — endless over epochs for training, one pass for eval.

    The run's ``t``-th batch is made by DataLoader worker ``t % num_workers``; the DataLoader returns
    them in ``t`` order, and its workers live across epochs (no restart at each epoch boundary).
    """

    def __init__(self, stream: WdsStream, epoch: int, start_batch: int) -> None:
        self.stream = stream
        self.epoch = epoch
        self.start_batch = start_batch

    def positions(self) -> Iterator[tuple[int, int]]:
        epoch, number = self.epoch, self.start_batch
        while True:
            if number >= self.stream.steps_per_epoch:
                if not self.stream.train:
                    return
                epoch, number = epoch + 1, 0
            yield epoch, number
            number += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = SampleReader(self.stream.index)
        plan_epoch, plan = -1, None
        try:
            for t, (epoch, number) in enumerate(self.positions()):
                if t % workers != worker:
                    continue
                if epoch != plan_epoch:
                    plan_epoch, plan = epoch, self.stream.plan(epoch)
                ids, valid = plan
                yield self.stream.make_batch(reader, epoch, number, ids[number], valid[number])
        finally:
            reader.close()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class WdsStream(ShardStream):
    """Batches from webdataset shards with PIL decode in DataLoader workers."""

    backend = "wds"

    def __init__(
        self,
        cfg: DataConfig,
        shards: str,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        tokenizer: PreTrainedTokenizerFast,
        seed: int,
        train: bool,
    ) -> None:
        super().__init__(
            cfg, shards, rank=rank, world_size=world_size, batch_size=batch_size, tokenizer=tokenizer, seed=seed,
            train=train,
        )  # fmt: skip
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer is built

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, valid)`` (steps, B) of this rank's batches in ``epoch``."""
        return epoch_batches(
            self.index.counts(),
            epoch=epoch if self.train else 0,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            train=self.train,
            shuffle_buffer=self.cfg.shuffle_buffer,
            resample_to=self.resample_to,
        )

    def make_batch(
        self, reader: SampleReader, epoch: int, number: int, ids: np.ndarray, valid: np.ndarray
    ) -> dict[str, Any]:
        """Read, decode, transform and collate batch ``number`` of ``epoch``."""
        images, texts, metas, keys, flags = [], [], [], [], []
        skipped: Counter = Counter()
        for slot, (sample_id, ok) in enumerate(zip(ids.tolist(), valid.tolist())):
            ref = self.index.ref(sample_id)
            try:
                raw = reader.read(ref)
                text = decode_text(raw.get("txt"))
                meta = decode_meta(raw.get("json"))
                image = decode_image(raw.get("jpg"), ref.key)
                rng = seeded_rng(self.seed, epoch, self.rank, number, slot) if self.transform.augment else None
                tensor = self.transform(image, rng)  # (C, S, S)
            except SampleError as err:
                if ok:  # a padding repeat of a bad sample is not counted twice
                    skipped[err.reason] += 1
                continue
            images.append(tensor)
            texts.append(text)
            metas.append(meta)
            keys.append(ref.key)
            flags.append(bool(ok))
        if not images:
            raise RuntimeError(
                f"every sample of batch {number} (epoch {epoch}, rank {self.rank}) is unreadable "
                f"({dict(skipped)}); check the shards with python -m data_tools.verify_shards"
            )
        for fill in range(len(ids) - len(images)):  # keep the batch size: repeats flagged invalid
            src = fill % len(images)
            images.append(images[src])
            texts.append(texts[src])
            metas.append(metas[src])
            keys.append(keys[src])
            flags.append(False)
        gen = mask_generator(self.seed, epoch, self.rank, number, self.train)
        batch = make_batch(images, texts, metas, keys, flags, self.encoder, gen)
        batch["_skipped"] = dict(skipped)  # a plain dict: DataLoader's default_convert would re-add a Counter
        return batch

    def _run_iter(self, epoch: int, start_batch: int) -> Iterator[dict[str, Any]]:
        dataset = _BatchRun(self, epoch, start_batch)
        remaining = self.steps_per_epoch - start_batch
        workers = self.cfg.num_workers if self.train else min(self.cfg.num_workers, remaining)
        if workers == 0 or remaining <= 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_batches,
            worker_init_fn=_worker_init,
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)
