"""`DataConfig`: the recipe's ``data:`` section — where the shards are and how batches are made.

Every field carries a docstring; types are checked by the config engine (``mpma_ds.config``), the value rules
are ``validate()``, so a wrong value is a clear error naming the field before any work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mpma_ds.config import ConfigSection
from mpma_ds.data.backends import BACKENDS
from mpma_ds.data.masking import finding_words_of


@dataclass
class TrainSource(ConfigSection):
    """One source of a weighted training mixture (``data.train_sources``)."""

    SECTION = "data.train_sources"

    name: str = ""
    """The source's name: letters, digits, ``_``, ``-``, ``.``; its samples seen are logged as
    ``data/samples/<name>``."""

    shards: str = ""
    """Its shards, in any form ``data.train_shards`` takes (folder, glob, brace, comma list, remote URLs)."""

    weight: float = 1.0
    """Its share of every epoch is ``weight / sum(weights)`` (> 0)."""

    val_shards: str = ""
    """Optional validation shards of this source: each evaluation then also reports the task's metrics on them
    as ``eval/<name>/<metric>`` (beside ``eval/<metric>`` on ``data.val_shards``)."""

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"data.train_sources: name {self.name!r} must be letters, digits, _, - or .")
        if not self.shards:
            raise ValueError(f"data.train_sources {self.name!r}: shards is empty; give its shard folder")
        if not self.weight > 0:
            raise ValueError(f"data.train_sources {self.name!r}: weight must be > 0, got {self.weight}")


@dataclass
class DataConfig(ConfigSection):
    """How shards become batches (SPEC §4.2 → the batch contract in docs/architecture.md)."""

    SECTION = "data"

    backend: str = "wds"
    """``dali`` (DALI reader + decode, GPU ``mixed`` decode when CUDA is there), ``wds`` (webdataset + PIL +
    torch DataLoader workers; the path for machines without DALI) or ``synthetic`` (in-memory batches)."""

    train_shards: str = ""
    """Training shards: a folder holding ``shard-*.tar``, a glob (``data/train/shard-*.tar``) or a brace
    pattern (``data/train/shard-{000000..000099}.tar``). Each tar needs its ``.idx`` beside it. The same
    forms on object stores: ``s3://bucket/prefix/train/`` (a prefix listed through the store's API),
    ``gs://...``, ``https://...`` (a brace pattern needs no listing), and ``pipe:CMD`` (docs/data_pipeline.md,
    "Remote shards"); credentials come from each store's standard chain."""

    train_sources: list[TrainSource] = field(default_factory=list)
    """A weighted mixture instead of ``train_shards``: ``[{name: mimic, shards: ..., weight: 3}, {name: roco,
    shards: ..., weight: 1}]``. Each epoch is ``epoch_length`` samples (0 = the sources' sizes summed), each
    source's share of it exactly its weight's (a small source repeats, a large one continues next epoch); the
    order is deterministic from the seed and resumes exactly mid-epoch (``mpma_ds.data.mixture``). Every source
    must hold the same kind of sample (image-report or VQA). ``wds`` backend. A source's optional ``val_shards``
    are evaluated too, as ``eval/<name>/<metric>``."""

    val_shards: str = ""
    """Validation shards, same forms as ``train_shards``; used by ``split="validate"`` (or ``"val"``)."""

    test_shards: str = ""
    """Test shards, same forms; used by ``split="test"``. Empty: ``split="test"`` reads ``val_shards`` (tools
    that evaluate one folder point ``val_shards`` at it)."""

    tokenizer: str = ""
    """Folder of a Hugging Face fast tokenizer (ours from ``data_tools.train_tokenizer`` or any HF folder)."""

    image_size: int = 288
    """Side of the square image tensor the model receives, in pixels."""

    in_chans: int = 1
    """Image channels: 1 (grayscale, as stored) or 3 (the gray value repeated)."""

    max_text_len: int = 128
    """Tokens per report including ``[CLS]``/``[SEP]``; longer reports are truncated, shorter padded to it."""

    dynamic_padding: bool | None = None
    """Pad each batch's text only to its longest report, rounded up to a multiple of ``pad_to`` (at most
    ``max_text_len``), instead of always to ``max_text_len``: less text-encoder and fusion work, and a batch
    without padding lets attention skip its mask (SDPA's Flash / memory-efficient kernels). The kept columns
    equal fixed padding's, so losses are the same. ``null``: on in pretraining recipes, off in fine-tuning
    ones (and for a data section used on its own)."""

    pad_to: int = 8
    """With ``dynamic_padding``: the multiple the text length is rounded up to (8: tensor-core friendly)."""

    mlm_probability: float = 0.15
    """Fraction of (non-special) tokens chosen for MLM, by whole words, in [0, 1). 0 (fine-tuning) masks
    nothing: ``input_ids`` unchanged, ``mlm_labels`` all -100 (no one-word-per-report fallback either)."""

    mlm_finding_probability: float | None = None
    """The MLM probability of *finding words* (`data.masking.FINDING_WORDS`: findings, sides, extent, zones — what
    only the image can tell), by whole words, in [0, 1); None = ``mlm_probability`` like every other word. A
    larger value makes the MLM head ask more often for what the image shows."""

    mlm_finding_classes: list[str] = field(default_factory=list)
    """Which classes of finding words (`data.masking.FINDING_CLASSES`: ``finding``, ``side``, ``extent``,
    ``zone``) ``mlm_finding_probability`` applies to; [] = all of them. ``[side, extent]`` asks for the words a
    report's text half-predicts least (which side, how large) and leaves the finding names at ``mlm_probability``."""

    mlm_mask_fraction: float = 0.8
    """Of the chosen tokens: the fraction replaced by ``[MASK]`` (BERT's 80 %)."""

    mlm_random_fraction: float = 0.1
    """Of the chosen tokens: the fraction replaced by a random vocabulary token (BERT's 10 %); the rest are
    left unchanged."""

    whole_word_mask: bool = True
    """Mask all pieces of a word together (using the fast tokenizer's ``word_ids()``); False masks pieces
    independently."""

    num_workers: int = 2
    """``wds``: DataLoader worker processes per rank (0 = decode in the main process). ``dali``: CPU threads
    of the pipeline."""

    shuffle_buffer: int = 256
    """Samples held in the shuffle buffer per worker (train only; 0 or 1 = no sample shuffle)."""

    resampled: bool = False
    """False: every sample once per epoch across ranks and workers. True: an endless stream where each
    epoch is ``epoch_length`` samples drawn with shard resampling (no exact once-per-epoch guarantee)."""

    epoch_length: int = 0
    """Samples per epoch (all ranks together) when ``resampled`` is true; 0 = the split's size."""

    augment: bool = True
    """Train-time augmentation on/off (eval never augments)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    """Random resized crop: range of the crop's area as a fraction of the image (mild for X-rays)."""

    crop_ratio: tuple[float, float] = (0.9, 1.1)
    """Random resized crop: range of the crop's aspect ratio (width / height)."""

    rotation_degrees: float = 0.0
    """Random rotation in [-d, d] degrees (0 = off)."""

    brightness: float = 0.0
    """Brightness jitter: a factor drawn from [1 - b, 1 + b] (0 = off)."""

    contrast: float = 0.0
    """Contrast jitter: a factor drawn from [1 - c, 1 + c] (0 = off)."""

    hflip: bool = False
    """Random horizontal flip. Off by default: left and right matter in chest X-ray reports."""

    eval_crop_fraction: float = 1.0
    """Eval transform: resize the shorter side to ``image_size / eval_crop_fraction``, then centre-crop."""

    image_mean: tuple[float, ...] = (0.5,)
    """Per-channel mean subtracted after scaling pixels to [0, 1]; one value is used for every channel."""

    image_std: tuple[float, ...] = (0.5,)
    """Per-channel standard deviation divided after subtracting the mean; one value serves every channel."""

    prefetch_batches: int = 2
    """Batches prepared ahead per worker (``wds``) or pipeline queue depth (``dali``)."""

    shard_cache: str = ""
    """Node-local folder remote shards are fetched whole into where a reader needs a local file (``dali``,
    ``pipe:`` shards, HTTP servers without ``Range``), shared by the ranks of a node; ``""`` =
    ``$TMPDIR/mpma-shard-cache-<uid>``. ``wds`` otherwise streams byte ranges with no local copy."""

    shard_cache_gb: float = 50.0
    """Disk budget of ``shard_cache`` in GB: least recently used shards are deleted beyond it."""

    dali_remote: str = "cache"
    """How the ``dali`` backend reads ``s3://`` shards: ``cache`` (fetched whole into ``shard_cache`` by our
    client: retries counted, ETag and size checked, every store) or ``direct`` (DALI's own AWS SDK client reads
    the objects in place, S3 only; nothing on local disk, no retries counted). docs/data_pipeline.md has the
    measurements behind the default (``direct`` read 0.02-0.05x of ``cache``'s samples/s)."""

    dali_decode: str = "auto"
    """``dali`` backend decode device: ``auto`` (``mixed`` when CUDA is available, else ``cpu``), ``cpu``,
    ``mixed``."""

    synthetic_samples: int = 512
    """``synthetic`` backend: samples in the in-memory split."""

    label_fraction: float = 1.0
    """Share of the **train** split's patients kept, in (0, 1] (1 = every sample; other splits are always
    whole): a patient is kept iff a hash of (subject_id, ``label_fraction_seed``) mapped to [0, 1) is below
    it, so no patient is split, the subsets of one seed are nested (1 % ⊂ 10 % ⊂ 100 %) and the same for
    every backend, world size and worker count (``mpma_ds.data.subsets.patient_subset``). The patient is
    the sample JSON's ``subject_id``, else the sample key. The label-efficiency protocol of SPEC §7."""

    label_fraction_seed: int = 0
    """Picks which patients a ``label_fraction`` below 1 keeps; the same seed keeps nested subsets."""

    label_fraction_cover: bool = False
    """With a ``label_fraction`` below 1, make every label / class that has a positive in the whole train split
    have one in the subset: the subset above first, unchanged; then, per label left without a positive, the
    first patient of the seed's ordering holding one is added, whole (``mpma_ds.data.subsets.cover_labels``).
    The patients / images added and the labels they cover are in the run's ``subset`` summary, its MLflow params
    (``subset.cover.*``) and one console line. Needs a task that reads labels (``cls``, ``linear_probe``). Off
    by default: the plain subset is the literature's sampling; the benchmark's fraction entries turn it on."""

    max_skipped_fraction: float = 0.01
    """Most samples a run may skip as unreadable (a truncated shard, a damaged JPEG), as a fraction in [0, 1]:
    of the samples the shards' indexes list (checked when the loader is built, naming each shard) and of the
    samples read so far (checked at every logged step). Above it the run stops with one line; below, every
    shard with skips is named on the console and logged to MLflow. 1 never stops."""

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend {self.backend!r} is not a data backend; {BACKENDS.describe()}")
        if self.dali_remote not in ("cache", "direct"):
            raise ValueError(f"data.dali_remote must be cache or direct, got {self.dali_remote!r}")
        if self.dali_decode not in ("auto", "cpu", "mixed"):
            raise ValueError(f"data.dali_decode must be auto, cpu or mixed, got {self.dali_decode!r}")
        lowest = {
            "image_size": 8,
            "in_chans": 1,
            "max_text_len": 4,
            "num_workers": 0,
            "shuffle_buffer": 0,
            "epoch_length": 0,
            "prefetch_batches": 1,
            "pad_to": 1,
            "synthetic_samples": 1,
        }
        for name, low in lowest.items():
            if getattr(self, name) < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"data.in_chans must be 1 or 3, got {self.in_chans}")
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"data.mlm_probability must be in [0, 1), got {self.mlm_probability}")
        if self.mlm_finding_probability is not None and not 0.0 <= self.mlm_finding_probability < 1.0:
            raise ValueError(f"data.mlm_finding_probability must be in [0, 1), got {self.mlm_finding_probability}")
        finding_words_of(self.mlm_finding_classes)  # raises on an unknown class
        if not (0.0 <= self.mlm_mask_fraction and 0.0 <= self.mlm_random_fraction) or (
            self.mlm_mask_fraction + self.mlm_random_fraction > 1.0
        ):
            raise ValueError(
                "data.mlm_mask_fraction and data.mlm_random_fraction must be >= 0 and sum to <= 1, got "
                f"{self.mlm_mask_fraction} and {self.mlm_random_fraction}"
            )
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high or (name == "crop_scale" and high > 1.0):
                raise ValueError(
                    f"data.{name} must be [low, high] with 0 < low <= high, got {list(getattr(self, name))}"
                )
        for name in ("rotation_degrees", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.brightness >= 1.0 or self.contrast >= 1.0:
            raise ValueError("data.brightness and data.contrast must be < 1 (the factor range is [1-x, 1+x])")
        if not 0.0 < self.eval_crop_fraction <= 1.0:
            raise ValueError(f"data.eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) not in (1, self.in_chans):
                raise ValueError(
                    f"data.{name} needs 1 or in_chans={self.in_chans} values, got {list(getattr(self, name))}"
                )
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"data.image_std must be > 0, got {list(self.image_std)}")
        if self.train_sources:
            names = [s.name for s in self.train_sources]
            if self.train_shards:
                raise ValueError("data.train_shards and data.train_sources are both set: give one of them")
            if len(set(names)) != len(names):
                raise ValueError(f"data.train_sources names must be unique, got {names}")
            if self.backend == "dali":
                raise ValueError(
                    "data.train_sources (a weighted mixture) runs on data.backend wds only (DALI's reader cannot "
                    "follow the mixture's per-sample order): set data.backend=wds"
                )
        if self.shard_cache_gb <= 0:
            raise ValueError(f"data.shard_cache_gb must be > 0, got {self.shard_cache_gb}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"data.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` expanded to ``in_chans`` values each."""
        mean = self.image_mean * self.in_chans if len(self.image_mean) == 1 else self.image_mean
        std = self.image_std * self.in_chans if len(self.image_std) == 1 else self.image_std
        return tuple(mean), tuple(std)
