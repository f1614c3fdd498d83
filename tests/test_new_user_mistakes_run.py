"""A new user's mistakes with the training / evaluation commands (issue 26): NaN in a float field, a shard set
that only the end of the run would read, shards of the wrong kind, a split name that is not one, an MLflow URI
scheme MLflow does not read — each one clear line, exit 2, found before any step; and ``max_steps`` winning
over ``epochs`` as users expect from Hugging Face's Trainer. Every test here failed on the code before issue 26.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_testdata import tiny_shards, tiny_tokenizer

from data_tools.build_shards import build_shards
from mpma_ds.cli import compare as compare_cli
from mpma_ds.cli import evaluate as evaluate_cli
from mpma_ds.cli import finetune as finetune_cli
from mpma_ds.cli import pretrain as pretrain_cli
from mpma_ds.eval.split_eval import canonical_split
from mpma_ds.models import MPMAConfig
from mpma_ds.recipes import find_recipe
from mpma_ds.training import RecipeError, load_recipe
from mpma_ds.training.recipe import FinetuneRecipe


def _error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every float field (``float`` or ``float | None``) of a config dataclass, nested ones too."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
        key = f"{prefix}{f.name.rstrip('_')}"
        if any(a is float for a in args):
            keys.append(key)
        elif len(args) == 1 and dataclasses.is_dataclass(args[0]):
            keys += _float_keys(args[0], f"{key}.")
    return keys


def test_every_float_field_refuses_nan_and_inf():
    keys = _float_keys(FinetuneRecipe)
    keys += [f"model.overrides.{k}" for k in _float_keys(MPMAConfig)]
    assert {"train.lr", "train.epochs", "data.mlm_probability", "model.overrides.image_mask_ratio"} <= set(keys)
    assert len(keys) >= 30
    for key in keys:
        for value in (".nan", "-inf"):
            with pytest.raises(RecipeError) as err:
                load_recipe(find_recipe("finetune_cls_tiny"), [f"{key}={value}"], cls=FinetuneRecipe)
            message = str(err.value)
            assert key.split(".")[-1] in message and "\n" not in message, (key, message)
            assert "finite" in message or "must be" in message, (key, message)
    with pytest.raises(RecipeError, match="data.crop_scale must be a finite number"):  # inside a list too
        load_recipe(find_recipe("pretrain_tiny"), ["data.crop_scale=[0.5, .inf]"])
    with pytest.raises(RecipeError) as err:
        load_recipe(find_recipe("pretrain_tiny"), ["train.lr=nan"])
    # the bad value is on the command line, not in the file
    assert str(err.value) == "train.lr must be a finite number, got 'nan' (from --set train.lr=nan)"


def test_max_steps_wins_over_epochs_and_the_run_says_so(tmp_path, capsys):
    recipe = load_recipe(find_recipe("finetune_cls_tiny"), ["train.max_steps=20"], cls=FinetuneRecipe)
    assert recipe.train.max_steps == 20 and recipe.train.epochs == 0
    assert recipe.train.steps_for(1000) == (20, recipe.train.steps_for(1000)[1])
    assert any("train.max_steps=20 wins over train.epochs=6" in n for n in recipe.notes)
    # the recipe alone (no max_steps given) still trains by epochs
    assert load_recipe(find_recipe("finetune_cls_tiny"), cls=FinetuneRecipe).train.steps_for(10)[0] == 60

    rc = finetune_cli.main(["--config", "finetune_cls_tiny", "--set", "train.max_steps=20",
                            f"train.output_dir={tmp_path / 'run'}", f"data.train_shards={tmp_path / 'none'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert "note: train.max_steps=20 wins over train.epochs=6" in lines[0]
    _error_line(err, "data.train_shards")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    base = str(tmp_path_factory.getbasetemp())
    tiny_shards(base)
    tiny_tokenizer(base)
    return base


@pytest.fixture(scope="module")
def vqa_shards(tmp_path_factory) -> Path:
    """A two-question VQA-RAD build (kind ``vqa``)."""
    root = tmp_path_factory.mktemp("rad")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8), "L").save(root / "images" / "a.png")
    entry = {"qid": 1, "image_name": "a.png", "question": "Is there a pleural effusion?", "answer": "yes",
             "answer_type": "CLOSED", "question_type": "PRES"}  # fmt: skip
    (root / "trainset.json").write_text(json.dumps([entry]))
    (root / "testset.json").write_text(json.dumps([{**entry, "qid": 2}]))
    out = root.parent / f"{root.name}-shards"
    build_shards("vqa-rad", root, out, image_size=64, progress=False)
    return out


def _finetune_args(base: str, out: Path, task: str = "cls", **values: object) -> list[str]:
    shards = tiny_shards(base)
    items = {
        "init.from": "random",
        "data.tokenizer": tiny_tokenizer(base),
        "data.train_shards": shards / "train",
        "data.val_shards": shards / "validate",
        "data.test_shards": shards / "test",
        "data.image_size": 64,
        "data.num_workers": 0,
        "train.output_dir": out,
        "tracking.enabled": False,
        **values,
    }
    return ["--config", f"finetune_{task}_tiny", "--set", *(f"{k}={v}" for k, v in items.items())]


def test_a_finetune_whose_test_shards_do_not_exist_is_refused_before_the_first_step(base, tmp_path, capsys):
    out = tmp_path / "run"
    rc = finetune_cli.main(_finetune_args(base, out, **{"data.test_shards": tmp_path / "typo" / "test"}))
    assert rc == 2
    _error_line(capsys.readouterr().err, "data.test_shards", str(tmp_path / "typo" / "test"))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_pretraining_on_vqa_shards_and_a_vqa_task_on_report_shards_are_refused(base, vqa_shards, tmp_path, capsys):
    shards = tiny_shards(base)
    rc = pretrain_cli.main(["--config", "pretrain_tiny", "--set", f"data.train_shards={vqa_shards / 'train'}",
                            f"data.val_shards={shards / 'validate'}", f"data.tokenizer={tiny_tokenizer(base)}",
                            f"train.output_dir={tmp_path / 'pre'}", "tracking.enabled=false"])  # fmt: skip
    assert rc == 2
    _error_line(capsys.readouterr().err, "data.train_shards", "holds image-question-answer samples",
                "task pretrain reads image-report pairs", "build_shards --format mimic-cxr")  # fmt: skip
    assert not (tmp_path / "pre" / "metrics.jsonl").exists()

    rc = finetune_cli.main(_finetune_args(base, tmp_path / "vqa", task="vqa"))
    assert rc == 2
    _error_line(capsys.readouterr().err, "data.train_shards", "holds image-report pairs", "task vqa reads",
                "--format vqa-rad")  # fmt: skip


def _evaluate(shards: Path, split: str, base: str, tmp_path: Path) -> list[str]:
    return ["--random-init", "mpma_tiny", "--shards", str(shards), "--split", split, "--tokenizer",
            str(tiny_tokenizer(base)), "--max-batches", "1", "--bootstrap", "0", "--device", "cpu",
            "--out-dir", str(tmp_path / "eval"), "--no-mlflow"]  # fmt: skip


def test_evaluate_split_names_and_shard_kind(base, vqa_shards, tmp_path, capsys):
    assert [canonical_split(s) for s in ("valid", "Validation", "val", "training", "test")] == [
        "validate",
        "validate",
        "validate",
        "train",
        "test",
    ]
    shards = tiny_shards(base)
    assert evaluate_cli.main(_evaluate(shards, "tset", base, tmp_path)) == 2
    _error_line(capsys.readouterr().err, "--split 'tset' is not a split name", "train, validate, test")
    assert evaluate_cli.main(_evaluate(shards / "validate", "test", base, tmp_path)) == 2
    _error_line(capsys.readouterr().err, "is the validate split but --split is test")
    assert evaluate_cli.main(_evaluate(vqa_shards, "test", base, tmp_path)) == 2
    _error_line(capsys.readouterr().err, "holds image-question-answer samples", "launch/evaluate.py reads")
    assert not (tmp_path / "eval").exists()


def test_compare_runs_names_a_scheme_mlflow_does_not_read(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert compare_cli.main(["--experiment", "e", "--tracking-uri", "foo://bar"]) == 2
    _error_line(capsys.readouterr().err, "MLflow reads no foo:// store", "sqlite://", "http://")
    assert list(tmp_path.iterdir()) == []
