"""The logging interface every logger implements (``MetricLogger``; the base class is the no-op logger ranks
other than 0 get) and the metric-name rules MLflow and the local files share."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_tools.registry import Registry

TRACKERS: Registry = Registry("tracking backend", "mpma_ds.trackers", builtins=("mpma_ds.tracking.mlflow_logger",))
"""Tracking backends by name (``tracking.backends``). A backend is a ``MetricLogger`` subclass built on rank 0 as
``cls(cfg, run_id=..., tags=..., metrics_file=...)`` (``cfg``: the recipe's ``TrackingConfig``; ``run_id``: the
run to continue on resume, from the checkpoint; ``metrics_file``: the run's ``metrics.jsonl``, for backfills)
with an ``active`` attribute (False: it could not start; the run goes on without it). It registers itself with
``@TRACKERS.register("name")``; a plugin's through the ``mpma_ds.trackers`` entry-point group."""

_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


class TrackingWarning(RuntimeWarning):
    """Tracking degraded (server unreachable, run missing); training goes on with local metrics."""


def to_float(value: Any) -> float | None:
    """A metric value as a Python float (tensors and numpy scalars included); ``None`` if not numeric."""
    try:
        if hasattr(value, "item"):
            value = value.item()
        return float(value)
    except (TypeError, ValueError):
        return None


def metric_name(key: str) -> str:
    """``key`` as a name MLflow accepts (alphanumerics and ``_-. :/``): ``i2t_R@1`` -> ``i2t_R_at_1``."""
    return _BAD_METRIC_CHARS.sub("_", str(key).replace("@", "_at_")) or "metric"


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep the numeric entries of ``metrics`` as floats, under names MLflow accepts (``metric_name``).

    The local ``metrics.jsonl`` uses the same names, so both records of a run read alike.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        number = to_float(value)
        if number is not None:
            out[metric_name(key)] = number
    return out


class MetricLogger:
    """The logging interface; this base class logs nothing (what ranks other than 0 get).

    Attributes:
        run_id: the MLflow run id (rank 0 creates it and the trainer broadcasts it; ``None`` without MLflow).
    """

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record settings; nested dicts are flattened to dotted keys."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record scalar metrics at a global step."""

    def log_artifact(self, path: str | Path) -> None:
        """Attach a file to the run."""

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything logged so far was delivered (or given up on); False on timeout."""
        return True

    def close(self, status: str = "FINISHED") -> None:
        """Flush and end the run (``FINISHED``, ``FAILED`` or ``KILLED``)."""

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


NoOpLogger = MetricLogger


def warn_once(message: str) -> None:
    """Emit a ``TrackingWarning`` (the caller guarantees once per logger)."""
    warnings.warn(message, TrackingWarning, stacklevel=3)


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records
