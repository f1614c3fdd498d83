"""The pretraining recipe: typed dataclasses loaded from YAML plus ``--set a.b=c`` overrides.

A recipe has five parts::

    model:            which architecture (``mpma_ds.create_model(name, **overrides)``)
    data:             ``mpma_ds.data.config.DataConfig`` (the loader's settings, composed as is)
    train:            ``TrainConfig`` (batch sizes, schedule, checkpoints, evaluation, faults)
    tracking:         ``mpma_ds.tracking.TrackingConfig`` (MLflow, composed as is)
    deepspeed_config: path of a DeepSpeed JSON (``ds_configs/*.json``)

Unknown keys and values of the wrong type are errors that name the dotted key (``train.lr``), raised as
``RecipeError`` before any work starts. ``load_recipe`` → ``Recipe``; ``recipe_to_dict`` / ``save_recipe``
write the resolved recipe back (the run folder's ``recipe.yaml``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mpma_ds.data.config import DataConfig
from mpma_ds.tracking.config import TrackingConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEDULES = ("cosine", "linear", "constant")


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown key, wrong type, bad value, missing file. One line, names the key."""


@dataclass
class ModelSection:
    """Which MPMA architecture to build."""

    name: str = "mpma_tiny"
    """A registered architecture (``mpma_ds.list_models()``): ``mpma_tiny``, ``mpma_small``, ``mpma_base``."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of ``MPMAConfig`` to change, passed to ``create_model(name, **overrides)`` (e.g.
    ``memory_slots: 0`` for the plain co-attention ablation)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise RecipeError("model.name must name an architecture (see mpma_ds.list_models())")


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing, evaluation and fault handling."""

    global_batch_size: int = 32
    """Samples per optimizer step over all ranks; must equal micro_batch_size × accumulation × world size."""

    micro_batch_size: int = 8
    """Samples per forward/backward on one rank; gradient accumulation makes up the rest of the global batch."""

    max_steps: int = 1000
    """Optimizer steps to train for (the run ends with a checkpoint at this step)."""

    lr: float = 1.5e-4
    """Peak learning rate (after warm-up)."""

    min_lr: float = 1.0e-6
    """Learning rate at the end of the cosine / linear decay."""

    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to ``lr``."""

    schedule: str = "cosine"
    """Decay after warm-up: ``cosine``, ``linear`` (both down to ``min_lr`` at ``max_steps``) or ``constant``."""

    weight_decay: float = 0.05
    """AdamW weight decay; never applied to norms, biases, embeddings, the temperature or the memory slots."""

    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""

    eps: float = 1.0e-8
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""

    output_dir: str = "runs/pretrain"
    """Run folder: recipe.yaml, ds_config.json, checkpoints/, metrics.jsonl, summary.json."""

    save_every: int = 500
    """Save a checkpoint every N steps (0 = only at the end)."""

    keep_last: int = 3
    """Complete checkpoints to keep (older ones are deleted once a newer one is complete)."""

    eval_every: int = 500
    """Evaluate retrieval / zero-shot AUROC on the validation split every N steps and at the end (0 = never)."""

    eval_batch_size: int = 0
    """Batch size of the validation pass (0 = micro_batch_size)."""

    eval_max_batches: int = 0
    """Validation batches per evaluation (0 = the whole split)."""

    log_every: int = 10
    """Log metrics every N steps (losses are those of the step; rates are averaged since the last log)."""

    seed: int = 42
    """Seed of the model init, the image masking and the data order."""

    grad_checkpointing: bool = False
    """Activation checkpointing per transformer block (less memory, ~30 % more compute)."""

    max_nan_steps: int = 5
    """A step whose loss is NaN/Inf on any rank is skipped; after this many in a row the run saves a
    checkpoint and stops with an error."""

    peak_tflops: float = 0.0
    """Peak FLOP/s (in TFLOP/s) that model FLOP utilisation is measured against; 0 = the device's known dense
    peak (H100/H200 bf16: 989) or, on CPU, a matmul measured at start-up."""

    def __post_init__(self) -> None:
        positive = (
            "global_batch_size",
            "micro_batch_size",
            "max_steps",
            "log_every",
            "keep_last",
            "max_nan_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise RecipeError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_every", "eval_batch_size", "eval_max_batches"):
            if getattr(self, name) < 0:
                raise RecipeError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps", "peak_tflops"):
            if getattr(self, name) < 0:
                raise RecipeError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise RecipeError(f"train.lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise RecipeError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise RecipeError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.output_dir:
            raise RecipeError("train.output_dir must be a folder path")


@dataclass
class Recipe:
    """A whole pretraining recipe (see the module docstring)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The architecture."""

    data: DataConfig = field(default_factory=DataConfig)
    """Shards, tokenizer and batch making (``mpma_ds.data.config.DataConfig``)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints, evaluation."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow settings (``mpma_ds.tracking.TrackingConfig``)."""

    deepspeed_config: str = "ds_configs/cpu_zero3.json"
    """DeepSpeed JSON; a relative path is looked up in the working folder, beside the recipe, then in the
    repository root. ``train_batch_size``, ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``
    and ``gradient_clipping`` may be ``"auto"`` (filled from ``train``)."""


