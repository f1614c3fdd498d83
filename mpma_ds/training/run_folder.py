"""What a run writes into ``train.output_dir``, and how a fresh start treats a folder that already holds a run.

    recipe.yaml  ds_config.json  checkpoints/  metrics.jsonl  params.json  summary.json  test_predictions.pt

A fresh start (no ``--resume``) in a folder where ``existing_run`` finds checkpoints, logged metrics or a
summary is refused; ``--overwrite`` removes exactly these names first (``clear_run``), nothing else.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mpma_ds.training.checkpoint import TAG_PREFIX
from mpma_ds.training.recipe import RECIPE_FILE

SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "test_predictions.pt"
"""Per-sample test outputs of a fine-tuning run (``torch.load(weights_only=True)``): ``keys`` and the task's
predictions and targets."""
DS_CONFIG_FILE = "ds_config.json"


RUN_FILES = (RECIPE_FILE, DS_CONFIG_FILE, SUMMARY_FILE, PREDICTIONS_FILE, "params.json", "checkpoints")
"""What a run writes into its folder (besides ``metrics.jsonl*``): the files ``overwrite`` removes."""


def existing_run(out: Path) -> list[str]:
    """What in ``out`` shows that a run already used it: checkpoints, logged metrics, a summary."""
    if not out.is_dir():
        return []
    found = []
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith(TAG_PREFIX) for p in ckpts.iterdir()):
        found.append("checkpoints/")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if (out / SUMMARY_FILE).is_file():
        found.append(SUMMARY_FILE)
    return found


def clear_run(out: Path) -> None:
    """Remove what a run wrote into ``out`` (only the names a run writes; other files stay)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in out.glob("metrics.jsonl*"):
        path.unlink()
