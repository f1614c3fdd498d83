"""Which map of a finding phrase points: the alternatives a user would try, each scored against the truth boxes.

A *map* is one (Hp, Wp) grid per (image, phrase), the phrase tokenised on its own as in `eval.grounding`:

- ``similarity``: the local alignment's token x patch cosine, averaged over the phrase tokens (`MPMA.grounding`;
  what the pointing game of `evaluate_grounding` used alone before).
- ``cross_attention``: the MA-CMF fusion's text -> image cross-attention of the phrase tokens over the image's
  patch tokens, averaged over heads, layers and phrase tokens (the image's [CLS] key left out). With
  ``memory_kv: concat`` the text stream attends to [V ; g*R], 2(1+N) keys: the weight on patch i's memory response
  is added to patch i's (both are read off patch i). Computed from each layer's own query / key projections on
  the inputs that layer saw (a forward hook): the model itself is not changed.
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

from mpma_ds.eval.bootstrap import with_intervals
from mpma_ds.eval.grounding import (
    _module,
    _phrase_map,
    _truth_pairs,
    box_fraction,
    eval_box,
    finding_phrase,
    phrase_tokens,
    pointing_hit,
)

MAPS: tuple[str, ...] = ("similarity", "cross_attention", "gradcam_itc", "gradcam_itm")
"""Every map `phrase_grids` computes (``gradcam_itm`` only for a model with an ITM head)."""


def available_maps(model: Any) -> tuple[str, ...]:
    """The maps ``model`` can give (``gradcam_itm`` needs an ITM head)."""
    net = _module(model)
    return tuple(m for m in MAPS if m != "gradcam_itm" or getattr(net, "itm_head", None) is not None)


def _tokenise(
    tokenizer: Any, phrases: Sequence[str], device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, L) ids, attention mask and the bool mask of the phrase's own tokens (no [CLS]/[SEP]/padding)."""
    enc = tokenizer(list(phrases), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    own = mask.bool() & ~torch.isin(ids, special)  # (P, L)
    if not own.any(dim=1).all():
        raise ValueError(f"a phrase of {list(phrases)} has no token besides the special ones")
    return ids.to(device), mask.to(device), own.to(device)


def attention_probs(module: torch.nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, Lk) softmax(QK^T / sqrt(d)) of a `MultiHeadAttention` on its inputs (the text stream's
    cross-attention takes no key mask: every visual key is attended)."""
    b, lq, _ = x.shape
    h, hd = module.heads, module.head_dim
    q = module.q(x).view(b, lq, h, hd).transpose(1, 2)  # (B, H, Lq, hd)
    k = module.kv(context).view(b, -1, 2, h, hd)[:, :, 0].transpose(1, 2)  # (B, H, Lk, hd)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(hd)).softmax(dim=-1)


@torch.no_grad()
def cross_attention_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                          own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) text -> image cross-attention of each image's phrase (row b of ``ids``) over its patches."""
    b, _, h, w = images.shape
    p = net.config.patch_size
    img = net.image_encoder(images)  # (B, 1+N, Dv)
    txt = net.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, Dt)
    t_type = torch.zeros_like(ids[:, :1])
    t = net.text_to_fusion(txt) + net.modality_embed(t_type)  # (B, L, D)
    v = net.image_to_fusion(img) + net.modality_embed(t_type + 1)  # (B, 1+N, D)
    probs: list[torch.Tensor] = []

    def keep(module, args, output):  # noqa: ANN001, ANN202, ARG001
        probs.append(attention_probs(module, args[0], args[1]).mean(dim=1).float())  # (B, L, Lk)

    hooks = [layer.t_cross.register_forward_hook(keep) for layer in net.fusion.layers]
    try:
        net.fusion(t, mask.bool(), v)
    finally:
        for hook in hooks:
            hook.remove()
    n = img.shape[1]  # 1 + N keys of the image stream
    per_layer = []
    for a in probs:  # (B, L, 1+N) or (B, L, 2(1+N)) with the memory's responses concatenated
        if a.shape[-1] == 2 * n:
            a = a[..., :n] + a[..., n:]
        per_layer.append(a[..., 1:])  # (B, L, N): the [CLS] key left out
    attn = torch.stack(per_layer).mean(0)  # (B, L, N)
    weights = own.float().unsqueeze(-1)  # (B, L, 1)
    grid = (attn * weights).sum(1) / weights.sum(1)  # (B, N)
    return grid.reshape(b, h // p, w // p).cpu()


def gradcam_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  score: str = "itc") -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) Grad-CAM of each image's score with its phrase on the last ViT block's patch tokens.

    ``score``: ``"itc"`` = the cosine of the global embeddings (`encode_image` . `encode_text`), ``"itm"`` = the
    ITM head's positive-minus-negative logit of the fused pair. Gradients are taken with respect to the
    activations only (`torch.autograd.grad`): no parameter's ``.grad`` is touched.
    """
    b, _, h, w = images.shape
    p = net.config.patch_size
    acts: list[torch.Tensor] = []

    def keep(module, args, output):  # noqa: ANN001, ANN202, ARG001
        acts.append(output)

    hook = net.image_encoder.blocks[-1].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # so the graph reaches the blocks even if frozen
            if score == "itc":
                img = net.encode_image(images)  # (B, E)
                txt = net.encode_text(ids, mask)  # (B, E)
                value = (img * txt).sum(-1)  # (B,)
            elif score == "itm":
                if getattr(net, "itm_head", None) is None:
                    raise ValueError("gradcam_itm needs a model with an ITM head (w_itm > 0)")
                feats = net.image_encoder(images)  # (B, 1+N, Dv)
                txt = net.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                t_type = torch.zeros_like(ids[:, :1])
                t = net.text_to_fusion(txt) + net.modality_embed(t_type)
                v = net.image_to_fusion(feats) + net.modality_embed(t_type + 1)
                t, v = net.fusion(t, mask.bool(), v)
                logits = net.itm_head(torch.cat([t[:, 0], v[:, 0]], -1)).float()  # (B, 2)
                value = logits[:, 1] - logits[:, 0]
            else:
                raise ValueError(f"score must be 'itc' or 'itm', got {score!r}")
            act = acts[0]  # (B, 1+N, Dv)
            (grad,) = torch.autograd.grad(value.sum(), act)  # each image's score depends on its own image only
    finally:
        hook.remove()
    act, grad = act[:, 1:].detach().float(), grad[:, 1:].float()  # (B, N, Dv): patch tokens
    cam = torch.relu((act * grad.mean(dim=1, keepdim=True)).sum(-1))  # (B, N)
    return cam.reshape(b, h // p, w // p).cpu()


def phrase_grids(model: Any, tokenizer: Any, images: torch.Tensor, phrases: Sequence[str], *,
                 map: str = "similarity", device: Any = "cpu") -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) float32 CPU map of phrase ``phrases[b]`` on image ``b`` by ``map`` (one of `MAPS`)."""
    net = _module(model)
    if len(phrases) != len(images):
        raise ValueError(f"{len(phrases)} phrases for {len(images)} images")
    if map not in MAPS:
        raise ValueError(f"map must be one of {', '.join(MAPS)}, got {map!r}")
    dtype = next(net.parameters()).dtype
    images = images.to(device=device, dtype=dtype)
    was_training = net.training
    net.eval()
    try:
        if map == "similarity":
            distinct = sorted(set(phrases))
            tokens = dict(zip(distinct, phrase_tokens(net, tokenizer, distinct, device=device)))
            with torch.no_grad():
                patches = net.patch_embeddings(images).float().cpu()  # (B, Hp, Wp, E)
            return torch.stack([_phrase_map(tokens[ph], patches[i]) for i, ph in enumerate(phrases)])
        ids, mask, own = _tokenise(tokenizer, phrases, device)
        if map == "cross_attention":
            return cross_attention_grids(net, images, ids, mask, own)
        return gradcam_grids(net, images, ids, mask, score=map.removeprefix("gradcam_"))
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
