"""``linear_probe``: the Med-VLP label-efficiency protocol (MGCA, GLoRIA, MRM) — a frozen image encoder, its
pooled features extracted once per split and cached (``mpma_ds.tasks.features``), a linear head trained on them
at a label fraction.

The label fraction applies the loader's own patient-level rule (``mpma_ds.data.subsets.patient_subset``) to the
cached training features, so the 1 % / 10 % / 100 % runs share one extraction and see the same patients as a
shard loader would; the head sees features standardised with the statistics of the samples it trains on
(MAE's BatchNorm without affine).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpma_ds.config import ConfigSection
from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.classification import ClsOptions, LinearHead, evaluate_classifier, resolve_labels
from mpma_ds.tasks.features import StandardisedHead, feature_eval_loader, frozen_splits
from mpma_ds.tasks.finetune import FinetuneTask
from mpma_ds.tasks.registry import TASKS


class ProbeHead(StandardisedHead):
    """Standardise (fixed training-split statistics) → linear layer; ``forward(batch)`` -> ``{"loss"}``."""

    def __init__(self, in_dim: int, labels: Any, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__(mean, std)
        self.head = LinearHead(in_dim, labels.num_outputs)
        self.labels = labels

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"loss": self.labels.loss(self.logits(batch), batch["targets"], batch["valid"])}


@dataclass
class LinearProbeOptions(ConfigSection):
    """``task.linear_probe``: frozen image encoder, its features extracted once and cached, a linear head."""

    SECTION = "task.linear_probe"

    cache_dir: str = ""
    """Where the extracted features are kept, keyed by the weights, shards and preprocessing they came from
    (runs at several label fractions share them); empty = ``<train.output_dir>/features``."""


@TASKS.register("linear_probe", sections={"cls": ClsOptions, "linear_probe": LinearProbeOptions})
class LinearProbeTask(FinetuneTask):
    name = "linear_probe"
    headline_metrics = ("auroc_macro",)
    pairing = "multilabel_auroc"
    title = "linear probe AUROC"
    default_best_metric = "auroc_macro"
    backbone_parts = ("image_encoder",)

    def check(self, ctx: RunContext) -> None:
        self.labels = resolve_labels(self, ctx)

    def architecture(self, ctx: RunContext) -> dict[str, Any]:
        return {"labels": list(self.labels.names), "multilabel": self.labels.multilabel}

    def cache_dir(self, ctx: RunContext) -> Path:
        return Path(self.recipe.task.linear_probe.cache_dir or ctx.output_dir / "features")

    def build_loaders(self, ctx: RunContext):
        frozen = frozen_splits(
            self, ctx, kind="image", featurize=lambda net, batch: net.image_features(batch["image"]),
            dim=ctx.model_config.vision_width, cache_dir=self.cache_dir(ctx),
            targets=lambda metas: torch.from_numpy(self.labels.targets_from_metas(metas)), cover=self.labels.cover,
        )  # fmt: skip
        self.cached, self.mean, self.std = frozen.cached, frozen.mean, frozen.std
        return frozen.loaders, frozen.val

    def eval_loader(self, ctx: RunContext, split: str, source: Any = None):
        return feature_eval_loader(self.cached[split], self.recipe.train)

    def build_model(self, ctx: RunContext) -> nn.Module:
        return ProbeHead(ctx.model_config.vision_width, self.labels, self.mean, self.std)

    def lr_scales(self, module: nn.Module) -> dict[str, float] | None:
        return None  # the head is all there is

    def evaluate(
        self,
        module: nn.Module,
        batches: Iterable[dict[str, Any]],
        ctx: RunContext,
        *,
        n_resamples: int = 0,
        keep: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return evaluate_classifier(module, batches, self.labels, ctx, n_resamples=n_resamples, keep=keep)

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        return {
            **super().summary(ctx),
            "labels": self.labels.names,
            "train_positives": self.labels.train_positives,
            "feature_files": ctx.feature_files or None,
        }
