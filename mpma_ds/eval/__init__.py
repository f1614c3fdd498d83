"""Evaluation of image-report alignment: retrieval R@K both directions and zero-shot CheXpert AUROC."""

from mpma_ds.eval.alignment import encode_texts, evaluate_alignment
from mpma_ds.eval.retrieval import correct_ranks, first_pair_per_report, recall_at_k, retrieval_metrics
from mpma_ds.eval.zeroshot import CHEXPERT_PROMPTS, prompt_scores, prompts_for, zero_shot_auroc

__all__ = [
    "CHEXPERT_PROMPTS",
    "correct_ranks",
    "encode_texts",
    "evaluate_alignment",
    "first_pair_per_report",
    "prompt_scores",
    "prompts_for",
    "recall_at_k",
    "retrieval_metrics",
    "zero_shot_auroc",
]