# --------------------------------------------------------------------------------------------- typed building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and lightly coerced to) the annotation ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if errors else f"{key}: null is not allowed")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise RecipeError(f"{key} must be a mapping of keys, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key} must be a string, got {value!r}")
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise RecipeError(f"{key} must have {len(args)} values, got {list(value)}")
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        inner = args[0] if args else Any
        items = [_convert(v, args[i] if fixed else inner, key) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


def build_dataclass(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys and wrong types raise ``RecipeError`` naming
    ``prefix.key``; a section's own ``__post_init__`` checks become ``RecipeError`` too."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        choices = ", ".join(sorted(known))
        raise RecipeError(f"unknown recipe key {names}; valid keys{' in ' + prefix if prefix else ''}: {choices}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as err:
        raise RecipeError(str(err)) from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` → ``(["train", "lr"], "3e-4")``; the value is read as YAML (``[1, 2]``, ``true``)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key.sub=value (e.g. --set train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: the key is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {text!r}: the value is not valid YAML ({err.problem})") from err
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each ``a.b=c`` in the nested dict ``tree`` (in place; returns it). Unknown keys are caught later by
    the typed build, except under free-form mappings (``model.overrides``, ``data.extra``)."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(path[: depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def resolve_path(path: str, *, recipe_dir: Path | None = None) -> Path:
    """A recipe path as an existing file: as given (absolute or relative to the working folder), else beside
    the recipe, else relative to the repository root. Returns the first candidate when none exists."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        if recipe_dir is not None:
            candidates.append(recipe_dir / path)
        candidates.append(REPO_ROOT / path)
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    return candidates[0]


def load_recipe(path: str | Path | None, overrides: Iterable[str] = ()) -> Recipe:
    """Read a YAML recipe (``None``: all defaults), apply ``--set`` overrides and build the typed ``Recipe``.

    Raises:
        RecipeError: missing/unreadable file, unknown key, wrong type or bad value (the message names the key).
    """
    tree: dict[str, Any] = {}
    recipe_dir = None
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise RecipeError(f"recipe {file} does not exist; pass one of launch/configs/*.yaml to --config")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {file} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"recipe {file} must be a mapping of sections (model, data, train, ...)")
        tree = loaded or {}
        recipe_dir = file.resolve().parent
    tree = apply_overrides(tree, overrides)
    recipe = build_dataclass(Recipe, tree, "")
    ds_path = resolve_path(recipe.deepspeed_config, recipe_dir=recipe_dir)
    if not ds_path.is_file():
        raise RecipeError(
            f"deepspeed_config {recipe.deepspeed_config} does not exist; name one of ds_configs/*.json"
        )
    recipe.deepspeed_config = str(ds_path)
    return recipe


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain nested dicts/lists (YAML/JSON-safe); ``load_recipe`` of its YAML gives it back."""
    return _plain(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe as YAML (the run folder's ``recipe.yaml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")
    return path
