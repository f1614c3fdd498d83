"""What the three backends share, in one place: the shard stream base, the stand-in policy for bad
samples, the report encoder and the per-batch masking generator.

`wds_backend`, `dali_backend` and `synthetic` are siblings: each imports from here (and from `plan`,
`samples`, `batch`, `shards`, `transforms`), never from another backend.

**Stand-in policy.** A sample that turns out unreadable while its batch is made (`SampleError`: a corrupt
JPEG, undecodable or empty text, bad JSON) is skipped and counted under its reason — unless its slot was
already remainder padding (``valid = False``), which would count it twice. Its slot is then filled with a
repeat of a good sample of the same batch, flagged ``valid = False``, so the batch size and the number of
batches per rank never change. A batch with no good sample at all is a clear error.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from data_tools.shard_format import VQA_SOURCES
from mpma_ds.data.batch import Batch, make_batch
from mpma_ds.data.config import DataConfig
from mpma_ds.data.masking import ReportEncoder, batch_generator, finding_words_of
from mpma_ds.data.mixture import Mixture, combine, mixture_stream
from mpma_ds.data.plan import SAMPLES_PREFIX, EpochStream, steps_per_epoch
from mpma_ds.data.samples import SampleError, SampleReader, decode_meta
from mpma_ds.data.shard_cache import ShardCache
from mpma_ds.data.shards import ShardIndex, load_shard_index
from mpma_ds.data.subsets import LabelCover, label_fraction_index
from mpma_ds.data.transforms import XrayTransform

EVAL_MASK_SALT = 0xE7A1
T = TypeVar("T")


def mask_generator(seed: int, epoch: int, rank: int, batch: int, train: bool) -> torch.Generator:
    """Masking RNG of one batch; eval ignores the epoch so every validation pass masks alike."""
    return (
        batch_generator(seed, epoch, rank, batch) if train else batch_generator(seed, EVAL_MASK_SALT, rank, batch)
    )


def encoder_from_config(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> ReportEncoder:
    """The report encoder (tokenise, pad, whole-word MLM masking) the recipe's ``data:`` section asks for."""
    return ReportEncoder(
        tokenizer,
        cfg.max_text_len,
        probability=cfg.mlm_probability,
        mask_fraction=cfg.mlm_mask_fraction,
        random_fraction=cfg.mlm_random_fraction,
        whole_word=cfg.whole_word_mask,
        pad_to_multiple=cfg.pad_to if cfg.dynamic_padding else 0,
        finding_probability=cfg.mlm_finding_probability,
        finding_words=finding_words_of(cfg.mlm_finding_classes),
    )


@dataclass(frozen=True, slots=True)
class SampleRow:
    """One good sample of a batch as a backend holds it before collating."""

    image: Any
    """``wds``: the transformed (C, S, S) tensor; ``dali``: the JPEG bytes (uint8 array) still to decode."""
    text: str
    meta: dict[str, Any]
    key: str
    valid: bool
    size: tuple[int, int] = (0, 0)
    """``(width, height)`` of the source image, where the backend needs it before decoding (``dali``)."""


def read_batch_rows(
    slots: Iterable[tuple[T, bool]], read: Callable[[int, T, bool], SampleRow], *, where: str
) -> tuple[list[SampleRow], Counter]:
    """Read a batch's slots under the stand-in policy (module docstring).

    Args:
        slots: ``(item, valid)`` per slot, in batch order: what ``read`` needs to read the slot, and whether
            the slot is a real sample (False: remainder padding).
        read: ``read(slot, item, valid) -> SampleRow``; raises `SampleError` for an unusable sample.
        where: names the batch in the error message (``"batch 3 (epoch 0, rank 1)"``).

    Returns:
        ``(rows, skipped)``: as many rows as slots — the good ones in slot order, then the stand-ins — and
        the skipped samples by reason.

    Raises:
        RuntimeError: no slot of the batch is readable.
    """
    rows: list[SampleRow] = []
    skipped: Counter = Counter()
    size = 0
    for slot, (item, ok) in enumerate(slots):
        size += 1
        try:
            rows.append(read(slot, item, ok))
        except SampleError as err:
            if ok:  # a padding repeat of a bad sample is not counted twice
                skipped[err.reason] += 1
    if not rows:
        raise RuntimeError(
            f"every sample of {where} is unreadable ({dict(skipped)}); "
            "check the shards with python -m data_tools.verify_shards"
        )
    good = len(rows)
    rows += [dataclasses.replace(rows[fill % good], valid=False) for fill in range(size - good)]
    return rows, skipped


def collate_rows(
    rows: list[SampleRow], images: list[torch.Tensor] | torch.Tensor, encoder: ReportEncoder, gen: torch.Generator
) -> Batch:
    """`make_batch` over ``rows`` with their ``images`` (decoded, transformed: (C, S, S) each or (B, C, S, S))."""
    return make_batch(
        images,
        [r.text for r in rows],
        [r.meta for r in rows],
        [r.key for r in rows],
        [r.valid for r in rows],
        encoder,
        gen,
    )


