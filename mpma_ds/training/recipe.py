"""The training recipe: typed sections built by the config engine (``mpma_ds.config``) from YAML + ``--set``.

A pretraining recipe has five parts::

    model:            which architecture (``ModelSection``: ``name`` + ``MPMAConfig`` overrides)
    data:             ``mpma_ds.data.config.DataConfig`` (the loader's settings, composed as is)
    train:            ``TrainConfig`` (batch sizes, schedule, checkpoints, evaluation, faults)
    tracking:         ``mpma_ds.tracking.TrackingConfig`` (MLflow, composed as is)
    deepspeed_config: a DeepSpeed JSON by name (``cpu_zero3``, shipped in ``mpma_ds/ds_configs/``) or path

A fine-tuning recipe (``mpma_ds.tasks.config.FinetuneRecipe``) adds ``task`` and ``init``. Unknown keys, values
of the wrong type and bad values are one ``ConfigError`` line naming the dotted key and the file, before any
work starts; ``load_recipe`` → ``Recipe``; ``save_recipe`` writes the resolved recipe back (``recipe.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from mpma_ds.config import (
    ConfigError,
    ConfigSection,
    apply_overrides,
    blame_override,
    build,
    given_keys,
    load_yaml,
    to_dict,
)
from mpma_ds.data.config import DataConfig
from mpma_ds.tasks.config import InitSection, TaskSection
from mpma_ds.tracking.config import TrackingConfig
from mpma_ds.training.ds_config import find_ds_config

SCHEDULES = ("cosine", "linear", "constant")
RECIPE_FILE = "recipe.yaml"
"""The resolved recipe's name in a run folder (and in an exported folder)."""

RecipeError = ConfigError
"""The error of a recipe that cannot be used (the config engine's ``ConfigError``)."""

R = TypeVar("R", bound="Recipe")


@dataclass
class ModelSection(ConfigSection):
    """Which MPMA architecture to build."""

    SECTION = "model"

    name: str = "mpma_base"
    """A registered architecture (``mpma_ds.list_models()``): ``mpma_tiny``, ``mpma_small``, ``mpma_base``. The
    default is the paper-scale model, whose sizes the ``data`` defaults (288 px, 128 tokens) match."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of ``MPMAConfig`` to change, passed to ``create_model(name, **overrides)`` (e.g.
    ``memory_slots: 0`` for the plain co-attention ablation)."""

    def validate(self) -> None:
        if not self.name:
            raise ValueError("model.name must name an architecture (see mpma_ds.list_models())")
        try:
            self.config  # noqa: B018 -- built once here, so a bad override fails with the recipe
        except ValueError as err:
            raise ValueError(f"model: {str(err).strip(chr(39))}") from err

    @cached_property
    def config(self):  # -> MPMAConfig
        """The ``MPMAConfig`` this section names, built once."""
        from mpma_ds.models import get_model_config

        return get_model_config(self.name, **self.overrides)


