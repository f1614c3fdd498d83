"""Pretraining from ``s3://`` shards on a loopback S3 server (moto's server mode, its own process): 2 ranks
(``deepspeed --num_gpus 2``, CPU/gloo) killed with SIGKILL mid-epoch and resumed with ``--resume auto`` log
the same losses as an uninterrupted 2-rank run from the same shards on local disk with the same seed — the
byte source does not change the sample order. The same run resumed from its step-6 checkpoint on 1 rank (2
accumulation steps), still from ``s3://``, logs those losses too: resume on another world size holds with remote
shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from remote_servers import env, free_port, make_bucket, s3_env, start_moto, stop, upload_tree
from test_scale_out import LOSS_RTOL, _one_thread, _rollback
from train_testdata import ROOT, TINY_RECIPE, prepared_base, step_metric, tiny_overrides, tiny_shards, wait_ok

from mpma_ds.runner.trainer import train
from mpma_ds.training import checkpoint as ckpt
from mpma_ds.training import load_recipe

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-e2e (minutes each; not in make test)
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEPS = 8
ONE_RANK_FROM = 6  # the 2-rank checkpoint the 1-rank resume starts from (keep_last 2 keeps steps 6 and 8)


def _launch(overrides: list[str], log: Path, extra_env: dict[str, str], *extra: str) -> subprocess.Popen:
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py"]
    cmd += ["--config", str(TINY_RECIPE), *extra]
    for item in overrides:
        cmd += ["--set", item]
    run_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra_env)
    handle = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=run_env, start_new_session=True
    )


def test_two_ranks_from_s3_killed_and_resumed_log_the_local_runs_losses(tmp_path_factory, tmp_path):
    base = prepared_base(tmp_path_factory)
    shards = tiny_shards(base)
    port = free_port()
    server = start_moto(port)
    try:
        s3 = s3_env(port)
        with env(s3):
            make_bucket("train")
            upload_tree(shards, "s3://train/tiny")
        local_run = tmp_path / "local"
        proc = _launch(tiny_overrides(base, local_run, **{"train.eval_every": 0}), tmp_path / "local.txt", {})
        wait_ok(proc, tmp_path / "local.txt", timeout=400)

        run = tmp_path / "remote"
        remote = {
            "data.train_shards": "s3://train/tiny/train/",
            "data.val_shards": "s3://train/tiny/validate/",
            "train.eval_every": 0,
            "data.shard_cache": str(tmp_path / "cache"),
        }
        overrides = tiny_overrides(base, run, **remote)
        proc = _launch(overrides, tmp_path / "remote1.txt", s3)
        deadline, killed_at = time.time() + 400, None
        while time.time() < deadline and proc.poll() is None:
            latest = run / "checkpoints" / "latest"
            logged = step_metric(run) if (run / "metrics.jsonl").exists() else {}
            if latest.exists() and latest.read_text().strip() >= "step_00000004" and max(logged, default=0) >= 5:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = max(logged)
                break
            time.sleep(0.2)
        proc.wait(timeout=60)
        assert killed_at is not None and killed_at < STEPS, (tmp_path / "remote1.txt").read_text()[-3000:]
        proc = _launch(overrides, tmp_path / "remote2.txt", s3, "--resume", "auto")
        wait_ok(proc, tmp_path / "remote2.txt", timeout=400)
        for key in ("loss", "loss_mlm", "loss_mim"):
            assert step_metric(run, key) == step_metric(local_run, key), key
        assert sorted(step_metric(run)) == list(range(1, STEPS + 1))

        # resume on ANOTHER world size from s3://: the 2-rank run as it was at its step-6 checkpoint (mid-epoch),
        # continued by 1 rank x 2 accumulation steps, logs the uninterrupted local 2-rank run's losses
        one = _rollback(run, tmp_path / "one-rank", ONE_RANK_FROM)
        with env(s3), _one_thread(), pytest.warns(ckpt.CheckpointWarning, match="written by 2 ranks, on 1"):
            summary = train(load_recipe(TINY_RECIPE, tiny_overrides(base, one, **remote)), resume="auto")
        assert summary["world_size"] == 1 and summary["start_step"] == ONE_RANK_FROM and summary["step"] == STEPS
        for key in ("loss", "loss_mlm", "loss_mim"):
            resumed, reference = step_metric(one, key), step_metric(local_run, key)
            for step in range(ONE_RANK_FROM + 1, STEPS + 1):
                assert resumed[step] == pytest.approx(reference[step], rel=LOSS_RTOL), (key, step)
    finally:
        stop(server)
