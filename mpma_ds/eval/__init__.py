"""Evaluation: image-report alignment (retrieval R@K both directions, zero-shot CheXpert AUROC) and the
downstream metrics (multi-label / multi-class classification, VQA accuracy, bootstrap intervals, the
label-efficiency table). All metrics are pure functions over numpy arrays / torch tensors."""

from mpma_ds.eval.alignment import alignment_metrics, encode_texts, evaluate_alignment
from mpma_ds.eval.bootstrap import Interval, bootstrap_ci, loggable_metrics, resample_indices, with_intervals
from mpma_ds.eval.classification import (
    UNCERTAIN_POLICIES,
    apply_uncertain_policy,
    multiclass_metrics,
    multilabel_auroc,
    weighted_auroc,
)
from mpma_ds.eval.label_efficiency import format_label_efficiency
from mpma_ds.eval.retrieval import (
    correct_ranks,
    first_pair_per_report,
    group_ranks,
    recall_at_k,
    retrieval_metrics,
)
from mpma_ds.eval.vqa import (
    answer_indices,
    build_answer_vocab,
    normalize_answer,
    soft_answer_targets,
    vqa_accuracy,
    vqa_correctness,
)
from mpma_ds.eval.zeroshot import (
    CHEXPERT_PROMPTS,
    DEFAULT_MIN_COUNT,
    abnormal_rows,
    ensemble_embeddings,
    prompt_scores,
    prompts_for,
    reference_targets,
    zero_shot_auroc,
)

__all__ = [
    "CHEXPERT_PROMPTS",
    "DEFAULT_MIN_COUNT",
    "abnormal_rows",
    "alignment_metrics",
    "ensemble_embeddings",
    "group_ranks",
    "reference_targets",
    "Interval",
    "UNCERTAIN_POLICIES",
    "answer_indices",
    "apply_uncertain_policy",
    "bootstrap_ci",
    "build_answer_vocab",
    "correct_ranks",
    "encode_texts",
    "evaluate_alignment",
    "first_pair_per_report",
    "format_label_efficiency",
    "loggable_metrics",
    "multiclass_metrics",
    "multilabel_auroc",
    "normalize_answer",
    "prompt_scores",
    "prompts_for",
    "recall_at_k",
    "resample_indices",
    "retrieval_metrics",
    "soft_answer_targets",
    "vqa_accuracy",
    "vqa_correctness",
    "weighted_auroc",
    "with_intervals",
    "zero_shot_auroc",
]
