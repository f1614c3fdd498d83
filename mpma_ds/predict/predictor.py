"""`Predictor`: zero-shot findings and phrase-grounding maps of an MPMA model on a user's films.

**Findings.** Per film and label, the zero-shot score of the evaluation (`mpma_ds.eval.zeroshot`): the label's
positive and negative prompt ensembles (`CHEXPERT_PROMPTS`, or the user's), score = cosine(image, positive) -
cosine(image, negative), the image embedded by `encode_image` after the evaluation loader's own transform
(`data.transforms.XrayTransform`, eval: shorter side to ``image_size / eval_crop_fraction``, centre crop) with the
training recipe's preprocessing. With a calibration (`predict.calibration`) each label also gets a calibrated
probability.

**Grounding.** The map is the evaluation's phrase map (`eval.grounding.phrase_maps` of `BEST_MAP`, the one the
pointing game scores, docs/model.md "Grounding maps"): the phrase tokenised alone, the mean over its tokens of
their cosine with every patch in the local alignment's feature space, minus the same of the neutral phrases,
ensembled (``similarity_neutral``, docs/model.md "Which map points"). A finding is queried with the phrase the pointing game
uses for it (`eval.grounding.finding_phrase`). So that the map covers the whole film in its own aspect, not the
model's square, the film is resized to the model's scale (shorter side ``image_size``) and cut into the fewest
square windows that cover its long side (overlapping evenly); each window's (Hp, Wp) map is upsampled
bilinearly to its pixels and the windows are averaged where they overlap, each weighted by a tent that falls
towards its cut edges (no seam). A square film is one window: the
evaluation's map itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.data import DataConfig
from mpma_ds.data.transforms import XrayTransform
from mpma_ds.eval.alignment import encode_texts
from mpma_ds.eval.grounding import BEST_MAP, finding_phrase, phrase_vectors
from mpma_ds.eval.zeroshot import ensemble_embeddings, prompt_scores, prompts_for
from mpma_ds.models import MPMA, check_tokenizer_vocab
from mpma_ds.predict.calibration import Calibration, load_calibration, model_fingerprint
from mpma_ds.predict.inputs import DISPLAY_SIZE, Film, film_key, load_film
from mpma_ds.tokenizer import load_tokenizer
from mpma_ds.training.recipe import RECIPE_FILE


@dataclass
class ModelSource:
    """Where the weights, tokenizer and preprocessing came from."""

    kind: str
    """``exported`` or ``run``."""
    path: Path
    """The exported folder, or the run folder."""
    tokenizer_dir: Path
    data_cfg: DataConfig
    """The training recipe's preprocessing (image size, channels, normalisation, crop), else the model's sizes."""
    step: int | None = None


def load_model(path: str | Path, tokenizer: str | Path | None = None) -> tuple[MPMA, Any, ModelSource]:
    """``(model in eval mode, tokenizer, source)`` of an exported folder (`launch/export.py`) or a pretraining run
    folder (its newest complete checkpoint, consolidated in memory).

    Raises:
        FileNotFoundError / ValueError: no such folder, neither kind of folder, no tokenizer, a tokenizer that
            does not fit the model (each message says which file and what to do).
    """
    from mpma_ds.runner.export import ExportError, load_pretraining_checkpoint, load_run_recipe, resolve_tokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model {folder} does not exist; give an exported folder or a pretraining run folder"
        )
    recipe = None
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        model = MPMA.from_pretrained(folder)
        if (folder / RECIPE_FILE).is_file():
            recipe = load_run_recipe(folder / RECIPE_FILE)
        tok_dir = folder / "text_encoder" if (folder / "text_encoder" / "tokenizer.json").is_file() else None
        if tok_dir is None and recipe is not None:
            tok_dir = resolve_tokenizer(recipe.data.tokenizer, folder)
        info_file = folder / "export_info.json"
        step = json.loads(info_file.read_text(encoding="utf-8")).get("step") if info_file.is_file() else None
        kind = "exported"
    else:
        try:
            model, tag_dir, meta, recipe = load_pretraining_checkpoint(folder)
        except ExportError as err:
            raise ValueError(
                f"model {folder} is neither an exported folder (config.json + model.safetensors) nor a pretraining "
                f"run: {err}"
            ) from err
        tok_dir = resolve_tokenizer(recipe.data.tokenizer, tag_dir.parent.parent)
        step, kind = meta.get("step"), "run"
    if tokenizer is not None:
        tok_dir = Path(tokenizer)
    if tok_dir is None:
        raise FileNotFoundError(
            f"no tokenizer for {folder}: pass --tokenizer DIR (the folder the model was trained with)"
        )
    tok = load_tokenizer(tok_dir)
    check_tokenizer_vocab(model, tok)
    if recipe is not None:
        data_cfg = recipe.data
    else:
        cfg = model.config
        data_cfg = DataConfig(image_size=cfg.image_size, in_chans=cfg.in_chans, max_text_len=cfg.max_text_len)
    model.eval()
    return model, tok, ModelSource(kind, folder, Path(tok_dir), data_cfg, step)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` / None: CUDA when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_film(item: Any, index: int = 0) -> Film:
    """A path (decoded by `build_shards`'s rules), a `Film`, a PIL image or an (H, W) / (H, W, 3) array."""
    if isinstance(item, Film):
        return item
    if isinstance(item, str | Path):
        return load_film(item)
    if isinstance(item, np.ndarray):
        item = Image.fromarray(item if item.dtype == np.uint8 else np.clip(item, 0, 255).astype(np.uint8))
    if isinstance(item, Image.Image):
        image = item.convert("L")
        w, h = image.size
        scale = min(1.0, DISPLAY_SIZE / min(w, h))
        if scale < 1.0:
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        return Film(Path(f"image-{index}"), f"image-{index}", image, w, h)
    raise TypeError(f"expected a path, Film, PIL image or numpy array, got {type(item).__name__}")


class Predictor:
    """Zero-shot findings and grounding maps of one model (see the module docstring).

    Example::

        p = mpma_ds.Predictor("exported/tiny")
        records = p.predict(["film.dcm", "film2.jpg"], phrases=["left pleural effusion"])
        records[0]["scores"]["Pleural Effusion"], records[0]["maps"]["left pleural effusion"]  # (H, W) array

    Args:
        model: an exported folder or a pretraining run folder.
        tokenizer: tokenizer folder (default: the one exported with the model, else the recipe's).
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda:1`` ...
        labels: label names (default: the 14 CheXpert labels).
        prompts: ``{label: (positive phrasings, negative phrasings)}`` overriding `CHEXPERT_PROMPTS` entries.
        calibration: a calibration file, a `predict.calibration.Calibration`, ``"auto"`` (the model folder's
            ``calibration.json`` when it fits this model and these labels) or None.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        tokenizer: str | Path | None = None,
        device: str | torch.device | None = "auto",
        labels: Sequence[str] | None = None,
        prompts: Mapping[str, Any] | None = None,
        calibration: Any = "auto",
    ) -> None:
        net, tok, source = load_model(model, tokenizer)
        self.device = resolve_device(device)
        self.model = net.to(self.device)
        self.tokenizer = tok
        self.source = source
        self._model_fingerprint: str | None = None
        self.data_cfg = source.data_cfg
        self.labels = list(labels or CHEXPERT_LABELS)
        self.prompts = dict(prompts or {})
        self.transform = XrayTransform(self.data_cfg, train=False)
        self.dtype = next(self.model.parameters()).dtype
        ensembles = prompts_for(self.labels, self.prompts)
        with torch.no_grad():
            pos = ensemble_embeddings(self._encode_texts, [p for p, _ in ensembles])  # (C, D)
            neg = ensemble_embeddings(self._encode_texts, [n for _, n in ensembles])  # (C, D)
        self.pos_emb, self.neg_emb = pos, neg
        self.logit_scale = float(self.model.global_loss.logit_scale().detach().cpu())
        if isinstance(calibration, str | Path) and str(calibration) == "auto":
            self.calibration = load_calibration(source.path, self, missing_ok=True)
        elif isinstance(calibration, str | Path):
            self.calibration = load_calibration(calibration, self)
        elif calibration is None or isinstance(calibration, Calibration):
            self.calibration = calibration
        else:
            raise TypeError(f"calibration: expected a path, 'auto', a Calibration or None, got {calibration!r}")
        self._phrase_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ identity
    def fingerprint(self) -> dict[str, Any]:
        """What a prediction depends on besides the film: the model (config + weights size + step), labels, prompts
        (a calibration or an earlier run's results are reused only when this matches)."""
        if self._model_fingerprint is None:
            self._model_fingerprint = model_fingerprint(self.source.path)
        return {"model": self._model_fingerprint, "labels": self.labels,
                "prompts": {k: [list(v[0]), list(v[1])] for k, v in zip(self.labels, prompts_for(self.labels, self.prompts))}}  # fmt: skip

    # ------------------------------------------------------------------------------------------ scores
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return encode_texts(self.model, texts, tokenizer=self.tokenizer, device=self.device,
                            max_text_len=self.data_cfg.max_text_len)  # fmt: skip

    def input_tensor(self, film: Film) -> torch.Tensor:
        """(C, S, S) the evaluation loader's tensor of a film (eval transform, the recipe's normalisation)."""
        return self.transform(film.image)

    @torch.no_grad()
    def scores_of(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) eval-transformed images -> (B, labels) zero-shot scores (float32, CPU)."""
        emb = self.model.encode_image(images.to(self.device, self.dtype)).float().cpu()  # (B, D)
        return prompt_scores(emb, self.pos_emb, self.neg_emb)  # (B, C)

    def probabilities_of(self, scores: torch.Tensor) -> np.ndarray | None:
        """(B, C) calibrated probabilities (NaN for a label the calibration left out); None without one."""
        return None if self.calibration is None else self.calibration.apply(scores.numpy())

    # ------------------------------------------------------------------------------------------ grounding
    def phrase_queries(self, phrases: Sequence[str]) -> list[torch.Tensor]:
        """Each phrase's query of `BEST_MAP` (cached); a phrase the model cannot read (longer than its
        ``max_text_len``, or only special tokens) raises ValueError naming it, so check them before a long run."""
        todo = [p for p in dict.fromkeys(phrases) if p not in self._phrase_cache]
        if todo:
            for p, t in zip(
                todo, phrase_vectors(self.model, self.tokenizer, todo, map=BEST_MAP, device=self.device)
            ):
                self._phrase_cache[p] = t  # (T, E): the map is the mean of the T queries' maps
        return [self._phrase_cache[p] for p in phrases]

    def windows(self, film: Film) -> tuple[torch.Tensor, list[tuple[int, int]], tuple[int, int]]:
        """The film at the model's scale cut into square windows covering it: ``((K, C, S, S) tensors, [(top,
        left)] per window, (height, width) of the resized film)``."""
        size = self.data_cfg.image_size
        w, h = film.image.size
        if w <= h:
            new_w, new_h = size, max(size, round(h * size / w))
        else:
            new_w, new_h = max(size, round(w * size / h)), size
        resized = film.image.resize((new_w, new_h), Image.BILINEAR)
        long, vertical = max(new_w, new_h), new_h > new_w
        k = max(1, math.ceil(long / size))
        offsets = sorted({round(v) for v in np.linspace(0, long - size, k)})
        mean, std = self.data_cfg.channel_stats()
        mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).float().div_(255.0)  # (H, W)
        tiles, where = [], []
        for off in offsets:
            top, left = (off, 0) if vertical else (0, off)
            tile = pixels[top : top + size, left : left + size].unsqueeze(0)  # (1, S, S)
            tile = tile.expand(self.data_cfg.in_chans, -1, -1)  # (C, S, S)
            tiles.append((tile - mean_t) / std_t)
            where.append((top, left))
        return torch.stack(tiles), where, (new_h, new_w)

    @torch.no_grad()
    def phrase_maps(self, film: Film, phrases: Sequence[str]) -> dict[str, np.ndarray]:
        """``{phrase: (H, W) map}`` over the whole film, ``(H, W)`` = the film image's size (see the module
        docstring); values are differences of cosines, in [-2, 2] (`BEST_MAP`)."""
        if not phrases:
            return {}
        tiles, where, (new_h, new_w) = self.windows(film)
        size = self.data_cfg.image_size
        patches = self.model.patch_embeddings(tiles.to(self.device, self.dtype)).float()  # (K, Hp, Wp, E)
        tokens = self.phrase_queries(phrases)
        # overlapping windows blend with a tent weight along the long side (no seam where one window ends)
        centre = (torch.arange(size, device=patches.device) + 0.5) / size
        ramp = 1.0 - (2.0 * centre - 1.0).abs() + 1e-3  # (S,)
        out = {}
        for phrase, tok in zip(phrases, tokens):
            grids = torch.einsum("te,khwe->kthw", tok.to(patches.device), patches).mean(1)  # (K, Hp, Wp)
            w, h = film.image.size
            if len(where) == 1:  # one window (a square film): the evaluation's map, upsampled once
                full = F.interpolate(grids[:, None], size=(h, w), mode="bilinear", align_corners=False)
                out[phrase] = full[0, 0].cpu().numpy()
                continue
            up = F.interpolate(grids[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            canvas = torch.zeros(new_h, new_w, device=up.device)
            count = torch.zeros(new_h, new_w, device=up.device)
            for (top, left), m in zip(where, up):
                weight = ramp[:, None] if new_h > new_w else ramp[None, :]  # fades out towards the cut edges
                canvas[top : top + size, left : left + size] += m * weight
                count[top : top + size, left : left + size] += weight.expand(size, size)
            full = (canvas / count)[None, None]  # (1, 1, H', W')
            out[phrase] = (
                F.interpolate(full, size=(h, w), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
            )
        return out

    # ------------------------------------------------------------------------------------------ records
    def finding_phrases(self, scores: np.ndarray, probs: np.ndarray | None, threshold: float | None,
                        limit: int) -> list[tuple[str, str]]:  # fmt: skip
        """``[(label, phrase)]`` of the findings at or above the threshold (probability when calibrated, else
        score; default 0.5 / 0.0), highest first, at most ``limit``; No Finding is not a place to point at."""
        values = probs if probs is not None else scores
        cut = threshold if threshold is not None else (0.5 if probs is not None else 0.0)
        order = np.argsort(-np.nan_to_num(values, nan=-np.inf))
        picked = [
            i for i in order if self.labels[i] != "No Finding" and not np.isnan(values[i]) and values[i] >= cut
        ]
        return [(self.labels[i], finding_phrase(self.labels[i])) for i in picked[:limit]]

    def record(
        self, film: Film, scores: np.ndarray, probs: np.ndarray | None, findings: list[str]
    ) -> dict[str, Any]:
        """The JSON record of one film (`predict`'s, `mpma-predict`'s predictions.jsonl line)."""
        calibrated = probs is not None
        return {
            "file": str(film.path),
            "key": film.key,
            "width": film.width,
            "height": film.height,
            "view": film.view,
            "scores": {n: round(float(s), 6) for n, s in zip(self.labels, scores)},
            "probabilities": (
                {n: (None if math.isnan(p) else round(float(p), 6)) for n, p in zip(self.labels, probs)}
                if calibrated
                else None
            ),  # fmt: skip
            "findings": findings,
        }

    def predict(
        self,
        images: Sequence[Any] | Any,
        phrases: Sequence[str] = (),
        *,
        ground_findings: bool = False,
        threshold: float | None = None,
        max_findings: int = 5,
        batch_size: int = 16,
    ) -> list[dict[str, Any]]:
        """Scores (and calibrated probabilities), findings above the threshold, and grounding maps of ``images``.

        Args:
            images: paths (JPG / PNG / DICOM, decoded by `build_shards`'s rules; a bad file raises its
                `ImageRejected`), PIL images or arrays; one or a list.
            phrases: phrases to ground on every film.
            ground_findings: also ground each finding above the threshold (its `finding_phrase`).
            threshold: findings cut: probability when calibrated (default 0.5), else score (default 0.0).
            max_findings: the most findings grounded per film.
        Returns:
            One record per image (`record`) plus ``"maps"``: ``{phrase: (H, W) float array}`` over the film
            (its decoded image's size) and ``"film"``: the `Film` (the decoded image).
        """
        items = [images] if isinstance(images, str | Path | Image.Image | np.ndarray | Film) else list(images)
        films = [as_film(x, i) for i, x in enumerate(items)]
        out = []
        for start in range(0, len(films), batch_size):
            chunk = films[start : start + batch_size]
            scores = self.scores_of(torch.stack([self.input_tensor(f) for f in chunk]))  # (B, C)
            probs = self.probabilities_of(scores)
            for i, film in enumerate(chunk):
                p = probs[i] if probs is not None else None
                found = self.finding_phrases(scores[i].numpy(), p, threshold, len(self.labels))
                rec = self.record(film, scores[i].numpy(), p, [label for label, _ in found])
                wanted = list(
                    dict.fromkeys([*phrases, *(ph for _, ph in found[:max_findings] if ground_findings)])
                )
                rec["maps"] = self.phrase_maps(film, wanted)
                rec["film"] = film
                out.append(rec)
        return out


__all__ = ["ModelSource", "Predictor", "as_film", "film_key", "load_model", "resolve_device"]
