"""Training and tracking faults, end to end: non-finite gradients behind a finite loss are skipped and counted
(and stop the run after ``train.max_nan_steps``, which then resumes), a hung rank ends a 2-rank job within
``train.collective_timeout_s`` with one clear line, and an MLflow server killed and restarted mid-run ends up
with every step's metrics exactly once and the run FINISHED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from train_testdata import ROOT, TINY_RECIPE, prepared_base, tiny_overrides
from train_testdata import pretrain_argv as _argv

from mpma_ds.distributed import free_port
from mpma_ds.tasks.pretrain import PretrainTask
from mpma_ds.tracking import read_metrics_jsonl
from mpma_ds.training.checkpoint import complete_tags

sys.path.insert(0, str(ROOT / "launch"))
import pretrain  # noqa: E402

pytestmark = pytest.mark.slow
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return prepared_base(tmp_path_factory)


class NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: every gradient becomes NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _with_nan_grads(monkeypatch, bad_calls) -> dict:
    real_build = PretrainTask.build_model
    calls = {"n": 0, "on": True}

    def build(self, ctx):
        model = real_build(self, ctx)
        forward = model.forward

        def faulty(batch, generator=None):
            out = forward(batch, generator=generator)
            if "key" not in batch or not calls["on"]:  # the FLOP count's made-up batch
                return out
            calls["n"] += 1
            if bad_calls(calls["n"]):
                out = dict(out, loss=NanGrad.apply(out["loss"]))
            return out

        model.forward = faulty
        return model

    monkeypatch.setattr(PretrainTask, "build_model", build)
    return calls


def _weights(ckpt_dir: Path, tag: str, ds_config: str) -> dict[str, torch.Tensor]:
    if ds_config == "cpu_dp":  # no ZeRO: the whole fp32 module is in the model states
        return torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


@pytest.mark.parametrize("ds_config", ["cpu_zero3", "cpu_dp"])
def test_nonfinite_gradients_are_skipped_counted_then_stop_and_resume(
    base, tmp_path, monkeypatch, capsys, ds_config
):
    """1 rank × 2 micro-batches per step. Micro-batch 3 has NaN gradients: step 2 is not applied and is redone
    on micro-batches 5-6. From micro-batch 9 on every gradient is NaN: after ``max_nan_steps=3`` skipped steps
    the run saves step 3 and stops (exit 3); resuming from that checkpoint (faults gone) trains on to step 5."""
    calls = _with_nan_grads(monkeypatch, lambda n: n == 3 or n >= 9)
    run = tmp_path / "run"
    overrides = tiny_overrides(
        base, run, **{"train.max_nan_steps": 3, "train.eval_every": 0, "train.save_every": 0,
                      "train.max_steps": 5, "deepspeed_config": ds_config},
    )  # fmt: skip
    assert pretrain.main(_argv(overrides)) == 3
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr[-3000:]
    err = [line for line in stderr.splitlines() if line.startswith("pretrain.py: ")]
    assert len(err) == 1 and err[0].startswith("pretrain.py: stopped: 3 skips in a row at step 4"), err
    assert "NaN/Inf gradients" in err[0]
    assert [t for _, t in complete_tags(run / "checkpoints")] == ["step_00000003"]
    rows = [r for r in read_metrics_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["nonfinite_grad_skipped"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["nonfinite_skipped"] for r in rows] == [0.0, 0.0, 0.0]
    if ds_config == "cpu_zero3":  # DeepSpeed reports no norm without ZeRO
        assert all(torch.isfinite(torch.tensor(r["grad_norm"])) for r in rows)
    weights = _weights(run / "checkpoints", "step_00000003", ds_config)
    assert len(weights) > 50 and all(torch.isfinite(w).all() for w in weights.values())  # no NaN reached them

    calls["on"] = False
    assert pretrain.main(_argv(overrides, "--resume", "auto")) == 0
    rows = [r for r in read_metrics_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    weights = _weights(run / "checkpoints", "step_00000005", ds_config)
    assert len(weights) > 50 and all(torch.isfinite(w).all() for w in weights.values())


HANG = """
import os
if os.environ.get("RANK") == "1":
    import time
    from mpma_ds.runner import trainer as _trainer
    _real = _trainer.Trainer.train_step
    def _hang(self):
        if self.step + 1 == 3:  # rank 1 stops taking part in collectives before step 3
            time.sleep(3600)
        return _real(self)
    _trainer.Trainer.train_step = _hang
