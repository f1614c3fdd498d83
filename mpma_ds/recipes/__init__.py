"""Experiment recipes shipped with mpma-ds (``launch/configs`` in a checkout points here), found by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_recipes() -> dict[str, Path]:
    """The recipes installed with the package, by name (``pretrain_tiny`` -> its YAML file)."""
    folder = resources.files("mpma_ds") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_recipe(spec: str) -> Path:
    """``spec`` as a recipe file: an existing path as given, else a shipped recipe's name (with or without
    ``.yaml``); otherwise the path itself (loading it then names it as missing)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    return shipped.get(path.stem if path.suffix == ".yaml" and path.parent == Path(".") else spec, path)
