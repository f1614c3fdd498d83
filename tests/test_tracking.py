"""Tracking: MLflow (sqlite and a real `mlflow server` on 127.0.0.1) queried back with MlflowClient, resume
into the same run without duplicated steps, and a server that is down or dies mid-run (one warning, local
metrics.jsonl complete, no stall)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mpma_ds.distributed import free_port
from mpma_ds.tracking import (
    TrackingConfig,
    TrackingWarning,
    build_logger,
    flatten_params,
    read_metrics_jsonl,
    resolve_tracking_uri,
)
from mpma_ds.tracking.params import MAX_PARAM_VALUE_CHARS

RECIPE = {
    "model": {"name": "mpma_tiny", "overrides": {"memory_slots": 16}},
    "train": {"lr": 3e-4, "global_batch_size": 8, "output_dir": Path("/tmp/run"), "betas": [0.9, 0.98]},
    "notes": "x" * 2000,
    "many": {f"k{i:03d}": i for i in range(230)},  # > 100 params: needs several log_batch calls
}


def _sqlite_cfg(tmp_path: Path, **kw) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="test-tracking", **kw)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _tracking_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, TrackingWarning)]


def test_flatten_params_respects_mlflow_limits():
    flat = flatten_params(RECIPE)
    assert flat["model.name"] == "mpma_tiny"
    assert flat["model.overrides.memory_slots"] == "16"
    assert flat["train.lr"] == "0.0003"
    assert flat["train.output_dir"] == "/tmp/run"
    assert flat["train.betas"] == "[0.9, 0.98]"
    assert len(flat["notes"]) == MAX_PARAM_VALUE_CHARS and flat["notes"].endswith("...")
    assert len(flat) == 7 + 230


def test_config_validation_and_default_uri(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="tracking.enabled must be true or false"):  # the config engine
        TrackingConfig(enabled="yes")
    with pytest.raises(ValueError, match="tracking.experiment"):
        TrackingConfig(experiment=" ")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("file:///x") == "file:///x"


def test_other_ranks_log_nothing(tmp_path):
    lg = build_logger(_sqlite_cfg(tmp_path), rank=1, run_dir=tmp_path / "run", run_id="abc")
    lg.log_params(RECIPE)
    lg.log_metrics({"loss": 1.0}, step=1)
    lg.close()
    assert lg.run_id == "abc"
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


def test_sqlite_run_then_resume_without_duplicated_steps(tmp_path):
    cfg = _sqlite_cfg(tmp_path, run_name="first")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("model:\n  name: mpma_tiny\n")
    lg = build_logger(cfg, rank=0, run_dir=run_dir)
    run_id = lg.run_id
    assert run_id
    lg.log_params(RECIPE)
    for step in range(1, 7):
        lg.log_metrics({"loss": 10.0 - step, "lr": 1e-3 * step, "not_a_number": "x"}, step=step)
    lg.log_metrics({"eval/i2t_R@1": 0.25}, step=5)
    lg.log_artifact(run_dir / "recipe.yaml")
    # a kill -9 right here: the process dies; the run stays RUNNING and the last JSONL line may be torn
    lg.log_metrics({"loss": 3.5}, step=7)
    assert lg.flush(30)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 8, "lo')

    # resume from a checkpoint at step 4: steps 5..7 are recomputed exactly and must not appear twice
    lg2 = build_logger(cfg, rank=0, run_dir=run_dir, run_id=run_id)
    assert lg2.run_id == run_id
    lg2.log_params(RECIPE)  # same values again: accepted, nothing duplicated
    for step in range(5, 10):
        lg2.log_metrics({"loss": 10.0 - step, "lr": 1e-3 * step}, step=step)
    lg2.log_metrics({"eval/i2t_R@1": 0.5}, step=9)
    lg2.close()

    client = MlflowClient(cfg.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["train.lr"] == "0.0003" and run.data.params["many.k229"] == "229"
    assert len(run.data.params) == 7 + 230
    assert _history(client, run_id, "loss") == [(s, 10.0 - s) for s in range(1, 7)] + [(7, 3.5)] + [
        (8, 2.0),
        (9, 1.0),
    ]
    assert [s for s, _ in _history(client, run_id, "lr")] == list(range(1, 10))
    assert _history(client, run_id, "eval/i2t_R_at_1") == [(5, 0.25), (9, 0.5)]
    assert "not_a_number" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run_id)] == ["recipe.yaml"]
    runs = client.search_runs([client.get_experiment_by_name("test-tracking").experiment_id])
    assert len(runs) == 1

    records = read_metrics_jsonl(run_dir / "metrics.jsonl")
    loss_steps = [r["step"] for r in records if "loss" in r]
    assert loss_steps == list(range(1, 10))  # no duplicates, the torn line skipped
    assert [r["loss"] for r in records if "loss" in r][-1] == 1.0


def test_fresh_run_moves_an_old_metrics_file_aside(tmp_path):
    cfg = TrackingConfig(enabled=False)
    run_dir = tmp_path / "run"
    lg = build_logger(cfg, rank=0, run_dir=run_dir)
    lg.log_metrics({"loss": 1.0}, step=1)
    lg.close()
    lg = build_logger(cfg, rank=0, run_dir=run_dir)
    lg.log_metrics({"loss": 2.0}, step=1)
    lg.close()
    assert lg.run_id is None
    assert read_metrics_jsonl(run_dir / "metrics.jsonl.prev-1")[0]["loss"] == 1.0
    assert read_metrics_jsonl(run_dir / "metrics.jsonl")[0]["loss"] == 2.0


def test_server_down_at_start_warns_once_and_keeps_local_metrics(tmp_path):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", experiment="nobody-listens")
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lg = build_logger(cfg, rank=0, run_dir=tmp_path / "run")
        for step in range(1, 21):
            lg.log_metrics({"loss": float(step)}, step=step)
        lg.log_params(RECIPE)
        lg.close()
    assert time.monotonic() - start < 30, "an unreachable server must not stall training"
    messages = _tracking_warnings(record)
    assert len(messages) == 1 and "metrics.jsonl" in messages[0]
    assert [r["step"] for r in read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 21))


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (free port), sqlite backend, artifacts proxied to tmp_path."""
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
        time.sleep(0.3)

    def kill() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    yield url, kill
    kill()
    log.close()


