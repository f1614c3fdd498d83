"""Run tracking: MLflow on rank 0 (the only module that imports mlflow), a local metrics.jsonl always,
no-op on other ranks. See ``build_logger``."""

from mpma_ds.tracking.base import MetricLogger, NoOpLogger, TrackingWarning, metric_name
from mpma_ds.tracking.config import TrackingConfig, resolve_tracking_uri
from mpma_ds.tracking.loggers import (
    METRICS_FILE,
    ConsoleLogger,
    JsonlMetricLogger,
    LoggerGroup,
    build_logger,
    read_metrics_jsonl,
)
from mpma_ds.tracking.params import flatten_params

__all__ = [
    "METRICS_FILE",
    "ConsoleLogger",
    "JsonlMetricLogger",
    "LoggerGroup",
    "MetricLogger",
    "NoOpLogger",
    "TrackingConfig",
    "TrackingWarning",
    "build_logger",
    "flatten_params",
    "metric_name",
    "read_metrics_jsonl",
    "resolve_tracking_uri",
]
