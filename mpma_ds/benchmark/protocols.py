"""The protocols of a suite entry, over a model's streamed image features (`features.image_features`).

Each returns an `EntryResult`: the metrics with a 95 % percentile bootstrap interval beside each
(``<metric>_ci95``, `mpma_ds.eval.bootstrap.with_intervals`), and the per-sample arrays they came from (``pair``)
so that two models evaluated on the same entry are compared by a *paired* bootstrap of their difference
(`bootstrap.paired_difference`: the same resampled rows for both).

- **zero_shot**: prompt ensembles (`mpma_ds.eval.zeroshot`), a dataset label named as the CheXpert finding it is
  (`PROMPT_ALIASES`: NIH's "Effusion" is "Pleural Effusion"); AUROC per label over the labels with
  ``min_count`` positives and negatives, and their mean.
- **zero_shot_accuracy** (5x200): the arg-max of the 5 prompt scores; accuracy (`classification.multiclass_metrics`).
- **linear_probe**: logistic regression (scikit-learn, L-BFGS, C=1) on the frozen L2-normalised image embeddings
  of the ``train`` split, one per label, at each label fraction (a seeded image-level subset, label-covered unless
  the entry says ``label_fraction_cover: false``, its checksum reported); test AUROC per label and mean — or, on a
  single-label dataset (COVIDx), one multinomial regression and accuracy. (The standard frozen-feature protocol of
  CLIP-style papers; the Trainer's ``linear_probe`` task fine-tunes from shards instead.)
- **retrieval**: image <-> report R@1/5/10 both ways over the records' texts (MIMIC 5x200), identical reports one
  candidate (`eval.retrieval`).
- **grounding** (BioViL's three): per (image, finding, phrase) the phrase's map (the entry's ``map``, default
  `eval.grounding.BEST_MAP`: the similarity minus the neutral phrases'; ``similarity`` the raw one;
  MS-CXR's own report phrase when the box carries one, else the finding's name), the pointing game (the map's maximum
  inside the boxes), CNR = |mean_in - mean_out| / sqrt(var_in +
  var_out) of the map upsampled to the input, and the IoU of the min-max-normalised map thresholded at 0.5 with
  the union of the boxes; means over pairs, and the box-area chance level of the pointing game.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_tools.benchmarks.common import BenchRecord, fraction_order, fraction_subset, subset_checksum
from mpma_ds.data.subsets import LabelCover, cover_labels
from mpma_ds.eval.alignment import encode_texts
from mpma_ds.eval.bootstrap import with_intervals
from mpma_ds.eval.classification import multiclass_metrics, multilabel_auroc
from mpma_ds.eval.grounding import BEST_MAP, _phrase_map, eval_box, finding_phrase, phrase_vectors
from mpma_ds.eval.retrieval import retrieval_metrics
from mpma_ds.eval.zeroshot import ensemble_embeddings, prompt_scores, prompts_for, zero_shot_auroc

PROMPT_ALIASES: dict[str, str] = {
    "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Airspace opacity": "Lung Opacity",
    "Nodule or mass": "Lung Lesion",
    "Lung Opacity": "Lung Opacity",
}
"""Dataset label -> the CheXpert finding whose prompt ensemble and grounding phrase it uses (a label with none,
e.g. Emphysema, gets the generic "There is emphysema." / "There is no emphysema.")."""


@dataclass
class EntryResult:
    metrics: dict[str, Any]
    headline: str
    """The metric the tables lead with (``zeroshot_auroc_mean``, ``accuracy``, ``pointing_game`` ...)."""
    pair: dict[str, Any] = field(default_factory=dict)
    """``{"fn", "arrays", "keys", "kwargs", "rows"}``: what `paired_difference` needs; ``rows``: record keys."""
    info: dict[str, Any] = field(default_factory=dict)


def _readable(name: str) -> str:
    return PROMPT_ALIASES.get(name, name.replace("_", " "))


def label_scores(model: Any, emb: np.ndarray, label_names: Sequence[str], device: Any) -> np.ndarray:
    """(N, C) zero-shot scores: cosine to each label's positive ensemble minus its negative one."""
    net = model.net

    def encode(texts: list[str]) -> torch.Tensor:
        return encode_texts(net, texts, tokenizer=model.tokenizer, device=device,
                            max_text_len=model.data_cfg.max_text_len)  # fmt: skip

    ensembles = prompts_for([_readable(n) for n in label_names])
    with torch.no_grad():
        pos = ensemble_embeddings(encode, [p for p, _ in ensembles])  # (C, D)
        neg = ensemble_embeddings(encode, [n for _, n in ensembles])  # (C, D)
    return prompt_scores(torch.from_numpy(emb), pos, neg).numpy().astype(np.float64)  # (N, C)


