"""Similarity maps with the location prior taken out: what a film's map says beyond the map every film gets.

The shifted baselines of `grounding_maps` show the local similarity of a phrase mostly encoding *where findings
usually are*: nearly the same map for every film. These maps remove that prior in the ways a user would try; each
is registered in `attribution.GROUNDING_MAPS` (``similarity_contrast``, ``similarity_zscore``,
``similarity_neutral``). The first two need a `GroundingPrior` fitted once on reference films and attached to the
model (`attach_prior`; without one they are not available, `attribution.available_maps`); the third needs only
the tokenizer (its registry entry says so: ``tokenizer=True``, and `attribution.model_grids` passes it).

The similarity map of a phrase is linear in the patch features: with t = the mean of the phrase's L2-normalised
token features and p_hw(x) the L2-normalised patch feature of film x at cell (h, w), ``map_hw(x) = t . p_hw(x)``
(the mean of the token maps, as `grounding.phrase_maps`). So the prior of *any* phrase over a reference set of
films needs only the patch features' per-cell mean mu_hw and covariance S_hw, stored once (Hp x Wp x E and
Hp x Wp x E x E floats), not one map per phrase:

- ``similarity_contrast``: ``t . (p_hw(x) - mu_hw)``, the phrase's map minus its mean map over the reference
  films (the prior).
- ``similarity_zscore``: the contrast divided per cell by the phrase map's standard deviation over the reference
  films, ``sqrt(t' S_hw t)``: how unusual this film's cell is for this phrase.
- ``similarity_neutral``: ``(t - n) . p_hw(x)``, the phrase's map minus the map of neutral phrases
  (`NEUTRAL_PHRASES`, what normal reports say; n the mean of their vectors) on the same film: what is left when
  the film's own structure, which every phrase follows alike, is subtracted. Linear too: one vector ``t - n``
  against the patches.
- ``similarity_findings``: ``(t - f) . p_hw(x)`` with f the mean of every finding phrase's vector
  (`FINDING_PHRASES`): where this finding reads above findings in general on this film. What every finding phrase
  follows alike (the film's structure, the prior) cancels as in the neutral map, with no neutral phrase to choose.

Fit the prior on films the maps are not scored on (the training split: `benchmarks/bench_grounding_maps.py`
``--prior-split``); at predict time fit it once on any set of the user's films and keep it with the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpma_ds.eval.attribution import GROUNDING_MAPS, _tokenise, text_limit

NEUTRAL_PHRASES = (
    "no acute cardiopulmonary process",
    "the lungs are clear",
    "normal chest",
    "heart size is normal",
    "the mediastinal contours are normal",
    "no pleural effusion or pneumothorax",
    "no focal consolidation",
)
"""The neutral phrases of ``similarity_neutral``, ensembled (the mean of their vectors, as CLIP ensembles its
prompts): sentences a normal chest report says, each naming no finding as present. One phrase alone moved a
900-step model's pointing game by up to 0.15 by which phrase it was; their mean is the one reference measured that
points above the random twin on every model and split (docs/model.md, "No phrase to choose")."""

FINDING_PHRASES: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Enlarged Cardiomediastinum": "widened mediastinum",
    "Fracture": "rib fracture",
    "Lung Lesion": "nodule",
    "Lung Opacity": "opacity",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "apical pleural thickening",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Support Devices": "tube",
}
"""The query phrase of each finding (`eval.grounding.finding_phrase` prefixes the side): how the synthetic reports
(``data_tools/synth/reports.py``) word it, the CheXpert name in lower case where they use it (Lung Lesion is a
"nodule" or "mass", Enlarged Cardiomediastinum a widened mediastinum, Pleural Other an apical pleural thickening /
cap, Support Devices tubes, lines and catheters). Together they are the reference of ``similarity_findings``."""

ZSCORE_FLOOR = 1e-6
"""Floor of the z-score's per-cell standard deviation: a cell whose map never varies scores 0, not inf."""