"""


@pytest.mark.e2e  # about 95 s, most of it waiting out the timeout: make test-e2e
def test_a_hung_rank_ends_the_job_within_the_collective_timeout(base, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG)
    overrides = tiny_overrides(base, tmp_path / "run", **{"train.collective_timeout_s": 30, "train.eval_every": 0})
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
           *_argv(overrides)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("a hung rank held the job past the timeout:\n" + out[-3000:])
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, out[-3000:]
    lines = [line for line in out.splitlines() if "pretrain.py: error:" in line]
    assert len(lines) == 1, out[-3000:]
    assert "rank 0: a collective did not complete within train.collective_timeout_s=30 s at step 3" in lines[0]
    assert "Traceback" not in out, out[-3000:]
    rows = [r for r in read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    print(f"hung-rank job ended after {elapsed:.0f} s (exit {proc.returncode})")


# --------------------------------------------------------------------------------------- MLflow restarted
class Server:
    """A real ``mlflow server`` on 127.0.0.1:port with a sqlite store that survives restarts."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        if wait:
            self.wait_up()

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start: " + (self.root / "server.log").read_text()[-2000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_mlflow_server_killed_and_restarted_mid_run_gets_every_step_once(base, tmp_path):
    from mlflow.tracking import MlflowClient

    from mpma_ds.runner.trainer import train
    from mpma_ds.training import load_recipe

    server = Server(tmp_path)
    server.start()
    run = tmp_path / "run"
    events: dict[str, int] = {}

    def chaos() -> None:  # kill the server once step 2 is logged, start it again at step 4
        def logged() -> int:
            path = run / "metrics.jsonl"
            steps = [r["step"] for r in read_metrics_jsonl(path) if "loss" in r] if path.exists() else []
            return max(steps, default=0)

        while logged() < 2:
            time.sleep(0.05)
        server.kill()
        events["killed_after"] = logged()
        while logged() < 4:
            time.sleep(0.05)
        server.start(wait=False)
        events["restarted_after"] = logged()

    watcher = threading.Thread(target=chaos, daemon=True)
    watcher.start()
    try:
        overrides = tiny_overrides(
            base, run, **{"train.max_steps": 12, "train.eval_every": 4, "train.save_every": 0,
                          "tracking.enabled": True, "tracking.uri": server.url, "tracking.experiment": "restart"},
        )  # fmt: skip
        summary = train(load_recipe(TINY_RECIPE, overrides))
        watcher.join(5)
        assert events.get("killed_after", 99) < 4 <= events.get("restarted_after", 0) < 12, events
        server.wait_up()
        client = MlflowClient(server.url)
        info = client.get_run(summary["mlflow_run_id"])
        assert info.info.status == "FINISHED"
        records = read_metrics_jsonl(run / "metrics.jsonl")
        keys = sorted({k for r in records for k in r if k not in ("step", "time")})
        assert "loss" in keys and "eval/i2t_R_at_1" in keys
        for key in keys:
            expected = sorted(r["step"] for r in records if key in r)
            got = sorted(m.step for m in client.get_metric_history(info.info.run_id, key))
            assert got == expected, (key, got, expected)
        assert sorted(m.step for m in client.get_metric_history(info.info.run_id, "loss")) == list(range(1, 13))
    finally:
        server.kill()
