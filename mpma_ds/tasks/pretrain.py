"""Pretraining as a task: MPMA's own forward (paired masking, GLA, MA-CMF, MLM + MAE heads) and the validation
pass: alignment (retrieval R@K both ways, zero-shot CheXpert AUROC) and masked-token accuracy of the fused text
stream, overall (``mlm_acc``) and on finding words (``mlm_acc_findings``, ``mpma_ds.eval.mlm``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from mpma_ds.tasks.base import RunContext, Task
from mpma_ds.tasks.registry import TASKS


@TASKS.register("pretrain")
class PretrainTask(Task):
    """MPMA pretraining: the engine wraps ``MPMA`` itself (consolidated keys are ``MPMA.state_dict()`` keys)."""

    name = "pretrain"
    kind = "pretrain"
    loss_keys = ("loss", "loss_mlm", "loss_mim", "loss_global", "loss_local", "loss_itm")
    test_after_training = False

    def resolve(self, ctx: RunContext) -> None:
        from mpma_ds.models import check_tokenizer_vocab
        from mpma_ds.tokenizer import load_tokenizer

        self.check_inputs()
        ctx.model_config = self.recipe.model.config
        if not self.recipe.data.tokenizer:
            raise ValueError("data.tokenizer is empty: set it to a tokenizer folder (data_tools.train_tokenizer)")
        ctx.tokenizer = load_tokenizer(self.recipe.data.tokenizer)
        check_tokenizer_vocab(ctx.model_config, ctx.tokenizer)
        if self.wants_validation() and not (
            self.recipe.data.val_shards or self.recipe.data.backend == "synthetic"
        ):
            raise ValueError("train.eval_every > 0 needs data.val_shards (or set train.eval_every=0)")

    @property
    def active_loss_keys(self) -> tuple[str, ...]:
        with_itm = self.recipe.model.config.w_itm > 0
        return tuple(k for k in self.loss_keys if k != "loss_itm" or with_itm)

    def build_model(self, ctx: RunContext) -> nn.Module:
        from mpma_ds.models import MPMA

        model = MPMA(ctx.model_config)
        model.set_distributed(ctx.rank, ctx.world_size)
        return model

    def flops_batch(self, ctx: RunContext) -> dict[str, Any]:
        from mpma_ds.training.metrics import sample_batch

        return sample_batch(self.recipe.data, ctx.model_config, ctx.tokenizer)

    def evaluate(
        self,
        module: nn.Module,
        batches: Iterable[dict[str, Any]],
        ctx: RunContext,
        *,
        n_resamples: int = 0,
        keep: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from mpma_ds.eval import evaluate_alignment
        from mpma_ds.eval.mlm import MaskedTokenAccuracy

        # masked-token accuracy (overall and on finding words) scored as the same pass goes by
        mlm = MaskedTokenAccuracy(module, ctx.tokenizer, ctx.device)
        metrics = evaluate_alignment(
            module,
            mlm.stream(batches),
            tokenizer=ctx.tokenizer,
            device=ctx.device,
            max_text_len=self.recipe.data.max_text_len,
            min_count=self.recipe.train.eval_min_label_count,
            n_resamples=n_resamples,
        )
        return {**metrics, **mlm.result()}
