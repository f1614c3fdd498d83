"""``vqa``: M3AE's recipe as the baseline — the unmasked image and question through both encoders and MA-CMF
fusion, both streams pooled and concatenated, a Linear-LN-GELU-Linear head over the answer set; BCE over the
answer set (scaled by its size, as M3AE) or softmax CE. Accuracy overall / CLOSED / OPEN.

VQA shards (``build_shards --format vqa-rad|slake``) hold the question in ``<key>.txt`` and the answer, its type
and the qid in ``<key>.json``; the loader passes the JSON through as ``batch["meta"]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpma_ds.config import ConfigSection
from mpma_ds.data.batch import sample_batch
from mpma_ds.eval import vqa_accuracy, with_intervals
from mpma_ds.eval.vqa import answer_indices, build_answer_vocab, soft_answer_targets
from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.features import StandardisedHead, feature_eval_loader, frozen_splits
from mpma_ds.tasks.finetune import BackboneModule, FinetuneTask, read_split_metas
from mpma_ds.tasks.registry import TASKS


class VQAHead(nn.Sequential):
    """Linear(2D, H) - LayerNorm - GELU - Linear(H, answers): M3AE's VQA classifier."""

    def __init__(self, in_dim: int, hidden: int, num_answers: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_answers)
        )
        for layer in (self[0], self[3]):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)


class VQAModel(BackboneModule):
    """MPMA backbone (encoders + fusion) and the VQA head; ``forward(batch)`` -> ``{"loss"}``."""

    def __init__(self, backbone: nn.Module, num_answers: int, *, hidden: int = 0, loss: str = "bce") -> None:
        super().__init__()
        width = 2 * backbone.config.fusion_width
        self.backbone = backbone
        self.head = VQAHead(width, hidden or width, num_answers)
        self.loss_kind = loss

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        feats = self.backbone.fused_features(
            batch["image"], batch["input_ids"], batch["attention_mask"]
        )  # (B, 2D)
        return self.head(feats).float()  # (B, A)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        logits = self.logits(batch)
        valid = batch["valid"].to(logits.device).float()  # (B,): stand-in repeats carry no loss
        if self.loss_kind == "bce":
            targets = batch["answer_targets"].to(logits)  # (B, A)
            per_row = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)  # (B,)
        else:
            ids = batch["answer_ids"].to(logits.device)  # (B,), -1 = answer outside the answer set
            per_row = F.cross_entropy(logits, ids.clamp(min=0), reduction="none")
            valid = valid * (ids >= 0).float()
        loss = (per_row * valid).sum() / valid.sum().clamp(min=1.0)
        return {"loss": loss}


class FrozenVQAHead(StandardisedHead):
    """The VQA head on cached fused features (``task.vqa.freeze_backbone``), standardised with the training
    samples' statistics; ``forward(batch)`` -> ``{"loss"}`` as ``VQAModel``."""

    def __init__(self, in_dim: int, num_answers: int, mean: torch.Tensor, std: torch.Tensor, *, hidden: int = 0,
                 loss: str = "bce") -> None:  # fmt: skip
        super().__init__(mean, std)
        self.head = VQAHead(in_dim, hidden or in_dim, num_answers)
        self.loss_kind = loss

    forward = VQAModel.forward


@dataclass
class VQAOptions(ConfigSection):
    """``task.vqa``: M3AE's VQA recipe — fused image + question → Linear-LN-GELU-Linear over the answer set."""

    SECTION = "task.vqa"

    answer_set: str = "train"
    """``train``: the answers of the training split (test answers never seen in training count as wrong and are
    reported as ``unseen_answers``); ``all``: M3AE's set of every split's answers (named in the results)."""

    loss: str = "bce"
    """``bce``: binary cross-entropy over the answer set with (soft) one-hot targets, scaled by the answer
    count (M3AE); ``ce``: softmax cross-entropy."""

    head_hidden: int = 0
    """Hidden width of the head; 0 = twice the fusion width (the width of the fused representation)."""

    freeze_backbone: bool = False
    """False: M3AE's recipe, everything fine-tuned. True: the backbone frozen, the fused image + question
    representation of every question extracted once and cached (as ``linear_probe`` does with image features),
    only the head trained — what pretraining bought the fused representation, at a fraction of the cost."""

    cache_dir: str = ""
    """``freeze_backbone``: where the fused features are cached; empty = ``<train.output_dir>/features``."""

    def validate(self) -> None:
        if self.answer_set not in ("train", "all"):
            raise ValueError(f"task.vqa.answer_set must be train or all, got {self.answer_set!r}")
        if self.loss not in ("bce", "ce"):
            raise ValueError(f"task.vqa.loss must be bce or ce, got {self.loss!r}")
        if self.head_hidden < 0:
            raise ValueError(f"task.vqa.head_hidden must be >= 0, got {self.head_hidden}")


