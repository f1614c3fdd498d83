"""The rank-0 MLflow logger: creates or continues a run and sends to it from a background thread.

Sending happens off the training thread, with short HTTP timeouts, so a slow or dead tracking server never
stalls a step. When a send fails the logger warns ONCE and keeps retrying in the background with back-off
(``RETRY_DELAYS_S``); meanwhile metrics go only to the run folder's ``metrics.jsonl`` (written first, by
``JsonlMetricLogger``), and parameters and artifacts wait in memory. When the server answers again, every
metric step ``metrics.jsonl`` holds and the run lacks is re-sent (``backfill``): each (metric, step) ends up in
MLflow exactly once, because what the server already has is asked, not assumed. The same backfill runs when a
run is continued (``--resume``), so a server that was down at the end of a process is caught up by the next.
``close(status)`` ends the run FINISHED / FAILED / KILLED (after one last try to reach the server).
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

# mlflow is imported inside the methods: heavy (seconds to import) and only rank 0 with tracking on needs it.
from mpma_ds.tracking.base import TRACKERS, MetricLogger, clean_metrics, read_metrics_jsonl, warn_once
from mpma_ds.tracking.config import TrackingConfig, default_artifact_location, resolve_tracking_uri
from mpma_ds.tracking.lineage import PARENT_TAG
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
CLOSE_RETRY_S = 15.0
"""How long ``close`` keeps trying to reach a server that is down before it leaves the run RUNNING."""
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Seconds between attempts to reach a server that failed (the last value repeats)."""
_RETRY = object()


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