def zero_shot(model, emb, targets, label_names, *, rows, min_count, n_resamples, device) -> EntryResult:
    scores = label_scores(model, emb, label_names, device)
    kw = dict(label_names=tuple(label_names), min_count=min_count, reference="labels")
    metrics = with_intervals(zero_shot_auroc, scores, targets, n_resamples=n_resamples, **kw) if n_resamples \
        else zero_shot_auroc(scores, targets, **kw)  # fmt: skip
    keys = [k for k in metrics if k.startswith("zeroshot_auroc") and isinstance(metrics[k], float)]
    return EntryResult(metrics, "zeroshot_auroc_mean",
                       {"fn": zero_shot_auroc, "arrays": [scores, targets], "keys": keys, "kwargs": kw, "rows": rows})  # fmt: skip


def zero_shot_accuracy(model, emb, targets, label_names, *, rows, n_resamples, device) -> EntryResult:
    scores = label_scores(model, emb, label_names, device)
    gold = np.argmax(targets, axis=1).astype(np.int64)  # one-hot rows (the reader checked exactly one class)
    kw = dict(class_names=tuple(label_names), probs=False)
    metrics = with_intervals(multiclass_metrics, scores, gold, keys=["accuracy"], n_resamples=n_resamples, **kw) \
        if n_resamples else multiclass_metrics(scores, gold, **kw)  # fmt: skip
    return EntryResult(metrics, "accuracy",
                       {"fn": multiclass_metrics, "arrays": [scores, gold], "keys": ["accuracy"], "kwargs": kw, "rows": rows})  # fmt: skip


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(N_test, C) probabilities of one logistic regression per label (NaN columns where the training subset
    has one class of it, with the reason)."""
    from sklearn.linear_model import LogisticRegression

    out = np.full((len(x_test), y_train.shape[1]), np.nan)
    why = []
    for c in range(y_train.shape[1]):
        keep = ~np.isnan(y_train[:, c])
        y = y_train[keep, c]
        if len(np.unique(y)) < 2:
            why.append(f"column {c}: the training subset has {int((y == 1).sum())} positives of {len(y)}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on tiny subsets; the AUROC tells
            clf = LogisticRegression(C=1.0, max_iter=1000).fit(x_train[keep], y.astype(np.int64))
        out[:, c] = clf.predict_proba(x_test)[:, 1]
    return out, why


def _fit_predict_multiclass(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int
) -> np.ndarray | None:
    """(N_test, K) class probabilities of one multinomial logistic regression (0 for a class the subset lacks);
    None when the subset holds a single class."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_train)) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(C=1.0, max_iter=1000).fit(x_train, y_train)
    out = np.zeros((len(x_test), k))
    out[:, clf.classes_] = clf.predict_proba(x_test)
    return out


def probe_cover(
    keys: Sequence[str], take: Sequence[int], cover: LabelCover, seed: int
) -> tuple[list[int], dict[str, Any]]:
    """``take`` (a `fraction_subset`) label-covered by `cover_labels` — the finetune protocol's rule — with the
    image as the unit: for each label / class holding a positive in the training images but none in ``take``, the
    first image of the seed's permutation (`fraction_order`) holding one is added.

    Why the image and not the record's patient: the linear probe's subset is drawn per image (the frozen-feature
    protocols of the literature sample images, not patients), and coverage must follow the order that drew it.
    Then a subset holding a positive of a label holds that label's first holder too, so covered subsets stay
    nested across fractions and a subset that misses nothing keeps its checksum; adding the holder's whole patient
    would mix in images the permutation never reached and break both. The probe fits on the ``train`` split only,
    so no patient comes to straddle train and test by it. ``patients_added`` therefore counts images here, as
    ``samples_added`` does.

    Returns:
        The covered indices (ascending) and what was added (`cover_labels`: labels, patients_added, samples_added,
        uncovered).
    """
    units = [str(i) for i in range(len(keys))]  # each image its own unit (keys may repeat; indices do not)
    keep = np.zeros(len(keys), dtype=bool)
    keep[list(take)] = True
    covered, added = cover_labels(units, keep, cover, seed, scores=fraction_order(keys, seed))
    return np.flatnonzero(covered).tolist(), added


