"""Scaling out on DeepSpeed's own machinery, on CPU (gloo, ZeRO-3, the tiny shards):

- two nodes on one machine: two ``launch/node.sh`` node launchers (``deepspeed --no_ssh --node_rank K``, one
  rank each, loopback) against one hostfile equal one node with 2 ranks (``deepspeed --num_gpus 2``);
- resume on another world size through DeepSpeed's universal checkpoint: 2 ranks → 1 rank (in-process) and
  1 rank → 2 ranks (the launcher), each compared with the uninterrupted run;
- the elastic batch arithmetic, the loader positions' remap, and the bad inputs (more ranks than the batch can
  feed, a node rank out of range, another architecture on another world size), each one line.

Runs are shared between assertions (a launcher start costs ~20 s on 2 quiet cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_testdata import (
    ROOT,
    TINY_RECIPE,
    consolidated_weights,
    prepared_base,
    pretrain_argv,
    step_metric,
    tiny_overrides,
    wait_ok,
)

from mpma_ds.config import ConfigError
from mpma_ds.data.plan import reshard_positions
from mpma_ds.distributed import free_port
from mpma_ds.tracking import read_metrics_jsonl
from mpma_ds.training import checkpoint as ckpt
from mpma_ds.training import load_recipe, reshard
from mpma_ds.training.ds_config import elastic_micro_batch, gradient_accumulation_steps

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
NODE_SH = ROOT / "launch" / "node.sh"
STEPS = 8
HALF = 4  # the checkpoint the world-size changes resume from
# Measured on this CPU (final consolidated fp32 weights, largest difference of any element, every run with one
# thread per rank): 2 node launchers vs 1 node × 2 ranks, 2 → 1 and 1 → 2 ranks vs the uninterrupted run: 0
# (bit-identical); losses and lr equal. The tolerances leave room for another machine's kernels: one step moves a
# weight by ~1e-3, a resume that lost Adam's step count is off by ~4e-4 after 2 steps (measured), so they still
# tell a carried optimizer state from a lost one.
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5


def _overrides(base: str, out: Path, **extra: object) -> list[str]:
    values = {"train.max_steps": STEPS, "train.save_every": HALF, "train.keep_last": 3, "train.eval_every": 0}
    values.update(extra)
    return tiny_overrides(base, out, **values)


def _env() -> dict[str, str]:
    return dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PATH=f"{DEEPSPEED.parent}:{os.environ['PATH']}"
    )


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env or _env(), start_new_session=True
    )


def _launch_two_ranks(overrides: list[str], log: Path, *extra: str) -> None:
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py"]
    wait_ok(_start(cmd + pretrain_argv(overrides, *extra), log), log, timeout=500)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 50
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


@contextlib.contextmanager
def _one_thread():
    """In-process runs compute with one thread like the launcher's ranks (``OMP_NUM_THREADS=1``): CPU matmuls
    split over another number of threads round differently (measured: 1.5e-5 apart after 4 steps), and the
    comparisons here are meant to see the world-size change, not the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rollback(src: Path, dst: Path, step: int) -> Path:
    """A copy of run folder ``src`` as it was right after its step-``step`` checkpoint."""
    shutil.copytree(src, dst)
    for _, tag in ckpt.complete_tags(dst / "checkpoints"):
        if int(tag[len(ckpt.TAG_PREFIX) :]) > step:
            shutil.rmtree(dst / "checkpoints" / tag)
    (dst / "checkpoints" / ckpt.LATEST_FILE).write_text(ckpt.tag_for(step))
    rows = [r for r in read_metrics_jsonl(dst / "metrics.jsonl") if r.get("step", 0) <= step]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dst / "summary.json").unlink()
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return prepared_base(tmp_path_factory)


@pytest.fixture(scope="module")
def two_ranks(base, tmp_path_factory) -> Path:
    """One node, 2 ranks: ``deepspeed --num_gpus 2``, 8 steps, checkpoints at 4 and 8 — the uninterrupted
    reference of every comparison here."""
    root = tmp_path_factory.mktemp("two_ranks")
    _launch_two_ranks(_overrides(base, root / "run"), root / "log.txt")
    return root / "run"


