"""Build-once test data for the training tests (test_train*.py, test_distributed*.py).

A tiny synthetic MIMIC-CXR-JPG corpus → shards (data_tools.build_shards) → a WordPiece tokenizer
(data_tools.train_tokenizer), made once per pytest process (``lru_cache``) under pytest's base temp folder.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from pathlib import Path

import torch

from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer
from mpma_ds.tracking import read_metrics_jsonl
from mpma_ds.training.checkpoint import tag_for

STUDIES = 48
SEED = 5
IMAGE_SIZE = 64  # the tiny recipe's crops are 64 px in tests
VOCAB = 1024


@functools.cache
def tiny_shards(base: str) -> Path:
    """``<base>/train-data/shards`` with train/validate/test splits of a small synthetic corpus."""
    root = Path(base) / "train-data"
    corpus = root / "corpus"
    generate_corpus(corpus, STUDIES, SEED, min_size=96, max_size=128, lateral_fraction=0.0)
    out = root / "shards"
    build_shards(
        "mimic-cxr", corpus, out, shard_size=16, image_size=IMAGE_SIZE, workers=1, progress=False,
        val_fraction=0.2, test_fraction=0.05,
    )  # fmt: skip
    return out


@functools.cache
def tiny_tokenizer(base: str) -> Path:
    """A WordPiece tokenizer folder trained on the tiny shards' reports (vocabulary <= ``VOCAB``)."""
    out = Path(base) / "train-data" / "tokenizer"
    train_tokenizer(tiny_shards(base), out, VOCAB, min_frequency=1)
    return out


def tiny_export(folder: Path, base: str, image_size: int) -> Path:
    """A freshly initialised ``mpma_tiny`` (seed 1) exported to ``folder`` with the tiny tokenizer as its
    ``text_encoder/``: the model the benchmark tests evaluate."""
    import shutil

    import mpma_ds

    torch.manual_seed(1)
    mpma_ds.create_model("mpma_tiny", image_size=image_size).save_pretrained(folder)
    shutil.copytree(tiny_tokenizer(base), folder / "text_encoder", dirs_exist_ok=True)
    return folder


ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "launch" / "configs" / "pretrain_tiny.yaml"


def prepared_base(tmp_path_factory) -> str:
    """The session's base temp folder with the tiny shards and tokenizer built in it (each built once)."""
    base = str(tmp_path_factory.getbasetemp())
    tiny_shards(base)
    tiny_tokenizer(base)
    return base


def pretrain_argv(overrides: list[str], *extra: str) -> list[str]:
    """``launch/pretrain.py`` arguments: the tiny recipe, ``extra`` flags, then one ``--set`` per override."""
    return ["--config", str(TINY_RECIPE), *extra] + [a for o in overrides for a in ("--set", o)]


def tiny_overrides(base: str, out: Path, **extra: object) -> list[str]:
    """``--set`` overrides that turn pretrain_tiny.yaml into a seconds-long test run on the tiny shards.

    Global batch 8 = micro 4 × (2 ranks × 1, or 1 rank × 2 accumulation steps). ``w_global=0`` because
    the global InfoNCE's negatives are the rank's gathered batch, which differs between 1 rank × 2
    accumulation steps (4 per micro-batch) and 2 ranks (8 gathered); every other term is computed per
    micro-batch and agrees between the two layouts.
    """
    shards = tiny_shards(base)
    values: dict[str, object] = {
        "data.train_shards": shards / "train",
        "data.val_shards": shards / "validate",
        "data.tokenizer": tiny_tokenizer(base),
        "data.image_size": IMAGE_SIZE,
        "data.max_text_len": 32,
        "data.num_workers": 0,
        "data.shuffle_buffer": 16,
        "model.overrides.w_global": 0.0,
        "train.output_dir": out,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.max_steps": 8,
        "train.lr": 2e-3,
        "train.warmup_steps": 1,
        "train.save_every": 2,
        "train.keep_last": 2,
        "train.eval_every": 4,
        "train.log_every": 1,
        "tracking.enabled": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def wait_ok(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait for a launcher started in its own session; on timeout kill its whole group (every rank); exit 0
    or fail with the log's tail."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, f"{log.name}: exited {rc}:\n" + log.read_text()[-4000:]


def step_metric(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of one metric from a run's metrics.jsonl, failing if a step was logged twice."""
    rows = [r for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if key in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    return {r["step"]: r[key] for r in rows}


def consolidated_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The fp32 weights of a run's ZeRO checkpoint at ``step``, gathered by DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag_for(step))