@TRACKERS.register("mlflow")
class MLflowMetricLogger(MetricLogger):
    """Logs to one MLflow run; ``active`` is False when the store could not be reached at start.

    Args:
        cfg: tracking settings (URI, experiment, run name, system metrics).
        run_id: continue this run (resume); metric steps it already holds are dropped.
        tags: tags for a new run.
        metrics_file: the run folder's ``metrics.jsonl``, where every metric is written before it reaches this
            logger: what the server missed while it was down (or before a resume) is re-sent from it. ``None``:
            metrics logged while the server is down are kept in memory instead.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        metrics_file: str | Path | None = None,
    ) -> None:
        super().__init__(None)
        self.uri = resolve_tracking_uri(cfg.uri)
        self.active = False
        self.metrics_file = Path(metrics_file) if metrics_file is not None else None
        self.last_step: dict[str, int] = {}
        self.sent_step: dict[str, int] = {}  # per metric: the newest step the server is known to hold
        self.resent = 0  # metric values re-sent by backfills
        self._params: dict[str, str] = {}
        self._held: list[tuple[str, Any]] = []  # sends waiting for the server to come back
        self._down: str | None = None  # why the server is unreachable; None while it answers
        self._attempt = 0
        self._retry_at = 0.0
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
        try:
            self.backfill()  # a continued run: what an earlier process logged while the server was away
        except Exception as err:  # noqa: BLE001
            self._went_down(err)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-logger", daemon=True)
        self._thread.start()
        if cfg.system_metrics:
            self._start_system_metrics(resume=run_id is not None, interval=cfg.system_metrics_interval_s)

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
                        self.last_step[key] = self.sent_step[key] = max(m.step for m in history)
                if run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                return run_id
        experiment_id = get_or_create_experiment(self.client, cfg.experiment, self.uri)
        if cfg.parent_run_id:  # the caller's parent wins over the lineage one (kept in mpma.pretrain_run)
            tags[PARENT_TAG] = cfg.parent_run_id
        parent = tags.get(PARENT_TAG)
        if parent and not self._run_exists(parent):
            # a pretraining run logged to another store: the link stays in mpma.pretrain_run, the tree needs both
            # runs in one store
            log.info("parent run %s is not in %s; the run is not nested under it", parent, self.uri)
            tags.pop(PARENT_TAG)
        run = self.client.create_run(experiment_id, run_name=cfg.run_name, tags=tags)
        return run.info.run_id

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except MlflowException:
            return False

    def _start_system_metrics(self, resume: bool, interval: float = 10.0) -> None:
        """MLflow's system-metrics sampler on this run (``system/cpu_utilization_percentage`` ...)."""
        try:
            import psutil  # noqa: F401 - MLflow's CPU / memory monitor needs it
        except ImportError:
            log.info("system metrics are off: psutil is not installed (pip install psutil)")
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # its INFO lines (started / stopping / no GPU) at every run would bury the progress lines
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=self.uri
            )
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 - optional: an MLflow without the monitor
            log.warning("system metrics are off: %s", _short(err))
            self._monitor = None

    # -- backfill ------------------------------------------------------------------------------------------
    def backfill(self) -> int:
        """Send every (metric, step) of ``metrics_file`` that the run does not hold; returns how many.

        The server is asked which steps it has (a send that failed may still have arrived), so nothing is sent
        twice. Raises when the server cannot be reached.
        """
        if self.metrics_file is None or not self.metrics_file.is_file():
            return 0
        from mlflow.entities import Metric

        records = read_metrics_jsonl(self.metrics_file)
        keys = sorted({k for r in records for k in r if k not in ("step", "time")})
        missing = []
        for key in keys:
            on_server = {m.step for m in self.client.get_metric_history(self.run_id, key)}
            steps = set(on_server)
            for record in records:
                if key not in record or int(record["step"]) in steps:
                    continue
                step = int(record["step"])
                steps.add(step)
                value = float(record[key])
                missing.append(Metric(key, value, int(float(record.get("time", time.time())) * 1000), step))
            if steps:
                self.sent_step[key] = max(self.sent_step.get(key, -1), *steps)
                self.last_step[key] = max(self.last_step.get(key, -1), self.sent_step[key])
        for part in chunked(missing, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=part, synchronous=True)
        self.resent += len(missing)
        return len(missing)

    # -- the sender thread ---------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            wait = None if self._down is None else max(0.0, self._retry_at - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                self._recover()
                continue
            try:
                if item is None:
                    return
                if self._down is not None:
                    self._hold(item)
                    if time.monotonic() >= self._retry_at:
                        self._recover()
                    continue
                try:
                    self._send(*item)
                except Exception as err:  # noqa: BLE001 - the server went away: hold, retry later
                    self._hold(item)
                    self._went_down(err)
            finally:
                self._queue.task_done()

    def _hold(self, item: tuple[str, Any]) -> None:
        """Keep a send for later; metrics need no copy when ``metrics_file`` has them (the backfill reads it)."""
        if item[0] != "metrics" or self.metrics_file is None:
            self._held.append(item)

    def _went_down(self, err: BaseException) -> None:
        self._down = _short(err)
        self._attempt = 0
        self._retry_at = time.monotonic() + RETRY_DELAYS_S[0]
        self._warn(
            f"MLflow tracking at {self.uri} failed ({self._down}); retrying in the background, the run folder's "
            "metrics.jsonl keeps every metric and what the server missed is re-sent when it is back"
        )

    def _recover(self) -> bool:
        """One attempt to reach the server again: backfill, then the held sends. False (and the next attempt
        scheduled) when it still fails."""
        try:
            self.client.get_run(self.run_id)
            resent = self.backfill() if self.metrics_file is not None else 0
            while self._held:
                self._send(*self._held[0])
                self._held.pop(0)
        except Exception as err:  # noqa: BLE001
            self._down = _short(err)
            self._attempt += 1
            self._retry_at = time.monotonic() + RETRY_DELAYS_S[min(self._attempt, len(RETRY_DELAYS_S) - 1)]
            return False
        if self._down is not None:
            log.warning(
                "MLflow tracking at %s is back; re-sent %d metric values from metrics.jsonl", self.uri, resent
            )
        self._down = None
        return True

    def _send(self, kind: str, payload: Any) -> None:
        from mlflow.entities import Metric, Param

        if kind == "metrics":
            step, timestamp, values = payload
            metrics = [
                Metric(k, v, timestamp, step) for k, v in values.items() if step > self.sent_step.get(k, -1)
            ]
            for part in chunked(metrics, MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=part, synchronous=True)
            for metric in metrics:
                self.sent_step[metric.key] = step
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

    # -- the interface -------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
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
        if not self.active:
            return
        step = int(step)
        fresh = {k: v for k, v in clean_metrics(metrics).items() if step > self.last_step.get(k, -1)}
        if not fresh:
            return
        for key in fresh:
            self.last_step[key] = step
        self._queue.put(("metrics", (step, int(time.time() * 1000), fresh)))

    def log_artifact(self, path: str | Path) -> None:
        if not self.active:
            return
        path = Path(path)
        if not path.exists():
            log.warning("artifact %s does not exist; not logged", path)
            return
        self._queue.put(("artifact", str(path)))

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until everything queued was sent (or held for re-sending while the server is down); False on
        timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    @property
    def reachable(self) -> bool:
        """False while the server is known to be down."""
        return self.active and self._down is None

    def close(self, status: str = "FINISHED") -> None:
        """Send what is queued, try once more to reach a server that was down (backfill), and end the run with
        ``status``. When the server is still unreachable the run stays RUNNING in MLflow: the next
        ``--resume`` of the run backfills it and ends it."""
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
        deadline = time.monotonic() + CLOSE_RETRY_S
        while self._down is not None and not self._recover() and time.monotonic() < deadline:
            time.sleep(1.0)  # a server coming back (a restart) gets a few seconds to answer
        if self._down is None:
            try:
                self.client.set_terminated(self.run_id, status=status)
                return
            except Exception as err:  # noqa: BLE001
                self._down = _short(err)
        message = (
            f"MLflow tracking at {self.uri} is still unreachable ({self._down}); run {self.run_id} stays RUNNING "
            "there, the run folder's metrics.jsonl holds every metric, and --resume of this run re-sends them"
        )
        if self._warned:
            log.warning(message)
        else:
            self._warn(message)


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) < 300 else text[:297] + "..."
