"""Readers of the public chest X-ray benchmark datasets as users download them (``data_tools.benchmarks.common``),
by id through `BENCHMARKS`; ``read_benchmark(id, root, options)`` reads one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from data_tools.benchmarks.common import BENCHMARKS, BenchmarkData, BenchmarkError, BenchRecord, Box, RowProblem

__all__ = ["BENCHMARKS", "BenchRecord", "BenchmarkData", "BenchmarkError", "Box", "RowProblem", "read_benchmark"]


def read_benchmark(dataset: str, root: str | Path, options: dict[str, Any] | None = None) -> BenchmarkData:
    """Read dataset ``dataset`` from ``root`` with reader ``options`` (its options dataclass's fields; an unknown
    one is an error naming the fields there are)."""
    entry = BENCHMARKS.get(dataset)
    opts = dict(options or {})
    known = {f.name for f in dataclasses.fields(entry.options)} if entry.options else set()
    unknown = sorted(set(opts) - known)
    if unknown:
        raise BenchmarkError(
            f"{dataset}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    for key in ("fractions", "labels", "projections"):  # YAML lists -> the dataclasses' tuples
        if isinstance(opts.get(key), list):
            opts[key] = tuple(opts[key])
    return entry.obj(Path(root), entry.options(**opts) if entry.options else None)