@dataclass
class GroundingPrior:
    """What ``similarity_contrast`` / ``similarity_zscore`` need of a reference set of films: per cell the mean
    (Hp, Wp, E) and covariance (Hp, Wp, E, E) of the L2-normalised patch features, and how many films they were
    fitted on. Float32 on the CPU."""

    mean: torch.Tensor
    cov: torch.Tensor
    films: int

    def state_dict(self) -> dict[str, Any]:
        """Everything, for ``torch.save`` (`from_state_dict` reads it back)."""
        return {"mean": self.mean, "cov": self.cov, "films": self.films}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GroundingPrior:
        return cls(**state)


def _module(model: Any) -> Any:
    return model if hasattr(model, "patch_embeddings") else model.module


@torch.no_grad()
def fit_prior(model: Any, images: Iterable[torch.Tensor], *, device: Any = "cpu") -> GroundingPrior:
    """The `GroundingPrior` of ``model`` over reference films: ``images`` yields (B, C, H, W) normalised images
    (the eval transform's, as the maps will see them). Runs in eval mode.

    Raises:
        ValueError: no film.
    """
    net = _module(model)
    was_training = net.training
    net.eval()
    total = second = None
    films = 0
    try:
        dtype = next(net.parameters()).dtype
        for batch in images:
            p = net.patch_embeddings(batch.to(device=device, dtype=dtype)).double().cpu()  # (B, Hp, Wp, E)
            total = p.sum(0) if total is None else total + p.sum(0)
            outer = torch.einsum("bhwe,bhwf->hwef", p, p)  # (Hp, Wp, E, E)
            second = outer if second is None else second + outer
            films += p.shape[0]
        if not films:
            raise ValueError("no reference film to fit the grounding prior on")
        mean = total / films
        cov = second / films - torch.einsum("hwe,hwf->hwef", mean, mean)
        return GroundingPrior(mean.float(), cov.float(), films)
    finally:
        net.train(was_training)


def attach_prior(model: Any, prior: GroundingPrior | None) -> None:
    """Keep ``prior`` with the model (``None`` removes it): the maps of this module read it from there. A plain
    attribute, not a buffer: the model's state dict and export are unchanged."""
    net = _module(model)
    if prior is None:
        net.__dict__.pop("grounding_prior", None)
    else:
        net.__dict__["grounding_prior"] = prior


def _has_prior(net: Any) -> bool:
    return isinstance(getattr(net, "grounding_prior", None), GroundingPrior)


def _prior(net: Any, hp: int, wp: int) -> GroundingPrior:
    prior = getattr(net, "grounding_prior", None)
    if not isinstance(prior, GroundingPrior):
        raise ValueError("this map needs a grounding prior: fit_prior(model, films), then attach_prior")
    if tuple(prior.mean.shape[:2]) != (hp, wp):
        raise ValueError(
            f"the grounding prior is for {tuple(prior.mean.shape[:2])} patches, these images have {(hp, wp)}"
        )
    return prior


def _phrase_and_patches(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(B, E) mean token feature of each phrase over its own tokens, (B, Hp, Wp, E) patch features; float32 CPU."""
    tokens = net.token_embeddings(ids, mask).float().cpu()  # (B, L, E)
    weights = own.float().cpu().unsqueeze(-1)  # (B, L, 1)
    phrase = (tokens * weights).sum(1) / weights.sum(1)  # (B, E)
    return phrase, net.patch_embeddings(images).float().cpu()


def _contrast(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
              own: torch.Tensor) -> tuple[torch.Tensor, GroundingPrior, torch.Tensor]:  # fmt: skip
    """The phrases' (B, E) mean tokens, the attached prior, and the (B, Hp, Wp) maps t . (p_hw - mu_hw)."""
    t, p = _phrase_and_patches(net, images, ids, mask, own)
    prior = _prior(net, p.shape[1], p.shape[2])
    return t, prior, torch.einsum("be,bhwe->bhw", t, p - prior.mean)


@GROUNDING_MAPS.register("similarity_contrast", available=_has_prior)
@torch.no_grad()
def similarity_contrast_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                              own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) the phrase's similarity map minus its mean map over the prior's reference films."""
    return _contrast(net, images, ids, mask, own)[2]


@GROUNDING_MAPS.register("similarity_zscore", available=_has_prior)
@torch.no_grad()
def similarity_zscore_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                            own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) the contrast map per cell in standard deviations of the phrase map over the reference films."""
    t, prior, contrast = _contrast(net, images, ids, mask, own)
    var = torch.einsum("be,hwef,bf->bhw", t, prior.cov, t)  # (B, Hp, Wp): t' S_hw t
    return contrast / var.clamp_min(0).sqrt().clamp_min(ZSCORE_FLOOR)


