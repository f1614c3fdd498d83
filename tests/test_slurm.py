"""launch/slurm/pretrain.sbatch: the hostfile and rendezvous come from SLURM_JOB_NODELIST via a fake
`scontrol` on PATH (dry run: nothing is launched)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"

FAKE_SCONTROL = """#!/bin/bash
# fake: `scontrol show hostnames gpu[01-03]` -> one host per line
[[ "$1 $2" == "show hostnames" ]] || exit 1
echo "$3" >> "$(dirname "$0")/calls"
echo gpu-a01; echo gpu-a02; echo gpu-b07
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "GPUS_PER_NODE"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_NODELIST="gpu-a[01-02],gpu-b07",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(REPO),
        MPMA_HOSTFILE=str(tmp_path / "hostfile"),
        MPMA_VENV=str(tmp_path / "no-venv"),
        MPMA_SLURM_DRY_RUN="1",
    )
    return env, tmp_path


def _run(env, *args):
    return subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_hostfile_and_master_from_nodelist(fake_slurm):
    env, tmp = fake_slurm
    env["SLURM_GPUS_ON_NODE"] = "4"
    res = _run(env, "--config", "launch/configs/pretrain_base.yaml", "--set", "train.max_steps=10")
    assert res.returncode == 0, res.stderr
    assert (tmp / "hostfile").read_text().splitlines() == [
        "gpu-a01 slots=4",
        "gpu-a02 slots=4",
        "gpu-b07 slots=4",
    ]
    assert (tmp / "bin" / "calls").read_text().strip() == "gpu-a[01-02],gpu-b07"
    command = next(line for line in res.stdout.splitlines() if line.startswith("command: "))
    assert command.split()[1:] == [
        "deepspeed", "--hostfile", str(tmp / "hostfile"), "--launcher", "pdsh", "--master_addr", "gpu-a01",
        "--master_port", str(29500 + 4242 % 1000), "launch/pretrain.py",
        "--config", "launch/configs/pretrain_base.yaml", "--set", "train.max_steps=10",
    ]  # fmt: skip
    assert "3 x 4 ranks" in res.stdout
    # the name PyTorch >= 2.2 reads (NCCL_ASYNC_ERROR_HANDLING is ignored): a hung rank's NCCL error ends it
    assert "env: TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in res.stdout.splitlines()


def test_overrides_and_bad_input(fake_slurm):
    env, tmp = fake_slurm
    env.update(GPUS_PER_NODE="8", MASTER_PORT="31000", DS_LAUNCHER="slurm")
    res = _run(env, "--config", "x.yaml")
    assert res.returncode == 0, res.stderr
    assert (tmp / "hostfile").read_text().splitlines()[0] == "gpu-a01 slots=8"
    assert "--launcher slurm --master_addr gpu-a01 --master_port 31000" in res.stdout

    missing = {k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"}
    res = _run(missing, "--config", "x.yaml")
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0
    assert "SLURM_JOB_NODELIST is not set" in res.stderr

    env["GPUS_PER_NODE"] = "zero"
    res = _run(env, "--config", "x.yaml")
    assert res.returncode != 0 and "GPUS_PER_NODE must be a positive integer" in res.stderr

    res = _run(fake_slurm[0])
    assert res.returncode != 0 and "pass at least --config" in res.stderr