@dataclass
class TrainConfig(ConfigSection):
    """Optimisation, schedule, checkpointing, evaluation and fault handling."""

    SECTION = "train"

    global_batch_size: int = 32
    """Samples per optimizer step over all ranks; must equal micro_batch_size × accumulation × world size."""

    micro_batch_size: int = 8
    """Samples per forward/backward on one rank; gradient accumulation makes up the rest of the global batch.
    A resume on another world size lowers it when it does not divide ``global_batch_size / world size``
    (docs/training.md, "Scaling")."""

    max_steps: int = 1000
    """Optimizer steps to train for (the run ends with a checkpoint at this step); 0 = no training, only the
    final evaluation (``zero_shot``). Derived from ``epochs`` when that is set."""

    epochs: float = 0.0
    """> 0: train for this many passes over the training split (after ``data.label_fraction``), i.e.
    ``max_steps = ceil(epochs × steps per epoch)`` — the usual unit of fine-tuning. An explicit ``max_steps``
    > 0 (``--set train.max_steps=20``) wins over it, as in Hugging Face's Trainer; the run says so when it
    starts."""

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

    head_lr_mult: float = 1.0
    """Learning-rate multiplier of a fine-tuning task's head (M3AE trains the VQA head at 50× the backbone's
    rate); pretraining has no head."""

    layer_decay: float = 1.0
    """Layer-wise learning-rate decay of the backbone (BEiT / MAE fine-tuning): a parameter ``k`` layers below
    the top gets ``lr × layer_decay^k``; 1 = off."""

    best_metric: str = ""
    """Validation metric that picks the best checkpoint, kept apart from ``keep_last`` pruning and used for the
    final test evaluation (e.g. ``val/accuracy``); empty = the task's default (pretraining: none)."""

    best_mode: str = "auto"
    """``max``, ``min`` or ``auto`` (``min`` for metric names holding "loss", else ``max``)."""

    early_stopping: int = 0
    """Stop after this many evaluations in a row without a better ``best_metric`` (0 = never)."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""

    output_dir: str = "runs/pretrain"
    """Run folder: recipe.yaml, ds_config.json, checkpoints/, metrics.jsonl, summary.json."""

    save_every: int = 500
    """Save a checkpoint every N steps (0 = only at the end)."""

    keep_last: int = 3
    """Complete checkpoints to keep (older ones are deleted once a newer one is complete)."""

    eval_every: int = 500
    """Evaluate on the validation split every N steps and at the end (0 = never): retrieval / zero-shot AUROC
    for pretraining, the task's metrics for fine-tuning."""

    eval_every_epochs: float = 0.0
    """> 0: evaluate every this many epochs (rounded to whole steps, at least 1) instead of ``eval_every``."""

    eval_batch_size: int = 0
    """Batch size of the validation pass (0 = micro_batch_size)."""

    eval_max_batches: int = 0
    """Validation batches per evaluation (0 = the whole split)."""

    eval_min_label_count: int = 20
    """Pretraining / retrieval evaluation: the zero-shot AUROC counts a CheXpert label only with at least this many
    positives and this many negatives in the validation pass (the others are listed with the reason)."""

    log_every: int = 10
    """Log metrics every N steps (losses are those of the step; rates are averaged since the last log)."""

    seed: int = 42
    """Seed of the model init, the image masking and the data order."""

    grad_checkpointing: bool | None = None
    """Activation checkpointing per transformer block (less memory, ~30 % more compute): true / false switch it
    on / off for every stack; null keeps the architecture's own default (``MPMAConfig.grad_checkpointing``)."""

    compile: bool = False
    """``torch.compile`` every transformer block (ViT, text encoder, MA-CMF fusion, MAE decoder) once, per block
    (``mpma_ds.training.compile``); works with activation checkpointing and ZeRO-3. Off by default: on CPU the
    compiled step is not faster for mpma_tiny / mpma_small and the first step pays minutes of compilation
    (docs/model.md, "Kernels"); on GPUs measure it with ``benchmarks/gpu_check.sh``."""

    max_nan_steps: int = 5
    """A micro-batch whose loss is NaN/Inf on any rank is skipped, and so is an optimizer step whose gradients
    are NaN/Inf (finite loss, non-finite gradient norm; redone on the next micro-batches); after this many such
    skips without an optimizer step in between the run saves a checkpoint and stops with an error."""

    collective_timeout_s: float = 600.0
    """Seconds any collective (all-reduce, barrier, the NCCL watchdog) may wait for the other ranks: a hung or
    dead rank then fails the job with one clear line instead of holding every GPU forever. Raise it for a
    checkpoint save or evaluation that takes longer than this on one rank while the others wait."""

    peak_tflops: float = 0.0
    """Peak FLOP/s (in TFLOP/s) that model FLOP utilisation is measured against; 0 = the device's known dense
    peak (H100/H200 bf16: 989) or, on CPU, a matmul measured at start-up."""

    def validate(self) -> None:
        for name in ("global_batch_size", "micro_batch_size", "log_every", "keep_last", "max_nan_steps",
                     "eval_min_label_count"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        nonnegative = ("max_steps", "warmup_steps", "save_every", "eval_every", "eval_batch_size")
        nonnegative += ("eval_max_batches", "early_stopping", "epochs", "eval_every_epochs")
        nonnegative += ("lr", "min_lr", "weight_decay", "grad_clip", "eps", "peak_tflops")
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"train.collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.head_lr_mult <= 0:
            raise ValueError(f"train.head_lr_mult must be > 0, got {self.head_lr_mult}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"train.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.best_mode not in ("max", "min", "auto"):
            raise ValueError(f"train.best_mode must be max, min or auto, got {self.best_mode!r}")
        if not self.output_dir:
            raise ValueError("train.output_dir must be a folder path")

    def mode_for(self, metric: str) -> str:
        """``max`` or ``min`` for ``metric`` under ``best_mode``."""
        if self.best_mode != "auto":
            return self.best_mode
        return "min" if "loss" in metric else "max"

    def steps_for(self, steps_per_epoch: int) -> tuple[int, int]:
        """``(max_steps, eval_every)`` for a training split of ``steps_per_epoch`` optimizer steps per epoch,
        ``epochs`` / ``eval_every_epochs`` applied where set."""
        max_steps = math.ceil(self.epochs * steps_per_epoch) if self.epochs > 0 else self.max_steps
        every = (
            max(1, round(self.eval_every_epochs * steps_per_epoch))
            if self.eval_every_epochs > 0
            else self.eval_every
        )
        return max_steps, every


@dataclass
class Recipe(ConfigSection):
    """A whole pretraining recipe (see the module docstring)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The architecture."""

    data: DataConfig = field(default_factory=DataConfig)
    """Shards, tokenizer and batch making (``mpma_ds.data.config.DataConfig``)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints, evaluation."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow settings (``mpma_ds.tracking.TrackingConfig``)."""

    deepspeed_config: str = "cpu_zero3"
    """DeepSpeed JSON: a name shipped with mpma-ds (``cpu_zero3``, ``zero3_bf16``, ``zero2_bf16``, ``cpu_zero2``,
    ``zero3_offload``, ``cpu_dp``) or a path (absolute, relative to the working folder, or beside the recipe).
    ``train_batch_size``, ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps`` and
    ``gradient_clipping`` may be ``"auto"`` (filled from ``train``)."""

    notes: list[str] = field(default_factory=list, init=False, compare=False, repr=False)
    """Lines about how the recipe was resolved, printed at the start of the run (not part of the recipe)."""

    kind = "pretrain"

    def validate(self) -> None:
        if self.data.dynamic_padding is None:  # resolved once here, so the saved recipe.yaml says which
            self.data.dynamic_padding = self.kind == "pretrain"
        model = self.model.config
        if self.data.image_size % model.patch_size:
            raise ValueError(
                f"data.image_size={self.data.image_size} is not a multiple of the model's patch_size "
                f"{model.patch_size}"
            )
        if self.data.in_chans != model.in_chans:
            raise ValueError(f"data.in_chans={self.data.in_chans} but the model takes {model.in_chans}")
        if self.data.max_text_len > model.max_text_len:
            raise ValueError(
                f"data.max_text_len={self.data.max_text_len} exceeds the model's max_text_len "
                f"{model.max_text_len}; lower data.max_text_len"
            )
        if self.train.epochs > 0 and self.train.max_steps > 0 and "max_steps" in given_keys(self.train):
            # the Hugging Face Trainer's convention, which users bring: max_steps > 0 wins over epochs. Resolved
            # once here, so the saved recipe.yaml (and a resume from it) says which.
            self.notes.append(
                f"train.max_steps={self.train.max_steps} wins over train.epochs={self.train.epochs} (as in Hugging "
                "Face's Trainer): the run trains for max_steps; set train.max_steps=0 to train by epochs"
            )
            self.train.epochs = 0.0


@dataclass
class FinetuneRecipe(Recipe):
    """A fine-tuning recipe: a pretraining recipe plus ``task`` and ``init`` (``mpma_ds.tasks.config``)."""

    task: TaskSection = field(default_factory=TaskSection)
    """Which task, and its options."""

    init: InitSection = field(default_factory=InitSection)
    """Where the backbone's weights come from."""

    deepspeed_config: str = "cpu_zero2"
    """DeepSpeed JSON (name or path); fine-tuning defaults to ZeRO-2 (``zero2_bf16`` on GPUs)."""

    kind = "finetune"

    def validate(self) -> None:
        super().validate()
        if self.data.mlm_probability > 0:
            raise ValueError(
                f"fine-tuning reads unmasked text: set data.mlm_probability: 0 (got {self.data.mlm_probability})"
            )


def load_recipe(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    *,
    check_files: bool = True,
    cls: type[R] | None = None,
) -> R:
    """Read a YAML recipe (``None``: all defaults), apply ``--set`` overrides and build the typed recipe once.

    Args:
        path: the YAML file.
        overrides: ``key.sub=value`` strings (``--set``).
        check_files: resolve ``deepspeed_config`` to an existing file (a run's saved ``recipe.yaml`` read on
            another machine by evaluation or export passes False).
        cls: ``Recipe`` (pretraining) or ``FinetuneRecipe``; ``None``: a fine-tuning recipe when the file has a
            ``task`` section (or an override sets one), else a pretraining one.

    Raises:
        ConfigError: missing/empty/unreadable file, unknown key, wrong type or bad value (names the key).
    """
    overrides = list(overrides)
    tree: dict[str, Any] = {}
    recipe_dir = None
    source = None
    if path is not None:
        tree = load_yaml(path, what="recipe", hint="pass one of launch/configs/*.yaml to --config")
        recipe_dir = Path(path).resolve().parent
        source = str(path)
    tree = apply_overrides(tree, overrides)
    if cls is None:
        cls = FinetuneRecipe if "task" in tree else Recipe  # type: ignore[assignment]
    try:
        recipe = build(cls, tree, source=source, what="recipe")
    except ConfigError as err:
        raise blame_override(err, overrides, source) from err
    if check_files:
        recipe.deepspeed_config = str(find_ds_config(recipe.deepspeed_config, recipe_dir=recipe_dir))
        check_output_dir(recipe.train.output_dir)
    return recipe


def check_output_dir(output_dir: str | Path) -> None:
    """``train.output_dir`` must be a folder or creatable as one: not a file, not under a file.

    Raises:
        ConfigError: one line naming the path.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.output_dir {path} is a file, not a folder; choose another train.output_dir")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(
            f"train.output_dir {path} lies under {parent}, which is a file; choose another train.output_dir"
        )


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain nested dicts/lists (YAML/JSON-safe); ``load_recipe`` of its YAML gives it back."""
    return to_dict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe as YAML (the run folder's ``recipe.yaml``), atomically and fsynced."""
    import yaml

    from mpma_ds.fileio import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, yaml.safe_dump(to_dict(recipe), sort_keys=False))
