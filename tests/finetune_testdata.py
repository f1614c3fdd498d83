"""Build-once test data for the fine-tuning tests (test_finetune*.py) and benchmarks/bench_finetune.py.

Made once per pytest process (``functools.cache``) under pytest's base temp folder:

- ``ft_shards``: a small synthetic MIMIC-CXR-JPG corpus (frontal films only) → MIMIC shards with a test split
  large enough for AUROC, and the same corpus's synthetic VQA-RAD set → VQA shards (``ft_vqa_shards``);
- ``pretrained``: a 4-step ``mpma_tiny`` pretraining run on train_testdata's tiny shards and tokenizer that logs
  to an MLflow sqlite store, and its exported folder (``export_checkpoint``) — what ``init.from`` points at;
- ``other_arch_export``: an exported ``mpma_tiny_nomem`` (random weights, ``save_pretrained``), for the
  "another architecture" error;
- ``finetune_overrides``: ``--set`` items that turn ``finetune_<task>_tiny.yaml`` into a seconds-long run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from train_testdata import IMAGE_SIZE, ROOT, TINY_RECIPE, tiny_overrides, tiny_shards, tiny_tokenizer

from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus
from data_tools.synth.vqa import generate_vqa

STUDIES = 96
SEED = 11
PRETRAIN_STEPS = 4
PRETRAIN_EXPERIMENT = "ft-test-pretrain"
TASKS = ("vqa", "cls", "linear_probe", "retrieval", "zero_shot")
FINETUNE_LAUNCHER = ROOT / "launch" / "finetune.py"


def recipe_name(task: str) -> str:
    """The packaged tiny recipe of ``task`` (found by name: ``mpma_ds.recipes``)."""
    return f"finetune_{task}_tiny"


@functools.cache
def ft_shards(base: str) -> Path:
    """``<base>/finetune-data/shards``: MIMIC shards (train / validate / test) of a 96-study synthetic corpus."""
    root = Path(base) / "finetune-data"
    generate_corpus(root / "corpus", STUDIES, SEED, min_size=96, max_size=128, lateral_fraction=0.0)
    out = root / "shards"
    build_shards(
        "mimic-cxr", root / "corpus", out, shard_size=32, image_size=IMAGE_SIZE, workers=1, progress=False
    )
    return out


@functools.cache
def ft_vqa_shards(base: str) -> Path:
    """``<base>/finetune-data/vqa_shards``: VQA shards (VQA-RAD layout) of the same corpus's frontal films."""
    root = ft_shards(base).parent
    generate_vqa(root / "corpus", root / "vqa", seed=0, image_size=IMAGE_SIZE, questions_per_image=2)
    out = root / "vqa_shards"
    build_shards("vqa-rad", root / "vqa", out, shard_size=64, image_size=IMAGE_SIZE, progress=False)
    return out


def split_counts(shards: Path) -> dict[str, int]:
    """Samples per split, from the build's manifest."""
    return json.loads((shards / "manifest.json").read_text(encoding="utf-8"))["counts"]


@dataclass(frozen=True)
class Pretrained:
    run_dir: Path
    """The pretraining run folder (recipe.yaml, checkpoints/)."""
    exported: Path
    """Its exported folder (``model.safetensors``, ``text_encoder/`` with the tokenizer, ``export_info.json``)."""
    tracking_uri: str
    run_id: str
    """The pretraining run's MLflow run id."""


@functools.cache
def pretrained(base: str) -> Pretrained:
    """A 4-step mpma_tiny pretraining run (one process, ZeRO-3, MLflow to sqlite) and its export."""
    from mpma_ds.runner.export import export_checkpoint
    from mpma_ds.runner.trainer import train
    from mpma_ds.training import load_recipe

    root = Path(base) / "finetune-data" / "pretrain"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    extra = {
        "train.max_steps": PRETRAIN_STEPS,
        "train.save_every": PRETRAIN_STEPS,
        "train.eval_every": 0,
        "train.log_every": PRETRAIN_STEPS,
        "tracking.enabled": True,
        "tracking.uri": uri,
        "tracking.experiment": PRETRAIN_EXPERIMENT,
    }
    summary = train(load_recipe(TINY_RECIPE, tiny_overrides(base, root / "run", **extra)))
    exported = export_checkpoint(root / "run", root / "exported")
    return Pretrained(root / "run", exported, uri, summary["mlflow_run_id"])


@functools.cache
def other_arch_export(base: str) -> Path:
    """An exported folder of another architecture than ``mpma_tiny`` (``mpma_tiny_nomem``, random weights)."""
    import torch

    import mpma_ds

    out = Path(base) / "finetune-data" / "exported_nomem"
    torch.manual_seed(0)
    mpma_ds.create_model("mpma_tiny_nomem").save_pretrained(out)
    return out


