"""Sweeps over recipe overrides: named arms x seeds at one budget, one evaluation protocol, paired intervals
against a reference arm, all runs grouped in MLflow (``mpma-sweep``; docs/model.md, "Ablation")."""

from mpma_ds.sweep.config import SweepConfig, SweepEvalConfig, flatten_overrides, load_sweep, shipped_sweeps
from mpma_ds.sweep.runner import SweepError, arm_recipe, run_arm, run_sweep, sweep_table

__all__ = [
    "SweepConfig",
    "SweepError",
    "SweepEvalConfig",
    "arm_recipe",
    "flatten_overrides",
    "load_sweep",
    "run_arm",
    "run_sweep",
    "shipped_sweeps",
    "sweep_table",
]
