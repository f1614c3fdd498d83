"""``cls``: the image encoder's pooled features → a linear head, fine-tuned end to end. Multi-label (BCE; macro and
per-label AUROC) over the CheXpert-14 labels of MIMIC shards (uncertain -1 mapped by ``task.cls.uncertain``, blank
ignored), over a dataset's own label set (``labels: dataset``: each sample JSON's ``dataset_labels``, written from a
manifest's ``dataset_labels`` column: NIH's 14, VinDr's, PadChest's) or over the synthetic corpus's drawn findings
(``labels: truth``: the supervised bound of the demo's zero-shot AUROC, `runner.supervised_bound`); or multi-class
(softmax cross-entropy; accuracy, per-class and macro F1 / AUROC) from one field of the sample JSON (``labels:
column``, e.g. ``label_column: class``, a manifest's ``class`` column: COVIDx's normal / pneumonia / COVID-19).

``Labels`` (the label rules) is shared with ``linear_probe``, which trains the same head on frozen features.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_tools.shard_format import CHEXPERT_LABELS, DATASET_LABELS_FIELD, LABEL_VALUES
from mpma_ds.config import ConfigSection
from mpma_ds.data.batch import labels_vector, sample_batch
from mpma_ds.data.shards import load_shard_index
from mpma_ds.data.subsets import LabelCover, meta_subject, split_subset
from mpma_ds.eval import apply_uncertain_policy, multiclass_metrics, multilabel_auroc, with_intervals
from mpma_ds.eval.zeroshot import truth_targets
from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.finetune import BackboneModule, FinetuneTask, read_split_metas, warn_rank0
from mpma_ds.tasks.registry import TASKS

if TYPE_CHECKING:
    from mpma_ds.training.recipe import FinetuneRecipe


UNCERTAIN = ("ignore", "zeros", "ones")
"""What an uncertain (-1) CheXpert label may become (``task.cls.uncertain``)."""
LABEL_SOURCES = ("chexpert", "truth", "column", "dataset")
"""Where ``task.cls.labels`` reads the targets: report labels, the dataset's own labels, the synthetic truth, or one
JSON field (the only multi-class source)."""


def dataset_label_set(metas: Sequence[dict[str, Any]]) -> list[str]:
    """The label names of the first sample JSON holding ``dataset_labels`` (a build writes the same on every
    sample); empty when none has them."""
    own = next((m[DATASET_LABELS_FIELD] for m in metas if isinstance(m.get(DATASET_LABELS_FIELD), dict)), {})
    return list(own)


def dataset_targets(metas: Sequence[dict[str, Any]], names: Sequence[str]) -> np.ndarray:
    """(N, C) float 1 / 0 / -1 / NaN of each sample's ``dataset_labels`` (a sample without one: all NaN)."""
    out = np.full((len(metas), len(names)), np.nan, dtype=np.float32)
    for i, meta in enumerate(metas):
        own = meta.get(DATASET_LABELS_FIELD) or {}
        for c, name in enumerate(names):
            value = own.get(name)
            if value is not None and value in LABEL_VALUES:
                out[i, c] = float(value)
    return out


