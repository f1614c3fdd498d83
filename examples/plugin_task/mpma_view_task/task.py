"""``view_position``: a linear head on the pooled image features, softmax cross-entropy over the view classes.

It uses mpma_ds's public task contract only: ``FinetuneTask`` (backbone from ``init.from``, layer-wise learning
rates, tags, summary), ``BackboneModule``, the backbone's ``image_features``, ``read_split_metas`` and the
multi-class metrics of ``mpma_ds.eval``. The Trainer runs the loops; the comparison report pairs two runs by
the headline metrics and the paired statistic declared below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpma_ds.config import ConfigSection
from mpma_ds.eval import multiclass_metrics, with_intervals
from mpma_ds.eval.bootstrap import paired_difference
from mpma_ds.eval.paired import PAIRED_STATISTICS
from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.finetune import BackboneModule, FinetuneTask, read_split_metas
from mpma_ds.tasks.registry import TASKS


@dataclass
class ViewOptions(ConfigSection):
    """``task.view_position``: which views are classes."""

    SECTION = "task.view_position"

    classes: list[str] = field(default_factory=list)
    """The view classes, in order; empty = the views of the training split, sorted. Others are skipped."""

    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""

    def validate(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"task.view_position.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class ViewClassifier(BackboneModule):
    """Pooled image features -> one linear layer over the view classes."""

    def __init__(self, backbone: nn.Module, num_classes: int, label_smoothing: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.vision_width, num_classes)
        self.label_smoothing = label_smoothing

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.head(self.backbone.image_features(batch["image"])).float()  # (B, K)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        targets = batch["targets"].to(batch["image"].device)
        known = (targets >= 0) & batch["valid"].to(targets.device).bool()  # (B,)
        rows = F.cross_entropy(
            self.logits(batch), targets.clamp(min=0), reduction="none", label_smoothing=self.label_smoothing
        )
        return {"loss": (rows * known).sum() / known.sum().clamp(min=1)}


@PAIRED_STATISTICS.register("view_accuracy")
def paired_view_accuracy(
    pre: Mapping[str, Any], rnd: Mapping[str, Any], key: str, params: Mapping[str, str], n_resamples: int
) -> dict | None:
    """Accuracy / macro AUROC of two runs over the same films (the per-sample scores they kept)."""
    if key not in ("accuracy", "auroc_macro") or list(pre.get("classes", [])) != list(rnd.get("classes", [])):
        return None
    arrays = [(p["scores"].numpy(), p["targets"].numpy()) for p in (pre, rnd)]
    return paired_difference(
        multiclass_metrics, *arrays, keys=[key], n_resamples=n_resamples, class_names=list(pre["classes"])
    )


@TASKS.register("view_position", sections={"view_position": ViewOptions})
class ViewPositionTask(FinetuneTask):
    """Which view (PA / AP / LATERAL) a film is, from its pixels (the shards' ``view`` field is the truth)."""

    name = "view_position"
    headline_metrics = ("accuracy", "auroc_macro")
    pairing = "view_accuracy"
    title = "view position accuracy"
    default_best_metric = "accuracy"
    backbone_parts = ("image_encoder",)

    def check(self, ctx: RunContext) -> None:
        options: ViewOptions = self.recipe.task.view_position
        views = sorted({str(m["view"]) for m in read_split_metas(self.recipe.data.train_shards) if m.get("view")})
        self.classes = list(options.classes or views)
        if len(self.classes) < 2:
            raise ValueError(
                f"view_position needs at least two views in the training split {self.recipe.data.train_shards}, "
                f"found {views}"
            )

    def architecture(self, ctx: RunContext) -> dict[str, Any]:
        return {"classes": self.classes}

    def build_model(self, ctx: RunContext) -> nn.Module:
        return ViewClassifier(
            self.backbone(ctx), len(self.classes), self.recipe.task.view_position.label_smoothing
        )

    def to_model(self, batch: dict[str, Any]) -> dict[str, Any]:
        index = {name: i for i, name in enumerate(self.classes)}
        targets = torch.tensor([index.get(str(m.get("view")), -1) for m in batch["meta"]], dtype=torch.long)
        return dict(batch, targets=targets)

    def evaluate(
        self,
        module: nn.Module,
        batches: Iterable[dict[str, Any]],
        ctx: RunContext,
        *,
        n_resamples: int = 0,
        keep: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        scores, targets, keys = [], [], []
        with torch.no_grad():
            for batch in batches:  # on the device, in the compute dtype (the Trainer's eval loop)
                valid = batch["valid"].bool().cpu()
                scores.append(module.logits(batch).cpu()[valid])
                targets.append(batch["targets"].cpu()[valid])
                keys += [k for k, ok in zip(batch["key"], valid.tolist()) if ok]
        s, t = torch.cat(scores), torch.cat(targets)
        known = (t >= 0).numpy()
        if keep is not None:
            keep.update(keys=keys, scores=s, targets=t, classes=list(self.classes))
        arrays = (s.numpy()[known].astype(np.float64), t.numpy()[known])
        if n_resamples:
            return with_intervals(
                multiclass_metrics, *arrays, n_resamples=n_resamples, seed=0, class_names=self.classes
            )
        return multiclass_metrics(*arrays, class_names=self.classes)

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        return {**super().summary(ctx), "classes": self.classes}
