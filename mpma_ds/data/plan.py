"""The epoch plan: which sample goes into which batch on which rank — deterministic and worker-independent.

Order (SPEC §6): shard list shuffled with ``seed + epoch`` → the concatenated sample stream split into
``world_size`` contiguous ranges (sample-exact, the same rule as DALI's ``shard_id``/``num_shards``) →
a shuffle buffer per rank → batches, handed to workers round-robin. Because the plan is computed on
indices before anything is read, batch ``j`` of epoch ``e`` is the same whatever the number of workers,
and resuming at batch ``k`` reads nothing before it.

Remainder policy (equal batches on every rank, since ZeRO-3 ranks step in lockstep): every rank gets
``steps_per_epoch = ceil(ceil(N / world_size) / batch_size)`` batches. A rank whose range runs out fills
its last batch(es) with repeats of its own first samples, flagged ``valid = False`` in the batch, so
counting only valid samples sees every sample of the split exactly once per epoch (``resampled: false``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mpma_ds.data.batch import Batch

MadeBatch = tuple["Batch", dict[str, int]]
"""What a backend's epoch iterator yields: a batch and the samples skipped while making it, by reason."""

RETRIES = "remote_retries"
"""Not a skip reason: the transient remote faults retried while making a batch, carried with the skips so the
counts of DataLoader workers reach ``stats()`` (as ``remote_retries``) and survive a resume."""

BYTES = "remote_bytes"
"""Not a skip reason either: the bytes read from object stores while making a batch (as `RETRIES`)."""

SAMPLES_PREFIX = "samples/"
"""Not a skip reason either: ``samples/<source>`` counts the valid samples of each mixture source."""


def is_counter(reason: str) -> bool:
    """True for the counters carried beside the skip reasons (`RETRIES`, `BYTES`, ``samples/<source>``)."""
    return reason in (RETRIES, BYTES) or reason.startswith(SAMPLES_PREFIX)


