"""A build split across machines: ``--num-nodes N --node-rank R`` (or a SLURM job array) builds a disjoint
part of the plan into one shared output folder, and whichever part finds every shard recorded writes
``rejects.jsonl`` and ``manifest.json``.

- **Disjoint and balanced.** Part ``R`` builds the planned shards ``i`` with ``i % N == R``. Every part scans
  the whole input (cheap next to encoding), so all parts hold the same plan and fingerprint; a shard's bytes
  depend only on its inputs and the options, so the result is byte-identical to a one-machine build.
- **Any order, any machine.** Parts share nothing but the output folder: each records its finished shards in
  ``OUT/.build/`` exactly as a one-machine build does, so a killed part reruns with the same command and
  skips what it had finished.
- **The last part finishes.** After its own shards a part reads the records of the whole plan; when all are
  there it writes ``rejects.jsonl`` and ``manifest.json`` (deterministic content, each through its own
  temporary file and a rename), so two parts finishing at once write the same bytes and either may remove
  ``.build/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from data_tools.shard_build import BuildError
from data_tools.shard_build.plan import PlannedShard


def resolve_part(num_nodes: int | None, node_rank: int | None) -> tuple[int, int]:
    """``(N, R)`` from the arguments, else from a SLURM job array (``SLURM_ARRAY_TASK_COUNT``,
    ``SLURM_ARRAY_TASK_ID`` - ``SLURM_ARRAY_TASK_MIN``), else ``(1, 0)``: one machine builds everything.

    Raises:
        BuildError: only one of the two given, or a rank outside ``[0, N)``.
    """
    if num_nodes is None and node_rank is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        num_nodes = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        node_rank = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")) - int(
            os.environ.get("SLURM_ARRAY_TASK_MIN", "0")
        )
    if num_nodes is None and node_rank is None:
        return 1, 0
    if num_nodes is None or node_rank is None:
        raise BuildError("give both --num-nodes and --node-rank (or neither), e.g. --num-nodes 4 --node-rank 0")
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise BuildError(f"--node-rank {node_rank} must be in [0, --num-nodes {num_nodes}); ranks count from 0")
    return num_nodes, node_rank


def part_of(plan: list[PlannedShard], num_nodes: int, node_rank: int) -> list[PlannedShard]:
    """The planned shards part ``node_rank`` of ``num_nodes`` builds."""
    return [shard for i, shard in enumerate(plan) if i % num_nodes == node_rank]


def all_records(state_dir: Path, plan: list[PlannedShard]) -> dict[str, dict] | None:
    """Every planned shard's record from ``state_dir`` (the other parts' trusted as written: each part checked
    its own shards), or None while a part is still missing."""
    records = {}
    for shard in plan:
        try:
            records[shard.record_name] = json.loads((state_dir / shard.record_name).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
    return records


class SharedRecords(Protocol):
    """Where the parts of a split build share their records when they share no folder (a remote ``--output``:
    `shard_build.upload.StoreRecords`)."""

    def put(self, name: str, record: dict, fingerprint: str, *, again: bool = True) -> None:
        """Share one finished shard's record (``again=False``: only when it is not shared yet)."""

    def all(self, plan: list[PlannedShard], fingerprint: str) -> dict[str, dict] | None:
        """Every planned shard's record, or None while a part is still missing.

        Raises:
            BuildError: a record of another build (other input or options) under the same output.
        """
