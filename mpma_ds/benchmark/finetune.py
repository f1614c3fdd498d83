"""Protocols that train: a suite entry run as a fine-tuning task through the ``Trainer`` (no second loop).

- **finetune** (the label-efficiency protocol, full fine-tuning): the dataset's records written as a ``manifest``
  (image, split, patient and the labels: under their CheXpert names where every label is a CheXpert finding —
  RSNA, SIIM, CheXpert; otherwise the dataset's own label set in a ``dataset_labels`` column — NIH's 14, VinDr's,
  PadChest's; a single-label set's class in a ``class`` column — COVIDx) and built into shards once, then the
  ``cls`` task (``task.cls.labels`` chexpert / dataset / column) fine-tunes image encoder + linear head at each
  label fraction (``data.label_fraction``: the Trainer's nested, patient-level subset; its checksum — the sorted
  keys of the records it keeps — in the results) and seed; test AUROC per label and mean (``auroc_mean@<f>%``),
  or on a single-label set accuracy (``accuracy@<f>%``, softmax cross-entropy; per-class F1 / AUROC beside it).
  A set without a train split (PadChest; NIH without its lists) is cut by a seeded patient-level split
  (`SEEDED_SPLIT`, each part's checksum in the results). Each fraction's subset is label-covered
  (``data.label_fraction_cover``, on unless the entry's ``set`` turns it off): a label / class the seeded subset
  leaves without a positive training image gets the seed's first patient holding one, and what was added
  (``cover``: labels, patients, images) is recorded beside the checksum, which covers the final subset. A label /
  class with no positive in the whole train split (or, coverage off, in the subset) is refused with one line
  before anything is built or trained.
- **vqa** (VQA-RAD, SLAKE): the dataset folder is built into VQA shards once (``build_shards --format
  vqa-rad|slake``, cached under ``CACHE/shards/``: a finished build is reused), then the ``vqa`` task fine-tunes
  the model on the ``train`` split (best checkpoint by validation accuracy where the set has a validation file)
  and the Trainer's final test gives accuracy overall / CLOSED / OPEN with 95 % bootstrap intervals and the
  per-question predictions (``test_predictions.pt``) that pair two models question by question.

The fine-tuning recipe is the entry's ``recipe`` (a shipped name or a path; default `DEFAULT_RECIPES`) with the
entry's ``set`` overrides (``train.epochs=2``) on top; the model, tokenizer and eval preprocessing are the
benchmarked model's, whatever the recipe says: its architecture goes in as ``model.overrides`` (so the recipe's own
``model.name`` cannot refuse it), ``init.from`` is its folder, and a ``random:`` twin is ``init.from: random`` built
with the twin's seed — the same weights the other protocols evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.benchmarks import BenchmarkData
from data_tools.benchmarks.common import BenchRecord, seeded_split, seeded_split_note, split_checksum
from data_tools.build_shards import BuildError, build_shards
from data_tools.shard_format import CHEXPERT_LABELS, CLASS_FIELD, DATASET_LABELS_FIELD
from mpma_ds.benchmark.model import BenchModel
from mpma_ds.benchmark.protocols import PROMPT_ALIASES, EntryResult
from mpma_ds.benchmark.suite import SuiteEntry
from mpma_ds.config import apply_overrides, build_with_overrides, load_yaml
from mpma_ds.data.shards import load_shard_index
from mpma_ds.data.subsets import LabelCover, cover_labels, patient_subset
from mpma_ds.data.transforms import eval_resize_size
from mpma_ds.distributed import broadcast_object
from mpma_ds.eval.classification import multiclass_metrics, multilabel_auroc
from mpma_ds.eval.vqa import vqa_accuracy
from mpma_ds.fileio import atomic_write_text
from mpma_ds.recipes import find_recipe
from mpma_ds.tasks.finetune import read_split_metas
from mpma_ds.training.ds_config import find_ds_config
from mpma_ds.training.recipe import FinetuneRecipe
from mpma_ds.training.run_folder import PREDICTIONS_FILE

DEFAULT_RECIPES: dict[str, str] = {"vqa": "finetune_vqa_tiny", "finetune": "finetune_cls_tiny"}
"""The fine-tuning recipe of a protocol when the entry names none."""

VQA_KEYS = ("accuracy_overall", "accuracy_closed", "accuracy_open")
SEEDED_SPLIT: tuple[tuple[float, float, float], int] = ((0.7, 0.1, 0.2), 0)
"""Train / validate / test shares of the patients, and the seed, of a set with no train split of its own."""


def task_shards(data: BenchmarkData, folder: Path, cache_dir: Path, *, image_size: int, lang: str) -> Path:
    """The dataset's shards, built once under ``CACHE/shards/<dataset>-<version>-<lang>-<px>`` (the key holds the
    split files' fingerprint: a changed download builds anew; a finished build is reused as it is)."""
    out = cache_dir / "shards" / f"{data.dataset}-{data.version()}-{lang}-{image_size}px"
    # min_size as the streamed protocols decode (features.RecordImages): any film the model can take
    summary = build_shards(data.dataset, folder, out, image_size=image_size, min_size=16, vqa_lang=lang,
                           progress=False)  # fmt: skip
    if not summary["splits"].get("train") or not summary["splits"].get("test"):
        raise ValueError(
            f"{data.dataset}: the shards built from {folder} hold no train or no test questions "
            f"({summary['splits']}); see {out / 'rejects.jsonl'}"
        )
    return out


