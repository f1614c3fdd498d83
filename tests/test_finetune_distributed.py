"""Fine-tuning through the real launcher: ``deepspeed --num_gpus 2 launch/finetune.py`` with 2 CPU processes on gloo
(ZeRO-2, cpu_zero2.json), against the same runs in one process (1 rank × 2 accumulation steps, the same global
batch and data; tests/finetune_testdata.py ``inprocess_run``).

Each launcher start costs ~20-30 s on 2 cores; every task goes through it once, where its distributed path is:
- ``vqa``: the fused model on 2 ranks; losses step by step and the test metrics equal the 1-rank run's;
- ``linear_probe``: features extracted by 2 ranks (each its share, merged by rank 0) equal a 1-rank extraction,
  and the head trained on them;
- ``retrieval``: InfoNCE with negatives gathered over the ranks (2 × 4 per step, where 1 rank × 2 accumulation
  steps has 4 per micro-batch, so its losses are not compared), R@K on both ranks' shared evaluation;
- ``cls``: the image classifier on 2 ranks equals the 1-rank run, losses and test AUROCs;
- ``zero_shot``: no step, the evaluation on both ranks equals one process's;
and one bad input that fails after the process group exists: one error line, from rank 0, and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_testdata import (
    FINETUNE_LAUNCHER,
    ROOT,
    finetune_overrides,
    fraction_seed,
    ft_shards,
    inprocess_run,
    prepare,
    recipe_name,
    set_args,
    split_counts,
)

from mpma_ds.distributed import free_port
from mpma_ds.tracking import read_metrics_jsonl

pytestmark = pytest.mark.slow
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
# 1 vs 2 ranks run the same weights on the same micro-batches; only the gradient reduction order differs
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    base = str(tmp_path_factory.getbasetemp())
    prepare(base)
    return base


def _launch(task: str, overrides: list[str], log: Path, timeout: float = 400) -> tuple[int, str]:
    """``deepspeed --num_gpus 2 launch/finetune.py --task TASK``; returns its exit status and its output."""
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(FINETUNE_LAUNCHER)]
    cmd += ["--config", recipe_name(task), "--task", task, *set_args(overrides)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.PIPE, env=env, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return proc.returncode, err


def _run(base: str, task: str, root: Path, **extra) -> tuple[Path, dict]:
    out = root / "run"
    rc, err = _launch(task, finetune_overrides(base, task, out, **extra), root / "log.txt")
    assert rc == 0, f"launcher exited {rc}:\n{(root / 'log.txt').read_text()[-3000:]}\n{err[-3000:]}"
    return out, json.loads((out / "summary.json").read_text())


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics_jsonl(run / "metrics.jsonl") if "loss" in r}


def _two_rank_facts(summary: dict, run: Path) -> None:
    assert summary["world_size"] == 2 and summary["accumulation"] == 1 and summary["zero_stage"] == 2
    assert summary["step"] == 4 and len(summary["memory_per_rank"]) == 2
    last = run / "checkpoints" / "step_00000004"
    assert (last / "rank_state_00000.pt").is_file() and (last / "rank_state_00001.pt").is_file()


@pytest.fixture(scope="module")
def vqa_two_ranks(base, tmp_path_factory):
    return _run(base, "vqa", tmp_path_factory.mktemp("vqa2"))


@pytest.fixture(scope="module")
def linear_probe_two_ranks(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lp2")
    return (*_run(base, "linear_probe", root, **{"task.linear_probe.cache_dir": root / "cache"}), root / "cache")


def test_vqa_on_two_ranks_equals_one_rank_with_accumulation(base, vqa_two_ranks):
    run, summary = vqa_two_ranks
    _two_rank_facts(summary, run)
    one = inprocess_run(base, "vqa", "pretrained")
    two_losses, one_losses = _losses(run), _losses(one.out)
    assert sorted(two_losses) == [1, 2, 3, 4]
    assert two_losses == pytest.approx(one_losses, rel=LOSS_RTOL)
    assert summary["best"]["step"] == one.summary["best"]["step"]
    for key in ("accuracy_overall", "accuracy_closed", "accuracy_open", "questions", "unseen_answers"):
        assert summary["test"][f"test/{key}"] == pytest.approx(one.summary["test"][f"test/{key}"]), key


def test_linear_probe_features_from_two_ranks_equal_one_rank_extraction(base, linear_probe_two_ranks):
    run, summary, cache = linear_probe_two_ranks
    _two_rank_facts(summary, run)
    one = inprocess_run(base, "linear_probe", "pretrained")
    counts = split_counts(ft_shards(base))
    for split, path in one.summary["feature_files"].items():
        mine = Path(summary["feature_files"][split])
        # the cache key does not depend on the world size: the same fingerprint folder, in another cache
        assert mine.parent.name == Path(path).parent.name and mine.parent.parent == cache
        two, ref = torch.load(mine, weights_only=True), torch.load(path, weights_only=True)
        assert len(two["keys"]) == counts[split]  # each sample once: the ranks' padding repeats left out
        assert two["keys"] == ref["keys"] == sorted(ref["keys"])
        assert two["subjects"] == ref["subjects"] and two["metas"] == ref["metas"]
        torch.testing.assert_close(two["features"], ref["features"], rtol=0, atol=1e-5)
    assert not list(cache.glob("*/*.part*")), "rank part files left behind"
    assert _losses(run) == pytest.approx(_losses(one.out), rel=LOSS_RTOL)


def test_retrieval_gathers_negatives_over_two_ranks(base, tmp_path):
    run, summary = _run(base, "retrieval", tmp_path)
    _two_rank_facts(summary, run)
    test = summary["test"]
    assert test["test/eval_samples"] == split_counts(ft_shards(base))["test"]
    for key in ("i2t_R@1", "t2i_R@10"):
        low, high = test[f"test/{key}_ci95"]
        assert 0.0 <= low <= test[f"test/{key}"] <= high <= 1.0
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < v < 10 for v in losses.values())
    # the near-uniform InfoNCE of a 4-step pretrained model over the 8 pairs gathered from both ranks is ~ln 8
    # (2.12 seen); one process scores each micro-batch's 4 pairs alone: ~ln 4 (1.42 seen)
    first, one_first = losses[1], _losses(inprocess_run(base, "retrieval", "pretrained").out)[1]
    assert first > one_first + 0.4, (first, one_first)


def test_cls_on_two_ranks_equals_one_rank_with_accumulation(base, tmp_path):
    run, summary = _run(base, "cls", tmp_path)
    _two_rank_facts(summary, run)
    one = inprocess_run(base, "cls", "pretrained")
    assert _losses(run) == pytest.approx(_losses(one.out), rel=LOSS_RTOL)
    assert summary["best"]["step"] == one.summary["best"]["step"]
    mine = {k: v for k, v in summary["test"].items() if k.startswith("test/auroc") and isinstance(v, float)}
    assert mine and mine == pytest.approx({k: one.summary["test"][k] for k in mine})


def test_zero_shot_on_two_ranks_equals_one_process(base, tmp_path):
    run, summary = _run(base, "zero_shot", tmp_path)
    assert summary["world_size"] == 2 and summary["step"] == 0 and summary["max_steps"] == 0
    one = inprocess_run(base, "zero_shot", "pretrained")
    for key in ("test/i2t_R@1", "test/t2i_R@5", "test/zeroshot_auroc_mean", "test/eval_samples"):
        assert summary["test"][key] == pytest.approx(one.summary["test"][key]), key
    assert summary["eval"]["eval/eval_samples"] == one.summary["eval"]["eval/eval_samples"] > 0


def test_bad_input_under_the_launcher_is_one_line_from_rank_0(base, tmp_path):
    """1 % of the labels keeps 1 sample: 2 ranks cannot be fed. Both ranks find it after the process group
    exists; only rank 0 says so, and the launcher exits non-zero without a traceback."""
    extra = {"data.label_fraction": 0.01, "data.label_fraction_seed": fraction_seed(base, (1, 1))}
    rc, err = _launch("cls", finetune_overrides(base, "cls", tmp_path / "run", **extra), tmp_path / "log.txt")
    assert rc != 0
    errors = [line for line in err.splitlines() if "finetune.py: error:" in line]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("finetune.py: error: 1 samples (data.label_fraction=0.01 keeps 1) cannot feed 2")
    assert "Traceback" not in err and "Traceback" not in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()
