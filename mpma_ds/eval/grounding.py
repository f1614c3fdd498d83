"""Phrase grounding: token x patch maps of a finding phrase, the pointing game against drawn boxes, overlays.

The local alignment scores each report token against each image patch (`MPMA.grounding`). For a finding phrase
("left pleural effusion") the map of an image is the mean of the phrase tokens' maps; the **pointing game**
(Zhang et al. 2018; BioViL on MS-CXR) asks whether the map's maximum lies inside the region where the finding was
drawn. Ground truth comes from the sample JSON of synthetic shards:

    meta["truth"] = {"<CheXpert name>": {"present": bool, "side": "left"|"right"|"bilateral"|None,
                                         "box": [x0, y0, x1, y1] | None}, ...}

with ``box`` in integer pixels of the stored JPEG (x1/y1 exclusive). The stored size is read from each JPEG's
header (`stored_sizes`): the json's ``width``/``height`` are the *original* image's (``shard_format.SIZE_FIELDS``),
which the build resized. Every finding with ``present`` and a ``box`` is one (image, finding) pair.

Choices (docs/model.md, "Grounding maps"):

- **The phrase alone.** The phrase is tokenised on its own (``[CLS] left pleural effusion [SEP]``), not found in
  the image's report: the query is defined for every finding however (and whether) the report words it, is the
  same for the pretrained model and its random twin, and the map depends on the image only. Its tokens without
  [CLS]/[SEP] are averaged. The phrase is the finding as the synthetic reports word it (`FINDING_PHRASES`), with
  the truth's side in front when it is ``left`` or ``right``.
- **The point.** The argmax cell of the (Hp, Wp) map stands for its centre pixel in the model's input frame; a
  hit when ``x0 <= x < x1`` and ``y0 <= y < y1`` (a centre on the left/top edge is in, on the right/bottom edge is
  out, as for the box's pixels). A tie for the maximum counts as a hit only when every tied cell is in the box
  (pessimistic, as `retrieval.correct_ranks`: a constant map never scores by luck).
- **Boxes in the model's frame.** A stored-pixel box goes through the loader's eval transform geometry
  (`data.transforms.eval_geometry`: resize the shorter side, centre-crop), which both the ``wds`` and ``dali``
  backends apply, and is clipped to the crop; a box cropped away entirely leaves its pair out (counted).
- **Chance level**: the mean fraction of the model's input that the (clipped) box covers, i.e. the hit rate of
  a uniformly random point.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mpma_ds.data.samples import SampleReader, decode_meta
from mpma_ds.data.shards import load_shard_index
from mpma_ds.data.transforms import eval_geometry
from mpma_ds.eval.attribution import MAPS, _tokenise, model_grids, text_limit
from mpma_ds.eval.bootstrap import with_intervals
from mpma_ds.eval.prior_maps import FINDING_PHRASES, findings_vector, neutral_vector

BEST_MAP = "similarity_neutral"
"""The grounding map every default plays — `evaluate_grounding`, `phrase_maps`, ``mpma-evaluate --grounding``,
``mpma-predict``, the demo and the comparison report's gallery — the best measured (docs/model.md, "Which map
points" and "No phrase to choose"): the local alignment's similarity of the phrase minus that of the neutral
phrases, ensembled, on the same film (`prior_maps.similarity_neutral_grids`, `prior_maps.NEUTRAL_PHRASES`). Of the
references measured on four 900-step models it is the one above a fixed random twin outside both intervals on
every split."""

LINEAR_MAPS = ("similarity", "similarity_neutral", "similarity_findings")
"""The maps that are one query vector (or the mean of several) against the patch features (`phrase_vectors`):
what `phrase_maps` and the predictor's windowed maps can give."""


class GroundTruthError(ValueError):
    """Shards without usable ``truth`` for the pointing game (the message says which and what to do)."""


def finding_phrase(name: str, side: str | None = None) -> str:
    """The query phrase of a finding: ``FINDING_PHRASES`` (else the name in lower case), ``left``/``right`` first."""
    phrase = FINDING_PHRASES.get(name, name.lower())
    return f"{side} {phrase}" if side in ("left", "right") else phrase