def label_mode(data: BenchmarkData) -> tuple[str, tuple[str, ...]]:
    """How the ``cls`` task reads the dataset's labels (``task.cls.labels``) and their names in the shards:
    ``chexpert`` with the CheXpert names where every label is a distinct CheXpert finding (RSNA's Pneumonia, SIIM's
    Pneumothorax), ``column`` with the classes of a single-label set (COVIDx), else ``dataset`` with its own names."""
    if data.task == "multiclass":
        return "column", tuple(data.label_names)
    names = tuple(PROMPT_ALIASES.get(n, n) for n in data.label_names)
    if all(n in CHEXPERT_LABELS for n in names) and len(set(names)) == len(names):
        return "chexpert", names
    return "dataset", tuple(data.label_names)


def split_records(data: BenchmarkData, split: str) -> tuple[list[BenchRecord], dict[str, Any]]:
    """The records with their splits: the dataset's own where it has a ``train`` split, else (every image in
    ``all``) a seeded patient-level `SEEDED_SPLIT` of them, described with each part's checksum."""
    if data.split("train") or not data.split("all"):
        return list(data.records), {}
    (shares, seed), patients = SEEDED_SPLIT, sorted({r.patient or r.key for r in data.records})
    part = seeded_split(patients, shares, seed)
    records = [dataclasses.replace(r, split=part[r.patient or r.key]) for r in data.records]
    parts = {s: [r for r in records if r.split == s] for s in ("train", "validate", "test")}
    info = {"note": f"{data.dataset} has no train split: {seeded_split_note(shares, seed)} of its "
                    f"{len(patients)} patients", "patients": len(patients),
            "checksums": {s: split_checksum(rs) for s, rs in parts.items()},
            "images": {s: len(rs) for s, rs in parts.items()}}  # fmt: skip
    return records, info


