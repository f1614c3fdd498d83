"""Bad input to the launch CLIs (issue 11): compare_runs with a store that is not there or not MLflow's,
evaluate's --shards on the train split, pretrain with train.output_dir a file. One line, a non-zero exit,
nothing created on the way."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from train_testdata import tiny_shards, tiny_tokenizer

from mpma_ds.cli import compare as compare_cli
from mpma_ds.cli import evaluate as evaluate_cli
from mpma_ds.cli import pretrain as pretrain_cli
from mpma_ds.data.loader import split_shards
from mpma_ds.runner.evaluate import data_config_for
from mpma_ds.runner.export import load_run_recipe


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.mark.parametrize(
    ("setup", "uri", "needle"),
    [
        (None, "sqlite:///{tmp}/missing/runs.db", "folder {tmp}/missing does not exist"),
        (None, "sqlite:///{tmp}/runs.db", "no MLflow database at {tmp}/runs.db"),
        ("text", "sqlite:///{tmp}/notes.txt", "is not a SQLite database (other content)"),
        ("empty", "sqlite:///{tmp}/empty.db", "is not a SQLite database (empty)"),
        ("other", "sqlite:///{tmp}/other.db", "not MLflow's (no experiments table)"),
        (None, "{tmp}/no-such-folder", "no MLflow file store"),
        (None, "", "no MLflow database at {tmp}/mlflow.db"),  # the default ./mlflow.db, absent
    ],
)
def test_compare_runs_store_that_is_not_there_or_not_mlflow(tmp_path, monkeypatch, capsys, setup, uri, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if setup == "text":
        (tmp_path / "notes.txt").write_text("not a database\n")
    elif setup == "empty":
        (tmp_path / "empty.db").write_bytes(b"")
    elif setup == "other":
        with sqlite3.connect(tmp_path / "other.db") as db:
            db.execute("CREATE TABLE t (x)")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    argv = ["--experiment", "mpma-demo"] + (["--tracking-uri", uri.format(tmp=tmp_path)] if uri else [])
    assert compare_cli.main(argv) == 2
    _one_error_line(capsys.readouterr().err, needle.format(tmp=tmp_path))
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # no stray database, nothing changed


def test_compare_runs_max_runs_must_be_positive(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for value in ("0", "-3"):
        assert compare_cli.main(["--experiment", "e", "--max-runs", value]) == 2
        _one_error_line(capsys.readouterr().err, f"--max-runs {value}: must be at least 1")
    assert _files(tmp_path) == set()


def test_evaluate_train_split_reads_the_given_shards(tmp_path, tmp_path_factory, capsys):
    base = str(tmp_path_factory.getbasetemp())
    shards, tokenizer = tiny_shards(base), tiny_tokenizer(base)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {name: mpma_tiny}\n"
        f"data: {{train_shards: {tmp_path / 'gone' / 'train'}, val_shards: {tmp_path / 'gone' / 'validate'}, "
        f"tokenizer: {tokenizer}, image_size: 64, max_text_len: 32, label_fraction: 0.5, num_workers: 0}}\n"
        "tracking: {enabled: false}\n"
    )
    cfg = data_config_for(
        None, recipe=load_run_recipe(recipe), shards=shards / "train", tokenizer=tokenizer, backend=None
    )
    assert split_shards(cfg, "train") == split_shards(cfg, "validate") == str(shards / "train")
    assert cfg.label_fraction == 1.0  # an evaluation reads the whole split, not the recipe's subset
    out = tmp_path / "eval"
    argv = ["--random-init", "mpma_tiny", "--recipe", str(recipe), "--split", "train", "--shards", str(shards),
            "--batch-size", "8", "--max-batches", "1", "--device", "cpu", "--out-dir", str(out), "--no-mlflow"]  # fmt: skip
    assert evaluate_cli.main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    assert result["split"] == "train" and 0.0 <= result["metrics"]["i2t_R@10"] <= 1.0


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_pretrain_output_dir_that_is_a_file(tmp_path, capsys, where):
    (tmp_path / "taken").write_text("a file")
    target = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    rc = pretrain_cli.main(["--config", "pretrain_tiny", "--set", f"train.output_dir={target}"])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, f"train.output_dir {target}", "file")
    assert (tmp_path / "taken").read_text() == "a file"
