"""Frozen-backbone features, extracted once per split and cached; a stream that serves them like a loader.

What ``linear_probe`` (pooled image features) and frozen-backbone ``vqa`` (the fused image + question
representation) share. Features are extracted under the process group, each rank a share of the split
(``build_loader`` rank r of W: one deterministic, unaugmented pass over the *whole* split whatever the run's
label fraction), gathered to rank 0 and merged there in sample-key order (``extract_once``; so 1 and 2 ranks
give the same file) and cached as ``<cache_dir>/<fingerprint>/<split>.pt`` (``torch.save`` of tensors and strings, read
back with ``weights_only=True``; it appears whole or not at all). The fingerprint covers what the features
depend on — the weights (``init.from``'s files by path, size and mtime; the seed of a random twin), the
architecture, the shards, the preprocessing, the text settings where text is read, and what is extracted —
so runs at several label fractions share one extraction and a changed input never reads a stale entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mpma_ds.data import build_loader
from mpma_ds.data.loader import LoaderInfo
from mpma_ds.data.plan import EpochStream, MadeBatch, epoch_batches, steps_per_epoch
from mpma_ds.data.subsets import LabelCover, meta_subject, split_subset
from mpma_ds.distributed import barrier, broadcast_object, gather_to_rank0

if TYPE_CHECKING:
    from mpma_ds.tasks.base import RunContext
    from mpma_ds.tasks.finetune import FinetuneTask

CACHE_FORMAT = 2  # what an entry holds; 2: ``subjects`` by the loader's patient rule (``meta_subject``)
CHUNK = 256  # samples per pseudo-shard of the feature stream (the shard-order shuffle's unit)
Featurizer = Callable[[nn.Module, dict[str, Any]], torch.Tensor]
"""``(frozen backbone, batch on the device) -> (B, D)`` features."""


class FeatureStream(EpochStream):
    """Batches of cached features with the loaders' plan (equal steps on every rank, padding flagged
    ``valid=False``, exact resume): ``{"features" (B, D), "targets", "valid" (B,), "key", "meta"}``."""

    backend = "features"

    def __init__(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        keys: list[str],
        metas: list[dict[str, Any]],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        train: bool,
        subset: dict[str, Any] | None = None,
    ) -> None:
        if len(features) == 0:
            raise ValueError("no features to train on")
        self.features, self.targets, self.keys, self.metas = features, targets, keys, metas
        self.batch_size = batch_size
        n = len(features)
        self.counts = [min(CHUNK, n - s) for s in range(0, n, CHUNK)]
        super().__init__(
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            steps=steps_per_epoch(n, world_size, batch_size),
            num_samples=n,
            subset=subset,
        )

    def _epoch_iter(self, epoch: int, start_batch: int) -> Iterator[MadeBatch]:
        ids, valid = epoch_batches(
            self.counts,
            epoch=epoch if self.train else 0,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            train=self.train,
            shuffle_buffer=len(self.features),
        )
        for number in range(start_batch, len(ids)):
            rows = ids[number].tolist()
            index = torch.from_numpy(ids[number])
            batch = {
                "features": self.features[index],
                "targets": self.targets[index],
                "valid": torch.from_numpy(valid[number]),
                "key": [self.keys[i] for i in rows],
                "meta": [self.metas[i] for i in rows],
            }
            yield batch, {}


def feature_loader(
    cached: dict[str, Any],
    rows: torch.Tensor | None = None,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    train: bool,
    subset: dict[str, Any] | None = None,
) -> LoaderInfo:
    """A ``FeatureStream`` over ``cached`` (``features``, ``targets``, ``keys``, ``metas``; ``rows`` picks some)
    behind the loaders' interface."""
    pick = rows if rows is not None else torch.arange(len(cached["features"]))
    index = pick.tolist()
    stream = FeatureStream(
        cached["features"][pick],
        cached["targets"][pick],
        [cached["keys"][i] for i in index],
        [cached["metas"][i] for i in index],
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        seed=seed,
        train=train,
        subset=subset,
    )
    return LoaderInfo(stream, stream.num_samples, stream.steps_per_epoch, stream.subset)