# ----------------------------------------------------------------------------------------------- geometry
def eval_box(box: Sequence[float], stored_size: tuple[int, int], data_cfg: Any) -> tuple[float, ...] | None:
    """A stored-image box ``[x0, y0, x1, y1]`` in the model input's pixel frame, clipped to it; ``None`` when the
    eval crop leaves none of it.

    Args:
        box: pixels of the stored JPEG, x1/y1 exclusive.
        stored_size: ``(width, height)`` of the stored JPEG.
        data_cfg: the loader's `DataConfig` (``image_size``, ``eval_crop_fraction``).
    """
    width, height = stored_size
    new_h, new_w, top, left = eval_geometry(data_cfg, width, height)
    sx, sy = new_w / width, new_h / height
    size = data_cfg.image_size
    x0 = min(max(box[0] * sx - left, 0.0), size)
    y0 = min(max(box[1] * sy - top, 0.0), size)
    x1 = min(max(box[2] * sx - left, 0.0), size)
    y1 = min(max(box[3] * sy - top, 0.0), size)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def argmax_cells(grid: torch.Tensor) -> list[tuple[int, int]]:
    """``(row, col)`` of every cell of a (Hp, Wp) map equal to its maximum."""
    rows, cols = torch.nonzero(grid == grid.max(), as_tuple=True)
    return list(zip(rows.tolist(), cols.tolist()))


def pointing_hit(grid: torch.Tensor, box: Sequence[float], image_size: tuple[int, int]) -> bool:
    """Whether the maximum of a (Hp, Wp) map, at its cell's centre pixel, lies in ``box`` (the model input's
    pixels, ``image_size = (H, W)``); a tie is a hit only when every tied cell's centre is in the box."""
    hp, wp = grid.shape
    h, w = image_size
    x0, y0, x1, y1 = box
    for r, c in argmax_cells(grid.detach().float().cpu()):
        x, y = (c + 0.5) * w / wp, (r + 0.5) * h / hp
        if not (x0 <= x < x1 and y0 <= y < y1):
            return False
    return True


def box_fraction(box: Sequence[float], image_size: tuple[int, int]) -> float:
    """The share of the image a box covers: a uniformly random point's chance to land in it."""
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0) / float(image_size[0] * image_size[1])


# ----------------------------------------------------------------------------------------------- metrics
def pointing_game(hits: Any, chance: Any, findings: Sequence[str]) -> dict[str, float]:
    """Pointing-game accuracy overall and per finding, with the box-area chance level beside each.

    Args:
        hits: (N,) 1/0 per (image, finding) pair.
        chance: (N,) each pair's box fraction of the image.
        findings: (N,) the finding of each pair.

    Returns:
        ``pointing_game`` (mean hit over all pairs), ``pointing_game_chance`` (mean box fraction),
        ``pointing_game/<finding>`` and ``pointing_game_chance/<finding>`` for every finding present,
        ``pointing_game_pairs`` (int).

    Raises:
        ValueError: no pairs (a pointing game over nothing is no result).
    """
    hits = np.asarray(hits, dtype=np.float64)
    chance = np.asarray(chance, dtype=np.float64)
    names = np.asarray(list(findings), dtype=object)
    if len(hits) == 0:
        raise ValueError("the pointing game has no (image, finding) pair with a box")
    out: dict[str, float] = {
        "pointing_game": float(hits.mean()),
        "pointing_game_chance": float(chance.mean()),
    }
    for name in sorted(set(names.tolist())):
        sel = names == name
        out[f"pointing_game/{name}"] = float(hits[sel].mean())
        out[f"pointing_game_chance/{name}"] = float(chance[sel].mean())
    out["pointing_game_pairs"] = len(hits)
    return out


