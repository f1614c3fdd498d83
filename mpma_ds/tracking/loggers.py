"""Metric loggers behind one interface (``base.MetricLogger``): a no-op logger (ranks > 0), a local JSONL
logger (always on rank 0), a console line every ``log_every`` steps (rank 0), the MLflow logger (rank 0,
``mlflow_logger.py``) and a group that fans out to several.

A training loop only ever sees ``MetricLogger``::

    logger = build_logger(recipe.tracking, rank=rank, run_dir=out, run_id=resumed_run_id)
    logger.log_params(flat_recipe)
    logger.log_metrics({"loss": 1.2, "lr": 3e-4}, step=10)
    logger.log_artifact(out / "recipe.yaml")
    logger.close("FINISHED")
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from mpma_ds.tracking.base import TRACKERS, MetricLogger, clean_metrics, read_metrics_jsonl  # noqa: F401 - re-exported
from mpma_ds.tracking.config import TrackingConfig
from mpma_ds.tracking.params import flatten_params

METRICS_FILE = "metrics.jsonl"
PARAMS_FILE = "params.json"


class JsonlMetricLogger(MetricLogger):
    """Appends one JSON line per ``log_metrics`` call to ``run_dir/metrics.jsonl``: ``{"step", "time", ...}``.

    On resume it continues the existing file and drops (metric, step) pairs it already holds, so an exact
    resume that recomputes steps since the checkpoint leaves no duplicates. A fresh run that finds an old
    file moves it aside (``metrics.jsonl.prev-N``) rather than overwrite it.
    """

    def __init__(self, run_dir: str | Path, *, run_id: str | None = None, resume: bool = False) -> None:
        super().__init__(run_id)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.last_step: dict[str, int] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            if resume:
                self.last_step = self._scan(self.path)
                self._end_with_newline()
            else:
                n = 1
                while (self.run_dir / f"{METRICS_FILE}.prev-{n}").exists():
                    n += 1
                self.path.rename(self.run_dir / f"{METRICS_FILE}.prev-{n}")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    @staticmethod
    def _scan(path: Path) -> dict[str, int]:
        last: dict[str, int] = {}
        for record in read_metrics_jsonl(path):
            step = int(record["step"])
            for key in record:
                if key not in ("step", "time"):
                    last[key] = max(last.get(key, step), step)
        return last

    def _end_with_newline(self) -> None:
        # A kill -9 can leave half a line; terminate it so the next record starts on its own line.
        with open(self.path, "rb+") as fh:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                fh.write(b"\n")

    def log_params(self, params: Mapping[str, Any]) -> None:
        path = self.run_dir / PARAMS_FILE
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.update(flatten_params(params))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        tmp.replace(path)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._file.closed:
            return
        step = int(step)
        fresh = {k: v for k, v in clean_metrics(metrics).items() if step > self.last_step.get(k, -1)}
        if not fresh:
            return
        for key in fresh:
            self.last_step[key] = step
        record = {"step": step, "time": round(time.time(), 3), **fresh}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self, status: str = "FINISHED") -> None:
        if not self._file.closed:
            self._file.close()


class ConsoleLogger(MetricLogger):
    """One line per training log on stdout (rank 0): ``step 40/300 | loss 3.2104 | lr 1.20e-04 | 41.2
    samples/s | ETA 1m03s`` (``| 24 skipped`` once the loaders skipped unreadable samples), and evaluation results as ``eval @ step 100: val/accuracy 0.731 ...``.

    Args:
        total_steps: the run's last step (for the ETA); 0 = unknown.
        stream: where lines go (default stdout, flushed each line so a launcher's log shows progress).
    """

    TRAIN_KEYS = ("loss", "lr", "samples_per_s")

    def __init__(self, total_steps: int = 0, *, stream: TextIO | None = None, prefix: str = "") -> None:
        super().__init__(None)
        self.total_steps = total_steps
        self.stream = stream
        self.prefix = prefix
        self._t0 = time.monotonic()
        self._first_step: int | None = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        values = clean_metrics(metrics)
        out = self.stream or sys.stdout
        if "loss" in values and "lr" in values:
            if self._first_step is None:
                self._first_step, self._t0 = step - 1, time.monotonic()
            parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
            parts.append(f"loss {values['loss']:.4f}")
            parts.append(f"lr {values['lr']:.2e}")
            if "samples_per_s" in values:
                parts.append(f"{values['samples_per_s']:.1f} samples/s")
            if values.get("skipped_samples"):
                parts.append(f"{int(values['skipped_samples'])} skipped")
            eta = self._eta(step)
            if eta:
                parts.append(f"ETA {eta}")
            print(self.prefix + " | ".join(parts), file=out, flush=True)
        else:
            shown = [
                f"{k} {v:.4g}"
                for k, v in values.items()
                if "/" in k and not k.endswith(("_samples", "_low", "_high"))
            ][:8]
            if shown:
                print(
                    f"{self.prefix}{next(iter(values)).split('/')[0]} @ step {step}: " + "  ".join(shown),
                    file=out,
                    flush=True,
                )

    def _eta(self, step: int) -> str:
        done = step - (self._first_step or 0)
        if not self.total_steps or done <= 0 or step >= self.total_steps:
            return ""
        seconds = (time.monotonic() - self._t0) / done * (self.total_steps - step)
        minutes, secs = divmod(int(seconds), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class LoggerGroup(MetricLogger):
    """Sends every call to each member; ``run_id`` is the first member's that has one."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        super().__init__(next((lg.run_id for lg in loggers if lg.run_id), None))
        self.loggers = loggers

    def log_params(self, params: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path) -> None:
        for lg in self.loggers:
            lg.log_artifact(path)

    def flush(self, timeout: float = 60.0) -> bool:
        return all([lg.flush(timeout) for lg in self.loggers])

    def close(self, status: str = "FINISHED") -> None:
        for lg in self.loggers:
            lg.close(status)


def build_logger(
    cfg: TrackingConfig,
    *,
    rank: int,
    run_dir: str | Path,
    run_id: str | None = None,
    resume: bool | None = None,
    tags: Mapping[str, str] | None = None,
    console_steps: int | None = None,
) -> MetricLogger:
    """The logger for this process.

    Args:
        cfg: the recipe's tracking section.
        rank: global rank; only rank 0 logs (others get a no-op logger carrying ``run_id``).
        run_dir: the run folder; rank 0 always writes ``run_dir/metrics.jsonl`` there.
        run_id: an MLflow run to continue (from the checkpoint's client state); metrics at steps that run
            already holds are dropped.
        resume: continue ``metrics.jsonl`` instead of starting it afresh; default: ``run_id is not None``.
        tags: extra MLflow tags for a new run (e.g. what an evaluation run evaluated).
        console_steps: also print progress lines on stdout, with an ETA to this step (0: no ETA); ``None``:
            no console lines.
    """
    if rank != 0:
        return MetricLogger(run_id)
    resume = run_id is not None if resume is None else resume
    # metrics.jsonl first: every metric is on disk before MLflow's sender sees it, so a backfill after the
    # server was down finds it there
    jsonl = JsonlMetricLogger(run_dir, resume=resume)
    loggers: list[MetricLogger] = []
    for name in cfg.backends if cfg.enabled else ():
        backend = TRACKERS[name](cfg, run_id=run_id, tags=tags, metrics_file=jsonl.path)
        if backend.active:
            loggers.append(backend)
    loggers.insert(0, jsonl)
    if console_steps is not None:
        loggers.append(ConsoleLogger(console_steps))
    group = LoggerGroup(loggers)
    if group.run_id is None and run_id is not None:
        group.run_id = run_id  # keep the id so a later resume can still continue that run
    return group
