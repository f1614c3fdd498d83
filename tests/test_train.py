"""Training faults and bad input, in process: NaN/Inf losses are skipped and then stop the run with a
checkpoint; bad input fails before training with one clear line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_testdata import ROOT, TINY_RECIPE, prepared_base, tiny_overrides, tiny_tokenizer
from train_testdata import pretrain_argv as _argv

from mpma_ds.tasks.pretrain import PretrainTask
from mpma_ds.tracking import read_metrics_jsonl
from mpma_ds.training import load_recipe
from mpma_ds.training.checkpoint import complete_tags

sys.path.insert(0, str(ROOT / "launch"))
import pretrain  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return prepared_base(tmp_path_factory)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pretrain.py: error: ")
    return lines[0]


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(base, tmp_path, monkeypatch):
    """Forward call 3 returns NaN (skipped, training goes on); from call 9 on every loss is Inf, so after
    ``max_nan_steps=3`` in a row the run saves a checkpoint of the last good step and stops (exit 3)."""
    real_build = PretrainTask.build_model
    calls = {"n": 0}

    def build_with_faults(self, ctx):
        model = real_build(self, ctx)
        forward = model.forward

        def faulty(batch, generator=None):
            out = forward(batch, generator=generator)
            if "key" not in batch:  # the FLOP count's made-up batch, not a training micro-batch
                return out
            calls["n"] += 1
            if calls["n"] == 3 or calls["n"] >= 9:
                bad = float("nan") if calls["n"] == 3 else float("inf")
                out = dict(out, loss=out["loss"] * bad, loss_mlm=out["loss_mlm"] * bad)
            return out

        model.forward = faulty
        return model

    monkeypatch.setattr(PretrainTask, "build_model", build_with_faults)
    run = tmp_path / "run"
    overrides = tiny_overrides(
        base, run, **{"train.max_nan_steps": 3, "train.eval_every": 0, "train.save_every": 0}
    )
    assert pretrain.main(_argv(overrides)) == 3
    # 1 rank × 2 micro-batches per step: calls 1-2 step 1, 3 skipped, 4-5 step 2, 6-7 step 3, 8 (+ 9-11 Inf)
    assert [t for _, t in complete_tags(run / "checkpoints")] == ["step_00000003"]
    rows = [r for r in read_metrics_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["nonfinite_skipped"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_00000003")
    assert all(torch.isfinite(w).all() for w in weights.values())  # no NaN reached the weights


def test_unknown_recipe_key_fails_with_one_line(base, tmp_path, capsys):
    assert pretrain.main(_argv(tiny_overrides(base, tmp_path / "run", **{"train.learning_rate": 1}))) == 2
    assert "unknown recipe key train.learning_rate" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_global_batch_mismatch_fails_before_any_work(base, tmp_path, capsys):
    overrides = tiny_overrides(base, tmp_path / "run", **{"train.global_batch_size": 6})
    assert pretrain.main(_argv(overrides)) == 2
    line = _one_error_line(capsys)
    assert "train.global_batch_size=6 is not a multiple of train.micro_batch_size=4 × world size 1" in line
    assert not (tmp_path / "run").exists()


def test_empty_shard_folder_fails_before_training(base, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = tiny_overrides(base, tmp_path / "run", **{"data.train_shards": empty})
    assert pretrain.main(_argv(overrides)) == 2
    line = _one_error_line(capsys)
    assert str(empty) in line and "shard" in line
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_model_vocabulary_fails_before_training(base, tmp_path, capsys):
    overrides = tiny_overrides(base, tmp_path / "run", **{"model.overrides.vocab_size": 100})
    assert pretrain.main(_argv(overrides)) == 2
    line = _one_error_line(capsys)
    assert "vocab_size is 100" in line and str(tiny_tokenizer(base)) in line
    assert not (tmp_path / "run").exists()


def test_resume_of_a_missing_checkpoint_fails(base, tmp_path, capsys):
    overrides = tiny_overrides(base, tmp_path / "run")
    assert pretrain.main(_argv(overrides, "--resume", str(tmp_path / "nope"))) == 2
    assert "no such checkpoint folder" in _one_error_line(capsys)


@pytest.mark.parametrize("bug", [TypeError("resolve() got an unexpected keyword argument 'x'"), KeyError("x")])
def test_a_programming_error_in_a_task_is_a_traceback_not_a_bad_recipe_line(
    base, tmp_path, monkeypatch, capsys, bug
):
    """Bad input is one line and exit 2; a bug in a task's setup (a TypeError, a KeyError) is not bad input: it
    propagates with its traceback (exit 1 from the interpreter) instead of passing for a bad recipe."""

    def broken(self, ctx):
        raise bug

    monkeypatch.setattr(PretrainTask, "resolve", broken)
    with pytest.raises(type(bug)) as raised:
        pretrain.main(_argv(tiny_overrides(base, tmp_path / "run")))
    assert raised.value is bug
    assert "error:" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_exit_code_and_single_stderr_line_in_a_real_process(base, tmp_path):
    overrides = tiny_overrides(base, tmp_path / "run", **{"train.global_batch_size": 6})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), *_argv(overrides)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("pretrain.py: error: train.global_batch_size=6")
    assert "Traceback" not in proc.stderr


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as done:
        pretrain.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--set" in out and "--resume" in out and "--deepspeed_config" in out


def test_saved_recipe_and_ds_config_of_a_run_are_resolved(base, tmp_path):
    """load_recipe resolves the DeepSpeed JSON path; the JSON the engine gets has the recipe's batch numbers."""
    from mpma_ds.training.ds_config import load_ds_config, resolve_ds_config

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(base, tmp_path / "run"))
    ds = resolve_ds_config(load_ds_config(recipe.deepspeed_config), recipe.train, 2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        8,
        4,
        1,
    )
    assert json.loads(json.dumps(ds)) == ds