def pointing_game_with_intervals(
    hits: Any, chance: Any, findings: Sequence[str], *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """`pointing_game` with a percentile bootstrap 95 % interval (``<metric>_ci95``) beside the overall and each
    per-finding accuracy, resampling (image, finding) pairs (`bootstrap.with_intervals`); a finding missing from
    a resample is left out of that resample's per-finding value (``bootstrap_skipped``)."""
    names = sorted(set(findings))
    keys = ["pointing_game", *(f"pointing_game/{n}" for n in names)]
    return with_intervals(
        _pointing_game_or_nan(names), hits, chance, list(findings), keys=keys, n_resamples=n_resamples, seed=seed
    )


def _pointing_game_or_nan(names: Sequence[str]):
    def metric(hits: Any, chance: Any, findings: Sequence[str]) -> dict[str, float]:
        out = pointing_game(hits, chance, findings)
        for name in names:  # a finding a resample drew no pair of: undefined there, not an error
            out.setdefault(f"pointing_game/{name}", math.nan)
        return out

    metric.__name__ = "pointing_game"
    return metric


# ----------------------------------------------------------------------------------------------- maps
def _module(model: Any) -> Any:
    return model if hasattr(model, "grounding") else model.module


@torch.no_grad()
def phrase_tokens(
    model: Any, tokenizer: Any, phrases: Sequence[str], *, device: Any = "cpu"
) -> list[torch.Tensor]:
    """Each phrase alone through the text side of the local alignment: a (T_i, E) float32 CPU tensor of its
    L2-normalised token features, [CLS]/[SEP]/padding left out."""
    net = _module(model)
    ids, mask, own = _tokenise(tokenizer, list(phrases), device, max_len=text_limit(net))
    tokens = net.token_embeddings(ids, mask).float().cpu()  # (P, L, E)
    own = own.cpu()
    return [tokens[i][own[i]] for i in range(len(phrases))]  # (T_i, E) each


@torch.no_grad()
def phrase_vectors(
    model: Any, tokenizer: Any, phrases: Sequence[str], *, map: str = BEST_MAP, device: Any = "cpu"
) -> list[torch.Tensor]:
    """Each phrase's query against the patch features for a map of `LINEAR_MAPS`: its (T, E) token features for
    ``similarity`` (the map is the mean of their maps); for ``similarity_neutral`` the (1, E) mean of them minus
    the neutral phrases' (`prior_maps.neutral_vector`), for ``similarity_findings`` minus the finding phrases'
    (`prior_maps.findings_vector`). Float32 on the CPU."""
    tokens = phrase_tokens(model, tokenizer, phrases, device=device)
    if map == "similarity":
        return tokens
    if map in ("similarity_neutral", "similarity_findings"):
        reference = (neutral_vector if map == "similarity_neutral" else findings_vector)(
            _module(model), tokenizer, device=device
        )  # (E,)
        return [t.mean(0, keepdim=True) - reference for t in tokens]
    raise ValueError(f"map must be one of {', '.join(LINEAR_MAPS)} (linear in the patch features), got {map!r}")


@torch.no_grad()
def phrase_maps(
    model: Any,
    tokenizer: Any,
    images: torch.Tensor,
    phrase: str | Sequence[str],
    *,
    map: str = BEST_MAP,
    device: Any = "cpu",
) -> torch.Tensor:
    """One (Hp, Wp) map per image of ``map`` (one of `LINEAR_MAPS`): for ``similarity`` the mean over the
    phrase's tokens of their token x patch cosine maps (`MPMA.grounding` of the phrase alone), for
    ``similarity_neutral`` that minus the neutral phrases' mean, for ``similarity_findings`` minus the finding
    phrases' mean. ``phrase``: one for every image, or one per image.

    Returns:
        (B, Hp, Wp) float32 on the CPU, values in [-1, 1] (``similarity``) or [-2, 2].
    """
    net = _module(model)
    phrases = [phrase] * len(images) if isinstance(phrase, str) else list(phrase)
    if len(phrases) != len(images):
        raise ValueError(f"{len(phrases)} phrases for {len(images)} images")
    distinct = sorted(set(phrases))
    tokens = dict(zip(distinct, phrase_vectors(net, tokenizer, distinct, map=map, device=device)))
    dtype = next(net.parameters()).dtype
    patches = net.patch_embeddings(images.to(device=device, dtype=dtype)).float().cpu()  # (B, Hp, Wp, E)
    return torch.stack([_phrase_map(tokens[p], patches[i]) for i, p in enumerate(phrases)])  # (B, Hp, Wp)


def _phrase_map(tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """(T, E) phrase tokens x (Hp, Wp, E) patches -> (Hp, Wp) mean of the T token maps."""
    return torch.einsum("te,hwe->thw", tokens, patches).mean(0)


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass
class GroundingExample:
    """One (image, finding) pair kept for an overlay: the model input (H, W) in [0, 1], the map, the box."""

    key: str
    finding: str
    phrase: str
    image: np.ndarray
    grid: np.ndarray
    box: tuple[float, ...]
    hit: bool


@dataclass
class GroundingResult:
    """`evaluate_grounding`'s output: metrics (with intervals), pairs counted, overlay examples."""

    metrics: dict[str, Any]
    examples: list[GroundingExample] = field(default_factory=list)


def _truth_pairs(meta: Mapping[str, Any], key: str) -> list[tuple[str, str | None, list[float]]]:
    """``(finding, side, box)`` of every present finding with a box in a sample's ``truth``."""
    truth = meta.get("truth")
    if not isinstance(truth, Mapping):
        return []
    pairs = []
    for name, entry in truth.items():
        if not isinstance(entry, Mapping) or not entry.get("present") or entry.get("box") is None:
            continue
        box = entry["box"]
        ok = isinstance(box, Sequence) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
        if not ok or not (box[2] > box[0] and box[3] > box[1]):
            raise GroundTruthError(
                f"sample {key}: truth[{name!r}].box is {box!r}, expected [x0, y0, x1, y1] with x0 < x1, y0 < y1 "
                "(pixels of the stored JPEG)"
            )
        pairs.append((str(name), entry.get("side"), [float(v) for v in box]))
    return pairs


def stored_sizes(shards: str | Path) -> dict[str, tuple[int, int]]:
    """``{sample key: (width, height)}`` of the stored JPEGs of a shard spec (folder, glob, list), from their
    headers (no pixel decoding): the frame the ``truth`` boxes are in."""
    index = load_shard_index(str(shards))
    reader = SampleReader(index)
    sizes = {}
    try:
        for i, (offset, size) in enumerate(index.member("jpg").tolist()):
            data = reader.read_member(int(index.shard_of[i]), offset, size)
            try:
                with Image.open(io.BytesIO(data)) as image:
                    sizes[index.keys[i]] = image.size
            except Exception:  # noqa: BLE001 - a corrupt JPEG: the loader skips that sample too
                continue
    finally:
        reader.close()
    return sizes


@torch.no_grad()
def evaluate_grounding(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    tokenizer: Any,
    data_cfg: Any,
    sizes: Mapping[str, tuple[int, int]],
    device: Any = "cpu",
    n_examples: int = 0,
    n_resamples: int = 1000,
    seed: int = 0,
    map: str = BEST_MAP,
) -> GroundingResult:
    """The pointing game of the phrase maps over one pass of eval-transform batches whose ``meta`` carry
    ``truth`` (see the module docstring), and the first ``n_examples`` pairs for overlays. ``sizes``: the
    stored JPEGs' ``(width, height)`` by sample key (`stored_sizes`). ``map``: which map points
    (`attribution.MAPS`: "similarity", the local alignment's; "cross_attention", "attention_rollout",
    "gloria_attention", "gradcam_itc", "gradcam_itm", and the prior-removed "similarity_neutral",
    "similarity_findings", "similarity_contrast", "similarity_zscore" of `prior_maps`, the last two with a prior
    attached to the model; default `BEST_MAP`); it is named in the metrics as ``grounding_map``.

    Returns:
        `pointing_game_with_intervals`'s metrics (its ``bootstrap_*`` entries as ``pointing_game_bootstrap_*``)
        plus ``grounding_images`` (images with a truth entry) and
        ``grounding_pairs_cropped`` (pairs whose box the eval crop removed).

    Raises:
        GroundTruthError: no sample has ``truth``, none has a present finding with a box, a malformed box, or
            a sample with boxes missing from ``sizes``.
    """
    if map not in MAPS:
        raise ValueError(f"grounding map must be one of {', '.join(MAPS)}, got {map!r}")
    net = _module(model)
    was_training = net.training
    net.eval()
    mean, std = data_cfg.channel_stats()
    hits: list[float] = []
    chance: list[float] = []
    findings: list[str] = []
    examples: list[GroundingExample] = []
    tokens: dict[str, torch.Tensor] = {}
    with_truth = cropped = 0
    try:
        dtype = next(net.parameters()).dtype
        for batch in batches:
            images = batch["image"]
            valid = batch.get("valid", [True] * len(images))
            rows = []
            for i, meta in enumerate(batch["meta"]):
                key = batch["key"][i] if "key" in batch else str(i)
                if not bool(valid[i]) or "truth" not in meta:
                    continue
                with_truth += 1
                pairs = _truth_pairs(meta, key)
                if pairs and key not in sizes:
                    raise GroundTruthError(f"sample {key}: truth boxes but no stored image size for it")
                for name, side, box in pairs:
                    mapped = eval_box(box, sizes[key], data_cfg)
                    if mapped is None:
                        cropped += 1
                        continue
                    rows.append((i, key, name, finding_phrase(name, side), mapped))
            if not rows:
                continue
            size = (images.shape[-2], images.shape[-1])
            if map in LINEAR_MAPS:  # one query per phrase against the batch's patch features
                new = sorted({r[3] for r in rows} - set(tokens))
                if new:
                    tokens.update(zip(new, phrase_vectors(net, tokenizer, new, map=map, device=device)))
                patches = (
                    net.patch_embeddings(images.to(device=device, dtype=dtype)).float().cpu()
                )  # (B, Hp, Wp, E)
                grids = [_phrase_map(tokens[r[3]], patches[r[0]]) for r in rows]  # (Hp, Wp) each
            else:
                picked = images[torch.tensor([r[0] for r in rows])]  # (P, C, H, W): one image per pair
                phrases = [r[3] for r in rows]
                grids = model_grids(net, tokenizer, picked, phrases, map=map, device=device).unbind(0)
            for (i, key, name, phrase, mapped), grid in zip(rows, grids):
                hit = pointing_hit(grid, mapped, size)
                hits.append(float(hit))
                chance.append(box_fraction(mapped, size))
                findings.append(name)
                if len(examples) < n_examples:
                    pixels = images[i, 0].float().cpu() * std[0] + mean[0]  # (H, W) back to [0, 1]
                    examples.append(
                        GroundingExample(
                            key, name, phrase, pixels.clamp(0, 1).numpy(), grid.numpy(), tuple(mapped), hit
                        )
                    )
    finally:
        net.train(was_training)
    if with_truth == 0:
        raise GroundTruthError(
            "no sample of this split has a 'truth' entry in its json: the pointing game needs shards built from "
            "a synthetic corpus with ground truth (python -m data_tools.synth_corpus, then build_shards)"
        )
    if not hits:
        raise GroundTruthError(
            f"{with_truth} samples have 'truth' but none a present finding with a box inside the eval crop "
            f"({cropped} cropped away): nothing to point at"
        )
    metrics = pointing_game_with_intervals(hits, chance, findings, n_resamples=n_resamples, seed=seed)
    # under names of their own: the retrieval / zero-shot metrics of the same evaluation carry theirs
    metrics["pointing_game_bootstrap_resamples"] = metrics.pop("bootstrap_resamples")
    metrics["pointing_game_bootstrap_skipped"] = metrics.pop("bootstrap_skipped")
    metrics["grounding_images"] = with_truth
    metrics["grounding_map"] = map
    metrics["grounding_pairs_cropped"] = cropped
    return GroundingResult(metrics, examples)


def shards_have_truth(shard_dir: str | Path) -> bool:
    """Whether the first readable sample of a shard folder has ``truth`` in its json (a cheap check before a
    whole evaluation pass; a synthetic build writes it for every sample or none)."""
    index = load_shard_index(str(shard_dir))
    reader = SampleReader(index)
    try:
        return "truth" in decode_meta(reader.read(index.ref(0)).get("json"))
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------- overlays
def save_overlay(
    path: str | Path,
    image: np.ndarray,
    box: Sequence[float],
    panels: Sequence[tuple[str, np.ndarray, bool]],
    *,
    title: str = "",
) -> Path:
    """A PNG of the film with each panel's map as a heat overlay, the truth box and the map's maximum.

    Args:
        path: the PNG to write.
        image: (H, W) the model input in [0, 1].
        box: ``[x0, y0, x1, y1]`` in the model input's pixels.
        panels: ``(label, (Hp, Wp) map, hit)`` per model, drawn side by side.
        title: the figure's title (the phrase).
    """
    # matplotlib: heavy (about a second to import) and needed for the overlay PNGs only
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = image.shape
    fig = Figure(figsize=(3.2 * len(panels), 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for k, (label, grid, hit) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, w, h, 0))
        lo, hi = float(grid.min()), float(grid.max())
        heat = ax.imshow(
            grid,
            cmap="jet",
            alpha=0.45,
            extent=(0, w, h, 0),
            interpolation="bilinear",
            vmin=lo,
            vmax=hi if hi > lo else lo + 1e-6,
        )
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        hp, wp = grid.shape
        for r, c in argmax_cells(torch.as_tensor(grid)):
            ax.plot((c + 0.5) * w / wp, (r + 0.5) * h / hp, marker="x", color="white", markersize=8, mew=2)
        ax.set_title(f"{label}: {'hit' if hit else 'miss'}", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


OVERLAY_INDEX = "overlays.json"


def overlay_name(number: int, example: GroundingExample) -> str:
    """``003-<key>-pleural_effusion.png``: sortable, the key and finding readable, safe on any file system."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{example.key}-{example.finding}").strip("_").lower()
    return f"{number:03d}-{slug}.png"


def write_overlays(
    folder: str | Path,
    examples: Mapping[str, Sequence[GroundingExample]] | Sequence[GroundingExample],
    *,
    map: str | None = None,
) -> list[Path]:
    """One PNG per example under ``folder``; with ``{model name: examples}`` (the same pairs, in the same order,
    from each model) one panel per model side by side. ``folder/OVERLAY_INDEX`` lists each file's key, finding,
    phrase, hit per model and the grounding ``map`` drawn (what the comparison report's gallery reads). Returns
    the PNGs written."""
    runs = {"": list(examples)} if not isinstance(examples, Mapping) else {k: list(v) for k, v in examples.items()}
    lists = list(runs.values())
    n = min(len(v) for v in lists) if lists else 0
    paths = []
    for j in range(n):
        first = lists[0][j]
        for other in lists[1:]:
            if (other[j].key, other[j].finding) != (first.key, first.finding):
                raise ValueError(f"overlay {j}: the models' examples differ ({first.key} vs {other[j].key})")
        panels = [(name or "map", ex[j].grid, ex[j].hit) for name, ex in runs.items()]
        key = first.key if len(first.key) <= 40 else f"{first.key[:18]}...{first.key[-18:]}"
        title = f'"{first.phrase}" ({first.finding})' + (f", map: {map}" if map else "") + f"\n{key}"
        paths.append(
            save_overlay(Path(folder) / overlay_name(j, first), first.image, first.box, panels, title=title)
        )
    index = [
        {
            "file": p.name,
            "key": runs_first.key,
            "finding": runs_first.finding,
            "phrase": runs_first.phrase,
            "hit": {name or "map": bool(ex[j].hit) for name, ex in runs.items()},
            "map": map,
        }
        for j, (p, runs_first) in enumerate(zip(paths, lists[0] if lists else []))
    ]
    if paths:
        (Path(folder) / OVERLAY_INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return paths


def pointing_game_summary(pretrained: Mapping[str, Any], random: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"pretrained", "random", "ci95_pretrained", "ci95_random", "chance", "map"}`` from two evaluations'
    metrics (the demo's ``results.json["pretrain_eval"]["pointing_game"]``; ``map``: which grounding map played);
    ``None`` when neither played it."""
    if "pointing_game" not in pretrained and "pointing_game" not in random:
        return None
    return {
        "pretrained": pretrained.get("pointing_game"),
        "random": random.get("pointing_game"),
        "ci95_pretrained": pretrained.get("pointing_game_ci95"),
        "ci95_random": random.get("pointing_game_ci95"),
        "chance": pretrained.get("pointing_game_chance", random.get("pointing_game_chance")),
        "map": pretrained.get("grounding_map", random.get("grounding_map")),
    }


def format_pointing_game(pretrained: Mapping[str, Any], random: Mapping[str, Any], overlays: str | Path) -> str:
    """One line for the demo: both models' pointing game with 95 % intervals, the chance level, the overlays."""

    def cell(m: Mapping[str, Any]) -> str:
        if m.get("pointing_game") is None:
            return "n/a"
        lo, hi = m.get("pointing_game_ci95") or (math.nan, math.nan)
        return f"{m['pointing_game']:.3f} [{lo:.3f}, {hi:.3f}]"

    summary = pointing_game_summary(pretrained, random) or {}
    pairs = int(pretrained.get("pointing_game_pairs", 0))
    return (
        f"pointing game (finding-phrase map maximum inside the drawn box, {pairs} pairs): pretrained "
        f"{cell(pretrained)}, random {cell(random)}, chance (box area) {summary.get('chance', math.nan):.3f}; "
        f"overlays in {overlays}"
    )
