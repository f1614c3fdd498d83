"""The build plan: which input goes to which shard, and the fingerprint that names the build.

A shard's content is a pure function of its inputs and the options, whatever the number of workers:
the source is scanned once in sorted order, and per split the planned samples are cut into shards of
`--shard-size` inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from data_tools.shard_format import SPLITS
from data_tools.sources.common import SourceItem, SourceScan


@dataclass
class PlannedShard:
    """One shard to write: its split, number and inputs (in scan order)."""

    split: str
    index: int
    items: list[SourceItem]

    @property
    def record_name(self) -> str:
        """The file in `OUT/.build/` that records this shard once written."""
        return f"{self.split}-shard-{self.index:06d}.json"


def plan_shards(items: list[SourceItem], shard_size: int) -> list[PlannedShard]:
    """Cut each split's items (in scan order) into consecutive shards; MIMIC splits first, then others."""
    by_split: dict[str, list[SourceItem]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    order = [s for s in SPLITS if s in by_split] + sorted(s for s in by_split if s not in SPLITS)
    plan = []
    for split in order:
        split_items = by_split[split]
        for n, start in enumerate(range(0, len(split_items), shard_size)):
            plan.append(PlannedShard(split, n, split_items[start : start + shard_size]))
    return plan


def fingerprint(options: dict, scan: SourceScan) -> str:
    """A hash of everything that decides the output bytes: options, planned inputs (path, size, text, meta)."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for item in scan.items:
        size = os.stat(item.image_path).st_size
        h.update(json.dumps([item.key, item.input, size, item.text, item.meta], sort_keys=True).encode())
    for rej in scan.rejects:
        h.update(json.dumps(rej.to_dict(), sort_keys=True).encode())
    return h.hexdigest()
