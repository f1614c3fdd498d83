"""The rank-0 MLflow logger: creates or continues a run and sends to it from a background thread.

Sending happens off the training thread, with short HTTP timeouts and few retries, so a slow or dead
tracking server never stalls a step. The first failure turns MLflow off for the rest of the run with ONE
``TrackingWarning``; the local ``metrics.jsonl`` (written by ``JsonlMetricLogger``) keeps every metric.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpma_ds.tracking.base import MetricLogger, clean_metrics, warn_once
from mpma_ds.tracking.config import TrackingConfig, default_artifact_location, resolve_tracking_uri
from mpma_ds.tracking.params import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, chunked, flatten_params

log = logging.getLogger(__name__)

# MLflow's defaults (120 s timeout, 7 retries with exponential back-off) can hang a call for many minutes
# when the server is gone. Users may still set their own values in the environment.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
CLOSE_TIMEOUT_S = 60.0


def _apply_http_defaults() -> None:
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """The id of experiment ``name`` (restored if deleted, created if missing)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=default_artifact_location(uri, name))
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


class MLflowMetricLogger(MetricLogger):
    """Logs to one MLflow run; ``active`` is False when the store could not be reached at start.

    Args:
        cfg: tracking settings (URI, experiment, run name, system metrics).
        run_id: continue this run (resume); metric steps it already holds are dropped.
        tags: tags for a new run.
    """

    def __init__(
        self, cfg: TrackingConfig, *, run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(None)
        self.uri = resolve_tracking_uri(cfg.uri)
        self.active = False
        self.last_step: dict[str, int] = {}
        self._params: dict[str, str] = {}
        self._failure: str | None = None
        self._warned = False
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._monitor = None
        _apply_http_defaults()
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._open_run(cfg, run_id, dict(tags or {}))
        except Exception as err:  # noqa: BLE001 - any failure here means "no MLflow", never a crash
            self._warn(
                f"MLflow tracking at {self.uri} is unavailable ({_short(err)}); metrics go only to the "
                "run folder's metrics.jsonl"
            )
            return
        self.active = True
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-logger", daemon=True)
        self._thread.start()
        if cfg.system_metrics:
            self._start_system_metrics(resume=run_id is not None)

    # -- setup -------------------------------------------------------------------------------------------
    def _open_run(self, cfg: TrackingConfig, run_id: str | None, tags: dict[str, str]) -> str:
        from mlflow.exceptions import MlflowException

        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as err:
                if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code) and "not found" not in str(err).lower():
                    raise
                log.warning("MLflow run %s not found at %s; starting a new run", run_id, self.uri)
            else:
                self._params = dict(run.data.params)
                for key in run.data.metrics:
                    history = self.client.get_metric_history(run_id, key)
                    if history:
                        self.last_step[key] = max(m.step for m in history)
                if run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                return run_id
        experiment_id = get_or_create_experiment(self.client, cfg.experiment, self.uri)
        run = self.client.create_run(experiment_id, run_name=cfg.run_name, tags=tags)
        return run.info.run_id

    def _start_system_metrics(self, resume: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 - optional (needs psutil)
            log.warning("system metrics are off: %s", _short(err))
            self._monitor = None

    # -- the sender thread ---------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._failure is None:
                    self._send(*item)
            except Exception as err:  # noqa: BLE001 - the server went away: stop sending, keep training
                self._failure = _short(err)
            finally:
                self._queue.task_done()

    def _send(self, kind: str, payload: Any) -> None:
        from mlflow.entities import Metric, Param

        if kind == "metrics":
            step, timestamp, values = payload
            metrics = [Metric(k, v, timestamp, step) for k, v in values.items()]
            for part in chunked(metrics, MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=part, synchronous=True)
        elif kind == "params":
            params = [Param(k, v) for k, v in payload.items()]
            for part in chunked(params, MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=part, synchronous=True)
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, payload)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warn_once(message)

    def _check(self) -> bool:
        """False once sending failed (after warning once)."""
        if self._failure is not None:
            self._warn(
                f"MLflow tracking at {self.uri} failed ({self._failure}); from now on metrics go only to "
                "the run folder's metrics.jsonl"
            )
            return False
        return self.active

    # -- the interface -------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self._check():
            return
        flat = flatten_params(params)
        changed = sorted(k for k, v in flat.items() if k in self._params and self._params[k] != v)
        if changed:
            # MLflow forbids changing a logged param; a resumed run keeps its first values.
            log.warning("resumed run %s keeps its logged values of %s", self.run_id, ", ".join(changed[:10]))
        new = {k: v for k, v in flat.items() if k not in self._params}
        self._params.update(new)
        if new:
            self._queue.put(("params", new))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self._check():
            return
        step = int(step)
        fresh = {k: v for k, v in clean_metrics(metrics).items() if step > self.last_step.get(k, -1)}
        if not fresh:
            return
        for key in fresh:
            self.last_step[key] = step
        self._queue.put(("metrics", (step, int(time.time() * 1000), fresh)))

    def log_artifact(self, path: str | Path) -> None:
        if not self._check():
            return
        path = Path(path)
        if not path.exists():
            log.warning("artifact %s does not exist; not logged", path)
            return
        self._queue.put(("artifact", str(path)))

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until everything queued was sent (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def close(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self.active = False
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT_S)
        if self._failure is None:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as err:  # noqa: BLE001
                self._failure = _short(err)
        if self._failure is not None:
            self._warn(
                f"MLflow tracking at {self.uri} failed ({self._failure}); the run folder's metrics.jsonl "
                "holds every metric"
            )


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) < 300 else text[:297] + "..."