@pytest.mark.slow
def test_real_server_then_server_killed_mid_run(tmp_path, mlflow_server):
    url, kill_server = mlflow_server
    cfg = TrackingConfig(uri=url, experiment="served", run_name="served-run")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ds_config.json").write_text('{"zero_optimization": {"stage": 3}}')
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lg = build_logger(cfg, rank=0, run_dir=run_dir)
        run_id = lg.run_id
        lg.log_params(RECIPE)
        lg.log_artifact(run_dir / "ds_config.json")
        for step in range(1, 6):
            lg.log_metrics({"loss": 1.0 / step}, step=step)
        assert lg.flush(30)

        client = MlflowClient(url)
        run = client.get_run(run_id)
        assert run.data.params["model.name"] == "mpma_tiny" and run.info.status == "RUNNING"
        assert _history(client, run_id, "loss") == [(s, 1.0 / s) for s in range(1, 6)]
        assert [a.path for a in client.list_artifacts(run_id)] == ["ds_config.json"]
        assert _tracking_warnings(record) == []

        kill_server()
        start = time.monotonic()
        for step in range(6, 31):
            lg.log_metrics({"loss": 1.0 / step}, step=step)
            time.sleep(0.01)
        assert time.monotonic() - start < 5, "logging must not block the training thread"
        lg.close("FINISHED")
    messages = _tracking_warnings(record)
    assert len(messages) == 1, messages
    assert url in messages[0] and "metrics.jsonl" in messages[0]
    records = read_metrics_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))


def test_compare_runs_table_plots_and_report(tmp_path):
    """Plain runs (no pretraining lineage): the table, the training-curve grid, one group of ungrouped runs."""
    from mpma_ds.tracking.compare import format_runs_table, load_runs
    from mpma_ds.tracking.report import write_report

    cfg = _sqlite_cfg(tmp_path)
    for name, slope in (("fast", 2.0), ("slow", 1.0)):
        cfg.run_name = name
        lg = build_logger(cfg, rank=0, run_dir=tmp_path / name)
        lg.log_params({"train": {"lr": slope, "steps": 4}})
        for step in range(1, 5):
            lg.log_metrics({"loss": 10.0 - slope * step, "eval/i2t_R@1": 0.1 * slope}, step=step)
        lg.close()
    runs, metrics = load_runs("test-tracking", tracking_uri=cfg.uri, metrics=["loss", "eval/i2t_R@1"])
    assert metrics == ["loss", "eval/i2t_R_at_1"]
    by_name = {r.name: r for r in runs}
    assert by_name["fast"].last == {"loss": 2.0, "eval/i2t_R_at_1": pytest.approx(0.2)}
    assert by_name["slow"].history["loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    table = format_runs_table(runs, metrics).splitlines()
    assert table[0].split()[:5] == ["run", "id", "kind", "status", "loss"]
    assert any(line.startswith("fast") and " 2 " in f" {line} " for line in table)
    report = write_report("test-tracking", tmp_path / "cmp", tracking_uri=cfg.uri, metrics=["loss"], smooth=0.5)
    assert [p.name for p in report.plots] == ["training_pretrain.png"]
    assert report.plots[0].read_bytes()[:4] == b"\x89PNG"
    assert [g.title for g in report.groups] == ["runs without a pretraining parent"] and report.pairs == []
    (diff,) = report.diffs
    assert diff.differing == {"train.lr": ["1.0", "2.0"]} and diff.identical == {"train.steps": "4"}
    page = report.html.read_text()
    assert "data:image/png;base64," in page and "fast (" in page and "1 parameter(s) differ" in page
    with pytest.raises(ValueError, match="no run of 'test-tracking' has metric"):
        load_runs("test-tracking", tracking_uri=cfg.uri, metrics=["nope"])
    with pytest.raises(ValueError, match="no experiment 'other'"):
        load_runs("other", tracking_uri=cfg.uri)
