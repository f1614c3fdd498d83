"""The supervised bound of the demo's zero-shot AUROC: what the same image encoder reaches, at the same budget,
when it is taught the answer itself.

Zero-shot AUROC learns from the reports; here the pretraining recipe's image encoder (its ``model.name`` and
``model.overrides``, from random weights) and a linear head are trained by the Trainer with binary cross-entropy
on the synthetic ground truth — the ``cls`` task with ``task.cls.labels: truth``, the zero-shot metric's own
reference — on the same shards, loader, augmentation, global batch, learning-rate schedule and number of steps
as the pretraining (`Budget`), and scored on the validation split as the zero-shot metric is: macro AUROC over
the labels with >= ``min_count`` positives and negatives of the truth, with a bootstrap 95 % interval (the
validation split is given as the run's ``data.test_shards``, whose final pass carries the interval). A classifier
taught the labels is an upper bound of what report supervision buys in the same updates.

The bound depends only on the corpus, the encoder and the budget, so it is measured once and cached under
`default_cache_dir` (``$MPMA_CACHE_DIR`` or ``~/.cache/mpma-ds``) by `bound_key`: the digest of the shard
manifest's contents (`corpus_digest`: each shard's name and sha256, not where it lies), the model config but for
the pretraining-only settings (`PRETRAINING_ONLY`: loss weights and masking, which build no layer) and the budget.
A rerun of ``make demo`` on the same corpus, ``--fresh`` included, reads it back in milliseconds.
``benchmarks/bench_supervised_bound.py`` runs the same measurement over other stems and budgets.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpma_ds.fileio import atomic_write_text
from mpma_ds.recipes import find_recipe
from mpma_ds.runner.trainer import train
from mpma_ds.tracking.params import json_safe
from mpma_ds.training.recipe import FinetuneRecipe, Recipe, load_recipe

BOUND_RECIPE = "finetune_cls_tiny"
"""The fine-tuning recipe the bound runs (``cls``: image encoder + linear head, trained end to end)."""
CACHE_ENV = "MPMA_CACHE_DIR"
CACHE_VERSION = 2
"""Part of every key: a change to how the bound is measured must not read an older measurement (2: the
`PRETRAINING_ONLY` settings left the key)."""
PRETRAINING_ONLY = (
    "image_mask_ratio", "align_on", "w_mlm", "w_mim", "w_global", "w_local", "local_exclude_masked_tokens",
    "mlm_masked_only", "mim_masked_only", "norm_pix_loss",
)  # fmt: skip
"""Model settings the bound does not depend on: they shape only the pretraining loss (what is masked, which
pass is aligned, how the terms weigh) and build no layer, and the bound's classifier reads the whole film
(`MPMA.image_features`). A recipe that changes only these reads the same cached bound. (``w_itm`` stays in the
key: above 0 it builds the ITM head, which moves the random initialisation of the layers built after it.)"""


@dataclass(frozen=True)
class Budget:
    """What "the same budget" holds equal: the updates, their size and schedule, the data's preprocessing."""

    steps: int
    global_batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    schedule: str
    weight_decay: float
    grad_clip: float
    seed: int
    image_size: int
    augment: bool

    @classmethod
    def of(cls, recipe: Recipe) -> Budget:
        """The budget of a pretraining recipe (its ``train`` and ``data`` sections)."""
        t, d = recipe.train, recipe.data
        return cls(
            steps=t.max_steps,
            global_batch_size=t.global_batch_size,
            lr=t.lr,
            min_lr=t.min_lr,
            warmup_steps=t.warmup_steps,
            schedule=t.schedule,
            weight_decay=t.weight_decay,
            grad_clip=t.grad_clip,
            seed=t.seed,
            image_size=d.image_size,
            augment=d.augment,
        )


def corpus_digest(shards: str | Path) -> str:
    """sha256 over the shard build's contents: every shard's name and sha256 in ``shards/manifest.json``."""
    manifest = Path(shards) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: the supervised bound needs a shard build's manifest")
    entries = sorted((s["name"], s["sha256"]) for s in json.loads(manifest.read_text(encoding="utf-8"))["shards"])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$MPMA_CACHE_DIR/supervised_bound``, else ``$XDG_CACHE_HOME/mpma-ds/...``, else ``~/.cache/mpma-ds/...``."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpma-ds")
    return Path(root) / "supervised_bound"


def bound_inputs(shards: str | Path, recipe: Recipe, min_count: int) -> dict[str, Any]:
    """What the bound depends on (and nothing else: no path, no tracking): the key's preimage."""
    return {
        "version": CACHE_VERSION,
        "corpus": corpus_digest(shards),
        "model": recipe.model.name,
        "model_config": json_safe(
            {k: v for k, v in dataclasses.asdict(recipe.model.config).items() if k not in PRETRAINING_ONLY}
        ),
        "budget": dataclasses.asdict(Budget.of(recipe)),
        "min_count": min_count,
    }


