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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.classification import LinearHead, evaluate_classifier, resolve_labels
from mpma_ds.tasks.features import FrozenEncoder, feature_loader, split_features, standardiser, subset_rows
from mpma_ds.tasks.finetune import FinetuneTask


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

    def cache_dir(self, ctx: RunContext) -> Path:
        return Path(self.recipe.task.linear_probe.cache_dir or ctx.output_dir / "features")

    def build_loaders(self, ctx: RunContext):
        from mpma_ds.data.subsets import meta_subject, split_subset

        data, cfg = self.recipe.data, self.recipe.train
        encoder = FrozenEncoder(self, ctx)
        splits = {"train": data.train_shards, "validate": data.val_shards, "test": data.test_shards}
        self.cached: dict[str, dict[str, Any]] = {}
        for split, spec in splits.items():
            if spec and (split != "validate" or self.wants_validation()):
                cached = split_features(
                    self, ctx, split, spec, kind="image", cache_dir=self.cache_dir(ctx), encoder=encoder,
                    featurize=lambda net, batch: net.image_features(batch["image"]), dim=ctx.model_config.vision_width,
                )  # fmt: skip
                targets = torch.from_numpy(self.labels.targets_from_metas(cached["metas"]))
                self.cached[split] = dict(cached, targets=targets)
        train = self.cached["train"]
        subjects = [meta_subject(m, k) for m, k in zip(train["metas"], train["keys"])]
        keep, subset = split_subset(subjects, data.label_fraction, data.label_fraction_seed, split="train")
        rows = subset_rows(keep)
        ctx.extras["subset"] = subset
        self.mean, self.std = standardiser(train["features"][rows])
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
            )  # fmt: skip
            for a in range(ctx.accumulation)
        ]
        val = self.eval_loader(ctx, "validate") if "validate" in self.cached else None
        return loaders, val

    def eval_loader(self, ctx: RunContext, split: str):
        cfg = self.recipe.train
        return feature_loader(
            self.cached[split], rank=0, world_size=1, batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
            seed=cfg.seed, train=False,
        )  # fmt: skip

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
            "train_positives": ctx.extras["label_counts"],
            "feature_files": ctx.extras.get("feature_files"),
        }
