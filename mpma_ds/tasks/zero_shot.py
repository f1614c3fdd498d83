"""``zero_shot``: no training — the prompt evaluation (zero-shot CheXpert AUROC from positive/negative prompts)
and image↔report retrieval of the ``init.from`` weights, run through the same command (and the same MLflow
tags) as the fine-tuning tasks, so one table holds them all. The recipe sets ``train.max_steps: 0``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.finetune import FinetuneTask
from mpma_ds.tasks.registry import TASKS
from mpma_ds.tasks.retrieval import AlignmentModel, RetrievalOptions, alignment_metrics


@TASKS.register("zero_shot", sections={"retrieval": RetrievalOptions})
class ZeroShotTask(FinetuneTask):
    name = "zero_shot"
    headline_metrics = ("zeroshot_auroc_mean", "i2t_R_at_1")
    title = "zero-shot AUROC"
    default_best_metric = ""
    backbone_parts = ("image_encoder", "text_encoder", "image_proj", "text_proj", "global_loss")

    def check(self, ctx: RunContext) -> None:
        cfg = self.recipe.train
        if cfg.max_steps != 0 or cfg.epochs > 0:
            raise ValueError(
                f"task zero_shot does not train: set train.max_steps: 0 (got max_steps={cfg.max_steps}, "
                f"epochs={cfg.epochs})"
            )
        if not (self.recipe.data.val_shards or self.recipe.data.test_shards):
            raise ValueError("task zero_shot needs data.val_shards or data.test_shards to evaluate on")

    def wants_validation(self) -> bool:
        return bool(self.recipe.data.val_shards)

    def build_loaders(self, ctx: RunContext):
        # nothing trains: no training stream; the validation pass runs once at the end
        val = self.eval_loader(ctx, "validate") if self.wants_validation() else None
        return [_NoTraining()], val

    def build_model(self, ctx: RunContext) -> nn.Module:
        return AlignmentModel(self.backbone(ctx))

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


class _NoTraining:
    """The training stream of a run of 0 steps: never iterated."""

    loader: tuple = ()
    num_samples = 0
    steps_per_epoch = 1
    subset = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"skipped_samples": 0, "epoch": 0}

    def close(self) -> None:
        pass