class Labels:
    """The label rules of a classification recipe: which targets a batch gives, the loss, the metrics."""

    def __init__(self, options: ClsOptions, classes: Sequence[str] | None = None) -> None:
        """``classes``: the names found in the shards (``column``: the classes; ``dataset``: the label set), used
        where the options list none."""
        self.options = options
        self.multilabel = options.labels != "column"
        self.truth = options.labels == "truth"
        self.own = options.labels == "dataset"
        if self.own:
            self.names = list(options.label_names or classes or ())
        elif self.multilabel:
            self.names = list(options.label_names or CHEXPERT_LABELS)
            self.columns = [list(CHEXPERT_LABELS).index(n) for n in self.names]
        else:
            self.names = list(classes or options.classes)
        self.train_positives: dict[str, int] = {}
        """Positive training samples of each label / class in the label-fraction subset (``check_subset``)."""
        self.train_cover: LabelCover | None = None
        """The training split's positives under ``data.label_fraction_cover`` (``check_subset``), else None."""

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, C) float 1/0/NaN (multi-label, uncertain policy applied) or (B,) int64 class id, -1 = none."""
        if self.truth:
            # a row without truth is one the batch skipped (valid False): NaN, left out of loss and AUROC
            targets = truth_targets(batch["meta"], self.names, strict=False)
            return torch.as_tensor(targets, dtype=torch.float32)  # (B, C)
        if self.own:
            labels = torch.from_numpy(dataset_targets(batch["meta"], self.names))  # (B, C)
            return apply_uncertain_policy(labels, self.options.uncertain)
        if self.multilabel:
            labels = torch.as_tensor(batch["labels"], dtype=torch.float32)[:, self.columns]  # (B, C)
            return apply_uncertain_policy(labels, self.options.uncertain)
        index = {name: i for i, name in enumerate(self.names)}
        column = self.options.label_column
        return torch.tensor([index.get(str(m.get(column)), -1) for m in batch["meta"]], dtype=torch.long)

    def targets_from_metas(self, metas: Sequence[dict[str, Any]]) -> np.ndarray:
        """The same targets for sample JSONs (label counts before training, cached features)."""
        if self.truth:
            return truth_targets(metas, self.names).astype(np.float32)
        if self.own:
            return self.targets({"meta": list(metas)}).numpy()
        if self.multilabel:
            rows = np.stack([labels_vector(m) for m in metas]) if metas else np.zeros((0, len(CHEXPERT_LABELS)))
            return self.targets({"labels": torch.from_numpy(rows.astype(np.float32))}).numpy()
        return self.targets({"meta": list(metas)}).numpy()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean BCE over labelled (row, label) cells (multi-label) or mean CE over labelled rows."""
        valid = valid.to(logits.device).bool()
        if self.multilabel:
            targets = targets.to(logits.device)
            known = ~torch.isnan(targets) & valid[:, None]  # (B, C)
            cells = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
            return (cells * known).sum() / known.sum().clamp(min=1)
        targets = targets.to(logits.device)
        known = (targets >= 0) & valid  # (B,)
        rows = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
        return (rows * known).sum() / known.sum().clamp(min=1)

    def metrics(self, scores: np.ndarray, targets: np.ndarray, *, n_resamples: int = 0) -> dict[str, Any]:
        if self.multilabel:
            fn, arrays = multilabel_auroc, (scores, targets)
            kwargs: dict[str, Any] = {"names": self.names, "min_each": self.options.min_label_count}
        else:
            known = targets >= 0
            fn, arrays, kwargs = multiclass_metrics, (scores[known], targets[known]), {"class_names": self.names}
        if n_resamples:
            return with_intervals(fn, *arrays, n_resamples=n_resamples, seed=0, **kwargs)
        return fn(*arrays, **kwargs)

    def positives(self, targets: np.ndarray) -> np.ndarray:
        """(N, C) bool of ``targets`` (`targets_from_metas`): a label's positives (target 1), or a class's
        samples (single-label)."""
        if self.multilabel:
            return targets == 1
        return targets[:, None] == np.arange(len(self.names))[None, :]

    def cover(self, targets: np.ndarray) -> LabelCover:
        """What ``data.label_fraction_cover`` needs of the training split (`subsets.cover_labels`)."""
        return LabelCover(tuple(self.names), self.positives(np.asarray(targets)))

    def check_subset(
        self,
        ctx: RunContext,
        metas: Sequence[dict[str, Any]],
        recipe: FinetuneRecipe,
        keys: Sequence[str] | None = None,
    ) -> dict:
        """Label counts of the training subset (``data.label_fraction``, covered under
        ``data.label_fraction_cover``: one line says what was added); a label without positives is named in a
        warning (its AUROC cannot improve from training), or refused with ``require_positives``. ``keys``: the
        samples' keys, the patient of a JSON without ``subject_id`` as the loader reads it (default: the row)."""
        data = recipe.data
        keys = [str(i) for i in range(len(metas))] if keys is None else keys
        subjects = [meta_subject(m, k) for m, k in zip(metas, keys)]
        targets = self.targets_from_metas(metas)
        self.train_cover = self.cover(targets) if data.label_fraction_cover else None
        keep, subset = split_subset(
            subjects, data.label_fraction, data.label_fraction_seed, split="train", cover=self.train_cover
        )
        counts = self.positives(targets[keep]).sum(axis=0)  # (C,)
        positives = {n: int(c) for n, c in zip(self.names, counts.tolist())}
        empty = [n for n, count in positives.items() if count == 0]
        where = f"data.label_fraction={data.label_fraction} (seed {data.label_fraction_seed})"
        added = (subset or {}).get("cover") or {}
        if added.get("patients_added") and ctx.rank == 0:
            print(
                f"{where}: data.label_fraction_cover added {added['patients_added']} patient(s), "
                f"{added['samples_added']} sample(s) so that {', '.join(added['labels'])} have a positive "
                "training sample",
                flush=True,
            )
        what = "label(s)" if self.multilabel else "class(es)"
        if empty and self.options.require_positives:
            if data.label_fraction_cover or data.label_fraction >= 1.0:
                raise ValueError(
                    f"the train split {data.train_shards} holds no positive training sample for {what} "
                    f"{', '.join(empty)}: leave them out of task.cls.label_names, or check its labels"
                )
            raise ValueError(
                f"{where} leaves no positive training sample for {what} {', '.join(empty)} in {data.train_shards}: "
                "set data.label_fraction_cover=true, raise the fraction, pick another data.label_fraction_seed, "
                "or leave them out of task.cls.label_names"
            )
        if empty:
            warn_rank0(ctx, f"{where} leaves no positive training sample for {', '.join(empty)}")
        return positives