def linear_probe(
    train_emb: np.ndarray, train_targets: np.ndarray, train_keys: Sequence[str], test_emb: np.ndarray,
    test_targets: np.ndarray, label_names: Sequence[str], *, rows, fractions, seeds, min_count, n_resamples,
    multiclass: bool = False, cover: bool = True,
) -> EntryResult:  # fmt: skip
    """Multi-label datasets: AUROC per label and mean (``auroc_mean@<f>%``); single-label ones (``multiclass``,
    e.g. COVIDx): accuracy (``accuracy@<f>%``) of a multinomial regression.

    Each fraction below 1 is label-covered where ``cover`` (`probe_cover`): a label / class the seeded subset
    leaves without a positive (a 1 in ``train_targets``) gets the seed's first image holding one, recorded as the
    fraction's ``cover`` beside its checksum, which is of the final subset. A label without any positive in the
    training images stays out of the mean, with its note. ``cover`` off: the plain seeded subset and its checksum.
    """
    metrics: dict[str, Any] = {}
    checksums, notes = {}, []
    multi = []
    keys = list(train_keys)
    test_t = np.where(test_targets == -1, np.nan, test_targets)
    train_t = np.where(train_targets == -1, np.nan, train_targets)
    covering = LabelCover(tuple(label_names), np.asarray(train_targets) == 1) if cover else None
    head = "accuracy" if multiclass else "auroc_mean"
    for seed in seeds:
        for frac in fractions:
            tag = f"@{frac * 100:g}%" + (f"/seed{seed}" if len(seeds) > 1 else "")
            take, digest = fraction_subset(keys, frac, seed)
            added = None
            if covering is not None and frac < 1.0:
                take, added = probe_cover(keys, take, covering, seed)
                digest = subset_checksum(keys, take)  # of the final subset, coverage included
                if added["labels"]:
                    notes.append(f"{tag}: label coverage added {added['samples_added']} image(s) so that "
                                 f"{', '.join(added['labels'])} have a positive")  # fmt: skip
            checksums[tag] = {"checksum": digest, "images": len(take), "fraction": frac, "seed": seed,
                              **({"cover": added} if added is not None else {})}  # fmt: skip
            if multiclass:
                gold = np.argmax(test_targets, axis=1).astype(np.int64)
                probs = _fit_predict_multiclass(train_emb[take], np.argmax(train_targets[take], axis=1),
                                                test_emb, len(label_names))  # fmt: skip
                if probs is None:
                    notes.append(f"{tag}: the training subset holds one class")
                    metrics[f"accuracy{tag}"] = math.nan
                    continue
                kw = dict(class_names=tuple(label_names), probs=True)
                m = with_intervals(multiclass_metrics, probs, gold, keys=["accuracy"], n_resamples=n_resamples, **kw) \
                    if n_resamples else multiclass_metrics(probs, gold, **kw)  # fmt: skip
                metrics[f"accuracy{tag}"] = m["accuracy"]
                if "accuracy_ci95" in m:
                    metrics[f"accuracy{tag}_ci95"] = m["accuracy_ci95"]
                multi.append({"fn": multiclass_metrics, "arrays": [probs, gold], "kwargs": kw, "key": "accuracy",
                              "name": f"accuracy{tag}"})  # fmt: skip
                continue
            probs, why = _fit_predict(train_emb[take], train_t[take], test_emb)
            notes += [f"{tag}: {w}" for w in why]
            cols = [c for c in range(len(label_names)) if not np.isnan(probs[:, c]).all()]
            if not cols:
                metrics[f"auroc_mean{tag}"] = math.nan
                continue
            names = [label_names[c] for c in cols]
            kw = dict(names=names, min_each=min_count, prefix=f"auroc{tag}")
            m = with_intervals(multilabel_auroc, probs[:, cols], test_t[:, cols], n_resamples=n_resamples, **kw) \
                if n_resamples else multilabel_auroc(probs[:, cols], test_t[:, cols], **kw)  # fmt: skip
            for k, v in m.items():
                if k.startswith(f"auroc{tag}"):
                    metrics[k.replace(f"auroc{tag}_macro", f"auroc_mean{tag}")] = v
            multi.append({"fn": multilabel_auroc, "arrays": [probs[:, cols], test_t[:, cols]], "kwargs": kw,
                          "key": f"auroc{tag}_macro", "name": f"auroc_mean{tag}"})  # fmt: skip
    headline = f"{head}@{max(fractions) * 100:g}%" + (f"/seed{seeds[0]}" if len(seeds) > 1 else "")
    metrics["train_images"] = len(train_keys)
    return EntryResult(metrics, headline, {"multi": multi, "rows": rows},
                       {"split_checksums": checksums, "notes": notes})  # fmt: skip


