"""``retrieval``: fine-tune the global image-report alignment (GLA's InfoNCE on the unmasked image and report,
negatives gathered over the data-parallel ranks), optionally with the local token-patch term; R@1/5/10 both
ways (one image per distinct report, ties counting against the query) and zero-shot AUROC on the side."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpma_ds.config import ConfigSection
from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.finetune import BackboneModule, FinetuneTask
from mpma_ds.tasks.registry import TASKS


class AlignmentModel(BackboneModule):
    """The MPMA encoders, projections and temperatures; ``forward(batch)`` -> ``{"loss", "loss_global"
    (, "loss_local")}``."""

    def __init__(self, backbone: nn.Module, w_local: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.w_local = w_local

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(input_ids, attention_mask)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        net = self.backbone
        f = net.alignment_features(
            batch["image"], batch["input_ids"], batch["attention_mask"], local=self.w_local > 0
        )
        loss_global = net.global_loss(f.image, f.text, net.rank, net.world_size)
        out = {"loss": loss_global, "loss_global": loss_global}
        if self.w_local > 0:
            out["loss_local"] = net.local_loss(f.tokens, f.token_mask, f.patches)
            out["loss"] = loss_global + self.w_local * out["loss_local"]
        return out


@dataclass
class RetrievalOptions(ConfigSection):
    """``task.retrieval``: fine-tune the global image-report alignment; R@K both ways."""

    SECTION = "task.retrieval"

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """The K of R@K."""

    w_local: float = 0.0
    """Also fine-tune the local token-patch alignment with this weight (0 = the global InfoNCE only)."""

    def validate(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"task.retrieval.ks must be positive integers, got {self.ks}")
        if self.w_local < 0:
            raise ValueError(f"task.retrieval.w_local must be >= 0, got {self.w_local}")


@TASKS.register("retrieval", sections={"retrieval": RetrievalOptions})
class RetrievalTask(FinetuneTask):
    name = "retrieval"
    headline_metrics = ("rsum", "i2t_R_at_1", "t2i_R_at_1")
    title = "retrieval RSUM"
    default_best_metric = "rsum"

    @property
    def backbone_parts(self) -> tuple[str, ...]:  # type: ignore[override]
        parts = ("image_encoder", "text_encoder", "image_proj", "text_proj", "global_loss")
        return parts + (("local_loss",) if self.recipe.task.retrieval.w_local > 0 else ())

    @property
    def loss_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("loss", "loss_global") + (("loss_local",) if self.recipe.task.retrieval.w_local > 0 else ())

    def architecture(self, ctx: RunContext) -> dict[str, Any]:
        return {"w_local": self.recipe.task.retrieval.w_local}

    def build_model(self, ctx: RunContext) -> nn.Module:
        return AlignmentModel(self.backbone(ctx), self.recipe.task.retrieval.w_local)

    def flops_batch(self, ctx: RunContext) -> dict[str, Any]:
        from mpma_ds.training.metrics import sample_batch

        return sample_batch(self.recipe.data, ctx.model_config, ctx.tokenizer, batch_size=2)  # InfoNCE needs 2

    def evaluate(
        self,
        module: nn.Module,
        batches: Iterable[dict[str, Any]],
        ctx: RunContext,
        *,
        n_resamples: int = 0,
        keep: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return alignment_metrics(self, module, batches, ctx, n_resamples=n_resamples)


def alignment_metrics(
    task: FinetuneTask, module: nn.Module, batches: Iterable[dict[str, Any]], ctx: RunContext, *, n_resamples: int
) -> dict[str, Any]:
    """R@K both ways (+ ``rsum``, their sum) and zero-shot AUROC; with intervals on each when asked."""
    from mpma_ds.eval import evaluate_alignment

    ks = tuple(task.recipe.task.retrieval.ks)
    metrics = dict(
        evaluate_alignment(
            module,
            batches,
            tokenizer=ctx.tokenizer,
            device=ctx.device,
            max_text_len=task.recipe.data.max_text_len,
            ks=ks,
            min_count=task.recipe.train.eval_min_label_count,
            n_resamples=n_resamples,
        )  # fmt: skip
    )
    metrics["rsum"] = sum(metrics[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    return metrics
