"""What a task is to the ``Trainer``: it owns its model, ``batch -> loss dict`` and its evaluation metrics.

Pretraining is one task (``PretrainTask``); each fine-tuning task (``vqa``, ``cls``, ``linear_probe``,
``retrieval``, ``zero_shot``) is another, in a file of its own — a new task is one class, not a second loop.

The ``Trainer`` calls, in this order:

1. ``resolve(ctx)`` — before any process group: the architecture, the tokenizer and every check bad input can
   fail (answer set, label columns, init folder); raise ``ValueError``/``FileNotFoundError`` with one line;
2. ``build_loaders(ctx)`` — the training streams (one per accumulation micro-step) and the validation stream
   (the process group exists now: a task may run collectives, e.g. to extract features once);
3. ``build_model(ctx)`` — the ``nn.Module`` the engine wraps, whose ``forward(batch, generator=None)`` returns a
   dict with ``"loss"`` and each term in ``loss_keys``;
4. per micro-batch ``to_model(batch)`` (batch → what the module reads, e.g. answer targets), then forward;
5. ``evaluate(module, batches, ctx)`` on the validation (and at the end the test) split — collective: every
   rank calls it with the same batches; metric names come without a split prefix (``accuracy``), the trainer
   adds ``eval/`` (validation) or ``test/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mpma_ds.data import build_loader
from mpma_ds.data.preflight import check_run_inputs
from mpma_ds.tracking.lineage import HEADLINE_TAG, PAIRING_TAG

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from mpma_ds.data.loader import LoaderInfo
    from mpma_ds.data.subsets import LabelCover
    from mpma_ds.models import MPMAConfig
    from mpma_ds.training.recipe import Recipe


@dataclass
class RunContext:
    """What the trainer resolved for this process, handed to every task hook."""

    recipe: Recipe
    rank: int
    world_size: int
    accumulation: int
    ds_config: dict[str, Any]
    device: torch.device
    model_config: MPMAConfig | None = None
    """The backbone architecture (set by ``Task.resolve``)."""
    tokenizer: PreTrainedTokenizerFast | None = None
    """The tokenizer (set by ``Task.resolve``)."""
    init: Any = None
    """Where the backbone's weights come from (``mpma_ds.runner.init.InitSource``; fine-tuning, set by ``resolve``)."""
    tokenizer_dir: str = ""
    """The tokenizer folder (fine-tuning, set by ``resolve``)."""
    subset: Any = None
    """The label-fraction subset the training streams read (``mpma_ds.data.subsets``), for the run's summary."""
    feature_files: dict[str, str] = field(default_factory=dict)
    """Frozen-backbone tasks: the cached feature file of each split."""

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.train.output_dir)

    @property
    def data_ranks(self) -> int:
        """Loader streams over all ranks: one per rank and accumulation micro-step."""
        return self.world_size * self.accumulation


