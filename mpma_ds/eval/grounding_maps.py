"""Which map of a finding phrase points: the alternatives a user would try, each scored against the truth boxes.

A *map* is one (Hp, Wp) grid per (image, phrase), the phrase tokenised on its own as in `eval.grounding`:

- ``similarity``: the local alignment's token x patch cosine, averaged over the phrase tokens (`MPMA.grounding`;
  what the pointing game of `evaluate_grounding` used alone before).
The attention and Grad-CAM maps are computed in `eval.attribution`:

- ``cross_attention``: the MA-CMF fusion's text -> image cross-attention of the phrase tokens over the image's
  patch tokens, averaged over heads, layers and phrase tokens (the image's [CLS] key left out). With
  ``memory_kv: concat`` the text stream attends to [V ; g*R], 2(1+N) keys: the weight on patch i's memory response
  is added to patch i's (both are read off patch i). Computed from each layer's own query / key projections on
  the inputs that layer saw (a forward hook): the model itself is not changed.
- ``attention_rollout``: attention rollout (Abnar & Zuidema 2020) through the fusion: each token's relevance over
  the fusion's inputs carried through every layer's text and image self-attention and both cross-attentions,
  heads averaged, each with its residual as an identity of equal weight; the phrase tokens' relevance over the
  image's patch inputs ([CLS] left out), averaged over them (`attribution.attention_rollout_grids`).
- ``gloria_attention``: the GLoRIA local loss's word -> region attention softmax(4 cos(word, patch)) over the
  image's patches, averaged over the phrase tokens; only for a model trained with ``local_loss: gloria``.
- ``gradcam_itc``: Grad-CAM (Selvaraju et al. 2017) of the global contrastive score cos(image, phrase) on the
  last ViT block's patch tokens: channel weights = the score's gradient averaged over the patch tokens, map =
  ReLU of the weighted channel sum.
- ``gradcam_itm``: the same on the image-text matching logit (positive minus negative), only for a model with
  an ITM head (``w_itm > 0``).

Scores of one map against the boxes (model input frame, `eval.grounding.eval_box`), per (image, finding) pair:

- **pointing game**: the map's maximum in the box (`eval.grounding.pointing_hit`; a tie is a hit only when every
  tied cell is in). Chance: the box's share of the image.
- **CNR** (contrast-to-noise ratio, BioViL): |mean inside - mean outside| / sqrt(var inside + var outside) of
  the map at pixel resolution (each pixel takes its patch's value), min-max normalised (`CNR_FLOOR`); 0 for a
  constant map.
- **IoU**: the map min-max normalised to [0, 1] and cut at 0.5, against the box; 0 for a constant map.

Beside each map's own scores stands its **shifted baseline**: the same maps scored against the box of the *next*
pair (pairs rolled by one). A map that only knows where findings usually are (a location prior, the same map for
every image) scores the same there; what a map gains over its shifted baseline it read off the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mpma_ds.eval.attribution import MAPS, available_maps, model_grids
from mpma_ds.eval.bootstrap import with_intervals
from mpma_ds.eval.grounding import (
    LINEAR_MAPS,
    _module,
    _truth_pairs,
    box_fraction,
    eval_box,
    finding_phrase,
    phrase_maps,
    pointing_hit,
)


def phrase_grids(model: Any, tokenizer: Any, images: torch.Tensor, phrases: Sequence[str], *,
                 map: str = "similarity", device: Any = "cpu") -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) float32 CPU map of phrase ``phrases[b]`` on image ``b`` by ``map`` (one of `MAPS`)."""
    net = _module(model)
    if len(phrases) != len(images):
        raise ValueError(f"{len(phrases)} phrases for {len(images)} images")
    if map not in MAPS:
        raise ValueError(f"map must be one of {', '.join(MAPS)}, got {map!r}")
    if map not in LINEAR_MAPS:
        return model_grids(net, tokenizer, images, phrases, map=map, device=device)
    was_training = net.training
    net.eval()
    try:  # one query per phrase against the patch features: the evaluation's own `phrase_maps`
        return phrase_maps(net, tokenizer, images, phrases, map=map, device=device)
    finally:
        net.train(was_training)


