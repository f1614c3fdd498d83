"""launch/slurm/pretrain.sbatch: the hostfile and rendezvous come from SLURM_JOB_NODELIST via a fake
`scontrol` on PATH (dry run: nothing is launched)."""

from __future__ import annotations

import base64
import json
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


RANGE_SCONTROL = """#!/bin/bash
# fake: `scontrol show hostnames node[001-016]` -> node001 ... node016 (one prefix[lo-hi] range or one host)
[[ "$1 $2" == "show hostnames" ]] || exit 1
if [[ "$3" =~ ^([a-z-]+)\\[([0-9]+)-([0-9]+)\\]$ ]]; then
    seq -f "${BASH_REMATCH[1]}%03g" "$((10#${BASH_REMATCH[2]}))" "$((10#${BASH_REMATCH[3]}))"
else
    echo "$3"
fi
"""


@pytest.fixture
def range_slurm(fake_slurm):
    env, tmp = fake_slurm
    (tmp / "bin" / "scontrol").write_text(RANGE_SCONTROL)
    return env, tmp


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_hostfile_reads_back_through_deepspeeds_own_parser(range_slurm, nodes):
    """The hostfile the sbatch writes, read by DeepSpeed's runner itself (fetch_hostfile, then the
    --include/--exclude resource filter and the world-info encoding its per-node launcher decodes)."""
    from deepspeed.launcher.runner import encode_world_info, fetch_hostfile, parse_inclusion_exclusion

    from mpma_ds.config import ConfigError
    from mpma_ds.training import load_recipe
    from mpma_ds.training.ds_config import elastic_micro_batch, gradient_accumulation_steps

    env, tmp = range_slurm
    env.update(SLURM_JOB_NODELIST="node001" if nodes == 1 else f"node[001-{nodes:03d}]", GPUS_PER_NODE="8")
    res = _run(env, "--config", "launch/configs/pretrain_base.yaml")
    assert res.returncode == 0, res.stderr
    pool = fetch_hostfile(str(tmp / "hostfile"))
    assert list(pool) == [f"node{i:03d}" for i in range(1, nodes + 1)]
    active = parse_inclusion_exclusion(pool, "", "")
    world = sum(len(slots) for slots in active.values())
    assert world == 8 * nodes and all(slots == list(range(8)) for slots in active.values())
    assert json.loads(base64.urlsafe_b64decode(encode_world_info(active))) == active
    # excluding one GPU of the first node (a broken device) leaves 8 × nodes - 1 ranks
    fewer = parse_inclusion_exclusion(pool, "", "node001:7")
    assert sum(len(s) for s in fewer.values()) == world - 1
    assert f"master: node001:{29500 + 4242 % 1000}" in res.stdout
    # the recipe's batch on that world: the base recipe (1024 = 32 per rank) fits 8 and 16 nodes' 64 / 128 ranks
    # only with a smaller micro-batch (a resume on another world size lowers it; a fresh start names it)
    base = load_recipe(REPO / "launch/configs/pretrain_base.yaml").train
    micro = elastic_micro_batch(base, world)
    assert micro * world * (base.global_batch_size // (micro * world)) == base.global_batch_size
    assert micro == {1: 32, 2: 32, 16: 8}[nodes]
    if nodes == 16:
        with pytest.raises(ConfigError, match=r"micro_batch_size=8 fits"):
            gradient_accumulation_steps(base, world)
        tiny = load_recipe(REPO / "launch/configs/pretrain_tiny.yaml").train  # 32 samples per step, 128 slots
        with pytest.raises(
            ConfigError, match=r"128 ranks \(launcher slots: hostfile slots × nodes, or --num_gpus\) are more than"
        ):
            gradient_accumulation_steps(tiny, world)


def test_master_port_follows_the_job_id_and_nccl_errors_end_the_job(fake_slurm):
    env, _ = fake_slurm
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"):  # set by in-process runs
        env.pop(name, None)
    ports = []
    for job in ("4242", "4243"):
        res = _run(dict(env, SLURM_JOB_ID=job), "--config", "x.yaml")
        assert res.returncode == 0, res.stderr
        ports.append(int(res.stdout.split("--master_port ")[1].split()[0]))
        assert "env: TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in res.stdout.splitlines()
    assert ports == [29742, 29743]  # two jobs sharing a node do not collide
    # the pre-2.2 name still given by a site profile is carried over; an explicit setting is kept
    res = _run(dict(env, NCCL_ASYNC_ERROR_HANDLING="3"), "--config", "x.yaml")
    assert "env: TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in res.stdout.splitlines()
    res = _run(dict(env, TORCH_NCCL_ASYNC_ERROR_HANDLING="2"), "--config", "x.yaml")
    assert "env: TORCH_NCCL_ASYNC_ERROR_HANDLING=2" in res.stdout.splitlines()


def test_nossh_mode_starts_one_node_launcher_per_node(fake_slurm):
    """DS_LAUNCHER=nossh: srun runs launch/node.sh once per node, which runs `deepspeed --no_ssh --node_rank
    $SLURM_NODEID`; the per-node payload is run here as srun would run it on node 2 (dry run)."""
    env, tmp = fake_slurm
    env["DS_LAUNCHER"] = "nossh"
    res = _run(env, "--config", "x.yaml", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    command = next(line for line in res.stdout.splitlines() if line.startswith("command: "))
    assert command.startswith("command: srun --nodes 3 --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c ")
    assert command.endswith("launch/node.sh launch/pretrain.py --config x.yaml --resume auto")
    payload = 'NODE_RANK="$SLURM_NODEID" exec "$0" "$@"'
    assert payload in command
    node = subprocess.run(
        ["bash", "-c", payload, "launch/node.sh", "launch/pretrain.py", "--config", "x.yaml"],
        env=dict(env, SLURM_NODEID="2", MPMA_HOSTFILE=str(tmp / "hostfile"), MASTER_ADDR="gpu-a01",
                 MASTER_PORT="29742", MPMA_NODE_DRY_RUN="1"),
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert node.returncode == 0, node.stderr
    assert "node 2 of 3 (gpu-b07)" in node.stdout
    assert "deepspeed --no_ssh --node_rank 2 --hostfile" in node.stdout
    assert "--master_addr gpu-a01 --master_port 29742 launch/pretrain.py --config x.yaml" in node.stdout