@TASKS.register("vqa", sections={"vqa": VQAOptions})
class VQATask(FinetuneTask):
    name = "vqa"
    headline_metrics = ("accuracy_overall", "accuracy_closed", "accuracy_open")
    pairing = "vqa_accuracy"
    title = "VQA accuracy"
    shard_kind = "vqa"
    default_best_metric = "accuracy_overall"
    backbone_parts = (
        "image_encoder",
        "text_encoder",
        "text_to_fusion",
        "image_to_fusion",
        "modality_embed",
        "fusion",
    )

    def check(self, ctx: RunContext) -> None:
        data, options = self.recipe.data, self.recipe.task.vqa
        splits = {"train": data.train_shards, "validate": data.val_shards, "test": data.test_shards}
        answers: dict[str, list[str]] = {}
        for split, spec in splits.items():
            if not spec or (split != "train" and options.answer_set == "train"):
                continue
            metas = read_split_metas(spec)
            missing = [i for i, m in enumerate(metas) if not str(m.get("answer") or "").strip()]
            if len(missing) == len(metas):
                raise ValueError(
                    f"the {split} shards {spec} hold no VQA answers (no 'answer' in the sample JSON): build them with "
                    "python -m data_tools.build_shards --format vqa-rad|slake"
                )
            answers[split] = [str(m["answer"]) for m in metas if str(m.get("answer") or "").strip()]
        vocab = build_answer_vocab(answers, mode=options.answer_set)
        self.answers = vocab
        self.answer_counts = {split: len(a) for split, a in answers.items()}

    def architecture(self, ctx: RunContext) -> dict[str, Any]:
        options = self.recipe.task.vqa
        return {"answers": len(self.answers), "head_hidden": options.head_hidden, "loss": options.loss,
                "freeze_backbone": options.freeze_backbone}  # fmt: skip

    @property
    def frozen(self) -> bool:
        return self.recipe.task.vqa.freeze_backbone

    def build_loaders(self, ctx: RunContext):
        if not self.frozen:
            return super().build_loaders(ctx)

        frozen = frozen_splits(
            self, ctx, kind="fused", dim=2 * ctx.model_config.fusion_width,
            featurize=lambda net, b: net.fused_features(b["image"], b["input_ids"], b["attention_mask"]),
            cache_dir=Path(self.recipe.task.vqa.cache_dir or ctx.output_dir / "features"),
            targets=lambda metas: torch.from_numpy(answer_indices([str(m.get("answer", "")) for m in metas],
                                                                  self.answers)),
        )  # fmt: skip
        self.cached, self.mean, self.std = frozen.cached, frozen.mean, frozen.std
        return frozen.loaders, frozen.val

    def eval_loader(self, ctx: RunContext, split: str, source: Any = None):
        if not self.frozen:
            return super().eval_loader(ctx, split, source)
        return feature_eval_loader(self.cached[split], self.recipe.train)

    def build_model(self, ctx: RunContext) -> nn.Module:
        options = self.recipe.task.vqa
        if self.frozen:
            return FrozenVQAHead(2 * ctx.model_config.fusion_width, len(self.answers), self.mean, self.std,
                                 hidden=options.head_hidden, loss=options.loss)  # fmt: skip
        return VQAModel(self.backbone(ctx), len(self.answers), hidden=options.head_hidden, loss=options.loss)

    def lr_scales(self, module: nn.Module) -> dict[str, float] | None:
        return None if self.frozen else super().lr_scales(module)

    def flops_batch(self, ctx: RunContext) -> dict[str, Any] | None:
        if self.frozen:
            return None  # a head on cached features: nothing worth counting

        batch = sample_batch(self.recipe.data, ctx.model_config, ctx.tokenizer)
        batch.update(valid=torch.ones(1, dtype=torch.bool), meta=[{"answer": self.answers[0]}])
        return self.to_model(batch)

    def to_model(self, batch: dict[str, Any]) -> dict[str, Any]:
        gold = [str(m.get("answer", "")) for m in batch["meta"]]
        batch = dict(batch)
        batch["answer_ids"] = torch.from_numpy(answer_indices(gold, self.answers))  # (B,)
        batch["answer_targets"] = soft_answer_targets(gold, self.answers)  # (B, A)
        return batch

    @torch.no_grad()
    def evaluate(
        self,
        module: nn.Module,
        batches: Iterable[dict[str, Any]],
        ctx: RunContext,
        *,
        n_resamples: int = 0,
        keep: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        dtype = next(module.parameters()).dtype
        predicted, gold, types, keys = [], [], [], []
        for batch in batches:
            batch = {k: (v.to(ctx.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            for key in ("image", "features"):
                if key in batch:
                    batch[key] = batch[key].to(dtype)
            pred = module.logits(batch).argmax(dim=1).cpu()  # (B,)
            for i, ok in enumerate(batch["valid"].tolist()):
                if ok:
                    meta = batch["meta"][i]
                    predicted.append(int(pred[i]))
                    gold.append(str(meta.get("answer", "")))
                    types.append(str(meta.get("answer_type", "OPEN")))
                    keys.append(batch["key"][i])
        if not gold:
            raise ValueError("the VQA evaluation split yielded no questions")
        if keep is not None:
            keep.update(keys=keys, predicted=predicted, gold=gold, types=types, answer_vocab=list(self.answers))
        if n_resamples:
            return with_intervals(
                vqa_accuracy, predicted, gold, types, answer_vocab=self.answers, n_resamples=n_resamples, seed=0
            )
        return vqa_accuracy(predicted, gold, types, answer_vocab=self.answers)

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        return {
            **super().summary(ctx),
            "answer_set": self.recipe.task.vqa.answer_set,
            "answers": len(self.answers),
            "questions_read": self.answer_counts,
            "freeze_backbone": self.frozen,
            "feature_files": ctx.feature_files or None,
        }
