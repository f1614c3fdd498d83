"""Remote shards for the ``dali`` backend: DALI's webdataset reader reads local files with their ``.idx``, so
each rank fetches the shards of *its own* part of the epoch into the node-local `ShardCache` before its reader
starts (in parallel, verified against the listed size), and reads them as local files.

The rank's part is DALI's own sample-exact split (``shard_id = rank`` of ``num_shards = world_size`` over the
epoch's shard list, `plan.rank_range`), computed here on the index: the reader is then built over just the
shards that part touches, each with an ``.idx`` trimmed to the part's samples, with ``shard_id = 0`` of
``num_shards = 1``. It reads the same samples in the same order as a reader over every shard would, and only
those shards have to be on the node's disk. While an epoch runs, the next epoch's shards are fetched ahead in
the background when the disk budget holds both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.shard_format import format_index
from mpma_ds.data.plan import rank_range
from mpma_ds.data.shard_cache import ShardCache
from mpma_ds.data.shards import ShardIndex


def rank_pieces(counts: list[int], order: list[int], rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """``[(shard, first, stop)]``: the runs of samples (positions within each shard) that ``rank``'s part of
    the epoch covers, in the epoch's shard ``order`` (shards may repeat when resampled)."""
    total = int(sum(counts[s] for s in order))
    lo, hi = rank_range(total, rank, world_size)
    pieces, start = [], 0
    for shard in order:
        end = start + counts[shard]
        a, b = max(lo, start), min(hi, end)
        if a < b:
            pieces.append((shard, a - start, b - start))
        start = end
    return pieces


def epoch_bytes(index: ShardIndex, pieces: list[tuple[int, int, int]]) -> int:
    """The cache space the distinct shards of ``pieces`` need."""
    shards = {s for s, _, _ in pieces}
    return sum(index.infos[s].size for s in shards if index.infos[s] is not None)


def local_reader_inputs(
    index: ShardIndex, pieces: list[tuple[int, int, int]], cache: ShardCache, folder: Path, tag: str
) -> tuple[list[str], list[str]]:
    """Local ``(paths, index_paths)`` for DALI over ``pieces``: each shard fetched into ``cache`` (in parallel),
    each ``.idx`` trimmed to the piece's samples and written to ``folder`` (names start with ``tag``).

    Raises:
        ValueError: the cache budget cannot hold the rank's shards of one epoch (one line).
    """
    need = epoch_bytes(index, pieces)
    if need > cache.budget_bytes:
        raise ValueError(
            f"data.shard_cache_gb={cache.budget_bytes / 1e9:g} cannot hold this rank's {need / 1e9:.2f} GB of "
            "shards for one epoch (DALI reads local copies): raise data.shard_cache_gb or use data.backend=wds"
        )
    fetched = fetch_all(index, sorted({s for s, _, _ in pieces}), cache)
    counts = index.counts()
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    paths, idx = [], []
    for n, (shard, first, stop) in enumerate(pieces):
        refs = [index.ref(i) for i in range(starts[shard] + first, starts[shard] + stop)]
        members = [(f"{ref.key}.{ext}", off, size) for ref in refs for ext, off, size in ref.members]
        path = folder / f"{tag}-{n:06d}.idx"
        path.write_text(format_index(members), encoding="utf-8")
        paths.append(str(fetched[shard]))
        idx.append(str(path))
    return paths, idx


def fetch_all(index: ShardIndex, shards: list[int], cache: ShardCache) -> dict[int, Path]:
    """Local copies of ``shards`` (fetched ``cache.prefetch``-style in parallel, or found already cached),
    pinned: no rank of the node evicts them while DALI may open them (the caller unpins)."""
    jobs = []
    for shard in shards:
        url, info = str(index.paths[shard]), index.infos[shard]
        jobs.append((url, lambda url=url, info=info: cache.path(url, info, pin=True)))
    cache.prefetch(jobs)
    return {shard: cache.wait(url) for shard, (url, _) in zip(shards, jobs)}