def fraction_subsets(
    data: BenchmarkData, train: list[BenchRecord], entry: SuiteEntry, mode: str, *, cover: bool, uncertain: str
) -> dict[tuple[int, float], tuple[np.ndarray, dict[str, Any] | None]]:
    """The patient subset the Trainer will keep at each (seed, fraction) of the entry — covered where ``cover``
    (``data.label_fraction_cover``; a positive is a 1, and a -1 under ``uncertain: ones``) — with what coverage
    added (None: not covered). Refused (one line) before any shard is built or model trained where a subset holds
    no positive training image of some label or class: under coverage only when the whole train split holds none.
    """
    labels = data.label_matrix(train) if train else np.zeros((0, len(data.label_names)))  # (N, C)
    positives = (labels == 1) | ((labels == -1) & (uncertain == "ones"))
    covering = LabelCover(tuple(data.label_names), positives) if cover else None
    subjects = [r.patient for r in train]
    what = "class(es)" if mode == "column" else "label(s)"
    if absent := [n for n, count in zip(data.label_names, positives.sum(axis=0).tolist()) if count == 0]:
        raise ValueError(
            f"{data.dataset}: its train split ({len(train)} images) holds no positive of {what} "
            f"{', '.join(absent)}, so fine-tuning cannot learn them; check the download's label table"
        )
    out = {}
    for seed in entry.seeds:
        for frac in entry.fractions:
            kept = patient_subset(subjects, frac, seed)
            added = None
            if covering is not None and frac < 1.0:
                kept, added = cover_labels(subjects, kept, covering, seed)
            empty = [n for n, count in zip(data.label_names, positives[kept].sum(axis=0).tolist()) if count == 0]
            if empty:  # coverage off (with it, only a label absent from the whole split, refused above)
                raise ValueError(
                    f"{data.dataset}: label fraction {frac:g} (seed {seed}) keeps {int(kept.sum())} of {len(train)} "
                    f"training images and no positive of {what} {', '.join(empty)}; leave label coverage on "
                    f"(data.label_fraction_cover), drop {frac:g} from the entry's fractions, or choose other seeds"
                )
            out[seed, frac] = kept, added
    return out


def cls_shards(
    data: BenchmarkData, records: list[BenchRecord], cache_dir: Path, *, split: str, image_size: int
) -> tuple[Path, str, tuple[str, ...]]:
    """Shards of a labelled image dataset (via a ``manifest``, built once), the ``cls`` label mode and the label
    names in them (`label_mode`): its ``train`` split, the evaluated ``split`` as ``test`` and, when that is
    ``test``, ``validate`` for picking the best checkpoint (evaluated on ``validate``, a set has no held-out split
    to pick on: the last weights count)."""
    mode, names = label_mode(data)
    role = {"train": "train", split: "test", **({"validate": "validate"} if split == "test" else {})}
    records = [r for r in records if r.split in role]
    if not any(r.split == "train" for r in records) or not any(r.split == split for r in records):
        raise ValueError(f"{data.dataset} has no train or no {split} split to fine-tune and test on")
    key = f"{data.dataset}-{data.version()}-{split}-{split_checksum(records)}-{mode}-{image_size}px"
    out = cache_dir / "shards" / key
    manifest = out.parent / f"{out.name}.jsonl"
    if not manifest.is_file():
        manifest.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for r in records:
            values = [None if math.isnan(v) else v for v in (r.labels or [math.nan] * len(names))]
            # the cls task reads no text, but a shard sample carries one: the record's, else the dataset's name
            row = {"image": r.image, "text": r.text or data.dataset, "split": role[r.split], "patient_id": r.patient,
                   "image_id": r.key}  # fmt: skip
            if mode == "chexpert":
                row["labels"] = dict(zip(names, values))
            elif mode == "dataset":
                row[DATASET_LABELS_FIELD] = dict(zip(names, values))
            elif 1 in values:  # column: the one class of a single-label record
                row[CLASS_FIELD] = names[values.index(1)]
            lines.append(json.dumps(row))
        atomic_write_text(manifest, "\n".join(lines) + "\n")
    try:
        summary = build_shards("manifest", manifest, out, image_size=image_size, min_size=16, min_words=0,
                               views=None, progress=False)  # fmt: skip
    except BuildError as err:  # e.g. a split file that puts one patient in train and test: the entry's one line
        raise ValueError(f"{data.dataset}: {err}") from None
    if not summary["splits"].get("train") or not summary["splits"].get("test"):
        raise ValueError(f"{data.dataset}: no train or no test image decoded; see {out / 'rejects.jsonl'}")
    return out, mode, names


