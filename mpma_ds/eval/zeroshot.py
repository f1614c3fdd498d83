"""Zero-shot CheXpert classification from label prompts: per label, an image's score is its similarity to
the positive prompt minus that to the negative prompt; AUROC over the samples labelled 0 or 1."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from sklearn.metrics import roc_auc_score

from data_tools.shard_format import CHEXPERT_LABELS

# One (positive, negative) prompt pair per CheXpert observation, in the phrasing of MIMIC-CXR reports (which
# the synthetic corpus imitates): the negative is how a report rules the finding out.
CHEXPERT_PROMPTS: dict[str, tuple[str, str]] = {
    "Atelectasis": ("Bibasilar atelectasis.", "No atelectasis."),
    "Cardiomegaly": ("Moderate cardiomegaly.", "Heart size is normal."),
    "Consolidation": ("Focal consolidation in the lower lobe.", "No focal consolidation."),
    "Edema": ("Moderate pulmonary edema.", "No pulmonary edema."),
    "Enlarged Cardiomediastinum": ("The superior mediastinum is widened.", "The mediastinal contours are normal."),
    "Fracture": ("Fracture of the posterior rib.", "No displaced rib fracture."),
    "Lung Lesion": ("A nodule is seen in the upper lobe.", "No suspicious nodule."),
    "Lung Opacity": ("Patchy opacity in the lower lobe.", "No focal opacity."),
    "No Finding": ("No acute cardiopulmonary process.", "Acute cardiopulmonary abnormality."),
    "Pleural Effusion": ("Moderate pleural effusion.", "No pleural effusion."),
    "Pleural Other": ("Apical pleural thickening.", "No pleural thickening."),
    "Pneumonia": ("Findings are consistent with pneumonia.", "No evidence of pneumonia."),
    "Pneumothorax": ("There is a pneumothorax.", "No pneumothorax."),
    "Support Devices": ("Endotracheal tube terminates above the carina.", "No lines or tubes."),
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
