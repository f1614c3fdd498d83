"""Samples a run skips as unreadable, shown and bounded: ``data.max_skipped_fraction`` (default 1 %).

Two places lose samples: a shard's index lists samples the tar cannot give (a truncated or damaged shard; found
when the loader is built, per shard) and samples that fail while read (a damaged JPEG, bad JSON; counted by the
loader as it goes). Both used to be visible only as ``skipped_samples`` in ``metrics.jsonl`` while the run
trained to the end on what was left (half a shard truncated: exit 0). Now the shards with skips are named on the
console and logged to MLflow per shard, and a run whose skips pass the fraction stops with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mpma_ds.data.shards import ShardIndex
from mpma_ds.distributed import all_reduce_sum


class TooManySkipped(ValueError):
    """More unreadable samples than ``data.max_skipped_fraction`` of those read: the run stops (one line, exit 2)."""


MIN_SAMPLES_READ = 100
"""Samples read before the while-reading fraction is checked: one bad JPEG in the first batch of 4 is not 25 %."""


def _index(loaders: list[Any]) -> Any:
    """The shard index behind the loaders (``None`` for the synthetic backend): every loader of a run (one per
    data rank, rank x accumulation step) lists the same shards, each holding the whole index."""
    indexes = (getattr(ld.loader, "index", None) for ld in loaders)
    return next((i for i in indexes if isinstance(i, ShardIndex)), None)  # zero_shot's no-op loader has none


def check_at_start(loaders: list[Any], max_fraction: float) -> str | None:
    """A note naming the shards whose indexes list unreadable samples (``None`` when none do).

    Raises:
        ValueError: the shards skip more than ``max_fraction`` of what their indexes list (one line naming them).
    """
    index = _index(loaders)
    return index.check_skipped(max_fraction) if index is not None else None


def split_counts(loaders: list[Any]) -> tuple[int, int]:
    """``(skipped while reading by these loaders, skipped at start)``: each loader's ``stats()`` counts the
    index's skips again (every one holds the whole index), so they are taken out once per loader and counted once."""
    total = sum(int(ld.stats().get("skipped_samples", 0)) for ld in loaders)
    bases = [
        sum(i.skipped.values())
        for i in (getattr(ld.loader, "index", None) for ld in loaders)
        if isinstance(i, ShardIndex)
    ]
    return total - sum(bases), max(bases, default=0)


def shard_metrics(loaders: list[Any]) -> dict[str, float]:
    """``skipped_samples.<split folder>.<shard>``: the unreadable samples of each shard that has any, for MLflow."""
    index = _index(loaders)
    return {
        f"skipped_samples.{Path(str(path)).parent.name}.{Path(str(path)).stem}": float(n)
        for path, n, _, _ in (index.unreadable() if index is not None else ())
    }


def loader_metrics(loaders: list[Any], samples_read: int, data: Any) -> dict[str, float]:
    """The loaders' counters for a logged step: ``skipped_samples`` (all ranks; the index's skips once),
    ``skipped_while_reading`` and ``epoch``, after ``check_while_reading`` against ``data.max_skipped_fraction``
    (collective: every rank calls it at the same step).

    Raises:
        TooManySkipped: past the fraction of the samples read (the same on every rank).
    """
    read_here, at_start = split_counts(loaders)  # at start: the same on every rank
    read = float(all_reduce_sum(torch.tensor([float(read_here)])).item())
    check_while_reading(read, samples_read, data.max_skipped_fraction)
    epoch = float(loaders[0].stats().get("epoch", 0))
    return {"skipped_samples": read + at_start, "skipped_while_reading": read, "epoch": epoch}


def check_while_reading(read_skipped: float, samples_read: int, max_fraction: float) -> None:
    """Stop a run whose loaders skipped more than ``max_fraction`` of the samples read so far.

    Raises:
        TooManySkipped: one line with the count and what to do.
    """
    if samples_read < MIN_SAMPLES_READ or read_skipped <= max_fraction * samples_read:
        return
    raise TooManySkipped(
        f"{int(read_skipped)} of the {samples_read} samples read so far were unreadable and skipped "
        f"({read_skipped / samples_read:.1%}, above data.max_skipped_fraction={max_fraction}; skipped_* in "
        "metrics.jsonl gives the reasons): check the shards with python -m data_tools.verify_shards and rebuild "
        "them, or raise data.max_skipped_fraction"
    )