def test_only_complete_checkpoints_count_and_prune_keeps_the_last_k(tmp_path):
    """A tag folder without complete.json (a save a kill interrupted) is never resumed from and is pruned."""
    from mpma_ds.training.checkpoint import COMPLETE_FILE, ResumeError, find_checkpoint, prune, read_meta

    ckpts = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6, 8):
        (ckpts / f"step_{step:08d}").mkdir(parents=True)
    for step in (2, 4, 6):
        (ckpts / f"step_{step:08d}" / COMPLETE_FILE).write_text(json.dumps({"step": step}))
    # step 8 is incomplete: auto resume takes 6
    assert find_checkpoint("auto", tmp_path / "run") == ckpts / "step_00000006"
    assert find_checkpoint(str(tmp_path / "run"), tmp_path / "other") == ckpts / "step_00000006"
    assert find_checkpoint(str(ckpts), tmp_path / "other") == ckpts / "step_00000006"
    assert find_checkpoint("auto", tmp_path / "fresh") is None
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        find_checkpoint(str(ckpts / "step_00000008"), tmp_path)
    assert read_meta(ckpts / "step_00000004") == {"step": 4}
    (ckpts / "step_00000005").mkdir()  # an older incomplete save
    removed = prune(ckpts, keep_last=2)
    assert sorted(removed) == ["step_00000002", "step_00000005"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000006", "step_00000008"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    from mpma_ds.training.checkpoint import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.gpu
def test_gpu_bf16_zero3_run_trains(base, tmp_path):
    """On CUDA: zero3_bf16.json, FusedAdam, bf16 inputs, NCCL group of one — a few steps that lower the loss."""
    from mpma_ds.runner.trainer import train

    overrides = tiny_overrides(
        base,
        tmp_path / "run",
        **{"deepspeed_config": "zero3_bf16", "train.max_steps": 6, "train.eval_every": 3},
    )
    summary = train(load_recipe(TINY_RECIPE, overrides))
    rows = [r for r in read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["step"] == 6 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["memory_gb"] > 0 and 0 < rows[-1]["mfu"] < 1


def test_a_complete_checkpoint_is_never_rewritten(tmp_path):
    from mpma_ds.training.checkpoint import COMPLETE_FILE, save_checkpoint

    class RecordingEngine:
        calls: list[str] = []

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            self.calls.append(tag)
            (tmp_path / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)

    engine = RecordingEngine()
    kwargs = dict(rank=0, client_state={}, rank_state={"rng": {}}, meta={"model_name": "m"}, keep_last=3)
    save_checkpoint(engine, tmp_path / "checkpoints", 4, **kwargs)
    first = (tmp_path / "checkpoints" / "step_00000004" / COMPLETE_FILE).read_text()
    assert (
        engine.calls == ["step_00000004"] and (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    )
    save_checkpoint(engine, tmp_path / "checkpoints", 4, **kwargs)  # same step again: left as it is
    assert engine.calls == ["step_00000004"]
    assert (tmp_path / "checkpoints" / "step_00000004" / COMPLETE_FILE).read_text() == first