def seeded_rng(*parts: int) -> np.random.Generator:
    """A numpy generator from several integers (seed, epoch, rank, ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per rank per epoch (the same on every rank)."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def shard_order(counts: list[int], epoch: int, seed: int, *, shuffle: bool, resample_to: int = 0) -> list[int]:
    """Shard numbers in this epoch's order: shuffled with ``seed + epoch`` (train) or as listed (eval).

    With ``resample_to > 0`` shards are drawn with replacement until they hold ``resample_to`` samples.
    """
    if resample_to:
        rng = seeded_rng(seed, epoch, 0x5EED)
        nonempty = [i for i, c in enumerate(counts) if c]
        order, total = [], 0
        while total < resample_to:
            pick = nonempty[int(rng.integers(len(nonempty)))]
            order.append(pick)
            total += counts[pick]
        return order
    order = list(range(len(counts)))
    if shuffle:
        seeded_rng(seed, epoch, 0x5EED).shuffle(order)
    return order


def buffer_shuffle(items: np.ndarray, bufsize: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a webdataset-style shuffle buffer of ``bufsize`` over ``items`` (on indices)."""
    if bufsize <= 1 or len(items) <= 1:
        return items
    buf: list[int] = []
    out: list[int] = []
    for item in items.tolist():
        buf.append(item)
        if len(buf) < bufsize:
            continue
        k = int(rng.integers(len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        out.append(buf.pop())
    rng.shuffle(buf)
    out.extend(buf)
    return np.asarray(out, dtype=np.int64)


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of ``rank`` in the epoch's sample stream (DALI's ``start_index`` rule)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def epoch_batches(
    counts: list[int],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    train: bool,
    shuffle_buffer: int,
    resample_to: int = 0,
    stream: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's batches of one epoch as sample ids into the flat sample list.

    Args:
        counts: samples per shard (the flat id of shard ``s``'s ``i``-th sample is ``sum(counts[:s]) + i``).
        resample_to: endless mode: draw shards with replacement for an epoch of this many samples.
        stream: the epoch's whole sample sequence, given (a mixture's, `mixture.mixture_stream`) instead of
            drawn from the shard order.

    Returns:
        ``ids`` (steps, B) int64 and ``valid`` (steps, B) bool (False on remainder padding).
    """
    if stream is None:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        order = shard_order(counts, epoch, seed, shuffle=train, resample_to=resample_to)
        stream = np.concatenate([np.arange(starts[s], starts[s] + counts[s], dtype=np.int64) for s in order])
    total = resample_to or len(stream)
    stream = stream[:total]
    lo, hi = rank_range(total, rank, world_size)
    own = stream[lo:hi]
    if len(own) == 0:
        raise ValueError(f"{total} samples cannot feed {world_size} ranks: rank {rank} gets none")
    if train:
        own = buffer_shuffle(own, shuffle_buffer, seeded_rng(seed, epoch, rank, 0xB0F))
    steps = steps_per_epoch(total, world_size, batch_size)
    slots = np.arange(steps * batch_size)
    ids = own[slots % len(own)].reshape(steps, batch_size)
    valid = (slots < len(own)).reshape(steps, batch_size)
    return ids, valid


class EpochStream:
    """Endless (train) or one-pass (eval) iteration over epochs with an exact, resumable position.

    Subclasses implement ``_epoch_iter(epoch, start_batch)`` (or ``_run_iter`` to span epochs with one
    iterator) yielding ``(batch, skipped)`` pairs: the batch, and the samples skipped while making it by
    reason (a plain dict, accumulated into ``stats()``).
    """

    backend = "base"

    def __init__(
        self,
        *,
        train: bool,
        seed: int,
        rank: int,
        world_size: int,
        steps: int,
        num_samples: int,
        subset: dict[str, Any] | None = None,
    ):
        if num_samples < world_size:  # found here, at build time, not as a traceback at the first batch
            kept = f" (data.label_fraction={subset['fraction']} keeps {num_samples})" if subset else ""
            raise ValueError(
                f"{num_samples} samples{kept} cannot feed {world_size} data ranks (ranks x gradient accumulation "
                "steps): each needs at least one sample; use more data, a higher label fraction or fewer ranks"
            )
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps
        self.num_samples = num_samples
        self.subset = subset  # the label-fraction subset's summary (`subsets.py`), None = the whole split
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped: Counter = Counter()
        self._generation = 0
        self._active: Any = None  # the running epoch iterator (a generator or a DataLoader iterator)

    def _epoch_iter(self, epoch: int, start_batch: int) -> Iterator[MadeBatch]:
        raise NotImplementedError

    def _base_skipped(self) -> Counter:
        """Samples left out before iteration (bad index entries); counted once in ``stats()``."""
        return Counter()

    def _run_iter(self, epoch: int, start_batch: int) -> Iterator[MadeBatch]:
        """Batches from ``(epoch, start_batch)`` on: endless over epochs (train) or to the end of the pass."""
        while True:
            epoch_iter = self._epoch_iter(epoch, start_batch)
            try:
                yield from epoch_iter
            finally:
                self._stop(epoch_iter)
            if not self.train:
                return
            epoch, start_batch = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        generation = self._generation
        run = self._run_iter(self.epoch, self.batch_in_epoch)
        self._active = run
        try:
            for batch, skipped in run:
                if generation != self._generation:  # load_state_dict() or close() was called: stale
                    return
                self.skipped.update(skipped)
                self.batch_in_epoch += 1
                if self.batch_in_epoch == self.steps_per_epoch:  # the position is the next epoch's start
                    self.batch_in_epoch = 0
                    if self.train:
                        self.epoch += 1
                yield batch
        finally:
            self._stop(run)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "backend": self.backend,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "skipped": dict(self.skipped),
        }
        if self.subset is not None:
            state["subset"] = dict(self.subset)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "batch_in_epoch", "world_size", "seed"):
            if key not in state:
                raise ValueError(f"loader state lacks {key!r}; it was not written by this loader")
        if state["world_size"] != self.world_size or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for world_size={state['world_size']}, seed={state['seed']}; this run has "
                f"world_size={self.world_size}, seed={self.seed}: exact resume needs the same values"
            )
        if state.get("subset") != self.subset:
            raise ValueError(
                f"loader state is for the label subset {state.get('subset')}; this run has {self.subset}: "
                "exact resume needs the same data.label_fraction and data.label_fraction_seed"
            )
        if not 0 <= state["batch_in_epoch"] <= self.steps_per_epoch:
            raise ValueError(f"loader state batch_in_epoch={state['batch_in_epoch']} is outside this epoch")
        self._invalidate()  # a running iterator is stale now
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        if self.batch_in_epoch == self.steps_per_epoch:  # the end of an epoch is the next one's start
            self.epoch, self.batch_in_epoch = self.epoch + int(self.train), 0
        self.skipped = Counter(state.get("skipped", {}))

    def stats(self) -> dict[str, int]:
        total = self.skipped + self._base_skipped()
        counters = {reason: int(total.pop(reason)) for reason in sorted(total) if is_counter(reason)}
        out = {"skipped_samples": int(sum(total.values())), "epoch": self.epoch}
        out.update({f"skipped_{reason}": int(n) for reason, n in sorted(total.items())})
        out.update(counters)
        return out

    @staticmethod
    def _stop(epoch_iter: Any) -> None:
        """Close a generator, or stop a DataLoader iterator's workers."""
        close = getattr(epoch_iter, "close", None) or getattr(epoch_iter, "_shutdown_workers", None)
        if close is not None:
            close()

    def close(self) -> None:
        """Stop running iterators and their workers (safe to call twice)."""
        self._invalidate()

    def _invalidate(self) -> None:
        self._generation += 1
        if self._active is not None:
            self._stop(self._active)
            self._active = None


def reshard_positions(states: list[dict[str, Any]], data_ranks: int, wanted: list[int]) -> list[dict[str, Any]]:
    """Loader positions for data ranks ``wanted`` of a run with ``data_ranks`` streams, from ``states`` (the
    saved position of every data rank of the run that wrote a checkpoint, in data-rank order).

    Same number of data ranks (the micro-batch did not change, only the ranks × accumulation split): each
    stream's own position, unchanged — the resumed run reads exactly the samples, in the order, that the
    uninterrupted run would have read. Another number (the micro-batch was lowered to fit the new world size):
    every stream continues at the same epoch and batch index; since micro-batch × data ranks is the global batch
    on both sides, that is the same number of samples into the epoch (the epoch still ends at the same step),
    but the epoch's remaining samples are those of the new split, not exactly the ones the old split had left.
    """
    if not states:
        raise ValueError("the checkpoint holds no loader position")
    epochs = {(int(s["epoch"]), int(s["batch_in_epoch"])) for s in states}
    if len(epochs) != 1:
        raise ValueError(f"the checkpoint's loader positions disagree between data ranks: {sorted(epochs)}")
    if len(states) == data_ranks:
        return [dict(states[d]) for d in wanted]
    total: Counter = Counter()
    for state in states:
        total.update(state.get("skipped", {}))
    out = []
    for d in wanted:
        state = {k: v for k, v in states[min(d, len(states) - 1)].items() if k != "dali_checkpoint"}
        # the skip counters are summed into data rank 0, so the run's total stays what it was
        state.update(rank=d, world_size=data_ranks, skipped=dict(total) if d == 0 else {})
        out.append(state)
    return out
