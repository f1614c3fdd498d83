"""Tracking settings (the recipe's ``tracking:`` section) and how a tracking URI is resolved."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mpma_ds.config import ConfigSection
from mpma_ds.tracking.base import TRACKERS

DEFAULT_DB_NAME = "mlflow.db"


@dataclass
class TrackingConfig(ConfigSection):
    """Where and how a run's parameters, metrics and artifacts are recorded (MLflow, rank 0 only)."""

    SECTION = "tracking"

    enabled: bool = True
    """Log to the tracking backends. ``False`` keeps only the local ``metrics.jsonl`` in the run folder."""

    backends: list[str] = field(default_factory=lambda: ["mlflow"])
    """The tracking backends a run logs to (rank 0), each registered in ``mpma_ds.tracking.base.TRACKERS``:
    ``mlflow`` or one an installed plugin adds (``mpma_ds.trackers`` entry points). The settings below are
    MLflow's; the first backend that opens a run owns the run id a resume continues."""

    uri: str | None = None
    """MLflow tracking URI (``sqlite:///path.db``, ``http://127.0.0.1:5000``, ``file:///dir``). ``None``:
    ``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlflow.db`` in the working folder."""

    experiment: str = "mpma-pretrain"
    """MLflow experiment name; created on first use."""

    run_name: str | None = None
    """MLflow run name; ``None`` lets MLflow pick one."""

    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags of a new run, e.g. ``mlflow.parentRunId`` to nest it under another run. A sweep
    (``mpma-sweep``) sets the parent (its own run), ``mpma.sweep``, ``mpma.arm`` and ``mpma.seed`` here, so
    the runs of one study are grouped in ``mlflow ui``."""

    parent_run_id: str | None = None
    """Nest a new run under this MLflow run (``mlflow.parentRunId``), over any parent the run's own tags name (a
    fine-tuning run's pretraining run, which stays in ``mpma.pretrain_run``): a benchmark suite's entry run is the
    parent of the Trainer runs its ``vqa`` / ``finetune`` protocols start. Dropped when that run is not in the
    store."""

    params: dict[str, str] = field(default_factory=dict)
    """Extra parameters of the run, logged under their own names (a benchmark entry's ``benchmark.suite``,
    ``benchmark.dataset_version``, ``benchmark.split_checksum`` on the fine-tuning run it starts)."""

    system_metrics: bool = True
    """Also log CPU / memory / disk / network (and, with ``pynvml``, GPU) system metrics through MLflow's
    sampler (``system/...``, shown on the run's "System metrics" tab); needs ``psutil``. Off where MLflow's
    monitor is not available (one log line says why)."""

    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metric samples (``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides)."""

    def validate(self) -> None:
        if not self.backends and self.enabled:
            raise ValueError("tracking.backends is empty: name one (mlflow), or set tracking.enabled: false")
        for name in self.backends:
            if name not in TRACKERS:
                raise ValueError(f"tracking.backends: {name!r} is not a tracking backend; {TRACKERS.describe()}")
        if not self.experiment.strip():
            raise ValueError(f"tracking.experiment must be a non-empty string, got {self.experiment!r}")
        if not self.system_metrics_interval_s > 0:
            raise ValueError(
                f"tracking.system_metrics_interval_s must be > 0 seconds, got {self.system_metrics_interval_s}"
            )


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else the working folder's
    ``sqlite:///mlflow.db`` (made absolute, so every process of a run writes the same database)."""
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path.cwd().resolve() / DEFAULT_DB_NAME)


def is_local_store(uri: str) -> bool:
    """True for stores that MLflow writes directly (no server): sqlite databases and file folders."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite store, keep artifacts beside the database (``<db dir>/mlartifacts/<experiment>``) rather
    than in MLflow's default ``./mlruns`` under whatever the current folder happens to be. Servers and
    other stores choose their own location (``None``)."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(uri[len("sqlite:///") :])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (db_path.parent / "mlartifacts" / safe).resolve().as_uri()
