"""What every fine-tuning task shares: the backbone from ``init.from``, the tokenizer, layer-wise learning
rates with a head multiplier, the sample JSONs of a split, and the MLflow tags / summary of the run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from mpma_ds.data.samples import SampleError, SampleReader, decode_meta
from mpma_ds.data.shards import ShardIndex, load_shard_index
from mpma_ds.models import check_tokenizer_vocab
from mpma_ds.tasks.base import RunContext, Task
from mpma_ds.tokenizer import load_tokenizer
from mpma_ds.tracking.lineage import lineage_tags, pair_key_finetune

if TYPE_CHECKING:
    from mpma_ds.models import MPMA
    from mpma_ds.runner.init import InitSource
    from mpma_ds.training.recipe import FinetuneRecipe

HEAD_PREFIX = "head."


class BackboneModule(nn.Module):
    """Base of the task modules that fine-tune an MPMA backbone (``self.backbone``, + a ``head`` where there is
    one): weight decay exemptions and activation checkpointing go to the backbone's own rules."""

    backbone: nn.Module

    def no_weight_decay(self) -> set[str]:
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        head = getattr(self, "head", None)
        if head is not None:
            names |= {f"head.{n}" for n, p in head.named_parameters() if p.ndim <= 1}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


class FinetuneTask(Task):
    """A task that starts from an MPMA backbone (``init.from``) and trains a head (and maybe the backbone)."""

    kind = "finetune"
    backbone_parts: ClassVar[tuple[str, ...]] = ()
    """The MPMA components the task's module keeps (``MPMA.retain``); every one of them receives gradients."""

    recipe: FinetuneRecipe

    # ---------------------------------------------------------------------------------------------- setup
    def resolve(self, ctx: RunContext) -> None:
        init = ctx.init
        if init is None:  # a bug of the caller, not bad input
            raise RuntimeError(
                "RunContext.init is unset: the runner resolves init.from and hands the task its source"
            )
        ctx.model_config = init.config
        tok_dir = self.recipe.data.tokenizer or (str(init.tokenizer_dir) if init.tokenizer_dir else "")
        if not tok_dir:
            raise ValueError(
                "data.tokenizer is empty and init.from brings no tokenizer: set data.tokenizer to a tokenizer folder"
            )
        ctx.tokenizer = load_tokenizer(tok_dir)
        ctx.tokenizer_dir = tok_dir
        check_tokenizer_vocab(ctx.model_config, ctx.tokenizer)
        for name in ("train_shards", "val_shards"):
            if not getattr(self.recipe.data, name) and (name == "train_shards" or self.wants_validation()):
                raise ValueError(
                    f"data.{name} is empty: point it at the {name.split('_')[0]} split's shard folder"
                )
        self.check(ctx)

    def check(self, ctx: RunContext) -> None:
        """The task's own input checks (answer set, label columns ...); default: none."""

    def init_source(self, ctx: RunContext) -> InitSource:
        return ctx.init

    def backbone(self, ctx: RunContext) -> MPMA:
        """The backbone with ``init.from``'s weights, cut down to ``backbone_parts``."""
        model = self.init_source(ctx).load()
        model.set_distributed(ctx.rank, ctx.world_size)
        return model.retain(self.backbone_parts)

    @property
    def bootstrap_resamples(self) -> int:
        return self.recipe.task.bootstrap

    # ---------------------------------------------------------------------------------------------- optimiser
    def lr_scales(self, module: nn.Module) -> dict[str, float] | None:
        """``train.head_lr_mult`` on the head's parameters; ``train.layer_decay`` ** (depth from the top) on the
        backbone's: embeddings at the bottom, then the encoder blocks, the projections, the fusion layers."""
        cfg = self.recipe.train
        if cfg.head_lr_mult == 1.0 and cfg.layer_decay == 1.0:
            return None
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        backbone = getattr(module, "backbone", None)
        depth = {n: backbone.depth_of(n.removeprefix("backbone.")) for n in names if not n.startswith(HEAD_PREFIX)}
        levels = {d: i for i, d in enumerate(sorted(set(depth.values())))}  # consecutive: 0 .. top-1
        top = len(levels)
        scales = {}
        for name in names:
            if name.startswith(HEAD_PREFIX):
                scales[name] = cfg.head_lr_mult
            else:
                scales[name] = cfg.layer_decay ** (top - levels[depth[name]])
        return scales

    # ---------------------------------------------------------------------------------------------- records
    def tags(self, ctx: RunContext) -> dict[str, str]:
        init = self.init_source(ctx)

        data = self.recipe.data
        pair = pair_key_finetune(self.name, data.label_fraction, self.recipe.train.seed, data.label_fraction_seed)
        return {
            "mpma.kind": "finetune",
            "mpma.task": self.name,
            "mpma.init_from": str(init.path) if init.path else "random",
            "mpma.label_fraction": str(data.label_fraction),
            # the pretraining run as MLflow parent (the logger drops it when that run is not in its store)
            **lineage_tags(init.pretrain_run_id, init.label, pair),
        }

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "init": self.init_source(ctx).describe(),
            "label_fraction": self.recipe.data.label_fraction,
            "label_fraction_seed": self.recipe.data.label_fraction_seed,
            "subset": ctx.subset,
        }

    def build_loaders(self, ctx: RunContext):
        loaders, val = super().build_loaders(ctx)
        ctx.subset = getattr(loaders[0], "subset", None)
        return loaders, val


def read_split_metas(spec: str | ShardIndex) -> list[dict[str, Any]]:
    """The sample JSON of every readable sample of a shard set (a spec, or its index already loaded), in index
    order (small reads at the ``.idx`` offsets; the images are not touched). A JSON that does not parse is ``{}``
    (the loader skips and counts that sample)."""
    index = load_shard_index(spec) if isinstance(spec, str) else spec
    at = index.member("json")  # (N, 2): offset, size
    reader = SampleReader(index)
    out = []
    try:
        for i, (offset, size) in enumerate(at.tolist()):
            if offset < 0:
                out.append({})
                continue
            try:
                out.append(decode_meta(reader.read_member(int(index.shard_of[i]), offset, size)))
            except SampleError:
                out.append({})
    finally:
        reader.close()
    return out


def warn_rank0(ctx: RunContext, message: str) -> None:
    """A warning shown once (rank 0), e.g. a label left without positives by a label fraction."""
    if ctx.rank == 0:
        print(f"warning: {message}", flush=True)


def count_values(values: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out
