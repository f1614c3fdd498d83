"""A suite: a named list of (dataset, protocol) entries in a YAML file, shipped under ``mpma_ds/benchmark/suites``
and found by name (``cxr-core``), or any file by path. Read and checked whole before any model is loaded::

    name: cxr-core
    entries:
      - {dataset: nih-cxr14, protocol: zero_shot, split: test}
      - {dataset: rsna-pneumonia, protocol: linear_probe, fractions: [0.01, 0.1, 1.0]}

Entry fields: ``dataset`` (a ``data_tools.benchmarks`` id), ``protocol`` (`PROTOCOLS`), ``split`` (default
``test``; a dataset without that split — no split file — is evaluated on ``all``, said in the results),
``path`` (the dataset's folder when not ``DATA_ROOT/<dataset>``), ``options`` (the reader's options),
``fractions`` / ``seeds`` (linear probe, finetune: label fractions and the seeds of their subsets), ``max_images``
(evaluate the first N records of the split; 0 = all), ``recipe`` / ``set`` (the protocols that fine-tune through
the Trainer, ``vqa`` and ``finetune``: the fine-tuning recipe and its ``key=value`` overrides, e.g. ``[train.epochs=2]``),
``map`` (``grounding``: which map of `eval.grounding.LINEAR_MAPS` is scored; default `eval.grounding.BEST_MAP`),
``label_fraction_cover`` (linear probe: ``false`` keeps the plain seeded subsets, without label coverage; a
``finetune`` entry says the same as ``set: [data.label_fraction_cover=false]``, the recipe's own key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from data_tools.benchmarks import BENCHMARKS
from mpma_ds.eval.grounding import BEST_MAP, LINEAR_MAPS

PROTOCOLS: dict[str, str] = {
    "zero_shot": "zero-shot classification from prompt ensembles: AUROC per label and mean",
    "zero_shot_accuracy": "zero-shot single-label classification (5x200): accuracy",
    "linear_probe": "logistic regression on frozen image embeddings at label fractions: test AUROC",
    "grounding": "phrase grounding on boxes: pointing game, CNR, mIoU of the thresholded map",
    "retrieval": "image <-> report retrieval: R@1/5/10 both ways (identical reports merged)",
    "finetune": "full fine-tuning (cls task, through the Trainer) at label fractions: test AUROC (accuracy single-label)",
    "vqa": "VQA fine-tuned through the Trainer on the train split: accuracy overall / CLOSED / OPEN",
}
"""The protocols an entry may name, with what each reports."""

_ENTRY_FIELDS = set(
    "dataset protocol split path options fractions seeds max_images recipe set map label_fraction_cover".split()
)
_TRAINING_PROTOCOLS = {"vqa", "finetune"}
"""Protocols that fine-tune through the Trainer: they read ``recipe`` and ``set``."""


class SuiteError(ValueError):
    """A suite that cannot be run (unknown suite, field, dataset or protocol): one line."""


@dataclass(frozen=True)
class SuiteEntry:
    dataset: str
    protocol: str
    split: str = "test"
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: tuple[int, ...] = (0,)
    max_images: int = 0
    recipe: str | None = None
    """Fine-tuning protocols: the recipe (a shipped name or a path; default ``finetune.DEFAULT_RECIPES``)."""
    set: tuple[str, ...] = ()
    """Fine-tuning protocols: ``key=value`` overrides of that recipe (``train.epochs=2``), as ``--set``."""
    map: str = BEST_MAP
    """``grounding``: the map scored (one of `eval.grounding.LINEAR_MAPS`: linear in the cached patch features)."""
    label_fraction_cover: bool = True
    """Linear probe: label-cover each fraction's subset (`protocols.probe_cover`), as ``finetune`` does by default."""

    @property
    def name(self) -> str:
        """``nih-cxr14/zero_shot``: the entry's key in results.json and its MLflow child run's name."""
        return f"{self.dataset}/{self.protocol}"


@dataclass(frozen=True)
class Suite:
    name: str
    entries: tuple[SuiteEntry, ...]
    description: str = ""
    source: str = ""
    """The YAML file read."""