class ShardStream(EpochStream):
    """What both shard backends (wds, dali) share: the shard index (cut to the label-fraction subset when
    ``label_fraction < 1``), the epoch length (declared when resampled), the per-rank step count, the report
    encoder and the image transform."""

    def __init__(
        self,
        cfg: DataConfig,
        shards: str,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        tokenizer: PreTrainedTokenizerFast,
        seed: int,
        train: bool,
        split: str = "train",
        label_fraction: float = 1.0,
        label_fraction_seed: int = 0,
        cover: LabelCover | None = None,
    ) -> None:
        self.cfg = cfg
        self.mixture: Mixture | None = None
        if split == "train" and cfg.train_sources:
            index, self.mixture = load_mixture(cfg)
        else:
            index = load_shard_index(shards)
        self.index, subset = label_fraction_index(
            index, label_fraction, label_fraction_seed, split=split, cover=cover
        )
        self.batch_size = batch_size
        if self.mixture is not None:
            self.resample_to = cfg.epoch_length or self.index.num_samples
            self._source_of = self.mixture.source_of_shard()[self.index.shard_of]  # (N,) source of each sample
        else:
            self.resample_to = (cfg.epoch_length or self.index.num_samples) if (cfg.resampled and train) else 0
        total = self.resample_to or self.index.num_samples
        super().__init__(
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            steps=steps_per_epoch(total, world_size, batch_size),
            num_samples=total,
            subset=subset,
        )
        self.encoder = encoder_from_config(cfg, tokenizer)
        self.transform = XrayTransform(cfg, train)

    def _base_skipped(self) -> Counter:
        return Counter(self.index.skipped)

    def shard_cache(self) -> ShardCache:
        """The node-local cache remote shards are fetched into where a local file is needed (`shard_cache`)."""
        return ShardCache(self.cfg.shard_cache, self.cfg.shard_cache_gb)

    def epoch_stream(self, epoch: int) -> np.ndarray | None:
        """The mixture's sample sequence of ``epoch`` (`mixture.mixture_stream`); None for one source."""
        if self.mixture is None:
            return None
        return mixture_stream(
            self.index.counts(), self.mixture, epoch=epoch, seed=self.seed, epoch_length=self.resample_to
        )

    def source_counts(self, ids: np.ndarray, valid: np.ndarray) -> dict[str, int]:
        """``{"samples/<name>": n}`` of a batch's valid samples per mixture source (empty for one source);
        carried with the skip counts (`plan.is_counter`) so they reach ``stats()`` and survive a resume."""
        if self.mixture is None:
            return {}
        found = np.bincount(self._source_of[ids[valid]], minlength=len(self.mixture.names))
        return {f"{SAMPLES_PREFIX}{name}": int(n) for name, n in zip(self.mixture.names, found.tolist()) if n}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.mixture is not None:
            state["mixture"] = self.mixture.describe()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.mixture.describe() if self.mixture is not None else None
        if state.get("mixture") != mine:
            raise ValueError(
                f"loader state is for the mixture {state.get('mixture')}; this run has {mine}: exact resume "
                "needs the same data.train_sources names and weights"
            )
        super().load_state_dict(state)


def load_mixture(cfg: DataConfig) -> tuple[ShardIndex, Mixture]:
    """The combined index of ``cfg.train_sources`` and its `Mixture`; sources of different sample kinds
    (image-report and VQA) are refused with one line."""
    indexes, kinds = [], {}
    for source in cfg.train_sources:
        index = load_shard_index(source.shards)
        indexes.append(index)
        kinds[source.name] = sample_kind(index)
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"data.train_sources mixes sample kinds {kinds}: every source of one mixture must hold the same kind "
            "(image-report pretraining data or VQA), so give each kind its own recipe"
        )
    bounds = np.cumsum([0] + [len(ix.paths) for ix in indexes]).tolist()
    mixture = Mixture(
        names=tuple(s.name for s in cfg.train_sources),
        weights=tuple(float(s.weight) for s in cfg.train_sources),
        shard_ranges=tuple(zip(bounds[:-1], bounds[1:])),
    )
    return combine(indexes), mixture


def sample_kind(index: ShardIndex) -> str:
    """``vqa`` or ``report``: the kind of the first sample of ``index``, from its JSON ``source`` field."""
    offset, size = index.member("json")[0].tolist()
    reader = SampleReader(index)
    try:
        meta = decode_meta(reader.read_member(int(index.shard_of[0]), offset, size) if offset >= 0 else b"")
    except SampleError:
        meta = {}
    finally:
        reader.close()
    return "vqa" if meta.get("source") in VQA_SOURCES else "report"