def finetune_recipe(
    model: BenchModel, entry: SuiteEntry, *, task: str, shards: Path, out_dir: Path, n_resamples: int, workers: int,
    tracking: dict[str, Any], extra: dict[str, dict[str, Any]] | None = None,
) -> FinetuneRecipe:  # fmt: skip
    """The entry's fine-tuning recipe for ``model`` on ``shards`` (see the module docstring)."""
    path = find_recipe(entry.recipe or DEFAULT_RECIPES[entry.protocol])
    tree = load_yaml(path, what="recipe", hint="the suite entry's recipe: a shipped name or a YAML path")
    arch = {k: v for k, v in model.net.config.to_dict().items() if not k.endswith("_init_from")}
    tree["model"] = {"overrides": arch}  # the model's own architecture, whatever the recipe names
    tree.setdefault("task", {})["name"] = task
    tree["task"]["bootstrap"] = n_resamples
    tree["init"] = {"from": "random" if model.kind == "random" else model.spec}
    cfg = model.data_cfg
    has_val = (shards / "validate").is_dir()
    tree.setdefault("data", {}).update(
        backend="wds", train_shards=str(shards / "train"), val_shards=str(shards / "validate") if has_val else "",
        test_shards=str(shards / "test"), tokenizer=model.tokenizer_dir, image_size=cfg.image_size,
        in_chans=cfg.in_chans, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        eval_crop_fraction=cfg.eval_crop_fraction, num_workers=workers, label_fraction=1.0,
        max_text_len=min(int(tree["data"].get("max_text_len", cfg.max_text_len)), cfg.max_text_len),
    )  # fmt: skip
    train = tree.setdefault("train", {})
    train.update(output_dir=str(out_dir), seed=int(model.info.get("seed", train.get("seed", 0))))
    if not has_val:  # no validation file (VQA-RAD as often shipped): the last weights are tested
        train.update(eval_every=0, eval_every_epochs=0, best_metric="", early_stopping=0)
    tree["tracking"] = {**tree.get("tracking", {}), **tracking}
    for section, values in (extra or {}).items():  # the protocol's own settings (label fraction, labels)
        node = tree
        for part in section.split("."):
            node = node.setdefault(part, {})
        node.update(values)
    apply_overrides(tree, entry.set)
    recipe = build_with_overrides(FinetuneRecipe, tree, entry.set, source=str(path), what="recipe")
    recipe.deepspeed_config = str(find_ds_config(recipe.deepspeed_config, recipe_dir=Path(path).parent))
    return recipe


def built_by_rank0(build: Callable[[], Any], rank: int) -> Any:
    """``build()`` (the shards of a dataset) run by rank 0 first; the other ranks then find its finished build
    (``build_shards`` reuses a complete one). Rank 0's ``ValueError`` is raised on every rank alike."""
    made, err = None, None
    if rank == 0:
        try:
            made = build()
        except ValueError as e:
            err = str(e)
    err = broadcast_object(err)  # also the barrier: rank 0's build is finished
    if err:
        raise ValueError(err)
    return made if rank == 0 else build()


