"""benchmarks/bench_mlm_budget.py's parsing and tables (no model): an arm's list override keeps its commas, the
per-class table has a row per word class, ``--eval-set`` changes only the evaluation's data section."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_mlm_budget  # noqa: E402

from mpma_ds.data.masking import FINDING_CLASSES  # noqa: E402


def test_arm_override_keeps_a_list_value_whole():
    tree = bench_mlm_budget.arm_tree("data.mlm_finding_probability=0.9,data.mlm_finding_classes=[side,extent]")
    assert tree == {"data.mlm_finding_probability": 0.9, "data.mlm_finding_classes": ["side", "extent"]}
    assert bench_mlm_budget.arm_tree("") == {}


def test_tables_split_the_finding_words_by_class():
    metrics = {"mlm_acc": 0.3, "mlm_acc_findings": 0.1, "mlm_acc_findings_shuffled": 0.05,
               "mlm_findings_image_gain": 0.05, "mlm_findings_image_gain_ci95": [0.01, 0.09],
               "mlm_tokens_findings": 40.0, "mlm_acc_findings_side": 0.5, "mlm_acc_findings_shuffled_side": 0.25,
               "mlm_findings_image_gain_side": 0.25, "mlm_findings_image_gain_side_ci95": [0.1, 0.4],
               "mlm_tokens_findings_side": 8.0, "mlm_image_changed": 0.02}  # fmt: skip
    text = bench_mlm_budget.tables({"m": metrics})
    assert "| m | 0.300 | 0.100 | 0.050 | +0.050 [+0.010, +0.090] | 40 | 0.020 |" in text
    assert "| m | side | 0.500 | 0.250 | +0.250 [+0.100, +0.400] | 8 |" in text
    assert "| m | zone | n/a | n/a | n/a | n/a |" in text  # a class never scored
    assert sum(line.startswith("| m | ") for line in text.splitlines()) == 1 + len(FINDING_CLASSES)


def test_eval_set_changes_only_the_data_section(tmp_path):
    import mpma_ds

    shutil.copy(Path(mpma_ds.__file__).parent / "recipes" / "pretrain_tiny.yaml", tmp_path / "recipe.yaml")
    overrides = bench_mlm_budget.arm_tree("data.mlm_finding_probability=0.5,data.mlm_finding_classes=[side]")
    recipe = bench_mlm_budget.eval_recipe(tmp_path, Path("/shards"), overrides)
    assert recipe.data.val_shards == "/shards/validate" and recipe.data.mlm_finding_classes == ["side"]
    assert recipe.data.mlm_finding_probability == 0.5
    with pytest.raises(SystemExit, match="only data"):
        bench_mlm_budget.eval_recipe(tmp_path, Path("/shards"), {"train.lr": 1.0})
    with pytest.raises(ValueError, match="known"):
        bench_mlm_budget.eval_recipe(tmp_path, Path("/shards"), {"data.mlm_finding_classes": ["sides"]})