def shards_for(base: str, task: str) -> Path:
    return ft_vqa_shards(base) if task == "vqa" else ft_shards(base)


def finetune_overrides(
    base: str, task: str, out: Path, *, init: str | Path | None = None, **extra: object
) -> list[str]:
    """``--set`` items that turn ``finetune_<task>_tiny.yaml`` into a seconds-long run on the test shards.

    ``init`` defaults to the exported pretraining run (``random`` for the random twin, which also gets the tiny
    tokenizer: it brings none). Global batch 8 = micro 4 × (1 rank × 2 accumulation steps, or 2 ranks), 64 px,
    4 steps, validation every 2, 50 bootstrap resamples, tracking off. ``extra`` adds or replaces items; a value
    of ``None`` drops the item (e.g. ``**{"train.eval_every": None, "train.eval_every_epochs": 1}``).
    """
    shards = shards_for(base, task)
    values: dict[str, object] = {
        "init.from": pretrained(base).exported if init is None else init,
        "data.train_shards": shards / "train",
        "data.val_shards": shards / "validate",
        "data.test_shards": shards / "test",
        "data.image_size": IMAGE_SIZE,
        "data.max_text_len": 32,
        "data.num_workers": 0,
        "data.shuffle_buffer": 16,
        "train.output_dir": out,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.log_every": 1,
        "task.bootstrap": 50,
        "tracking.enabled": False,
    }
    if task == "zero_shot":
        values["train.eval_every"] = 1
    else:
        values.update({"train.epochs": 0, "train.max_steps": 4, "train.warmup_steps": 1, "train.eval_every": 2,
                       "train.eval_every_epochs": 0})  # fmt: skip
    if task == "linear_probe":
        values["task.linear_probe.cache_dir"] = feature_cache(base)
    if str(init) == "random":
        values["data.tokenizer"] = tiny_tokenizer(base)
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items() if v is not None]


def feature_cache(base: str) -> Path:
    """The linear probe's shared feature cache of the in-process runs."""
    return Path(base) / "finetune-data" / "feature_cache"


def set_args(overrides: list[str]) -> list[str]:
    """``--set`` followed by every item (one ``--set`` takes several)."""
    return ["--set", *overrides] if overrides else []


@dataclass(frozen=True)
class Run:
    out: Path
    rc: int
    summary: dict
    stdout: str


@functools.cache
def inprocess_run(base: str, task: str, init: str = "pretrained") -> Run:
    """``mpma_ds.cli.finetune.main`` of ``task`` in this process (1 rank × 2 accumulation steps) from the exported
    pretraining run (``init="pretrained"``) or ``random``, logging to the pretraining run's MLflow store
    (experiment ``ft-test``). Shared by the tests that look at it (one run per task and init)."""
    import contextlib
    import io

    from mpma_ds.cli.finetune import main

    out = Path(base) / "finetune-runs" / f"{task}-{init}"
    extra = {
        "tracking.enabled": True,
        "tracking.uri": pretrained(base).tracking_uri,
        "tracking.experiment": "ft-test",
    }
    overrides = finetune_overrides(base, task, out, init="random" if init == "random" else None, **extra)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["--config", recipe_name(task), "--task", task, *set_args(overrides)])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8")) if rc == 0 else {}
    return Run(out, rc, summary, printed.getvalue())


@functools.cache
def fraction_seed(base: str, kept_at_1pct: tuple[int, int] = (2, 1000)) -> int:
    """The first ``data.label_fraction_seed`` whose 1 % subset of the fine-tuning train split keeps between
    ``kept_at_1pct`` samples (at least 2 by default: one per data rank) and whose 10 % subset keeps more samples
    than that but not all. The corpus has ~40 patients: most seeds keep nobody at 1 %."""
    from mpma_ds.data.shards import load_shard_index
    from mpma_ds.data.subsets import patient_subset, shard_subject_ids

    subjects = shard_subject_ids(load_shard_index(str(ft_shards(base) / "train")))
    low, high = kept_at_1pct
    for seed in range(1000):
        one = int(patient_subset(subjects, 0.01, seed).sum())
        ten = int(patient_subset(subjects, 0.1, seed).sum())
        if low <= one <= high and one < ten < len(subjects):
            return seed
    raise AssertionError(f"no seed keeps {low}..{high} samples at 1 %")


def prepare(base: str) -> None:
    """Everything the fine-tuning tests read, built now (a module fixture calls it once)."""
    tiny_shards(base)
    tiny_tokenizer(base)
    ft_vqa_shards(base)
    pretrained(base)
