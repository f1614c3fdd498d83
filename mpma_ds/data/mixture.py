"""Weighted mixtures of training sources (``data.train_sources``): which source each sample of an epoch comes
from, deterministic from the seed and the epoch alone.

**The epoch rule.** An epoch is ``data.epoch_length`` samples (all ranks together; 0 = the sum of the
sources' sizes). Source ``s`` of weight ``w_s`` gets a fixed quota ``q_s`` of every epoch: ``epoch_length *
w_s / sum(w)`` rounded by largest remainder, so the shares are exact to one sample. Each source is read as an
endless stream of passes over its own samples (pass ``p``: its shards in an order shuffled with ``(seed, s,
p)``), and epoch ``e`` takes positions ``[e * q_s, (e + 1) * q_s)`` of that stream: a small source repeats
(a new shuffled pass each time round), a large one is read on from where the last epoch stopped. The
epoch's sample sequence interleaves the sources in an order shuffled with ``(seed, e)``; ranks then split it
and shuffle within a buffer exactly as a single source (`plan.epoch_batches`).

So the plan is a pure function of ``(seed, epoch)``: exact mid-epoch resume needs only the loader position
``(epoch, batch_in_epoch)``, as for one source, and any rank can compute any epoch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from mpma_ds.data.plan import seeded_rng
from mpma_ds.data.shards import ShardIndex

_PASS_SALT = 0x9A55
_MIX_SALT = 0x313C


@dataclass(frozen=True)
class Mixture:
    """The sources of a combined shard index: source ``k`` owns shards ``shard_ranges[k]`` (``[lo, hi)``)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    shard_ranges: tuple[tuple[int, int], ...]

    def source_of_shard(self) -> np.ndarray:
        """(num_shards,) int: the source of every shard."""
        out = np.zeros(self.shard_ranges[-1][1], dtype=np.int64)
        for k, (lo, hi) in enumerate(self.shard_ranges):
            out[lo:hi] = k
        return out

    def describe(self) -> dict[str, float]:
        """``{name: weight}`` — what a saved loader position must match to resume this mixture."""
        return dict(zip(self.names, self.weights))


def combine(indexes: list[ShardIndex]) -> ShardIndex:
    """One index over several: shards and samples of ``indexes[0]``, then ``indexes[1]``, ..."""
    offsets = np.cumsum([0] + [len(ix.paths) for ix in indexes[:-1]])
    skipped: Counter = Counter()
    for ix in indexes:
        skipped.update(ix.skipped)
    return ShardIndex(
        paths=[p for ix in indexes for p in ix.paths],
        keys=[k for ix in indexes for k in ix.keys],
        shard_of=np.concatenate([ix.shard_of + off for ix, off in zip(indexes, offsets)]).astype(np.int32),
        layout=np.concatenate([ix.layout for ix in indexes]),
        listed=[n for ix in indexes for n in ix.listed],
        skipped=skipped,
        infos=[i for ix in indexes for i in (ix.infos or [None] * len(ix.paths))],
    )


def quotas(weights: tuple[float, ...], total: int) -> np.ndarray:
    """Samples of each source per epoch: ``total * w / sum(w)`` by largest remainder (sums to ``total``)."""
    share = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    out = np.floor(share).astype(np.int64)
    rest = total - int(out.sum())
    if rest:
        out[np.argsort(-(share - out), kind="stable")[:rest]] += 1
    return out


def _source_pass(counts: list[int], lo: int, hi: int, seed: int, source: int, number: int) -> np.ndarray:
    """Flat sample ids of pass ``number`` over source ``source`` (shards ``[lo, hi)``), shards shuffled."""
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = list(range(lo, hi))
    seeded_rng(seed, source, number, _PASS_SALT).shuffle(order)
    return np.concatenate([np.arange(starts[s], starts[s + 1], dtype=np.int64) for s in order])


def mixture_stream(counts: list[int], mixture: Mixture, *, epoch: int, seed: int, epoch_length: int) -> np.ndarray:
    """The flat sample ids of epoch ``epoch`` in mixture order, ``epoch_length`` long (module docstring)."""
    quota = quotas(mixture.weights, epoch_length)
    labels = np.repeat(np.arange(len(mixture.names)), quota)
    seeded_rng(seed, epoch, _MIX_SALT).shuffle(labels)
    stream = np.empty(epoch_length, dtype=np.int64)
    for k, (lo, hi) in enumerate(mixture.shard_ranges):
        size = int(sum(counts[lo:hi]))
        if quota[k] == 0:
            continue
        if size == 0:
            raise ValueError(f"data.train_sources {mixture.names[k]!r} has no readable sample left")
        start, stop = epoch * int(quota[k]), (epoch + 1) * int(quota[k])
        passes = [_source_pass(counts, lo, hi, seed, k, p) for p in range(start // size, (stop - 1) // size + 1)]
        joined = np.concatenate(passes)
        first = (start // size) * size
        stream[labels == k] = joined[start - first : stop - first]
    return stream