def resolve_labels(task: FinetuneTask, ctx: RunContext) -> Labels:
    """The label rules of ``task``'s recipe, classes discovered from the training split when not listed, and the
    label counts of the training subset checked."""
    options = task.recipe.task.cls
    index = load_shard_index(task.recipe.data.train_shards)  # once: its keys name each sample's patient below
    metas = read_split_metas(index)
    classes = None
    if options.labels == "column":
        values = [m.get(options.label_column) for m in metas]
        present = sorted({str(v) for v in values if v is not None and v != ""})
        if not present:
            raise ValueError(
                f"task.cls.label_column {options.label_column!r} is absent from every training sample's JSON "
                f"({task.recipe.data.train_shards})"
            )
        classes = options.classes or present
        if len(classes) < 2:
            raise ValueError(f"task.cls.label_column {options.label_column!r} has one class only: {classes}")
    if options.labels == "dataset":
        classes = dataset_label_set(metas)
        if not classes:
            raise ValueError(
                f"task.cls.labels=dataset but no sample of the train shards {task.recipe.data.train_shards} holds "
                f"{DATASET_LABELS_FIELD}: build them from a manifest with a {DATASET_LABELS_FIELD} column"
            )
        if unknown := [n for n in options.label_names if n not in classes]:
            raise ValueError(
                f"task.cls.label_names: {', '.join(map(repr, unknown))} not among the {DATASET_LABELS_FIELD} of "
                f"{task.recipe.data.train_shards} ({', '.join(classes)})"
            )
    labels = Labels(options, classes)
    if labels.multilabel and not np.isfinite(labels.targets_from_metas(metas)).any():
        raise ValueError(
            f"the train shards {task.recipe.data.train_shards} hold no CheXpert labels (every sample's labels are "
            "blank): cls and linear_probe need labelled shards, e.g. MIMIC-CXR built with its "
            "mimic-cxr-2.0.0-chexpert.csv, or task.cls.labels=column with a label_column"
        )
    labels.train_positives = labels.check_subset(ctx, metas, task.recipe, index.keys)
    task.label_cover = labels.train_cover  # the training streams keep the subset checked here
    return labels


