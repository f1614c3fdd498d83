"""Evaluate a model on one shard split (the library side of ``launch/evaluate.py`` and the demo)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from mpma_ds.eval.alignment import evaluate_alignment

RECIPE_FILE = "recipe.yaml"
# Rows of the summary table: (metric key, label).
TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("i2t_R@1", "image->report R@1"),
    ("i2t_R@5", "image->report R@5"),
    ("i2t_R@10", "image->report R@10"),
    ("t2i_R@1", "report->image R@1"),
    ("t2i_R@5", "report->image R@5"),
    ("t2i_R@10", "report->image R@10"),
    ("zeroshot_auroc_mean", "zero-shot AUROC (mean)"),
)


def read_recipe_tree(path: str | Path) -> dict[str, Any]:
    """A recipe YAML as a plain dict (no path checks: the run may come from another machine)."""
    tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path} is not a recipe (a mapping of sections)")
    return tree


def split_folder(shards: str | Path, split: str) -> Path:
    """``shards/<split>`` when the build root is given, else ``shards`` itself (already a split folder)."""
    root = Path(shards)
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {root} does not exist; build shards with data_tools.build_shards")
    for name in (split, "validate" if split in ("val", "valid") else split):
        if (root / name).is_dir():
            return root / name
    if any(root.glob("shard-*.tar")):
        return root
    raise FileNotFoundError(f"{root} holds no {split}/ folder and no shard-*.tar files")


def data_config_for(
    model_config: Any,
    *,
    recipe: Mapping[str, Any] | None,
    shards: Path,
    tokenizer: str | Path,
    backend: str | None,
):
    """The eval ``DataConfig``: the training recipe's preprocessing (size, channels, normalisation, text length)
    when known, else the model's own sizes; pointed at ``shards``."""
    from mpma_ds.data import DataConfig

    section = dict((recipe or {}).get("data") or {})
    if not section:
        section = {
            "image_size": model_config.image_size,
            "in_chans": model_config.in_chans,
            "max_text_len": model_config.max_text_len,
        }
    section.update(val_shards=str(shards), tokenizer=str(tokenizer))
    if backend:
        section["backend"] = backend
    if section.get("backend") == "synthetic":
        raise ValueError("evaluation reads shards: use --backend wds or dali")
    return DataConfig.from_dict(section)


def evaluate_on_split(
    model: torch.nn.Module,
    tokenizer,
    data_cfg,
    *,
    split: str = "validate",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> dict[str, float]:
    """One deterministic pass over ``split`` (rank 0 of 1) through ``evaluate_alignment``."""
    from mpma_ds.data import build_loader

    info = build_loader(
        data_cfg, 0, 1, split=split, batch_size=batch_size, tokenizer=tokenizer, seed=0, train=False
    )
    try:
        batches = info.loader
        if max_batches:
            batches = (b for i, b in zip(range(max_batches), info.loader))
        model.to(device)
        return evaluate_alignment(
            model, batches, tokenizer=tokenizer, device=device, max_text_len=data_cfg.max_text_len
        )
    finally:
        info.close()


def format_table(results: Mapping[str, Mapping[str, float]], rows: Sequence[tuple[str, str]] = TABLE_ROWS) -> str:
    """A plain-text table: one row per metric, one column per evaluated model (``results`` name -> metrics)."""
    names = list(results)
    width = max(len(label) for _, label in rows)
    cols = [max(10, len(n)) for n in names]
    head = " " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols))
    lines = [head, "-" * len(head)]
    for key, label in rows:
        cells = []
        for name, c in zip(names, cols):
            value = results[name].get(key, math.nan)
            cells.append(("n/a" if value is None or math.isnan(value) else f"{value:.3f}").rjust(c))
        lines.append(label.ljust(width) + "  " + "  ".join(cells))
    return "\n".join(lines)