@pytest.fixture(scope="module")
def two_nodes(base, tmp_path_factory) -> tuple[Path, list[str]]:
    """Two node launchers on this machine (``launch/node.sh``: ``deepspeed --no_ssh --node_rank K``), one rank
    each, one hostfile, rendezvous on loopback; the same 8 steps as ``two_ranks``."""
    root = tmp_path_factory.mktemp("two_nodes")
    hostfile = root / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    argv = ["launch/pretrain.py", *pretrain_argv(_overrides(base, root / "run"))]
    procs = []
    for node in (0, 1):
        env = dict(_env(), MPMA_HOSTFILE=str(hostfile), NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)  # fmt: skip
        procs.append(
            (_start(["bash", str(NODE_SH), *argv], root / f"node{node}.txt", env), root / f"node{node}.txt")
        )
    for proc, log in procs:
        wait_ok(proc, log, timeout=500)
    return root / "run", [log.read_text() for _, log in procs]


@pytest.fixture(scope="module")
def two_to_one(base, two_ranks, tmp_path_factory) -> tuple[Path, dict]:
    """``two_ranks`` as it was at its step-4 checkpoint, resumed here on 1 rank (``--resume auto``)."""
    from mpma_ds.runner.trainer import train

    run = _rollback(two_ranks, tmp_path_factory.mktemp("two_to_one") / "run", HALF)
    with _one_thread(), pytest.warns(ckpt.CheckpointWarning, match="written by 2 ranks, on 1"):
        summary = train(load_recipe(TINY_RECIPE, _overrides(base, run)), resume="auto")
    return run, summary


@pytest.fixture(scope="module")
def one_to_two(base, tmp_path_factory) -> tuple[Path, str, str]:
    """A 1-rank run (in this process, MLflow to sqlite) stopped by an interrupt at step 5, after its step-4
    checkpoint, then resumed by ``deepspeed --num_gpus 2 ... --resume auto``: 2 ranks, the same MLflow run."""
    from mpma_ds.runner.trainer import Trainer, train

    root = tmp_path_factory.mktemp("one_to_two")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking = {"tracking.enabled": True, "tracking.uri": uri, "tracking.experiment": "test-scale"}
    overrides = _overrides(base, root / "run", **tracking)
    log_step = Trainer._log_step

    def preempted(self, losses):
        if self.step > HALF:
            raise KeyboardInterrupt("preempted")  # what SIGTERM becomes (cli.pretrain.run_guard)
        log_step(self, losses)

    with _one_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_log_step", preempted)
        with pytest.raises(KeyboardInterrupt):
            train(load_recipe(TINY_RECIPE, overrides))
    assert ckpt.complete_tags(root / "run" / "checkpoints")[-1] == (HALF, ckpt.tag_for(HALF))
    _launch_two_ranks(overrides, root / "log.txt", "--resume", "auto")
    return root / "run", uri, (root / "log.txt").read_text()


# ------------------------------------------------------------------------------------------- two nodes
@pytest.mark.slow
@pytest.mark.e2e  # about 70 s of two node launchers: moved out of make test to keep it under 25 minutes
def test_two_node_launchers_equal_one_node_with_two_ranks(two_nodes, two_ranks):
    run, logs = two_nodes
    for node, log in enumerate(logs):  # DeepSpeed's per-node launcher started one local rank on each node
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in log, log[-2000:]
        assert f"--no_ssh --node_rank {node}" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["accumulation"] == 1 and summary["step"] == STEPS
    nodes, one_node = step_metric(run), step_metric(two_ranks)
    assert sorted(nodes) == list(range(1, STEPS + 1))
    for step in nodes:
        assert nodes[step] == pytest.approx(one_node[step], rel=LOSS_RTOL), (step, nodes, one_node)
    assert _max_diff(consolidated_weights(run, STEPS), consolidated_weights(two_ranks, STEPS)) <= WEIGHT_ATOL
    ckpt_dir = run / "checkpoints" / ckpt.tag_for(STEPS)
    assert len(list(ckpt_dir.glob("*optim_states.pt"))) == 2  # each node's rank saved its ZeRO-3 partition
    assert json.loads((ckpt_dir / ckpt.COMPLETE_FILE).read_text())["world_size"] == 2


