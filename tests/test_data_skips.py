"""Unreadable training samples are shown and bounded (``data.max_skipped_fraction``, default 1 %).

A train shard truncated to half its size used to train to the end with exit 0, the loss recorded only as
``skipped_samples`` in metrics.jsonl. Now the run stops with one line naming the shard; under a raised limit it
trains, with the shard named on the console and its count in metrics.jsonl / MLflow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_testdata import prepared_base, pretrain_argv, tiny_overrides, tiny_shards

from mpma_ds.cli import pretrain
from mpma_ds.training.data_skips import check_while_reading


@pytest.fixture(scope="module")
def half_shard(tmp_path_factory) -> tuple[str, Path, str]:
    """``(base, train shards with one tar cut to half its size, that shard's name)``; the .idx still lists
    every sample, as after an interrupted copy."""
    base = prepared_base(tmp_path_factory)
    train = shutil.copytree(tiny_shards(base) / "train", tmp_path_factory.mktemp("skips") / "train")
    tar = sorted(train.glob("shard-*.tar"))[0]
    with open(tar, "r+b") as fh:
        fh.truncate(tar.stat().st_size // 2)
    return base, train, tar.name


def _errors(capsys) -> tuple[list[str], str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err[-3000:]
    return [ln for ln in captured.err.splitlines() if ": error:" in ln], captured


def test_a_half_truncated_shard_stops_the_run_with_one_line(half_shard, tmp_path, capsys):
    base, train, name = half_shard
    run = tmp_path / "run"
    overrides = tiny_overrides(base, run, **{"data.train_shards": train, "train.max_steps": 2})
    assert pretrain.main(pretrain_argv(overrides)) == 2
    errors, _ = _errors(capsys)
    assert len(errors) == 1, errors
    assert f"{name} " in errors[0] and "truncated" in errors[0] and "data.max_skipped_fraction=0.01" in errors[0]
    assert "verify_shards" in errors[0]
    assert not (run / "checkpoints").exists()  # stopped before any step


def test_under_a_raised_limit_the_shard_is_named_on_the_console_and_in_mlflow(half_shard, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    base, train, name = half_shard
    run = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny_overrides(
        base, run, **{"data.train_shards": train, "data.max_skipped_fraction": 0.9, "train.max_steps": 2,
                      "train.eval_every": 0, "tracking.enabled": True, "tracking.uri": uri,
                      "tracking.system_metrics": False},
    )  # fmt: skip
    assert pretrain.main(pretrain_argv(overrides)) == 0
    errors, captured = _errors(capsys)
    assert not errors
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("warning:") and name in ln]
    assert len(warnings) == 1 and "unreadable and skipped" in warnings[0], captured.err[-2000:]
    skipped = int(warnings[0].split(" of ")[0].removeprefix("warning: "))
    assert skipped > 0
    step_lines = [ln for ln in captured.out.splitlines() if ln.startswith("step ")]
    assert step_lines and all(f"| {skipped} skipped" in ln for ln in step_lines), step_lines
    key = f"skipped_samples.train.{Path(name).stem}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r[key] for r in rows if key in r] == [skipped]
    assert [r["skipped_samples"] for r in rows if "loss" in r] == [skipped, skipped]
    run_id = json.loads((run / "summary.json").read_text())["mlflow_run_id"]
    assert MlflowClient(uri).get_run(run_id).data.metrics[key] == skipped


def test_skips_while_reading_stop_past_the_fraction():
    check_while_reading(1, 100, 0.01)  # 1 % is allowed
    check_while_reading(50, 99, 0.01)  # too few samples read to judge
    with pytest.raises(ValueError, match=r"2 of the 100 samples read so far .*2\.0%.*max_skipped_fraction=0\.01"):
        check_while_reading(2, 100, 0.01)
    check_while_reading(50, 100, 1.0)
