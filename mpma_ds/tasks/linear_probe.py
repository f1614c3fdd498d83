"""``linear_probe``: the Med-VLP label-efficiency protocol (MGCA, GLoRIA, MRM) — a frozen image encoder, its
pooled features extracted once per split and cached, a linear head trained on them at a label fraction.

Features are extracted under the process group, each rank a share of the split (``build_loader`` rank r of W,
one deterministic unaugmented pass), gathered, sorted by sample key and cached in
``<cache_dir>/<fingerprint>/<split>.pt`` (``torch.save`` of tensors and strings, read back with
``weights_only=True``). The fingerprint covers the weights (``init.from`` and, for a random twin, the seed),
the architecture, the shards and the preprocessing, so runs at 1 %, 10 % and 100 % of the labels share one
extraction, and nothing stale is ever read. The label fraction then applies the loader's own patient-level
rule (``mpma_ds.data.subsets.patient_subset``) to the cached training features; the head sees features
standardised with the training split's mean and standard deviation (MAE's BatchNorm without affine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpma_ds.data.loader import LoaderInfo
from mpma_ds.data.plan import EpochStream, MadeBatch, epoch_batches, steps_per_epoch
from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.classification import LinearHead, evaluate_classifier, resolve_labels
from mpma_ds.tasks.finetune import FinetuneTask

CHUNK = 256  # samples per pseudo-shard of the feature stream (the shard-order shuffle's unit)


def feature_loader(stream: FeatureStream) -> LoaderInfo:
    """``stream`` behind the loaders' interface (``LoaderInfo``)."""
    return LoaderInfo(stream, stream.num_samples, stream.steps_per_epoch, stream.subset)


class FeatureStream(EpochStream):
    """Batches of cached features with the loaders' plan (equal steps on every rank, padding flagged
    ``valid=False``, exact resume): ``{"features" (B, D), "targets", "valid" (B,), "key"}``."""

    backend = "features"

    def __init__(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        keys: list[str],
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
        self.features, self.targets, self.keys = features, targets, keys
        self.batch_size = batch_size
        n = len(features)
        self.counts = [min(CHUNK, n - s) for s in range(0, n, CHUNK)]
        super().__init__(
            train=train, seed=seed, rank=rank, world_size=world_size, steps=steps_per_epoch(n, world_size, batch_size),
            num_samples=n, subset=subset,
        )  # fmt: skip

    def _epoch_iter(self, epoch: int, start_batch: int) -> Iterator[MadeBatch]:
        ids, valid = epoch_batches(
            self.counts, epoch=epoch if self.train else 0, seed=self.seed, rank=self.rank,
            world_size=self.world_size, batch_size=self.batch_size, train=self.train,
            shuffle_buffer=len(self.features),
        )  # fmt: skip
        for number in range(start_batch, len(ids)):
            rows = torch.from_numpy(ids[number])
            batch = {
                "features": self.features[rows],
                "targets": self.targets[rows],
                "valid": torch.from_numpy(valid[number]),
                "key": [self.keys[i] for i in ids[number].tolist()],
            }
            yield batch, {}


class ProbeHead(nn.Module):
    """Standardise (fixed training-split statistics) → linear layer; ``forward(batch)`` -> ``{"loss"}``."""

    def __init__(self, in_dim: int, labels: Any, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clamp(min=1e-6).clone())
        self.head = LinearHead(in_dim, labels.num_outputs)
        self.labels = labels

    def no_weight_decay(self) -> set[str]:
        return {"head.fc.bias"}

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        x = (batch["features"].float() - self.mean) / self.std  # (B, D)
        return self.head(x.to(self.head.fc.weight.dtype)).float()

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"loss": self.labels.loss(self.logits(batch), batch["targets"], batch["valid"])}