# ------------------------------------------------------------------------------- world size changes
@pytest.mark.slow
def test_two_ranks_resumed_on_one_rank_continue_the_uninterrupted_run(two_to_one, two_ranks, tmp_path):
    run, summary = two_to_one
    assert summary["world_size"] == 1 and summary["accumulation"] == 2
    assert summary["start_step"] == HALF and summary["step"] == STEPS
    # the step, the lr schedule and the losses of steps 5..8 are those of the run that never stopped
    for key in ("loss", "lr", "loss_mlm", "loss_mim"):
        resumed, reference = step_metric(run, key), step_metric(two_ranks, key)
        assert sorted(resumed) == list(range(1, STEPS + 1))
        for step in range(HALF + 1, STEPS + 1):
            assert resumed[step] == pytest.approx(reference[step], rel=LOSS_RTOL), (key, step)
    assert _max_diff(consolidated_weights(run, STEPS), consolidated_weights(two_ranks, STEPS)) <= WEIGHT_ATOL
    # the conversion is cached in the checkpoint and covered by its digests
    tag_dir = run / "checkpoints" / ckpt.tag_for(HALF)
    meta = ckpt.read_meta(tag_dir)
    assert meta[ckpt.UNIVERSAL_KEY]["from_world_size"] == 2 and meta[ckpt.UNIVERSAL_KEY]["bytes"] > 0
    assert any(rel.startswith("universal/zero/") for rel in meta[ckpt.FILES_KEY])
    assert ckpt.verify_checkpoint(tag_dir)
    # Adam's moments and step count came along: the final optimizer states agree with the uninterrupted run's
    moments = {}
    for name, source in (("resumed", run), ("reference", two_ranks)):
        copy = tmp_path / name / ckpt.tag_for(STEPS)
        shutil.copytree(source / "checkpoints" / ckpt.tag_for(STEPS), copy)
        moments[name] = reshard.ensure_universal(copy, rank=0) / "zero"
    params = sorted(p.name for p in moments["reference"].iterdir() if p.is_dir())
    assert len(params) > 50

    def load(which: str, name: str, key: str) -> torch.Tensor:
        value = torch.load(moments[which] / name / f"{key}.pt", weights_only=False)
        return value["param"] if isinstance(value, dict) else value

    for key in ("exp_avg", "exp_avg_sq"):
        pairs = {name: (load("resumed", name, key), load("reference", name, key)) for name in params}
        # relative to the largest moment of any parameter: an attention key bias has no gradient but rounding
        # noise (~1e-12), whose moments agree in size, not in digits
        scale = max(float(b.abs().max()) for _, b in pairs.values())
        worst = max(pairs, key=lambda n: float((pairs[n][0] - pairs[n][1]).abs().max()))
        assert float((pairs[worst][0] - pairs[worst][1]).abs().max()) <= 1e-4 * scale, (key, worst)
    state = {k: torch.load(moments[k] / "optimizer_state.pt", weights_only=False) for k in moments}
    steps = {k: [float(s["step"]) for s in v["optimizer_state_dict"]["state"].values()] for k, v in state.items()}
    assert steps["resumed"] == steps["reference"] == [float(STEPS)] * 2


@pytest.mark.slow
def test_one_rank_resumed_on_two_ranks_continues_the_mlflow_run(one_to_two, two_ranks):
    from mlflow.tracking import MlflowClient

    run, uri, log = one_to_two
    assert "written by 1 ranks, on 2" in log  # the one-line notice (rank 0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["accumulation"] == 1
    assert summary["start_step"] == HALF and summary["step"] == STEPS
    # the uninterrupted reference: the same recipe on 2 ranks (1 rank × 2 accumulation steps and 2 ranks train
    # bit-identically here, see test_distributed.py and the 2 → 1 test)
    resumed, reference = step_metric(run), step_metric(two_ranks)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=LOSS_RTOL), (step, resumed, reference)
    assert step_metric(run, "lr") == pytest.approx(step_metric(two_ranks, "lr"), rel=1e-9)
    assert _max_diff(consolidated_weights(run, STEPS), consolidated_weights(two_ranks, STEPS)) <= WEIGHT_ATOL
    # one MLflow run, continued by the 2-rank job, with each step once
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test-scale").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    assert runs[0].info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert [s for s, _ in history] == list(range(1, STEPS + 1))
    assert history[-1][1] == pytest.approx(reference[STEPS], rel=LOSS_RTOL)
    final = ckpt.read_meta(run / "checkpoints" / ckpt.tag_for(STEPS))
    assert final["world_size"] == 2 and final["mlflow_run_id"] == runs[0].info.run_id


