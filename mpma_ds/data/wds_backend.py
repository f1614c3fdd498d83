"""The ``wds`` backend: webdataset shards → PIL decode → torch DataLoader workers.

The epoch plan (`plan.py`) fixes every batch's samples before anything is read; workers take batches
round-robin, read each sample's members at the offsets of the shard's ``.idx`` (one seek and one read per
sample, the members of a sample being adjacent), decode with PIL, transform, tokenise and mask. So:

- batch ``j`` of an epoch is the same whatever ``num_workers`` is, and resume at batch ``k`` reads nothing
  before it (webdataset's streaming tar iterator cannot seek, which is why reads go through the index;
  shard lists and brace patterns are expanded by webdataset);
- a corrupt image, text or JSON is skipped and counted under the stand-in policy of `stream.py`, so the
  batch count per rank never changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools import remote
from mpma_ds.data.backends import BACKENDS
from mpma_ds.data.config import DataConfig
from mpma_ds.data.plan import MadeBatch, epoch_batches, seeded_rng
from mpma_ds.data.samples import SampleReader, decode_image, decode_meta, decode_text
from mpma_ds.data.stream import SampleRow, ShardStream, collate_rows, mask_generator, read_batch_rows


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

    def __iter__(self) -> Iterator[MadeBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = SampleReader(self.stream.index, self.stream.shard_cache())
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


@BACKENDS.register("wds")
class WdsStream(ShardStream):
    """Batches from webdataset shards with PIL decode in DataLoader workers."""

    backend = "wds"

    def __init__(self, cfg: DataConfig, shards: str, **common: Any) -> None:
        """``common``: `ShardStream`'s keyword arguments (rank, world size, batch size, tokenizer, ...)."""
        super().__init__(cfg, shards, **common)
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
            stream=self.epoch_stream(epoch if self.train else 0),
        )

    def make_batch(
        self, reader: SampleReader, epoch: int, number: int, ids: np.ndarray, valid: np.ndarray
    ) -> MadeBatch:
        """Read, decode, transform and collate batch ``number`` of ``epoch``."""

        def read(slot: int, sample_id: int, ok: bool) -> SampleRow:
            ref = self.index.ref(sample_id)
            raw = reader.read(ref)
            text = decode_text(raw.get("txt"))
            meta = decode_meta(raw.get("json"))
            image = decode_image(raw.get("jpg"), ref.key)
            rng = seeded_rng(self.seed, epoch, self.rank, number, slot) if self.transform.augment else None
            return SampleRow(self.transform(image, rng), text, meta, ref.key, bool(ok))  # image (C, S, S)

        where = f"batch {number} (epoch {epoch}, rank {self.rank})"
        with remote.counted() as cost:  # this batch's retries and bytes, carried with the skips to stats()
            rows, skipped = read_batch_rows(zip(ids.tolist(), valid.tolist()), read, where=where)
        skipped.update(cost)
        skipped.update(self.source_counts(ids, valid))  # the plan's draws, whether or not they decode
        gen = mask_generator(self.seed, epoch, self.rank, number, self.train)
        batch = collate_rows(rows, [r.image for r in rows], self.encoder, gen)
        return batch, dict(skipped)  # a plain dict: DataLoader's default_convert would re-add a Counter

    def _run_iter(self, epoch: int, start_batch: int) -> Iterator[MadeBatch]:
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