def run_finetune(recipe: FinetuneRecipe, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Train ``recipe`` through the Trainer (every rank of the group); ``(summary, the final test's per-sample
    predictions)`` — those on rank 0, which writes them, None on the others."""
    from mpma_ds.runner.trainer import train

    summary = train(recipe, overwrite=True)
    if rank != 0:
        return summary, None
    predictions = Path(recipe.train.output_dir) / PREDICTIONS_FILE
    if not predictions.is_file():
        raise ValueError(f"the fine-tuning run {recipe.train.output_dir} wrote no test predictions")
    return summary, torch.load(predictions, weights_only=True)


def vqa(
    model: BenchModel, data: BenchmarkData, entry: SuiteEntry, *, folder: Path, cache_dir: Path, out_dir: Path,
    n_resamples: int, workers: int, tracking: dict[str, Any], rank: int = 0,
) -> EntryResult | None:  # fmt: skip
    """VQA accuracy overall / CLOSED / OPEN of ``model`` fine-tuned on the dataset's train split (None on another
    rank than 0)."""
    lang = str(entry.options.get("lang", "en"))
    shards = built_by_rank0(
        lambda: task_shards(data, folder, cache_dir, image_size=eval_resize_size(model.data_cfg), lang=lang), rank
    )
    recipe = finetune_recipe(model, entry, task="vqa", shards=shards, out_dir=out_dir, n_resamples=n_resamples,
                             workers=workers, tracking=tracking)  # fmt: skip
    summary, kept = run_finetune(recipe, rank)
    if kept is None:
        return None
    metrics = {k.removeprefix("test/"): v for k, v in (summary.get("test") or {}).items()}
    vocab = list(kept["answer_vocab"])
    predicted = np.asarray([vocab[i] for i in kept["predicted"]], dtype=str)
    arrays = [predicted, np.asarray(kept["gold"], dtype=str), np.asarray(kept["types"], dtype=str)]
    pair = {"fn": vqa_accuracy, "arrays": arrays, "keys": list(VQA_KEYS), "kwargs": {"answer_vocab": tuple(vocab)},
            "rows": list(kept["keys"])}  # fmt: skip
    info = {
        "run_dir": str(out_dir), "mlflow_run_id": summary.get("mlflow_run_id"), "steps": summary.get("step"),
        "recipe": entry.recipe or DEFAULT_RECIPES["vqa"], "set": list(entry.set),
        "answers": len(vocab), "questions_read": summary.get("questions_read"), "best": summary.get("best"),
        "shards": str(shards), "build_rejects": json.loads((shards / "manifest.json").read_text()).get("rejects"),
    }  # fmt: skip
    return EntryResult(metrics, "accuracy_overall", pair, info)


def finetune_cls(
    model: BenchModel, data: BenchmarkData, entry: SuiteEntry, *, cache_dir: Path, out_dir: Path, n_resamples: int,
    workers: int, tracking: dict[str, Any], rank: int = 0,
) -> EntryResult | None:  # fmt: skip
    """Test AUROC (accuracy on a single-label set) of ``model`` fine-tuned (cls task) at each of the entry's label
    fractions and seeds (None on another rank than 0)."""
    records, seeded = split_records(data, entry.split)
    mode, names = label_mode(data)
    train = [r for r in records if r.split == "train"]

    def extra(frac: float, seed: int, shards: Path) -> dict[str, dict[str, Any]]:
        """The protocol's settings of one run, under the entry's ``set``: label coverage on by default."""
        options = {"labels": mode, "require_positives": True}
        options.update({"label_column": CLASS_FIELD, "classes": list(names)} if mode == "column" else
                       {"label_names": list(names)})  # fmt: skip
        out = {"data": {"label_fraction": frac, "label_fraction_seed": seed, "label_fraction_cover": True},
               "task.cls": options}  # fmt: skip
        if mode == "column" and (shards / "validate").is_dir():  # the best checkpoint by what is reported
            out["train"] = {"best_metric": "accuracy"}
        return out

    # the entry's recipe as the Trainer will read it (the shards are not built yet): is coverage on, and what
    # counts as a positive — so the checksummed subset is the one the Trainer keeps
    unbuilt = cache_dir / "shards" / "unbuilt"
    planned = finetune_recipe(model, entry, task="cls", shards=unbuilt, out_dir=out_dir, n_resamples=n_resamples,
                              workers=workers, tracking=tracking,
                              extra=extra(min(entry.fractions), entry.seeds[0], unbuilt))  # fmt: skip
    subsets = fraction_subsets(data, train, entry, mode, cover=planned.data.label_fraction_cover,
                               uncertain=planned.task.cls.uncertain)  # fmt: skip
    shards, mode, names = built_by_rank0(
        lambda: cls_shards(
            data, records, cache_dir, split=entry.split, image_size=eval_resize_size(model.data_cfg)
        ),
        rank,
    )
    head = "accuracy" if mode == "column" else "auroc_mean"
    metrics: dict[str, Any] = {}
    checksums, multi, runs, rows = {}, [], {}, None
    for seed in entry.seeds:
        for frac in entry.fractions:
            tag = f"@{frac * 100:g}%" + (f"/seed{seed}" if len(entry.seeds) > 1 else "")
            keep, added = subsets[seed, frac]
            kept = [r for r, k in zip(train, keep.tolist()) if k]
            checksums[tag] = {
                "checksum": split_checksum(kept),  # of the final subset, coverage included
                "images": len(kept),
                "fraction": frac,
                "seed": seed,
                **({"cover": added} if added is not None else {}),
            }
            recipe = finetune_recipe(model, entry, task="cls", shards=shards, out_dir=out_dir / tag.strip("@").replace(
                "%", "pct").replace("/", "-"), n_resamples=n_resamples, workers=workers,
                tracking={**tracking, "run_name": f"{tracking.get('run_name', '')} {tag}"},
                extra=extra(frac, seed, shards))  # fmt: skip
            summary, out = run_finetune(recipe, rank)
            if out is None:
                continue
            test = summary.get("test") or {}
            if mode == "column":
                metrics[f"accuracy{tag}"] = test.get("test/accuracy", math.nan)
                for name in names:  # per class: F1 and one-vs-rest AUROC
                    for kind in ("f1", "auroc"):
                        if f"test/{kind}/{name}" in test:
                            metrics[f"{kind}{tag}/{name}"] = test[f"test/{kind}/{name}"]
                kw: dict[str, Any] = {"class_names": list(out["names"])}
                multi.append({"fn": multiclass_metrics, "arrays": [out["scores"].numpy(), out["targets"].numpy()],
                              "kwargs": kw, "key": "accuracy", "name": f"accuracy{tag}"})  # fmt: skip
            else:
                metrics[f"auroc_mean{tag}"] = test.get("test/auroc_macro", math.nan)
                for name in names:
                    if f"test/auroc/{name}" in test:
                        metrics[f"auroc{tag}/{name}"] = test[f"test/auroc/{name}"]
                kw = {"names": list(out["names"]), "min_each": recipe.task.cls.min_label_count}
                multi.append({"fn": multilabel_auroc, "arrays": [out["scores"].numpy(), out["targets"].numpy()],
                              "kwargs": kw, "key": "auroc_macro", "name": f"auroc_mean{tag}"})  # fmt: skip
            source = "test/accuracy" if mode == "column" else "test/auroc_macro"
            if f"{source}_ci95" in test:
                metrics[f"{head}{tag}_ci95"] = test[f"{source}_ci95"]
            runs[tag] = {"run_dir": recipe.train.output_dir, "steps": summary.get("step"),
                         "mlflow_run_id": summary.get("mlflow_run_id"), "subset": summary.get("subset")}  # fmt: skip
            if rows is None:  # shard keys -> the records' own keys (the manifest's image_id)
                test_keys = dict(zip(load_shard_index(str(shards / "test")).keys,
                                     (str(m.get("image_id")) for m in read_split_metas(str(shards / "test")))))  # fmt: skip
                rows = [test_keys[k] for k in out["keys"]]
    if rank != 0:
        return None
    metrics["train_images"] = len(train)
    headline = f"{head}@{max(entry.fractions) * 100:g}%" + (
        f"/seed{entry.seeds[0]}" if len(entry.seeds) > 1 else ""
    )
    info = {"split_checksums": checksums, "runs": runs, "labels": list(names), "label_mode": mode,
            "shards": str(shards), "recipe": entry.recipe or DEFAULT_RECIPES["finetune"], "set": list(entry.set),
            "test_keys": [r.key for r in records if r.split == entry.split]}  # fmt: skip
    if seeded:
        info["seeded_split"] = seeded
    return EntryResult(metrics, headline, {"multi": multi, "rows": rows or []}, info)
