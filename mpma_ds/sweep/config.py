"""A sweep: named arms (recipe overrides over one base recipe) x seeds, each pretrained at the same budget and
evaluated by the same protocol (``mpma-sweep``; docs/model.md, "Ablation").

    name: ablation_tiny
    base: pretrain_tiny                 # a shipped recipe name or a YAML path
    shared:                             # every arm: the budget (steps, batch, data) and the paths
      train: {max_steps: 300}
    reference: full                     # each arm's difference is taken from this arm's
    seeds: [0, 1]
    arms:
      full: {}
      clip: {model.overrides: {w_mlm: 0, w_mim: 0, w_local: 0}}

``shared`` and each arm are recipe trees: nested mappings (``train: {max_steps: 300}``) or dotted keys
(``model.overrides: {...}``, ``train.lr: 1e-3``), flattened to the ``--set`` overrides of ``mpma-pretrain``;
an arm's keys override ``shared``'s. The seed goes to ``train.seed``: with the same seed every arm sees the same
batches in the same order (and its own initialisation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mpma_ds.config import ConfigSection, load_config


@dataclass
class SweepEvalConfig(ConfigSection):
    """How every arm is evaluated (the pretraining evaluation of ``mpma-evaluate``, kept row by row)."""

    SECTION = "evaluation"

    split: str = "validate"
    """The shard split evaluated, from the base recipe's ``data.val_shards`` folder's build (its parent holds
    the splits) or that folder itself."""
    batch_size: int = 32
    """Evaluation batch size."""
    max_batches: int = 0
    """Stop after this many batches (0 = the whole split)."""
    min_label_count: int = 20
    """Zero-shot AUROC over labels with at least this many positives and negatives."""
    bootstrap: int = 1000
    """Bootstrap resamples of every interval (each arm's own and the paired differences)."""
    maps: list[str] = field(default_factory=lambda: ["similarity", "cross_attention", "gradcam_itc"])
    """Grounding maps whose pointing game is played against the truth boxes (`eval.grounding_maps.MAPS`); each
    arm plays those its model has (``gloria_attention``: ``local_loss: gloria``; ``gradcam_itm``: an ITM head).
    An empty list skips grounding (shards without ``truth``)."""
    device: str = "auto"
    """Where the evaluation runs: cpu, cuda, or auto (cuda when available)."""
    linear_probe_fraction: float = 0.01
    """Label fraction of the linear probe (CheXpert macro AUROC of a linear head on the frozen image features,
    trained on that patient-level subset of the training split, tested on the build's ``test`` split;
    `sweep.downstream`); 0 skips it."""
    linear_probe_min_label_count: int = 10
    """The linear probe's macro AUROC counts a label with at least this many test positives and negatives (the
    demo's ``--min-label-count``)."""
    finetune_set: list[str] = field(default_factory=list)
    """More ``--set`` overrides of both downstream fine-tuning recipes (e.g. ``train.max_steps=200``)."""
    vqa_shards: str = ""
    """A VQA shard build (``train/``, ``validate/``, ``test/``; ``build_shards --format vqa-rad``) for VQA with the
    backbone frozen (CLOSED / OPEN accuracy); empty skips it."""

    def validate(self) -> None:
        from mpma_ds.eval.grounding_maps import MAPS

        if self.batch_size < 1 or self.max_batches < 0 or self.min_label_count < 1 or self.bootstrap < 1:
            raise ValueError("evaluation: batch_size, min_label_count, bootstrap must be >= 1, max_batches >= 0")
        if not 0.0 <= self.linear_probe_fraction <= 1.0 or self.linear_probe_min_label_count < 1:
            raise ValueError(
                "evaluation: linear_probe_fraction must be in [0, 1], linear_probe_min_label_count >= 1"
            )
        unknown = [m for m in self.maps if m not in MAPS]
        if unknown:
            raise ValueError(f"evaluation.maps: unknown map(s) {unknown}; choose from {', '.join(MAPS)}")


@dataclass
class SweepConfig(ConfigSection):
    """One sweep (see the module docstring)."""

    name: str = "sweep"
    """The sweep's name: its MLflow parent run, the prefix of every run name, the ``mpma.sweep`` tag."""
    base: str = "pretrain_tiny"
    """The base pretraining recipe: a shipped recipe's name or a YAML path."""
    shared: dict[str, Any] = field(default_factory=dict)
    """Recipe overrides of every arm (a recipe tree; see the module docstring): the common budget."""
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Arm name -> its recipe overrides (a recipe tree, ``{}`` = the base recipe as ``shared`` leaves it)."""
    reference: str = "full"
    """The arm every other arm's difference is taken from."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds (``train.seed``); every arm runs every seed, and arm s pairs with the reference's s."""
    output_dir: str = "sweeps/sweep"
    """Where each arm's runs go (``<output_dir>/<arm>/seed<k>/``) and the table (``table.md``)."""
    experiment: str | None = None
    """MLflow experiment of every run of the sweep (default: the base recipe's ``tracking.experiment``)."""
    evaluation: SweepEvalConfig = field(default_factory=SweepEvalConfig)
    """The evaluation protocol."""

    def validate(self) -> None:
        if not self.arms:
            raise ValueError("arms is empty: name at least the reference arm")
        if self.reference not in self.arms:
            raise ValueError(f"reference {self.reference!r} is not an arm; arms: {', '.join(self.arms)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        for arm, tree in self.arms.items():
            if not arm.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"arm name {arm!r}: use letters, digits, '_' and '-' (it names a folder)")
            if not isinstance(tree, Mapping):
                raise ValueError(f"arms.{arm} must be a mapping of recipe overrides, got {tree!r}")

    def arm_overrides(self, arm: str) -> list[str]:
        """``shared`` then the arm's tree, as ``key.sub=value`` overrides (an arm's key after ``shared``'s)."""
        return flatten_overrides(self.shared) + flatten_overrides(self.arms[arm])


def flatten_overrides(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"train": {"max_steps": 5}, "model.overrides": {"w_mlm": 0}}`` -> ``["train.max_steps=5",
    "model.overrides.w_mlm=0"]`` (values as JSON, which the ``--set`` parser reads back as YAML)."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):  # an empty mapping changes nothing (it would wipe the base's keys)
            out += flatten_overrides(value, dotted)
        else:
            out.append(f"{dotted}={json.dumps(value)}")
    return out


def shipped_sweeps() -> dict[str, Path]:
    """The sweep files installed with the package, by name (``ablation_tiny``)."""
    folder = resources.files("mpma_ds") / "sweep"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_sweep(spec: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """A sweep file (a path, or a shipped sweep's name) with ``--set`` overrides (``shared.train.max_steps=50``,
    ``seeds=[0]``); ``ConfigError`` naming the key on anything unknown or invalid."""
    path = Path(spec)
    if not path.is_file():
        path = shipped_sweeps().get(str(spec), path)
    return load_config(SweepConfig, path, overrides or [], what="sweep")