class LinearProbeTask(FinetuneTask):
    name = "linear_probe"
    default_best_metric = "auroc_macro"
    backbone_parts = ("image_encoder",)

    def check(self, ctx: RunContext) -> None:
        self.labels = resolve_labels(self, ctx)

    def architecture(self, ctx: RunContext) -> dict[str, Any]:
        return {"labels": list(self.labels.names), "multilabel": self.labels.multilabel}

    # ---------------------------------------------------------------------------------------------- features
    def fingerprint(self, ctx: RunContext, split: str, spec: str) -> str:
        """What the features of ``split`` depend on: weights, architecture, shards, preprocessing."""
        from mpma_ds.data.shards import resolve_shards

        data = self.recipe.data
        init = self.init_source(ctx)
        weights: Any = "random"
        if init.path is not None:
            files = sorted(
                p for p in Path(init.path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt")
            )
            weights = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        shards = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in resolve_shards(spec)]
        identity = {
            "weights": weights,
            "seed": self.recipe.train.seed if init.kind == "random" else None,
            "architecture": init.config.architecture(),
            "shards": shards,
            "split": split,
            "preprocessing": {
                k: getattr(data, k)
                for k in ("image_size", "in_chans", "image_mean", "image_std", "eval_crop_fraction", "backend")
            },  # fmt: skip
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def cache_dir(self, ctx: RunContext) -> Path:
        return Path(self.recipe.task.linear_probe.cache_dir or ctx.output_dir / "features")

    def split_features(
        self, ctx: RunContext, encoder: Callable[[], nn.Module], split: str, spec: str
    ) -> dict[str, Any]:
        """``{"features" (N, D), "keys", "subjects", "metas"}`` of ``split``, from the cache or extracted now
        (collective: every rank calls it). Each rank writes its share as a part file; rank 0 merges them."""
        from mpma_ds.training.distributed import barrier, broadcast_object

        path = self.cache_dir(ctx) / self.fingerprint(ctx, split, spec) / f"{split}.pt"
        if not broadcast_object(path.is_file()):  # rank 0 decides: every rank takes the same branch
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f"{split}.part{ctx.rank:05d}")
            torch.save(self._extract(ctx, encoder(), split), part)
            barrier()
            if ctx.rank == 0:
                files = [path.with_name(f"{split}.part{r:05d}") for r in range(ctx.world_size)]
                merged = _merge([torch.load(f, map_location="cpu", weights_only=True) for f in files])
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                torch.save(merged, tmp)
                os.replace(tmp, path)  # the cache entry appears whole or not at all
                for f in files:
                    f.unlink(missing_ok=True)
            barrier()
        ctx.extras.setdefault("feature_files", {})[split] = str(path)
        return torch.load(path, map_location="cpu", weights_only=True)

    @torch.no_grad()
    def _extract(self, ctx: RunContext, encoder: nn.Module, split: str) -> dict[str, Any]:
        from mpma_ds.data import build_loader

        # the whole split, whatever the run's label fraction: the cache serves every fraction, which then
        # selects its patients from the cached rows
        whole = dataclasses.replace(self.recipe.data, label_fraction=1.0)
        info = build_loader(
            whole, ctx.rank, ctx.world_size, split=split,
            batch_size=self.recipe.train.eval_batch_size or self.recipe.train.micro_batch_size,
            tokenizer=ctx.tokenizer, seed=self.recipe.train.seed, train=False,
        )  # fmt: skip
        feats, keys, metas = [], [], []
        try:
            for batch in info.loader:
                keep = batch["valid"].bool()
                out = encoder.image_features(batch["image"].to(ctx.device)).float().cpu()  # (B, D)
                feats.append(out[keep])
                keys += [k for k, ok in zip(batch["key"], keep.tolist()) if ok]
                metas += [m for m, ok in zip(batch["meta"], keep.tolist()) if ok]
        finally:
            info.close()
        dim = encoder.config.vision_width
        return {"features": torch.cat(feats) if feats else torch.zeros(0, dim), "keys": keys, "metas": metas}

    def build_loaders(self, ctx: RunContext):
        from mpma_ds.data.subsets import meta_subject, split_subset

        data, cfg = self.recipe.data, self.recipe.train
        state: dict[str, Any] = {}

        def encoder() -> nn.Module:  # built once, only when some split is not cached yet
            if "encoder" not in state:
                torch.manual_seed(cfg.seed)
                state["encoder"] = self.backbone(ctx).to(ctx.device).eval()
            return state["encoder"]

        splits = {"train": data.train_shards, "validate": data.val_shards, "test": data.test_shards}
        self.cached: dict[str, dict[str, Any]] = {}
        for split, spec in splits.items():
            if spec and (split != "validate" or self.wants_validation()):
                self.cached[split] = self._with_targets(self.split_features(ctx, encoder, split, spec))
        state.clear()
        train = self.cached["train"]
        subjects = [meta_subject(m, k) for m, k in zip(train["metas"], train["keys"])]
        keep, subset = split_subset(subjects, data.label_fraction, data.label_fraction_seed, split="train")
        rows = torch.from_numpy(np.flatnonzero(keep))
        ctx.extras["subset"] = subset
        feats = train["features"]
        self.mean, self.std = feats.mean(dim=0), feats.std(dim=0)
        loaders = []
        for a in range(ctx.accumulation):
            stream = FeatureStream(
                feats[rows], train["targets"][rows], [train["keys"][i] for i in rows.tolist()],
                rank=ctx.rank * ctx.accumulation + a, world_size=ctx.data_ranks, batch_size=cfg.micro_batch_size,
                seed=cfg.seed, train=True, subset=subset,
            )  # fmt: skip
            loaders.append(feature_loader(stream))
        val = self.eval_loader(ctx, "validate") if "validate" in self.cached else None
        return loaders, val

    def _with_targets(self, cached: dict[str, Any]) -> dict[str, Any]:
        targets = torch.from_numpy(self.labels.targets_from_metas(cached["metas"]))
        return dict(cached, targets=targets)

    def eval_loader(self, ctx: RunContext, split: str) -> LoaderInfo:
        cached = self.cached[split]
        cfg = self.recipe.train
        stream = FeatureStream(
            cached["features"], cached["targets"], cached["keys"], rank=0, world_size=1,
            batch_size=cfg.eval_batch_size or cfg.micro_batch_size, seed=cfg.seed, train=False,
        )  # fmt: skip
        return feature_loader(stream)

    # ---------------------------------------------------------------------------------------------- model
    def build_model(self, ctx: RunContext) -> nn.Module:
        return ProbeHead(ctx.model_config.vision_width, self.labels, self.mean, self.std)

    def lr_scales(self, module: nn.Module) -> dict[str, float] | None:
        return None  # the head is all there is

    def evaluate(
        self, module: nn.Module, batches: Iterable[dict[str, Any]], ctx: RunContext, *, n_resamples: int = 0
    ) -> dict[str, Any]:
        return evaluate_classifier(module, batches, self.labels, ctx, n_resamples=n_resamples)

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        return {
            **super().summary(ctx),
            "labels": self.labels.names,
            "train_positives": ctx.extras["label_counts"],
            "feature_files": ctx.extras.get("feature_files"),
        }


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' shares of a split as one set, sorted by sample key (independent of the world size)."""
    keys = [k for p in parts for k in p["keys"]]
    metas = [m for p in parts for m in p["metas"]]
    feats = torch.cat([p["features"] for p in parts])
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return {
        "features": feats[order].contiguous(),
        "keys": [keys[i] for i in order],
        "subjects": [str(metas[i].get("subject_id", keys[i])) for i in order],
        "metas": [metas[i] for i in order],
    }
