"""The sections a fine-tuning recipe adds to a pretraining one: ``task`` (which task, its options) and ``init``
(where the backbone's weights come from). ``mpma_ds.training.recipe.FinetuneRecipe`` composes them; the same
config engine builds them; every field documented here::

    task:
      name: vqa                 # vqa | cls | linear_probe | retrieval | zero_shot
      vqa: {answer_set: train, loss: bce}
    init:
      from: demo_runs/exported  # an exported folder, a pretraining run folder, or random
    model: {name: mpma_tiny}    # the architecture (random init; for a folder it must agree with it)
    data: {...}                 # shards, tokenizer, data.label_fraction
    train: {...}                # epochs, head_lr_mult, layer_decay, early_stopping, best_metric ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.config import ConfigSection, given_keys

UNCERTAIN = ("ignore", "zeros", "ones")
FINETUNE_TASKS = ("vqa", "cls", "linear_probe", "retrieval", "zero_shot")
"""The fine-tuning tasks ``task.name`` may name (``mpma_ds.tasks.registry`` maps each to its class)."""


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


@dataclass
class ClsOptions(ConfigSection):
    """``task.cls`` (also read by ``linear_probe``): which labels, and what an uncertain label means."""

    SECTION = "task.cls"

    labels: str = "chexpert"
    """``chexpert``: multi-label over the CheXpert-14 labels of MIMIC shards (``labels`` in each sample's JSON);
    ``column``: multi-class from one field of the sample JSON (``label_column``)."""

    label_names: list[str] = field(default_factory=list)
    """``chexpert``: the labels to train and report (empty = all 14)."""

    uncertain: str = "ignore"
    """``chexpert``: what an uncertain (-1) label becomes: ``ignore`` (left out of loss and AUROC), ``zeros`` or
    ``ones`` (the CheXpert U-Zeros / U-Ones policies). A blank label is always ignored."""

    label_column: str = ""
    """``column``: the sample-JSON field holding each sample's class (e.g. ``view``)."""

    classes: list[str] = field(default_factory=list)
    """``column``: the class names, in order; empty = the distinct values of the training split, sorted. A value
    outside the list is skipped and counted."""

    min_label_count: int = 1
    """``chexpert``: a label enters the macro AUROC of a split only when that split holds at least this many
    positive and this many negative labelled samples (the others are listed in ``labels_left_out``): a label
    with 3 positives moves the mean by chance, not by skill."""

    def validate(self) -> None:
        if self.labels not in ("chexpert", "column"):
            raise ValueError(f"task.cls.labels must be chexpert or column, got {self.labels!r}")
        if self.uncertain not in UNCERTAIN:
            raise ValueError(f"task.cls.uncertain must be one of {', '.join(UNCERTAIN)}, got {self.uncertain!r}")
        if self.min_label_count < 1:
            raise ValueError(f"task.cls.min_label_count must be >= 1, got {self.min_label_count}")
        if self.labels == "column" and not self.label_column:
            raise ValueError("task.cls.labels=column needs task.cls.label_column (a field of the sample JSON)")

        unknown = sorted(set(self.label_names) - set(CHEXPERT_LABELS))
        if unknown:
            raise ValueError(
                f"task.cls.label_names: unknown {unknown}; the CheXpert labels are {list(CHEXPERT_LABELS)}"
            )


@dataclass
class LinearProbeOptions(ConfigSection):
    """``task.linear_probe``: frozen image encoder, its features extracted once and cached, a linear head."""

    SECTION = "task.linear_probe"

    cache_dir: str = ""
    """Where the extracted features are kept, keyed by the weights, shards and preprocessing they came from
    (runs at several label fractions share them); empty = ``<train.output_dir>/features``."""


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


@dataclass
class TaskSection(ConfigSection):
    """``task``: which fine-tuning task and its options."""

    SECTION = "task"

    name: str = "vqa"
    """``vqa``, ``cls``, ``linear_probe``, ``retrieval`` or ``zero_shot``."""

    bootstrap: int = 1000
    """Resamples of the bootstrap 95 % interval reported beside each final test metric (0 = none)."""

    vqa: VQAOptions = field(default_factory=VQAOptions)
    """Options of ``vqa``."""

    cls: ClsOptions = field(default_factory=ClsOptions)
    """Options of ``cls`` and ``linear_probe`` (labels)."""

    linear_probe: LinearProbeOptions = field(default_factory=LinearProbeOptions)
    """Options of ``linear_probe`` (feature cache)."""

    retrieval: RetrievalOptions = field(default_factory=RetrievalOptions)
    """Options of ``retrieval`` (``ks`` also of ``zero_shot``)."""

    def validate(self) -> None:
        if self.name not in FINETUNE_TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose one of {', '.join(FINETUNE_TASKS)}")
        if self.bootstrap < 0:
            raise ValueError(f"task.bootstrap must be >= 0, got {self.bootstrap}")
        reads = {"vqa": {"vqa"}, "cls": {"cls"}, "linear_probe": {"cls", "linear_probe"}}
        reads.update(retrieval={"retrieval"}, zero_shot={"retrieval"})
        ignored = sorted((set(given_keys(self)) & {"vqa", "cls", "linear_probe", "retrieval"}) - reads[self.name])
        if ignored:
            raise ValueError(
                f"task.{ignored[0]} options are set but task.name is {self.name!r}, which does not read them; "
                f"remove them or set task.name"
            )


@dataclass
class InitSection(ConfigSection):
    """``init``: the backbone's starting weights."""

    SECTION = "init"

    from_: str = "random"
    """``random`` (a randomly initialised twin of ``model``, seeded by ``train.seed`` — the baseline of every
    comparison), an exported folder (``launch/export.py --out``), or a pretraining run folder / checkpoint
    (consolidated on the fly). Written ``from:`` in YAML."""

    def validate(self) -> None:
        if not self.from_:
            raise ValueError("init.from must be random, an exported folder or a pretraining run folder")