@pytest.mark.slow
def test_universal_conversion_is_reused_and_checked(two_to_one):
    run, _ = two_to_one
    tag_dir = run / "checkpoints" / ckpt.tag_for(HALF)
    before = (tag_dir / ckpt.COMPLETE_FILE).read_bytes()
    reshard.ensure_universal(tag_dir, rank=0)  # cached: nothing converted or rewritten
    assert (tag_dir / ckpt.COMPLETE_FILE).read_bytes() == before
    # a changed file of the conversion is damage like any other
    victim = next((tag_dir / "universal" / "zero").glob("*/exp_avg.pt"))
    data = bytearray(victim.read_bytes())
    data[-8] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"universal/zero/.*exp_avg\.pt does not match"):
        ckpt.verify_checkpoint(tag_dir)
    # a conversion killed before it was recorded is ignored (never loaded) and redone
    meta = json.loads(before)
    del meta[ckpt.UNIVERSAL_KEY]
    meta[ckpt.FILES_KEY] = {k: v for k, v in meta[ckpt.FILES_KEY].items() if not k.startswith("universal/")}
    (tag_dir / ckpt.COMPLETE_FILE).write_text(json.dumps(meta))
    assert ckpt.verify_checkpoint(tag_dir)
    reshard.ensure_universal(tag_dir, rank=0)
    assert ckpt.verify_checkpoint(tag_dir) and ckpt.UNIVERSAL_KEY in ckpt.read_meta(tag_dir)


