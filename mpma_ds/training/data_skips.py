"""Samples a run skips as unreadable, shown and bounded: ``data.max_skipped_fraction`` (default 1 %).

Two places lose samples: a shard's index lists samples the tar cannot give (a truncated or damaged shard; found
when the loader is built, per shard) and samples that fail while read (a damaged JPEG, bad JSON; counted by the
loader as it goes). Both used to be visible only as ``skipped_samples`` in ``metrics.jsonl`` while the run
trained to the end on what was left (half a shard truncated: exit 0). Now the shards with skips are named on the
console and logged to MLflow per shard, and a run whose skips pass the fraction stops with one line.
"""

from __future__ import annotations

import sys
from typing import Any

MIN_SAMPLES_READ = 100
"""Samples read before the while-reading fraction is checked: one bad JPEG in the first batch of 4 is not 25 %."""


def _index(loaders: list[Any]) -> Any:
    """The shard index behind the loaders (``None`` for the synthetic backend): every loader of a run (one per
    data rank, rank x accumulation step) lists the same shards, each holding the whole index."""
    return next((i for i in (getattr(ld.loader, "index", None) for ld in loaders) if i is not None), None)


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
        sum(i.skipped.values()) for i in (getattr(ld.loader, "index", None) for ld in loaders) if i is not None
    ]
    return total - sum(bases), max(bases, default=0)


def shard_metrics(loaders: list[Any]) -> dict[str, float]:
    """``skipped_samples.<split folder>.<shard>``: the unreadable samples of each shard that has any, for MLflow."""
    index = _index(loaders)
    return {
        f"skipped_samples.{path.parent.name}.{path.stem}": float(n)
        for path, n, _, _ in (index.unreadable() if index is not None else ())
    }


def show_at_start(note: str | None, loaders: list[Any], logger: Any, step: int) -> None:
    """Rank 0: the shards with unreadable samples on the console (stderr) and, per shard, in MLflow."""
    if note is None:
        return
    print(f"warning: {note}", file=sys.stderr, flush=True)
    logger.log_metrics(shard_metrics(loaders), step=step)


def check_while_reading(read_skipped: float, samples_read: int, max_fraction: float) -> None:
    """Stop a run whose loaders skipped more than ``max_fraction`` of the samples read so far.

    Raises:
        ValueError: one line with the count and what to do.
    """
    if samples_read < MIN_SAMPLES_READ or read_skipped <= max_fraction * samples_read:
        return
    raise ValueError(
        f"{int(read_skipped)} of the {samples_read} samples read so far were unreadable and skipped "
        f"({read_skipped / samples_read:.1%}, above data.max_skipped_fraction={max_fraction}; skipped_* in "
        "metrics.jsonl gives the reasons): check the shards with python -m data_tools.verify_shards and rebuild "
        "them, or raise data.max_skipped_fraction"
    )
