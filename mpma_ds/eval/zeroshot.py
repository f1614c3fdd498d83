"""Zero-shot CheXpert classification from label prompts: per label, an image's score is its similarity to
the positive prompt minus that to the negative prompt; AUROC over the samples labelled 0 or 1."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from sklearn.metrics import roc_auc_score

from data_tools.labels import CHEXPERT_LABELS

# One (positive, negative) prompt pair per CheXpert observation, phrased as a radiologist would write it.
CHEXPERT_PROMPTS: dict[str, tuple[str, str]] = {
    "Atelectasis": ("There is atelectasis.", "There is no atelectasis."),
    "Cardiomegaly": ("The heart is enlarged, consistent with cardiomegaly.", "The heart size is normal."),
    "Consolidation": ("There is focal consolidation.", "There is no focal consolidation."),
    "Edema": ("There is pulmonary edema.", "There is no pulmonary edema."),
    "Enlarged Cardiomediastinum": (
        "The cardiomediastinal silhouette is enlarged.",
        "The cardiomediastinal silhouette is normal.",
    ),
    "Fracture": ("There is a rib fracture.", "There is no fracture."),
    "Lung Lesion": ("There is a lung nodule.", "There is no lung nodule or mass."),
    "Lung Opacity": ("There is an opacity in the lung.", "The lungs are clear."),
    "No Finding": ("No acute cardiopulmonary process.", "There is an acute cardiopulmonary abnormality."),
    "Pleural Effusion": ("There is a pleural effusion.", "There is no pleural effusion."),
    "Pleural Other": ("There is pleural thickening.", "There is no pleural thickening."),
    "Pneumonia": ("There is pneumonia.", "There is no evidence of pneumonia."),
    "Pneumothorax": ("There is a pneumothorax.", "There is no pneumothorax."),
    "Support Devices": ("A support device is in place.", "There are no support devices."),
}


def prompt_scores(image_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor) -> torch.Tensor:
    """(N, C) zero-shot scores: cosine(image, positive prompt) - cosine(image, negative prompt).

    Args:
        image_emb: (N, D) L2-normalised image embeddings.
        pos_emb: (C, D) embeddings of each label's positive prompt.
        neg_emb: (C, D) embeddings of each label's negative prompt.
    """
    return image_emb.float() @ pos_emb.float().T - image_emb.float() @ neg_emb.float().T  # (N, C)


def zero_shot_auroc(
    scores: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str] = CHEXPERT_LABELS
) -> dict[str, float]:
    """Per-label AUROC over samples whose label is exactly 0 or 1 (blank/NaN and uncertain -1 left out).

    Labels with only one class among those samples have no AUROC and are left out of the mean.

    Args:
        scores: (N, C) higher = more likely positive.
        labels: (N, C) float, 1 / 0 / -1 / NaN.
    Returns:
        ``{"zeroshot_auroc/<label>": ..., "zeroshot_auroc_mean": ..., "zeroshot_labels": n_labels_scored}``;
        the mean is NaN when no label has both classes.
    """
    if scores.shape != labels.shape or scores.shape[1] != len(label_names):
        raise ValueError(
            f"scores {tuple(scores.shape)}, labels {tuple(labels.shape)} and {len(label_names)} "
            "label names do not agree"
        )
    out: dict[str, float] = {}
    values = []
    for c, name in enumerate(label_names):
        y = labels[:, c]
        keep = (y == 0) | (y == 1)
        y_kept = y[keep]
        if y_kept.numel() == 0 or bool((y_kept == y_kept[0]).all()):
            continue
        auc = float(roc_auc_score(y_kept.numpy().astype(int), scores[keep, c].double().numpy()))
        out[f"zeroshot_auroc/{name}"] = auc
        values.append(auc)
    out["zeroshot_auroc_mean"] = sum(values) / len(values) if values else math.nan
    out["zeroshot_labels"] = float(len(values))
    return out


def prompts_for(
    label_names: Sequence[str], prompts: Mapping[str, tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    """The (positive, negative) prompt pair of each label; unknown labels get a generic pair."""
    table = {**CHEXPERT_PROMPTS, **(prompts or {})}
    return [table.get(name, (f"There is {name.lower()}.", f"There is no {name.lower()}.")) for name in label_names]