# --------------------------------------------------------------------------------------------------- grounding
def grounding_summary(hits: Any, chance: Any, cnr: Any, iou: Any) -> dict[str, float]:
    """Means over (image, finding) pairs (NaN CNR of a constant map is left out of its mean)."""
    hits, chance, cnr, iou = (np.asarray(a, dtype=np.float64) for a in (hits, chance, cnr, iou))
    if len(hits) == 0:
        raise ValueError("no grounding pairs")
    return {
        "pointing_game": float(hits.mean()),
        "pointing_game_chance": float(chance.mean()),
        "cnr": float(np.nanmean(cnr)) if np.isfinite(cnr).any() else math.nan,
        "miou": float(iou.mean()),
    }


def _pair_scores(grid: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(hit, cnr, iou) of one (Hp, Wp) map against an (S, S) bool box mask."""
    size = mask.shape
    hp, wp = grid.shape
    best = torch.nonzero(grid == grid.max(), as_tuple=False)
    hit = all(bool(mask[min(size[0] - 1, int((r + 0.5) * size[0] / hp)), min(size[1] - 1, int((c + 0.5) * size[1] / wp))])
              for r, c in best.tolist())  # fmt: skip
    up = torch.nn.functional.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    inside, outside = up[mask], up[~mask]
    denom = math.sqrt(float(inside.var(unbiased=False) + outside.var(unbiased=False))) if len(outside) else 0.0
    cnr = abs(float(inside.mean() - outside.mean())) / denom if denom > 0 else math.nan
    lo, hi = float(up.min()), float(up.max())
    on = (up - lo) / (hi - lo) >= 0.5 if hi > lo else torch.zeros_like(mask)
    union = (on | mask).sum().item()
    iou = float((on & mask).sum().item() / union) if union else 0.0
    return float(hit), cnr, iou


@torch.no_grad()
def grounding_pairs(
    model, batches, records: Sequence[BenchRecord], *, device, map: str = BEST_MAP
) -> dict[str, list]:
    """The per-(image, finding, phrase) scores of ``batches`` (`features.stream` of the boxed records) by ``map``
    (one of `eval.grounding.LINEAR_MAPS`):
    ``{"pairs": [(position, hit, chance, cnr, iou, finding, row key)], "problems": [(position, line)]}`` in the
    order the batches hold them (one rank's share; `grounding` scores the merged shares)."""
    net = model.net.to(device)
    dtype = next(net.parameters()).dtype
    size = model.data_cfg.image_size
    tokens: dict[str, torch.Tensor] = {}
    pairs, problems = [], []
    for batch in batches:
        patches = net.patch_embeddings(batch.images.to(device=device, dtype=dtype)).float().cpu()  # (B, Hp, Wp, E)
        for j, i in enumerate(batch.index):
            rec = records[i]
            width, height = batch.sizes[j]
            by_label: dict[tuple[str, str], list[tuple[float, ...]]] = {}  # (finding, phrase) -> its boxes
            ow, oh = batch.originals[j]
            for box in rec.boxes:
                fw, fh = box.frame or (ow, oh)
                if box.x1 > fw + 0.5 or box.y1 > fh + 0.5:
                    problems.append((i, f"{rec.key}: the {box.label} box {box.x0:g},{box.y0:g},{box.x1:g},"
                                        f"{box.y1:g} lies outside the {fw}x{fh} image"))  # fmt: skip
                    continue
                mapped = eval_box(box.scaled(width, height, (ow, oh)), (width, height), model.data_cfg)
                if mapped is None:
                    problems.append((i, f"{rec.key}: the {box.label} box lies outside the eval crop"))
                    continue
                by_label.setdefault((box.label, box.phrase), []).append(mapped)
            for (label, text), boxes in by_label.items():
                phrase = text or finding_phrase(_readable(label))
                if phrase not in tokens:
                    tokens[phrase] = phrase_vectors(net, model.tokenizer, [phrase], map=map, device=device)[0]
                mask = torch.zeros(size, size, dtype=torch.bool)
                for x0, y0, x1, y1 in boxes:
                    mask[int(y0) : max(int(y0) + 1, math.ceil(y1)), int(x0) : max(int(x0) + 1, math.ceil(x1))] = (
                        True
                    )
                hit, cnr, iou = _pair_scores(_phrase_map(tokens[phrase], patches[j]), mask)
                pairs.append((i, hit, float(mask.float().mean()), cnr, iou, label, f"{rec.key}|{label}|{text}"))
    return {"pairs": pairs, "problems": problems}


def grounding(pairs: Sequence[tuple], *, n_resamples: int) -> EntryResult:
    """The grounding metrics over the (image, finding, phrase) pairs of `grounding_pairs`, in record order."""
    if not pairs:
        raise ValueError("no (image, finding) pair with a box inside the eval crop: nothing to ground")
    _, hits, chance, cnrs, ious, findings, rows = zip(*pairs)
    arrays = [np.asarray(a, dtype=np.float64) for a in (hits, chance, cnrs, ious)]
    metrics = with_intervals(grounding_summary, *arrays, n_resamples=n_resamples) if n_resamples \
        else grounding_summary(*arrays)  # fmt: skip
    metrics["pairs"] = len(hits)
    per = {}
    names = np.asarray(findings)
    for name in sorted(set(findings)):
        sel = names == name
        per[name] = {"pairs": int(sel.sum()), "pointing_game": float(arrays[0][sel].mean())}
    return EntryResult(metrics, "pointing_game",
                       {"fn": grounding_summary, "arrays": arrays, "keys": ["pointing_game", "cnr", "miou"], "kwargs": {},
                        "rows": list(rows)}, {"per_finding": per})  # fmt: skip


def retrieval(model, emb, texts: Sequence[str], *, rows, n_resamples, device) -> EntryResult:
    """R@1/5/10 image -> report and report -> image (`eval.retrieval.retrieval_metrics`, queries resampled)."""
    distinct = list(dict.fromkeys(texts))  # identical reports embed identically: encode each once
    where = {t: i for i, t in enumerate(distinct)}
    with torch.no_grad():
        text = encode_texts(model.net, distinct, tokenizer=model.tokenizer, device=device,
                            max_text_len=model.data_cfg.max_text_len)  # fmt: skip
    text_emb = torch.nn.functional.normalize(text.float(), dim=-1)[
        torch.tensor([where[t] for t in texts])
    ]  # (N, D)
    image_emb = torch.from_numpy(emb)
    kw = dict(texts=list(texts))
    metrics = with_intervals(retrieval_metrics, image_emb, text_emb, n_resamples=n_resamples, **kw) if n_resamples \
        else retrieval_metrics(image_emb, text_emb, **kw)  # fmt: skip
    keys = [k for k in metrics if k.startswith(("i2t_R@", "t2i_R@")) and isinstance(metrics[k], float)]
    return EntryResult(metrics, "i2t_R@10",
                       {"fn": retrieval_metrics, "arrays": [image_emb, text_emb], "keys": keys, "kwargs": kw, "rows": rows})  # fmt: skip


PROTOCOL_FUNCS: dict[str, Callable[..., EntryResult]] = {
    "zero_shot": zero_shot,
    "zero_shot_accuracy": zero_shot_accuracy,
    "linear_probe": linear_probe,
    "grounding": grounding,
    "retrieval": retrieval,
}