def suite_names() -> list[str]:
    """The suites shipped with the package."""
    folder = resources.files("mpma_ds.benchmark") / "suites"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _entry(raw: Any, where: str, tasks: dict[str, str]) -> SuiteEntry:
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: an entry is a mapping with dataset and protocol, got {raw!r}")
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        raise SuiteError(
            f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_ENTRY_FIELDS))})"
        )
    for key in ("dataset", "protocol"):
        if not isinstance(raw.get(key), str):
            raise SuiteError(f"{where}: no {key}")
    if raw["dataset"] not in tasks:
        raise SuiteError(f"{where}: unknown dataset {raw['dataset']!r} (known: {', '.join(tasks)})")
    if raw["protocol"] not in PROTOCOLS:
        raise SuiteError(f"{where}: unknown protocol {raw['protocol']!r} (known: {', '.join(PROTOCOLS)})")
    vqa_data, vqa_protocol = tasks[raw["dataset"]] == "vqa", raw["protocol"] == "vqa"
    if vqa_data != vqa_protocol:
        raise SuiteError(
            f"{where}: {raw['dataset']} is "
            + ("a VQA set: its protocol is vqa" if vqa_data else "not a VQA set: protocol vqa does not apply")
        )
    overrides = raw.get("set") or []
    if not isinstance(overrides, list) or any(not isinstance(o, str) or "=" not in o for o in overrides):
        raise SuiteError(f"{where}: set is a list of key=value strings (train.epochs=2), got {overrides!r}")
    if (overrides or raw.get("recipe")) and raw["protocol"] not in _TRAINING_PROTOCOLS:
        raise SuiteError(f"{where}: recipe / set apply only to {', '.join(sorted(_TRAINING_PROTOCOLS))}")
    grounding_map = str(raw.get("map", BEST_MAP))
    if "map" in raw and raw["protocol"] != "grounding":
        raise SuiteError(f"{where}: map applies only to grounding")
    if grounding_map not in LINEAR_MAPS:
        raise SuiteError(f"{where}: map must be one of {', '.join(LINEAR_MAPS)}, got {grounding_map!r}")
    cover = raw.get("label_fraction_cover", True)
    if "label_fraction_cover" in raw and raw["protocol"] != "linear_probe":
        hint = (
            " (a finetune entry: set: [data.label_fraction_cover=false])" if raw["protocol"] == "finetune" else ""
        )
        raise SuiteError(f"{where}: label_fraction_cover applies only to linear_probe{hint}")
    if not isinstance(cover, bool):
        raise SuiteError(f"{where}: label_fraction_cover is true or false, got {cover!r}")
    fractions = tuple(float(f) for f in raw.get("fractions", (0.01, 0.1, 1.0)))
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise SuiteError(f"{where}: fractions {list(fractions)} must each be in (0, 1]")
    return SuiteEntry(
        raw["dataset"], raw["protocol"], str(raw.get("split", "test")), raw.get("path"), dict(raw.get("options") or {}),
        fractions, tuple(int(s) for s in raw.get("seeds", (0,))), int(raw.get("max_images", 0)),
        str(raw["recipe"]) if raw.get("recipe") else None, tuple(overrides), grounding_map, cover,
    )  # fmt: skip


def load_suite(spec: str | Path) -> Suite:
    """The suite named ``spec`` (shipped) or the YAML file at ``spec``; every entry checked."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise SuiteError(f"suite file {path} does not exist")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        shipped = resources.files("mpma_ds.benchmark") / "suites" / f"{spec}.yaml"
        if not shipped.is_file():
            raise SuiteError(
                f"unknown suite {spec!r}: shipped suites are {', '.join(suite_names())}, or give a YAML path"
            )
        text, source = shipped.read_text(encoding="utf-8"), f"mpma_ds/benchmark/suites/{spec}.yaml"
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list) or not raw["entries"]:
        raise SuiteError(f"{source}: a suite is a mapping with a non-empty 'entries' list")
    tasks = {e.name: e.meta.get("task", "multilabel") for e in BENCHMARKS}
    entries = tuple(_entry(e, f"{source} entry {i + 1}", tasks) for i, e in enumerate(raw["entries"]))
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SuiteError(f"{source}: entries repeat {', '.join(dup)}")
    return Suite(str(raw.get("name") or path.stem), entries, str(raw.get("description", "")), source)