class Task:
    """Base class of every task (see the module docstring for the hooks' order)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "finetune"
    loss_keys: ClassVar[tuple[str, ...]] = ("loss",)
    default_best_metric: ClassVar[str] = ""
    """Validation metric that picks the best checkpoint when ``train.best_metric`` is empty ("" = none)."""
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    """The test metrics (no ``test/`` prefix) two runs of the task are compared on, the first being its
    label-efficiency curve; the Trainer writes them as the run's ``mpma.headline_metrics`` tag, which the
    comparison report reads (nothing in ``tracking`` lists tasks)."""
    pairing: ClassVar[str] = ""
    """How two runs are compared sample by sample: a paired statistic registered in ``mpma_ds.eval.paired``
    (``vqa_accuracy``, ``multilabel_auroc``, a plugin's own), fed the ``keep`` outputs of ``evaluate``; "" = from
    the two runs' own intervals. Written as the ``mpma.pairing`` tag."""
    title: ClassVar[str] = ""
    """What the first headline metric is, for figures ("linear probe AUROC"); "" = the task's name."""
    shard_kind: ClassVar[str] = "report"
    """What the task's shards hold (``data_tools.shard_format.SHARD_KINDS``): ``report`` or ``vqa``; shards of
    another kind are refused before the first step (``mpma_ds.data.preflight``)."""
    test_after_training: ClassVar[bool] = True
    """Evaluate the best (else last) checkpoint on the test split at the end, when ``data.test_shards`` is set."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.label_cover: LabelCover | None = None
        """The train split's positives, for ``data.label_fraction_cover``: set in ``resolve`` by a task that
        reads labels (``cls``), handed to the training streams."""

    # ---------------------------------------------------------------------------------------------- setup
    def resolve(self, ctx: RunContext) -> None:
        """Set ``ctx.model_config`` and ``ctx.tokenizer`` and check every input; raise on bad input."""
        raise NotImplementedError

    def check_inputs(self) -> None:
        """Every shard set the run will read (train, validation, test) exists, is indexed and holds
        ``shard_kind``: the runner calls it first, before ``init.from`` is resolved and ``resolve`` runs, so a
        wrong path is found before the first step, not after the last (``mpma_ds.data.preflight``)."""
        check_run_inputs(
            self.recipe,
            kind=self.shard_kind,
            reader=f"task {self.name}",
            validation=self.wants_validation(),
            test=self.test_after_training,
        )

    def architecture(self, ctx: RunContext) -> dict[str, Any] | None:
        """What a checkpoint must agree with besides the backbone (e.g. the answer-set size); None: nothing."""
        return None

    def build_loaders(self, ctx: RunContext) -> tuple[list[LoaderInfo], LoaderInfo | None]:
        """``(train streams, validation stream or None)``; default: shards through ``mpma_ds.data.build_loader``."""
        recipe, cfg = self.recipe, self.recipe.train
        loaders = []
        try:
            for a in range(ctx.accumulation):
                loaders.append(
                    build_loader(
                        recipe.data,
                        ctx.rank * ctx.accumulation + a,
                        ctx.data_ranks,
                        split="train",
                        batch_size=cfg.micro_batch_size,
                        tokenizer=ctx.tokenizer,
                        seed=cfg.seed,
                        train=True,
                        cover=self.label_cover,
                    )  # fmt: skip
                )
            val = self.eval_loader(ctx, "validate") if self.wants_validation() else None
        except BaseException:
            for loader in loaders:
                loader.close()
            raise
        return loaders, val

    def wants_validation(self) -> bool:
        return bool(self.recipe.train.eval_every or self.recipe.train.eval_every_epochs)

    def eval_loader(self, ctx: RunContext, split: str, source: Any = None) -> LoaderInfo:
        """One deterministic pass over ``split``, the whole split on every rank (data rank 0 of 1); with
        ``source`` (a ``data.train_sources`` entry), over that source's ``val_shards`` instead."""
        cfg = self.recipe.train
        data = (
            self.recipe.data
            if source is None
            else dataclasses.replace(self.recipe.data, val_shards=source.val_shards)
        )
        return build_loader(
            data, 0, 1, split=split, batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
            tokenizer=ctx.tokenizer, seed=cfg.seed, train=False,
        )  # fmt: skip

    def build_model(self, ctx: RunContext) -> nn.Module:
        raise NotImplementedError

    def lr_scales(self, module: nn.Module) -> dict[str, float] | None:
        """Per-parameter learning-rate multipliers (head multiplier, layer decay); None: all 1."""
        return None

    def flops_batch(self, ctx: RunContext) -> dict[str, Any] | None:
        """A made-up batch of the shapes training sees, to count training FLOPs per sample (None: not counted)."""
        return None

    # ---------------------------------------------------------------------------------------------- steps
    def to_model(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The loader's batch → what the module's forward reads (default: as it is)."""
        return batch

    @property
    def bootstrap_resamples(self) -> int:
        """Resamples of the 95 % intervals beside the final test metrics (0 = none)."""
        return 0

    def evaluate(
        self,
        module: nn.Module,
        batches: Iterable[dict[str, Any]],
        ctx: RunContext,
        *,
        n_resamples: int = 0,
        keep: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Metrics of ``module`` over ``batches`` (collective: every rank runs it on the same batches); with
        ``n_resamples`` > 0 a bootstrap 95 % interval beside each (``<metric>_ci95: [low, high]``). A task that
        can fills ``keep`` with its per-sample outputs (``keys`` + predictions and targets), which the trainer
        saves as ``test_predictions.pt`` for paired comparisons between runs."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- records
    def tags(self, ctx: RunContext) -> dict[str, str]:
        """MLflow tags of the run (``mpma.kind``, ``mpma.task``, ``mpma.init`` ...)."""
        return {"mpma.kind": self.kind, "mpma.task": self.name}

    def comparison_tags(self) -> dict[str, str]:
        """The tags the comparison report pairs a fine-tuning run by: its headline test metrics and pairing."""
        if self.kind != "finetune":
            return {}
        return {HEADLINE_TAG: ",".join(f"test/{m}" for m in self.headline_metrics), PAIRING_TAG: self.pairing}

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        """Task facts for ``summary.json`` / ``results.json`` (answer set, label fraction ...)."""
        return {}