def mean_phrase_vector(net: Any, tokenizer: Any, phrases: Sequence[str], *, device: Any = "cpu",
                       skip_unknown: bool = False) -> torch.Tensor:  # fmt: skip
    """(E,) float32 CPU: the mean over ``phrases`` of each phrase's mean L2-normalised token feature ([CLS]/[SEP]
    left out): every phrase weighs the same, whatever its length. ``skip_unknown``: a phrase the tokenizer only
    spells as special tokens ([UNK]) is left out of the mean instead of refused.

    Raises:
        ValueError: a phrase without a token of its own (without ``skip_unknown``: any; with it: every one).
    """
    ids, mask, own = _tokenise(tokenizer, list(phrases), device, max_len=text_limit(net), allow_empty=skip_unknown)
    kept = own.any(dim=1)
    if not kept.any():
        raise ValueError(f"none of the phrases {list(phrases)} has a token besides the special ones")
    with torch.no_grad():
        tokens = net.token_embeddings(ids[kept], mask[kept]).float().cpu()  # (P, L, E)
    weights = own[kept].float().cpu().unsqueeze(-1)  # (P, L, 1)
    return ((tokens * weights).sum(1) / weights.sum(1)).mean(0)


def neutral_vector(net: Any, tokenizer: Any, phrases: Sequence[str] = NEUTRAL_PHRASES, *,
                   device: Any = "cpu") -> torch.Tensor:  # fmt: skip
    """(E,) float32 CPU: the mean over the neutral phrases of their mean L2-normalised token features ([CLS]/[SEP]
    left out); a phrase the tokenizer spells only as [UNK] is left out."""
    return mean_phrase_vector(net, tokenizer, phrases, device=device, skip_unknown=True)


def findings_vector(net: Any, tokenizer: Any, *, device: Any = "cpu") -> torch.Tensor:
    """(E,) float32 CPU: the mean over the finding phrases (`FINDING_PHRASES`, no side) of their mean tokens; a
    phrase the tokenizer cannot spell (only [UNK]) is left out."""
    return mean_phrase_vector(net, tokenizer, list(FINDING_PHRASES.values()), device=device, skip_unknown=True)


@GROUNDING_MAPS.register("similarity_neutral", tokenizer=True)
@torch.no_grad()
def similarity_neutral_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                             own: torch.Tensor, *, tokenizer: Any) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) the phrase's similarity map minus the neutral phrases' mean map (`NEUTRAL_PHRASES`) on the same
    film. Needs no prior: every model can give it."""
    t, p = _phrase_and_patches(net, images, ids, mask, own)
    return torch.einsum("be,bhwe->bhw", t - neutral_vector(net, tokenizer, device=ids.device), p)


@GROUNDING_MAPS.register("similarity_findings", tokenizer=True)
@torch.no_grad()
def similarity_findings_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                              own: torch.Tensor, *, tokenizer: Any) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) the phrase's similarity map minus the mean map of all finding phrases (`FINDING_PHRASES`) on
    the same film: where this finding reads above findings in general. Needs no prior and no chosen phrase."""
    t, p = _phrase_and_patches(net, images, ids, mask, own)
    return torch.einsum("be,bhwe->bhw", t - findings_vector(net, tokenizer, device=ids.device), p)
