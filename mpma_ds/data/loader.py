"""`build_loader(cfg, rank, world_size, ...) -> LoaderInfo`: one interface over the DALI, webdataset and
synthetic backends (docs/architecture.md, "Batches")."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from transformers import PreTrainedTokenizerFast

from mpma_ds.data.backends import BACKENDS
from mpma_ds.data.batch import Batch
from mpma_ds.data.config import DataConfig
from mpma_ds.data.subsets import LabelCover
from mpma_ds.tokenizer import load_tokenizer


class BatchStream(Protocol):
    """What every backend returns: an iterable of batches with an exact, resumable position."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass
class LoaderInfo:
    """The loader and what the training loop needs to know about it.

    Attributes:
        loader: iterable of batches; ``train=True``: endless over epochs, ``train=False``: one pass.
        num_samples: samples in the split (all ranks together; ``epoch_length`` when resampled).
        steps_per_epoch: batches per rank per epoch — the same on every rank.
        subset: the label-fraction subset of the train split (`subsets.py`): ``{"fraction", "seed",
            "samples_kept", "samples_total", "patients_kept", "patients_total"}``; ``None`` when the whole
            split is read (``label_fraction`` 1, or another split). ``num_samples`` counts the kept samples.
    """

    loader: BatchStream
    num_samples: int
    steps_per_epoch: int
    subset: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Exact position (epoch, batches consumed in it, ...): small and JSON-able."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the next batches equal those an uninterrupted loader would give."""
        self.loader.load_state_dict(state)

    def stats(self) -> dict[str, int]:
        """Counters for logging, e.g. ``{"skipped_samples": 3, "epoch": 1}``."""
        return self.loader.stats()

    def close(self) -> None:
        """Stop workers / pipelines."""
        self.loader.close()


def split_shards(cfg: DataConfig, split: str) -> str:
    """The shard spec of ``split``: ``train`` → ``train_shards``; ``validate``/``val`` → ``val_shards``;
    ``test`` → ``test_shards`` (``val_shards`` when that is empty)."""
    if split == "train":
        return cfg.train_shards
    if split == "test" and cfg.test_shards:
        return cfg.test_shards
    if split in ("validate", "val", "valid", "test"):
        return cfg.val_shards
    raise ValueError(f"unknown split {split!r}: use train, validate or test")


def label_fraction_of(cfg: DataConfig, split: str) -> tuple[float, int]:
    """``(fraction, seed)`` of the label-fraction subset ``split`` is read with: the recipe's on the train
    split, the whole split (1.0) on every other."""
    return (cfg.label_fraction, cfg.label_fraction_seed) if split == "train" else (1.0, 0)


def build_loader(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    *,
    split: str = "train",
    batch_size: int,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    train: bool = True,
    cover: LabelCover | None = None,
) -> LoaderInfo:
    """Build the batch stream of ``split`` for process ``rank`` of ``world_size``.

    Args:
        cfg: the recipe's ``data:`` section.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel processes; every rank gets the same number of batches.
        split: ``train`` (``cfg.train_shards``), ``validate`` (``cfg.val_shards``) or ``test``
            (``cfg.test_shards``, else ``cfg.val_shards``).
        batch_size: samples per batch on this rank (the micro-batch).
        tokenizer: a fast tokenizer; ``None`` loads ``cfg.tokenizer``.
        seed: makes shard order, sample shuffle, augmentation and masking reproducible (and rank-distinct).
        train: True: endless over epochs, shuffled, augmented. False: one deterministic pass in shard and
            file order, no augmentation, masking with a fixed seed (so validation MLM losses are comparable)
            — also over the train split, e.g. to extract features of every training sample once.
        cover: the train split's positives (in its index order), from the task that reads labels: required
            by ``data.label_fraction_cover`` with a fraction below 1 (`subsets.cover_labels`), else unused.

    Raises:
        ValueError: a bad rank / batch size, an unknown split, or a label fraction that keeps no sample.
        FileNotFoundError: missing shards, a shard without ``.idx``, a split with no readable sample.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None:
        if not cfg.tokenizer:
            raise ValueError("data.tokenizer is empty: set it to a tokenizer folder (data_tools.train_tokenizer)")

        tokenizer = load_tokenizer(cfg.tokenizer)
    fraction, fraction_seed = label_fraction_of(cfg, split)
    covering = cfg.label_fraction_cover and fraction < 1.0
    if covering and cover is None:
        raise ValueError(
            "data.label_fraction_cover needs the labels of the train split: a task that reads them (cls, "
            "linear_probe) gives them; set it false for this task"
        )
    common = dict(
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        tokenizer=tokenizer,
        seed=seed,
        train=train,
        split=split,
        label_fraction=fraction,
        label_fraction_seed=fraction_seed,
    )
    stream_cls = BACKENDS[cfg.backend]  # DataConfig validated the name
    own_samples = getattr(stream_cls, "makes_own_samples", False)
    if covering:  # only then: a backend that predates coverage is built as before
        if own_samples:
            raise ValueError(
                f"data.label_fraction_cover needs shards; the {cfg.backend} backend makes its own samples"
            )
        common["cover"] = cover
    shards = "" if own_samples else split_shards(cfg, split)
    stream: Any = stream_cls(cfg, shards, **common)
    return LoaderInfo(
        loader=stream, num_samples=stream.num_samples, steps_per_epoch=stream.steps_per_epoch, subset=stream.subset
    )