def bound_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


def bound_overrides(
    shards: Path, tokenizer: str | Path, recipe: Recipe, min_count: int, out_dir: Path
) -> list[str]:
    """``--set`` overrides of `BOUND_RECIPE` for the bound of ``recipe``'s encoder and budget."""
    b = Budget.of(recipe)
    sets = [
        "init.from=random",
        f"model.name={recipe.model.name}",
        "task.cls.labels=truth",
        f"task.cls.min_label_count={min_count}",
        f"data.train_shards={shards / 'train'}",
        f"data.val_shards={shards / 'validate'}",
        f"data.test_shards={shards / 'validate'}",  # the zero-shot's split, scored once with its interval
        f"data.tokenizer={tokenizer}",
        f"data.image_size={b.image_size}",
        f"data.augment={str(b.augment).lower()}",
        f"train.max_steps={b.steps}",
        f"train.global_batch_size={b.global_batch_size}",
        f"train.micro_batch_size={b.global_batch_size}",  # one process: no accumulation
        f"train.lr={b.lr}",
        f"train.min_lr={b.min_lr}",
        f"train.warmup_steps={b.warmup_steps}",
        f"train.schedule={b.schedule}",
        f"train.weight_decay={b.weight_decay}",
        f"train.grad_clip={b.grad_clip}",
        f"train.seed={b.seed}",
        "train.head_lr_mult=1.0",  # the encoder and head at the pretraining's lr, as the bench measured it
        "train.layer_decay=1.0",
        "train.eval_every=0",  # no checkpoint choice on the split it is scored on: the last weights
        "train.eval_every_epochs=0",
        "train.early_stopping=0",
        f"train.output_dir={out_dir}",
    ]
    sets += [f"model.overrides.{k}={json.dumps(v)}" for k, v in recipe.model.overrides.items()]
    return sets


def measure_bound(overrides: list[str]) -> dict[str, Any]:
    """Run `BOUND_RECIPE` with ``overrides`` through the Trainer; the bound from its final (validation) pass. The
    run folder is the measurement's own: a run an interrupted measurement left there is replaced."""
    summary = train(load_recipe(find_recipe(BOUND_RECIPE), overrides, cls=FinetuneRecipe), overwrite=True)
    test = summary.get("test") or {}
    return {
        "auroc": test.get("test/auroc_macro"),
        "ci95": test.get("test/auroc_macro_ci95"),
        "labels": test.get("test/labels_used"),
        "labels_left_out": test.get("test/labels_left_out"),
        "train_seconds": summary.get("wall_s"),
        "steps": summary.get("step"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
    }


def supervised_bound(
    shards: str | Path,
    tokenizer: str | Path,
    recipe: Recipe,
    *,
    out_dir: str | Path,
    min_count: int,
    cache_dir: str | Path | None = None,
    tracking: list[str] = (),
    measure: bool = True,
) -> dict[str, Any]:
    """The bound of ``recipe``'s image encoder and budget on ``shards``: read from the cache, else measured (run
    folder ``out_dir``, ``tracking``: extra ``tracking.*`` overrides) and cached — or, with ``measure=False``, left
    unknown (``"auroc": None``, ``"measured": False``). Returns ``{"auroc", "ci95", "labels", "labels_left_out",
    "train_seconds", "steps", "mlflow_run_id", "key", "inputs", "measured_at", "cached": bool, "cache_file"}``."""
    shards = Path(shards)
    inputs = bound_inputs(shards, recipe, min_count)
    key = bound_key(inputs)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{key}.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            found = None  # a damaged entry is measured again and replaced
        if found and found.get("inputs") == inputs:
            return {**found, "cached": True, "measured": True, "cache_file": str(path)}
    if not measure:  # the caller only reads the cache: the bound stays unknown (its targets "not measured")
        return {"auroc": None, "ci95": None, "steps": inputs["budget"]["steps"], "key": key, "inputs": inputs,
                "cached": False, "measured": False, "cache_file": str(path)}  # fmt: skip
    start = time.monotonic()
    result = measure_bound([*bound_overrides(shards, tokenizer, recipe, min_count, Path(out_dir)), *tracking])
    result.update(
        key=key,
        inputs=inputs,
        measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=time.monotonic() - start,
    )
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(json_safe(result), indent=1) + "\n")
    return {**result, "cached": False, "measured": True, "cache_file": str(path)}
