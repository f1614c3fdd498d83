"""How runs are grouped (MLflow tags, no mlflow import): a pretraining run is the parent of the evaluation and
fine-tuning runs made from its weights (MLflow's nested-run tag, so ``mlflow ui`` shows the tree), and a run from
a random initialisation is matched with its pretrained partner by a *pair key* (what must be equal for the two
to be compared: the task, the label fraction, the seeds, the evaluated split).

Tags written by the fine-tuning trainer (``tasks/finetune.py``) and the evaluation (``runner/evaluate.py``):

- ``mlflow.parentRunId``: the pretraining run (only when it is in the same store; else left out);
- ``mpma.pretrain_run``: the same id, kept even when the parent is elsewhere;
- ``mpma.init``: ``pretrained`` or ``random``;
- ``mpma.pair``: the pair key (``pair_key_finetune`` / ``pair_key_eval``).
"""

from __future__ import annotations

PARENT_TAG = "mlflow.parentRunId"
"""MLflow's nested-run tag: ``mlflow ui`` shows a run under its parent (both in one experiment)."""
PRETRAIN_RUN_TAG = "mpma.pretrain_run"
PAIR_TAG = "mpma.pair"
INIT_TAG = "mpma.init"
HEADLINE_TAG = "mpma.headline_metrics"
"""A fine-tuning run's headline test metrics, comma-separated, first = its label-efficiency curve (the task's
``headline_metrics``, written by the Trainer): what the comparison report pairs it on."""
PAIRING_TAG = "mpma.pairing"
"""The paired statistic two runs of the task are compared by (``mpma_ds.eval.paired``); "" = their intervals."""


def pair_key_finetune(task: str, label_fraction: float | str, seed: int | str, subset_seed: int | str) -> str:
    """``linear_probe|labels=0.1|seed=0|subset_seed=0``: a fine-tuning setting; a pretrained and a random-init run
    with the same key trained the same head on the same labelled subset and were tested on the same split."""
    return f"{task}|labels={float(label_fraction):g}|seed={seed}|subset_seed={subset_seed}"


def pair_key_eval(split: str, shards: str) -> str:
    """``eval|validate|/data/shards/validate``: an evaluation of one split of one shard set."""
    return f"eval|{split}|{shards}"


def lineage_tags(pretrain_run_id: str | None, init: str, pair: str) -> dict[str, str]:
    """The grouping tags of an evaluation or fine-tuning run (the parent only when the pretraining run is known)."""
    tags = {INIT_TAG: init, PAIR_TAG: pair}
    if pretrain_run_id:
        tags[PRETRAIN_RUN_TAG] = str(pretrain_run_id)
        tags[PARENT_TAG] = str(pretrain_run_id)
    return tags