# ----------------------------------------------------------------------------------------------- scores
def _box_mask(box: Sequence[float], size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool: pixels whose centre lies in ``box`` (x1/y1 exclusive)."""
    h, w = size
    x0, y0, x1, y1 = box
    xs, ys = torch.arange(w) + 0.5, torch.arange(h) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def _pixels(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(Hp, Wp) -> (H, W): each pixel takes its patch's value."""
    hp, wp = grid.shape
    return grid.float().repeat_interleave(size[0] // hp, 0).repeat_interleave(size[1] // wp, 1)


CNR_FLOOR = 1e-3
"""Floor of the CNR's denominator on the min-max normalised map: a map that separates the box perfectly (no
spread inside or out) scores 1 / CNR_FLOOR = 1000, not infinity."""


def contrast_to_noise(grid: torch.Tensor, box: Sequence[float], size: tuple[int, int]) -> float:
    """|mean in - mean out| / sqrt(var in + var out) of the map in pixels, min-max normalised to [0, 1] (the
    denominator floored at `CNR_FLOOR`); 0 for a flat map, NaN when the box covers all or none of the image."""
    values, inside = _pixels(grid, size), _box_mask(box, size)
    if inside.all() or not inside.any():
        return math.nan
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return 0.0
    values = (values - lo) / (hi - lo)
    a, b = values[inside], values[~inside]
    spread = math.sqrt(float(a.var(unbiased=False) + b.var(unbiased=False)))
    return abs(float(a.mean() - b.mean())) / max(spread, CNR_FLOOR)


def box_iou(grid: torch.Tensor, box: Sequence[float], size: tuple[int, int], threshold: float = 0.5) -> float:
    """IoU of the box with the map's region >= ``threshold`` after min-max normalisation (0 for a flat map)."""
    values, inside = _pixels(grid, size), _box_mask(box, size)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return 0.0
    region = (values - lo) / (hi - lo) >= threshold
    union = int((region | inside).sum())
    return int((region & inside).sum()) / union if union else 0.0


def pair_scores(grid: torch.Tensor, box: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float]:
    """(hit, CNR, IoU) of one map against one box."""
    return float(pointing_hit(grid, box, size)), contrast_to_noise(grid, box, size), box_iou(grid, box, size)


def _mean_scores(hits: Any, cnr: Any, iou: Any) -> dict[str, float]:
    hits, cnr, iou = (np.asarray(a, dtype=np.float64) for a in (hits, cnr, iou))
    if len(hits) == 0:
        raise ValueError("no (image, finding) pairs to score")
    return {"pointing_game": float(hits.mean()), "cnr": float(np.nanmean(cnr)) if np.isfinite(cnr).any()
            else math.nan, "miou": float(iou.mean())}  # fmt: skip


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass
class MapPairs:
    """What `evaluate_maps` read off one pass: the (image, finding) pairs and, per map, each pair's grid."""

    keys: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    boxes: list[tuple[float, ...]] = field(default_factory=list)
    chance: list[float] = field(default_factory=list)
    grids: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)

    def scores(self, map: str, *, shift: int = 0) -> np.ndarray:
        """(P, 3) hit, CNR, IoU of ``map``'s grid of pair i against the box of pair (i + shift) mod P."""
        n = len(self.boxes)
        return np.asarray(
            [pair_scores(g, self.boxes[(i + shift) % n], self.size) for i, g in enumerate(self.grids[map])],
            dtype=np.float64,
        ).reshape(-1, 3)


def collect_map_pairs(model: Any, batches: Iterable[Mapping[str, Any]], *, tokenizer: Any, data_cfg: Any,
                      sizes: Mapping[str, tuple[int, int]], maps: Sequence[str] | None = None,
                      device: Any = "cpu") -> MapPairs:  # fmt: skip
    """Every (image, present finding with a box) pair of one pass of eval batches (``meta["truth"]``, as
    `eval.grounding.evaluate_grounding` reads them) and each map's grid of it. ``maps``: default
    `available_maps`."""
    maps = tuple(maps or available_maps(model))
    out = MapPairs(grids={m: [] for m in maps})
    for batch in batches:
        images = batch["image"]
        valid = batch.get("valid", [True] * len(images))
        rows = []
        for i, meta in enumerate(batch["meta"]):
            key = batch["key"][i] if "key" in batch else str(i)
            if not bool(valid[i]) or "truth" not in meta:
                continue
            for name, side, box in _truth_pairs(meta, key):
                mapped = eval_box(box, sizes[key], data_cfg) if key in sizes else None
                if mapped is not None:
                    rows.append((i, key, name, finding_phrase(name, side), mapped))
        if not rows:
            continue
        index = torch.tensor([r[0] for r in rows])
        picked = images[index]  # (P, C, H, W): one image per pair
        phrases = [r[3] for r in rows]
        for m in maps:
            out.grids[m].extend(phrase_grids(model, tokenizer, picked, phrases, map=m, device=device).unbind(0))
        out.size = (images.shape[-2], images.shape[-1])
        for _, key, name, phrase, mapped in rows:
            out.keys.append(key)
            out.findings.append(name)
            out.phrases.append(phrase)
            out.boxes.append(tuple(mapped))
            out.chance.append(box_fraction(mapped, out.size))
    if not out.boxes:
        raise ValueError("no sample of this pass has a present finding with a box inside the eval crop")
    return out


def map_metrics(pairs: MapPairs, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per map: ``pointing_game``, ``cnr``, ``miou`` with bootstrap 95 % intervals (pairs resampled), the same
    three of the shifted baseline (``shifted_*``), and ``chance`` (mean box fraction) and ``pairs``."""
    out = {}
    for m in pairs.grids:
        own, shifted = pairs.scores(m), pairs.scores(m, shift=1)
        metrics = with_intervals(_mean_scores, own[:, 0], own[:, 1], own[:, 2], n_resamples=n_resamples, seed=seed)
        metrics.update(
            {f"shifted_{k}": v for k, v in _mean_scores(shifted[:, 0], shifted[:, 1], shifted[:, 2]).items()}
        )
        metrics["chance"] = float(np.mean(pairs.chance))
        metrics["pairs"] = len(pairs.boxes)
        out[m] = metrics
    return out


def format_map_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A markdown table: one row per (model, map), pointing game / CNR / mIoU with intervals, their shifted
    baselines and the chance level. ``results``: ``{model name: map_metrics(...)}``."""

    def cell(m: Mapping[str, Any], key: str) -> str:
        value = m.get(key, math.nan)
        ci = m.get(f"{key}_ci95")
        if value is None or math.isnan(value):
            return "n/a"
        if ci is None or any(c is None or math.isnan(c) for c in ci):
            return f"{value:.3f}"
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = ["| model | map | pointing game | (shifted) | CNR | (shifted) | mIoU | (shifted) | chance (pointing) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, per_map in results.items():
        for name, m in per_map.items():
            lines.append(
                f"| {model} | {name} | {cell(m, 'pointing_game')} | {m['shifted_pointing_game']:.3f} | "
                f"{cell(m, 'cnr')} | {m['shifted_cnr']:.3f} | {cell(m, 'miou')} | {m['shifted_miou']:.3f} | "
                f"{m['chance']:.3f} |"
            )
    return "\n".join(lines)
