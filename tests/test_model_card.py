"""The model card export writes (README.md, Hugging Face layout) from a real 2-step pretraining run with an
evaluation, mpma-predict printing its summary line, and the run folder and its export predicting alike."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import yaml
from train_testdata import TINY_RECIPE, prepared_base, tiny_overrides, tiny_shards

import mpma_ds
from mpma_ds.cli.predict import main as predict_main
from mpma_ds.runner.export import export_checkpoint
from mpma_ds.runner.model_card import card_summary
from mpma_ds.runner.trainer import train
from mpma_ds.training import load_recipe

pytestmark = pytest.mark.slow  # a 2-step DeepSpeed pretraining run and its export: ~1 min on 2 busy cores


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
    base = prepared_base(tmp_path_factory)
    root = tmp_path_factory.mktemp("card")
    extra = {"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 2, "train.log_every": 1}
    train(load_recipe(TINY_RECIPE, tiny_overrides(base, root / "run", **extra)))
    return base, root / "run", export_checkpoint(root / "run", root / "exported")


def test_card_header_summary_data_training_and_logged_figures(run_and_export):
    base, run_dir, exported = run_and_export
    text = (exported / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "mpma-ds" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert "synthetic-data" in meta["tags"] and meta["datasets"] == ["mimic-cxr-synthetic"]
    counts = json.loads((tiny_shards(base) / "manifest.json").read_text())["counts"]
    summary = card_summary(exported)
    assert summary.startswith("MPMA mpma_tiny (") and "M parameters), pretrained 2 steps on " in summary
    assert f"on {counts['train']} synthetic mimic-cxr image-report pairs" in summary
    assert "not a medical device" in summary
    params = sum(p.numel() for p in mpma_ds.MPMA.from_pretrained(exported).parameters())
    assert f"| total | {params:,} |" in text
    assert (
        f"- samples per split: train {counts['train']}, validate {counts['validate']}, test {counts['test']}"
        in text
    )
    assert "- steps: 2 (recipe max_steps 2), global batch 8 (micro batch 4)" in text
    # the figures the run logged: its summary.json's evaluation, each value as logged
    logged = json.loads((run_dir / "summary.json").read_text())["eval"]
    assert logged, "the run evaluated at step 2"
    for key, value in logged.items():
        if isinstance(value, float) and not key.endswith("_ci95") and value == value:
            assert f"| {key} | {value:.4g} |" in text
    for heading in ("## Model details", "## How to use", "## Training data", "## Training procedure",
                    "## Evaluation", "## Intended use and limits", "## Provenance"):  # fmt: skip
        assert heading in text
    assert "Trained on **synthetic** films" in text


def test_predict_prints_the_card_line_and_run_folder_equals_export(run_and_export, tmp_path):
    base, run_dir, exported = run_and_export
    film = next(iter(sorted((tiny_shards(base).parent / "corpus").rglob("*.jpg"))))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = predict_main(["--model", str(exported), str(film), "--out", str(tmp_path / "p"), "--workers", "0",
                           "--no-progress", "--max-findings", "0"])  # fmt: skip
    assert rc == 0
    assert out.getvalue().splitlines()[0] == f"model: {card_summary(exported)}"
    from_export = mpma_ds.Predictor(exported, device="cpu", calibration=None).predict(film)[0]["scores"]
    from_run = mpma_ds.Predictor(run_dir, device="cpu", calibration=None).predict(film)[0]["scores"]
    assert from_run == pytest.approx(from_export, abs=1e-6)