class LinearHead(nn.Module):
    """The classifier of ``cls`` and ``linear_probe``: one linear layer (``head.`` parameters)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ImageClassifier(BackboneModule):
    """The MPMA image encoder (pooled features) and a linear head."""

    def __init__(self, backbone: nn.Module, labels: Labels) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = LinearHead(backbone.config.vision_width, labels.num_outputs)
        self.labels = labels

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.head(self.backbone.image_features(batch["image"])).float()  # (B, C)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"loss": self.labels.loss(self.logits(batch), batch["targets"], batch["valid"])}


def evaluate_classifier(
    module: nn.Module,
    batches: Iterable[dict[str, Any]],
    labels: Labels,
    ctx: RunContext,
    *,
    n_resamples: int,
    keep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Scores of the valid rows of one pass, then AUROC (multi-label) or accuracy/F1/AUROC (multi-class)."""
    dtype = next(module.parameters()).dtype
    scores, targets, keys = [], [], []
    with torch.no_grad():
        for batch in batches:
            batch = {k: (v.to(ctx.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            for key in ("image", "features"):
                if key in batch:
                    batch[key] = batch[key].to(dtype)
            valid = batch["valid"].bool().cpu()
            scores.append(module.logits(batch).cpu()[valid])
            targets.append(batch["targets"].cpu()[valid])
            keys += [k for k, ok in zip(batch["key"], valid.tolist()) if ok]
    if not scores or sum(len(s) for s in scores) == 0:
        raise ValueError("the evaluation split yielded no samples")
    all_scores, all_targets = torch.cat(scores), torch.cat(targets)
    if keep is not None:
        keep.update(keys=keys, scores=all_scores, targets=all_targets, names=list(labels.names),
                    multilabel=labels.multilabel)  # fmt: skip
    return labels.metrics(all_scores.numpy(), all_targets.numpy(), n_resamples=n_resamples)


@dataclass
class ClsOptions(ConfigSection):
    """``task.cls`` (also read by ``linear_probe``): which labels, and what an uncertain label means."""

    SECTION = "task.cls"

    labels: str = "chexpert"
    """``chexpert``: multi-label over the CheXpert-14 labels of MIMIC shards (``labels`` in each sample's JSON);
    ``truth``: multi-label over the findings the synthetic corpus drew (each sample JSON's ``truth``: 1 drawn,
    0 not, the zero-shot metric's reference; shards from ``data_tools.synth_corpus`` only);
    ``column``: multi-class from one field of the sample JSON (``label_column``)."""

    label_names: list[str] = field(default_factory=list)
    """``chexpert``: the labels to train and report (empty = all 14); ``dataset``: the dataset's labels to train and
    report, names of the shards' ``dataset_labels`` (empty = all of them, in the shards' order)."""

    uncertain: str = "ignore"
    """``chexpert`` / ``dataset``: what an uncertain (-1) label becomes: ``ignore`` (left out of loss and AUROC), ``zeros`` or
    ``ones`` (the CheXpert U-Zeros / U-Ones policies). A blank label is always ignored."""

    label_column: str = ""
    """``column``: the sample-JSON field holding each sample's class (e.g. ``view``)."""

    classes: list[str] = field(default_factory=list)
    """``column``: the class names, in order; empty = the distinct values of the training split, sorted. A value
    outside the list is skipped and counted."""

    require_positives: bool = False
    """Refuse (one line, before the model is built) a ``data.label_fraction`` subset that leaves a label / class
    without a positive training sample; False: warn and train (its AUROC cannot improve from training). Under
    ``data.label_fraction_cover`` that happens only where the whole train split has no positive of it."""

    min_label_count: int = 1
    """Multi-label: a label enters the macro AUROC of a split only when that split holds at least this many
    positive and this many negative labelled samples (the others are listed in ``labels_left_out``): a label
    with 3 positives moves the mean by chance, not by skill."""

    def validate(self) -> None:
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"task.cls.labels must be one of {', '.join(LABEL_SOURCES)}, got {self.labels!r}")
        if self.uncertain not in UNCERTAIN:
            raise ValueError(f"task.cls.uncertain must be one of {', '.join(UNCERTAIN)}, got {self.uncertain!r}")
        if self.min_label_count < 1:
            raise ValueError(f"task.cls.min_label_count must be >= 1, got {self.min_label_count}")
        if self.labels == "column" and not self.label_column:
            raise ValueError("task.cls.labels=column needs task.cls.label_column (a field of the sample JSON)")
        if self.labels == "dataset" and self.classes:
            raise ValueError(
                "task.cls.classes is for labels=column; labels=dataset names its labels in label_names"
            )
        unknown = (
            sorted(set(self.label_names) - set(CHEXPERT_LABELS)) if self.labels in ("chexpert", "truth") else []
        )
        if unknown:
            raise ValueError(
                f"task.cls.label_names: unknown {unknown}; the CheXpert labels are {list(CHEXPERT_LABELS)}"
            )


@TASKS.register("cls", sections={"cls": ClsOptions})
class ClassificationTask(FinetuneTask):
    name = "cls"
    headline_metrics = ("auroc_macro",)
    pairing = "multilabel_auroc"
    title = "classification AUROC"
    default_best_metric = "auroc_macro"
    backbone_parts = ("image_encoder",)

    def check(self, ctx: RunContext) -> None:
        self.labels = resolve_labels(self, ctx)

    def architecture(self, ctx: RunContext) -> dict[str, Any]:
        return {"labels": list(self.labels.names), "multilabel": self.labels.multilabel}

    def build_model(self, ctx: RunContext) -> nn.Module:
        return ImageClassifier(self.backbone(ctx), self.labels)

    def to_model(self, batch: dict[str, Any]) -> dict[str, Any]:
        return dict(batch, targets=self.labels.targets(batch))

    def flops_batch(self, ctx: RunContext) -> dict[str, Any]:
        batch = sample_batch(self.recipe.data, ctx.model_config, ctx.tokenizer)
        batch.update(valid=torch.ones(1, dtype=torch.bool), labels=torch.zeros(1, len(CHEXPERT_LABELS)), meta=[{}])
        return self.to_model(batch)

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
        }