@pytest.mark.slow
def test_another_architecture_on_another_world_size_is_refused(two_ranks, base, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    import pretrain

    target = two_ranks / "checkpoints" / ckpt.tag_for(HALF)
    before = sorted(p.name for p in target.iterdir())
    overrides = _overrides(base, tmp_path / "run", **{"model.name": "mpma_tiny_nomem"})
    assert pretrain.main(pretrain_argv(overrides, "--resume", str(target))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pretrain.py: error: checkpoint {ckpt.tag_for(HALF)} holds model")
    assert "mpma_tiny_nomem" in err[0]
    assert sorted(p.name for p in target.iterdir()) == before  # nothing converted


# ------------------------------------------------------------------------------------ batch and data
def test_elastic_micro_batch_keeps_the_global_batch():
    train = load_recipe(None, ["train.global_batch_size=32", "train.micro_batch_size=8"]).train
    layouts = {}
    for world in (1, 2, 4, 8, 16, 32):
        micro = elastic_micro_batch(train, world)
        layouts[world] = (micro, train.global_batch_size // (micro * world))
        assert micro * layouts[world][1] * world == 32
    # the recipe's micro-batch as long as it divides, then the largest divisor of global / world below it
    assert layouts == {1: (8, 4), 2: (8, 2), 4: (8, 1), 8: (4, 1), 16: (2, 1), 32: (1, 1)}
    odd = load_recipe(None, ["train.global_batch_size=24", "train.micro_batch_size=16"]).train
    assert (
        elastic_micro_batch(odd, 2) == 12
        and elastic_micro_batch(odd, 3) == 8
        and elastic_micro_batch(odd, 1) == 12
    )
    with pytest.raises(ConfigError, match=r"train.global_batch_size=32 cannot be split evenly over 3 ranks"):
        elastic_micro_batch(train, 3)
    with pytest.raises(ConfigError, match=r"^64 ranks .* are more than train.global_batch_size=32 samples"):
        elastic_micro_batch(train, 64)
    # a fresh start is not adjusted: the error names the micro-batch that fits
    with pytest.raises(ConfigError, match=r"change one of them \(train.micro_batch_size=2 fits\)"):
        gradient_accumulation_steps(train, 16)


def _position(d: int, world: int, epoch: int = 1, batch: int = 3, **extra) -> dict:
    return {"backend": "wds", "epoch": epoch, "batch_in_epoch": batch, "seed": 42, "rank": d,
            "world_size": world, "skipped": {"decode": d}, **extra}  # fmt: skip


def test_loader_positions_follow_their_data_rank():
    # 2 ranks × 2 accumulation steps = 4 data ranks, resumed on 4 ranks × 1: data rank d keeps its own position
    states = [_position(d, 4, dali_checkpoint=f"c{d}") for d in range(4)]
    assert reshard_positions(states, 4, [2]) == [states[2]]
    assert reshard_positions(states, 4, [0, 1, 2, 3]) == states
    # the micro-batch halved: 8 data ranks at the same epoch and batch (the same number of samples into the epoch)
    moved = reshard_positions(states, 8, [6, 7])
    assert [(m["rank"], m["world_size"], m["epoch"], m["batch_in_epoch"]) for m in moved] == [
        (6, 8, 1, 3),
        (7, 8, 1, 3),
    ]
    assert all("dali_checkpoint" not in m for m in moved)
    total = reshard_positions(states, 8, list(range(8)))
    assert sum(sum(m["skipped"].values()) for m in total) == 0 + 1 + 2 + 3  # the skip counters are kept once
    with pytest.raises(ValueError, match="disagree between data ranks"):
        reshard_positions([_position(0, 2), _position(1, 2, batch=4)], 2, [0])


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("world", "message"),
    [
        (
            "16",
            "16 ranks (launcher slots: hostfile slots × nodes, or --num_gpus) are more than train.global_batch_size=8",
        ),
        ("3", "train.global_batch_size=8 cannot be split evenly over 3 ranks"),
    ],
)
def test_more_slots_than_the_batch_can_use_is_one_line(base, tmp_path, monkeypatch, capsys, world, message):
    sys.path.insert(0, str(ROOT / "launch"))
    import pretrain

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", world)
    assert pretrain.main(pretrain_argv(_overrides(base, tmp_path / "run"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_rank_outside_the_world_is_one_line(base, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    import pretrain

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pretrain.main(pretrain_argv(_overrides(base, tmp_path / "run"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RANK=2 is outside WORLD_SIZE=2" in err[0], err


def test_node_launcher_checks_its_node_rank(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=4\n\nnode-b slots=4\n")
    env = dict(_env(), MPMA_HOSTFILE=str(hostfile), MASTER_ADDR="10.0.0.5", MPMA_NODE_DRY_RUN="1")
    args = ["bash", str(NODE_SH), "launch/pretrain.py", "--config", "x.yaml"]

    def run(**extra):
        return subprocess.run(args, env=dict(env, **extra), capture_output=True, text=True, timeout=60, cwd=ROOT)

    ok = run(NODE_RANK="1")
    assert ok.returncode == 0, ok.stderr
    assert "node 1 of 2 (node-b)" in ok.stdout
    assert (
        f"deepspeed --no_ssh --node_rank 1 --hostfile {hostfile} --master_addr 10.0.0.5 --master_port 29500 "
        in ok.stdout
    )
    for extra, message in (
        (
            {"NODE_RANK": "2"},
            "NODE_RANK=2 is out of range: " + f"{hostfile} names 2 node(s), so NODE_RANK is 0..1",
        ),
        ({"NODE_RANK": "-1"}, "NODE_RANK must be this node's 0-based line"),
        ({"NODE_RANK": "0", "MPMA_HOSTFILE": str(tmp_path / "nope")}, "does not exist"),
        ({"NODE_RANK": "0", "MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
    ):
        bad = run(**extra)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and message in lines[0], (extra, bad.stderr)


def test_a_resume_on_more_ranks_lowers_the_micro_batch_with_one_warning():
    cfg = load_recipe(None, ["train.global_batch_size=32", "train.micro_batch_size=8"]).train
    with pytest.warns(ckpt.CheckpointWarning) as seen:
        reshard.elastic_batch(cfg, 16, 2)
    assert len(seen) == 1 and str(seen[0].message) == (
        "the checkpoint was written by 2 ranks, this run has 16: train.micro_batch_size 8 -> 2 keeps "
        "train.global_batch_size=32 (2 x 1 accumulation x 16 ranks)"
    )
    assert (cfg.micro_batch_size, cfg.eval_batch_size) == (2, 8)
    assert gradient_accumulation_steps(cfg, 16) == 1
    reshard.elastic_batch(cfg, 8, 16)  # 2 × 2 × 8 = 32: the micro-batch that runs now fits, nothing to say
    assert cfg.micro_batch_size == 2


def test_only_zero3_checkpoints_change_world_size():
    from mpma_ds.models import get_model_config

    config = get_model_config("mpma_tiny")
    meta = {"tag": "step_00000004", "model_name": "mpma_tiny", "model_config": config.architecture(),
            "task": "pretrain", "world_size": 2, "zero_stage": 3}  # fmt: skip
    same = dict(model_name="mpma_tiny", model_config=config, zero_stage=3)
    assert ckpt.check_compatible(meta, world_size=2, **same) is False
    assert ckpt.check_compatible(meta, world_size=4, **same) is True
    with pytest.raises(ckpt.ResumeError, match=r"written by 2 ranks under ZeRO-2; this run has 4 ranks"):
        ckpt.check_compatible(dict(meta, zero_stage=2), world_size=4, **dict(same, zero_stage=2))
    with pytest.raises(ckpt.ResumeError, match=r"only from a ZeRO-3 checkpoint into a ZeRO-3 run"):
        ckpt.check_compatible(meta, world_size=1, **dict(same, zero_stage=2))