def fingerprint(task: FinetuneTask, ctx: RunContext, split: str, spec: str, kind: str) -> str:
    """What the ``kind`` features of ``split`` depend on (see the module docstring)."""
    from mpma_ds.data.shards import resolve_shard_infos

    data = task.recipe.data
    init = task.init_source(ctx)
    weights: Any = "random"
    if init.path is not None:
        files = sorted(
            p for p in Path(init.path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt")
        )
        weights = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    shards = [
        (str(p), info.size, info.etag)
        if info is not None
        else (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
        for p, info in resolve_shard_infos(spec)
    ]  # a remote shard is named by its URL, size and ETag
    preprocessing = ("image_size", "in_chans", "image_mean", "image_std", "eval_crop_fraction", "backend")
    identity: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "weights": weights,
        "seed": task.recipe.train.seed if init.kind == "random" else None,
        "architecture": init.config.architecture(),
        "shards": shards,
        "split": split,
        "preprocessing": {k: getattr(data, k) for k in preprocessing},
    }
    if kind != "image":  # the text is read too
        tok = Path(ctx.tokenizer_dir)
        tok_file = tok / "tokenizer.json"
        identity["text"] = {
            "max_text_len": data.max_text_len,
            "tokenizer": [str(tok_file.resolve()), tok_file.stat().st_size, tok_file.stat().st_mtime_ns]
            if tok_file.is_file()
            else str(tok),
        }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def split_features(
    task: FinetuneTask,
    ctx: RunContext,
    split: str,
    spec: str,
    *,
    kind: str,
    cache_dir: Path,
    encoder: Callable[[], nn.Module],
    featurize: Featurizer,
    dim: int,
) -> dict[str, Any]:
    """``{"features" (N, D), "keys", "subjects", "metas"}`` of ``split``, from the cache or extracted now.

    Collective: every rank calls it. ``encoder()`` builds the frozen backbone (called only when some rank has
    to extract); ``featurize(encoder, batch)`` makes a batch's features.
    """
    path = cache_dir / fingerprint(task, ctx, split, spec, kind) / f"{split}.pt"
    found, _ = extract_once(
        path, lambda: _extract(task, ctx, encoder(), featurize, split, dim), _merge, rank=ctx.rank
    )
    barrier()  # rank 0 has written the entry: the other ranks read it
    ctx.feature_files[split] = str(path)
    return found if found is not None else torch.load(path, map_location="cpu", weights_only=True)


def extract_once(
    path: Path | None,
    extract: Callable[[], dict[str, Any]],
    merge: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    rank: int,
) -> tuple[dict[str, Any] | None, bool]:
    """Per-sample outputs computed once over the process group: ``(outputs on rank 0 / None elsewhere, read from
    the cache)``.

    Collective: every rank calls it. When ``path`` (a ``torch.save`` file of tensors and strings) exists — rank 0
    decides, so every rank takes the same branch — rank 0 reads it and nothing is computed. Else every rank runs
    ``extract()`` on its own share of the samples, the shares are gathered to rank 0 (``gather_to_rank0``) and
    ``merge``d there into an order that does not depend on the world size, then written to ``path`` (when
    given) whole or not at all. What the fine-tuning tasks' frozen features and the benchmark's streamed
    protocols (``mpma_ds.benchmark.features``) share.
    """
    if broadcast_object(path is not None and path.is_file()):
        return (torch.load(path, map_location="cpu", weights_only=True) if rank == 0 else None), True
    parts = gather_to_rank0(extract())
    if rank != 0:
        return None, False
    merged = merge(parts)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(merged, tmp)
        os.replace(tmp, path)  # the cache entry appears whole or not at all
    return merged, False


@torch.no_grad()
def _extract(
    task: FinetuneTask, ctx: RunContext, encoder: nn.Module, featurize: Featurizer, split: str, dim: int
) -> dict[str, Any]:
    # the whole split, whatever the run's label fraction: the cache serves every fraction, which then selects
    # its patients from the cached rows
    whole = dataclasses.replace(task.recipe.data, label_fraction=1.0)
    cfg = task.recipe.train
    info = build_loader(
        whole,
        ctx.rank,
        ctx.world_size,
        split=split,
        batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
        tokenizer=ctx.tokenizer,
        seed=cfg.seed,
        train=False,
    )
    feats, keys, metas = [], [], []
    try:
        for batch in info.loader:
            keep = batch["valid"].bool()
            on_device = {k: (v.to(ctx.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            feats.append(featurize(encoder, on_device).float().cpu()[keep])  # (B', D)
            keys += [k for k, ok in zip(batch["key"], keep.tolist()) if ok]
            metas += [m for m, ok in zip(batch["meta"], keep.tolist()) if ok]
    finally:
        info.close()
    return {"features": torch.cat(feats) if feats else torch.zeros(0, dim), "keys": keys, "metas": metas}


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' shares of a split as one set, sorted by sample key (independent of the world size)."""
    keys = [k for p in parts for k in p["keys"]]
    metas = [m for p in parts for m in p["metas"]]
    feats = torch.cat([p["features"] for p in parts])
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return {
        "features": feats[order].contiguous(),
        "keys": [keys[i] for i in order],
        "subjects": [meta_subject(metas[i], keys[i]) for i in order],  # the loader's patient rule
        "metas": [metas[i] for i in order],
    }


class FrozenEncoder:
    """Builds the task's frozen backbone once, on the first split that is not cached yet."""

    def __init__(self, task: FinetuneTask, ctx: RunContext) -> None:
        self.task, self.ctx = task, ctx
        self.model: nn.Module | None = None

    def __call__(self) -> nn.Module:
        if self.model is None:
            torch.manual_seed(self.task.recipe.train.seed)  # a random twin is the same on every rank
            self.model = self.task.backbone(self.ctx).to(self.ctx.device).eval()
        return self.model


class StandardisedHead(nn.Module):
    """Base of the heads on cached features: standardise them with fixed statistics of the samples the head
    trains on (MAE's BatchNorm without affine), then ``self.head``; ``logits(batch)`` -> (B, outputs)."""

    head: nn.Module

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clamp(min=1e-6).clone())

    def no_weight_decay(self) -> set[str]:
        return {f"head.{n}" for n, p in self.head.named_parameters() if p.ndim <= 1}

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        x = (batch["features"].float() - self.mean) / self.std  # (B, D)
        return self.head(x.to(next(self.head.parameters()).dtype)).float()


@dataclasses.dataclass
class FrozenSplits:
    """Every split's cached features (``cached[split]``: ``features``, ``targets``, ``keys``, ``metas``), the
    training loaders over the label-fraction subset, the validation loader, and the standardiser fitted on the
    samples the head trains on."""

    cached: dict[str, dict[str, Any]]
    loaders: list[LoaderInfo]
    val: LoaderInfo | None
    mean: torch.Tensor
    std: torch.Tensor


def frozen_splits(
    task: FinetuneTask,
    ctx: RunContext,
    *,
    kind: str,
    featurize: Featurizer,
    dim: int,
    cache_dir: Path,
    targets: Callable[[list[dict[str, Any]]], torch.Tensor],
    cover: Callable[[np.ndarray], LabelCover] | None = None,
) -> FrozenSplits:
    """What a head on a frozen backbone trains from: features of every split the recipe names (validation only
    when the run evaluates), ``targets(metas)`` beside them, the training split cut to ``data.label_fraction``
    (patient level, recorded in ``ctx.subset``; ``cover(train targets)`` gives the positives
    ``data.label_fraction_cover`` covers), one loader per accumulation step."""
    data, cfg = task.recipe.data, task.recipe.train
    encoder = FrozenEncoder(task, ctx)
    cached: dict[str, dict[str, Any]] = {}
    for split, spec in {"train": data.train_shards, "validate": data.val_shards, "test": data.test_shards}.items():
        if spec and (split != "validate" or task.wants_validation()):
            found = split_features(
                task,
                ctx,
                split,
                spec,
                kind=kind,
                cache_dir=cache_dir,
                encoder=encoder,
                featurize=featurize,
                dim=dim,
            )
            cached[split] = dict(found, targets=targets(found["metas"]))
    train = cached["train"]
    positives = None
    if data.label_fraction_cover and data.label_fraction < 1.0:
        if cover is None:
            raise ValueError(f"data.label_fraction_cover: task {task.name} reads no labels to cover")
        positives = cover(train["targets"].numpy())
    keep, subset = split_subset(
        train["subjects"], data.label_fraction, data.label_fraction_seed, split="train", cover=positives
    )
    rows = subset_rows(keep)
    ctx.subset = subset
    mean, std = standardiser(train["features"][rows])
    loaders = [
        feature_loader(
            train,
            rows,
            rank=ctx.rank * ctx.accumulation + a,
            world_size=ctx.data_ranks,
            batch_size=cfg.micro_batch_size,
            seed=cfg.seed,
            train=True,
            subset=subset,
        )
        for a in range(ctx.accumulation)
    ]
    val = feature_eval_loader(cached["validate"], cfg) if "validate" in cached else None
    return FrozenSplits(cached, loaders, val, mean, std)


def feature_eval_loader(cached: dict[str, Any], cfg: Any) -> LoaderInfo:
    """One split's cached features in order, whole on every rank (the heads are tiny; evaluation is not split)."""
    return feature_loader(
        cached,
        rank=0,
        world_size=1,
        batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
        seed=cfg.seed,
        train=False,
    )


def standardiser(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's per-dimension mean and standard deviation (MAE's BatchNorm without affine)."""
    if len(features) < 2:
        return features.mean(dim=0) if len(features) else torch.zeros(features.shape[1]), torch.ones(
            features.shape[1]
        )
    return features.mean(dim=0), features.std(dim=0)


def subset_rows(keep: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(keep))
