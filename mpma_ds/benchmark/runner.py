"""Run a suite: every entry for every model, its metrics with intervals, models paired per sample,
``results.json``, MLflow runs (a parent per model and suite run, a child per entry, under which a protocol that
trains nests its Trainer runs) and the report page.

Under ``deepspeed`` / ``torchrun`` every rank runs the suite: each streams its share of an entry's images
(``features.stream``), rank 0 gathers the per-sample outputs in record order, scores and alone writes.

Datasets live in ``DATA_ROOT/<id>/`` (or the entry's / ``--dataset-path``'s folder); a dataset not there is skipped
with one line. Every reader's row problems go to ``OUT/problems/<id>.jsonl`` with their count in the results; an
image that does not decode is counted per entry (``images_rejected``) — nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.benchmarks import BenchmarkData, BenchmarkError, read_benchmark
from data_tools.benchmarks.common import split_checksum
from mpma_ds.benchmark import finetune
from mpma_ds.benchmark.features import image_features, stream
from mpma_ds.benchmark.model import BenchModel
from mpma_ds.benchmark.protocols import (
    EntryResult,
    grounding,
    grounding_pairs,
    linear_probe,
    retrieval,
    zero_shot,
    zero_shot_accuracy,
)
from mpma_ds.benchmark.references import references_for
from mpma_ds.benchmark.report import write_page
from mpma_ds.benchmark.samples import paired_rows, result_sets, samples_path, save_samples
from mpma_ds.benchmark.suite import Suite, SuiteEntry
from mpma_ds.eval.bootstrap import loggable_metrics
from mpma_ds.tasks.features import extract_once
from mpma_ds.tracking import TrackingConfig, build_logger
from mpma_ds.tracking.params import json_safe

RESULTS_FILE = "results.json"


def _select(data: BenchmarkData, entry: SuiteEntry) -> tuple[list, str, str]:
    """The entry's records, the split used and a note when it differs from the asked one."""
    note = ""
    if entry.split == "all":
        records, split = list(data.records), "all"
    else:
        records, split = data.split(entry.split), entry.split
        if not records and data.split("all"):
            records, split = data.split("all"), "all"
            note = f"{data.dataset} has no {entry.split!r} split (no split file found): evaluated on every image"
    if entry.protocol == "grounding":
        records = [r for r in records if r.boxes]
    if entry.max_images:
        records = records[: entry.max_images]
    return records, split, note


def _targets(data: BenchmarkData, records: Sequence, index: np.ndarray) -> np.ndarray:
    return data.label_matrix([records[i] for i in index.tolist()])


def _run_entry(
    model: BenchModel, data: BenchmarkData, entry: SuiteEntry, records: list, *, cache_dir, batch_size, workers,
    device, n_resamples, min_count, timing: dict, folder: Path, out: Path, tracking: dict[str, Any], rank: int,
    world_size: int,
) -> EntryResult | None:  # fmt: skip
    """One model on one entry. Collective: every rank streams its share of the images; rank 0 gets the result,
    the others None."""
    if entry.protocol in ("vqa", "finetune"):  # the Trainer: every rank trains, rank 0 scores
        start = time.perf_counter()
        run_dir = out / "finetune" / model.name / entry.name.replace("/", "-")
        tracking = {**tracking, "run_name": f"{entry.name} [{model.name}] fine-tune"}
        if entry.protocol == "vqa":
            result = finetune.vqa(model, data, entry, folder=folder, cache_dir=cache_dir, out_dir=run_dir,
                                  n_resamples=n_resamples, workers=workers, tracking=tracking, rank=rank)  # fmt: skip
        else:
            result = finetune.finetune_cls(model, data, entry, cache_dir=cache_dir, out_dir=run_dir,
                                           n_resamples=n_resamples, workers=workers, tracking=tracking,
                                           rank=rank)  # fmt: skip
        if result is None:
            return None
        evaluated = set(result.pair["rows"])
        # a set cut by a seeded split tests a part of the records the entry's split selected
        expected = result.info.pop("test_keys", None) or [r.key for r in records]
        missing = [k for k in expected if k not in evaluated]
        timing.update(seconds=time.perf_counter() - start, images=len(evaluated), cached=False)
        result.info.update(images_rejected=len(missing), rejected=missing[:20])
        return result
    if entry.protocol == "grounding":
        start = time.perf_counter()

        def extract() -> dict[str, Any]:
            rejected: dict[int, str] = {}
            batches = stream(records, model.data_cfg, batch_size=batch_size, workers=workers, rejected=rejected,
                             rank=rank, world_size=world_size)  # fmt: skip
            return {**grounding_pairs(model, batches, records, device=device, map=entry.map), "rejected": rejected}

        found, _ = extract_once(None, extract, _merge_pairs, rank=rank)
        if found is None:
            return None
        rejected, problems = found["rejected"], [line for _, line in found["problems"]]
        result = grounding(found["pairs"], n_resamples=n_resamples)
        timing.update(seconds=time.perf_counter() - start, images=len(records) - len(rejected), cached=False)
        result.info.update(
            map=entry.map, images_rejected=len(rejected), rejected=_first(rejected, records), box_problems=len(problems),
            box_problem_examples=problems[:20],
        )  # fmt: skip
        return result
    shared = dict(dataset=data.dataset, cache_dir=cache_dir, batch_size=batch_size, workers=workers, device=device,
                  rank=rank, world_size=world_size)  # fmt: skip
    train, seeded = [], {}
    if entry.protocol == "linear_probe":
        train, records, seeded = _probe_split(data, entry, records)
    if entry.protocol == "linear_probe" and not train:
        raise ValueError(f"{data.dataset} has no 'train' split to fit the linear probe on")
    feats = image_features(model, records, **shared)
    tf = image_features(model, train, **shared) if train else None
    if feats is None:  # not rank 0: its share is with rank 0
        return None
    timing.update(seconds=feats.seconds, images=len(feats.index), cached=feats.cached)
    targets = _targets(data, records, feats.index)
    rows = [records[i].key for i in feats.index.tolist()]
    if entry.protocol == "zero_shot":
        targets = np.where(targets == -1, np.nan, targets)
        result = zero_shot(model, feats.emb, targets, data.label_names, rows=rows, min_count=min_count,
                           n_resamples=n_resamples, device=device)  # fmt: skip
    elif entry.protocol == "zero_shot_accuracy":
        result = zero_shot_accuracy(model, feats.emb, targets, data.label_names, rows=rows, n_resamples=n_resamples,
                                    device=device)  # fmt: skip
    elif entry.protocol == "retrieval":
        texts = [records[i].text for i in feats.index.tolist()]
        if not all(texts):
            raise ValueError(f"{data.dataset} records carry no report text: nothing to retrieve")
        result = retrieval(model, feats.emb, texts, rows=rows, n_resamples=n_resamples, device=device)
    elif entry.protocol == "linear_probe":
        timing.update(seconds=timing["seconds"] + tf.seconds, images=timing["images"] + len(tf.index),
                      cached=feats.cached and tf.cached)  # fmt: skip
        result = linear_probe(
            tf.emb, _targets(data, train, tf.index), [train[i].key for i in tf.index.tolist()], feats.emb, targets,
            data.label_names, rows=rows, fractions=entry.fractions, seeds=entry.seeds, min_count=min_count,
            n_resamples=n_resamples, multiclass=data.task == "multiclass", cover=entry.label_fraction_cover,
        )  # fmt: skip
        result.info["train_images_rejected"] = len(tf.rejected)
        if seeded:
            result.info["seeded_split"] = seeded
    else:  # the suite loader refuses other names
        raise AssertionError(entry.protocol)
    result.info.update(images_rejected=len(feats.rejected), rejected=_first(feats.rejected, records))
    return result


def _probe_split(data: BenchmarkData, entry: SuiteEntry, records: list) -> tuple[list, list, dict[str, Any]]:
    """``(train, tested, seeded)``: the linear probe's training records and the ones it tests — the dataset's own
    ``train`` split and the entry's records; for a set without splits (PadChest, every image in ``all``) the
    train and test parts of the seeded patient-level split `finetune.split_records` cuts, described (each part's
    checksum) in ``seeded``."""
    if data.split("train") or not data.split("all"):
        return data.split("train"), records, {}
    cut, seeded = finetune.split_records(data, entry.split)
    tested = [r for r in cut if r.split == "test"]
    return [r for r in cut if r.split == "train"], tested[: entry.max_images or None], seeded


def _merge_pairs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' grounding pairs, problems and rejected images in record order (the images of one rank are in
    order and every image is on one rank, so a stable sort by position gives the 1-rank order)."""
    by_position = lambda item: item[0]  # noqa: E731
    return {
        "pairs": sorted((p for part in parts for p in part["pairs"]), key=by_position),
        "problems": sorted((p for part in parts for p in part["problems"]), key=by_position),
        "rejected": dict(sorted(kv for part in parts for kv in part["rejected"].items())),
    }


def _first(rejected: Mapping[int, str], records: Sequence, n: int = 20) -> list[str]:
    return [f"{records[i].key}: {why}" for i, why in sorted(rejected.items())[:n]]


def _paired(a: EntryResult, b: EntryResult, n_resamples: int) -> dict[str, Any]:
    """B - A per key, paired over the rows both evaluated (the same images in the same order)."""
    return paired_rows(a.pair["rows"], result_sets(a), b.pair["rows"], result_sets(b), n_resamples)


def run_benchmark(
    models: Sequence[BenchModel], suite: Suite, data_root: str | Path, out: str | Path, *,
    dataset_paths: Mapping[str, str] | None = None, cache_dir: str | Path | None = None, batch_size: int = 64,
    workers: int = 2, device: str = "cpu", n_resamples: int = 1000, min_count: int = 10, mlflow: bool = True,
    tracking_uri: str | None = None, experiment: str = "mpma-benchmark", say: Callable[[str], None] = print,
    rank: int = 0, world_size: int = 1,
) -> dict[str, Any] | None:  # fmt: skip
    """Run ``suite`` for each of ``models``; returns (and writes to ``OUT/results.json``) the results.

    Under a process group of ``world_size`` ranks every rank calls it: each streams its share of every entry's
    images, rank 0 computes the metrics and alone writes (results, samples, problems, MLflow runs, the page) and
    returns the results; the other ranks return None."""
    out = Path(out)
    lead = rank == 0
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    else:
        say = _quiet
    cache = Path(cache_dir) if cache_dir else out / "cache"
    root = Path(data_root)
    start = time.perf_counter()
    loaded: dict[tuple, BenchmarkData] = {}
    unreadable: dict[tuple, str] = {}  # (dataset, folder, options) -> why its tables could not be read
    results: dict[str, Any] = {
        "suite": suite.name, "suite_file": suite.source, "data_root": str(root.resolve()),
        "models": {m.name: {"spec": m.spec, "kind": m.kind, "fingerprint": m.fingerprint} for m in models},
        "skipped": {}, "datasets": {}, "entries": {}, "references": {},
        "bootstrap_resamples": n_resamples, "min_label_count": min_count, "ranks": world_size,
    }  # fmt: skip
    train_tracking = {"enabled": mlflow, "uri": tracking_uri, "experiment": experiment, "system_metrics": False}
    loggers = {}
    for m in models:
        tracking = TrackingConfig(enabled=mlflow, uri=tracking_uri, experiment=experiment,
                                  run_name=f"benchmark-{suite.name}-{m.name}", system_metrics=False)  # fmt: skip
        loggers[m.name] = build_logger(tracking, rank=rank, run_dir=out / "runs" / m.name,
                                       tags={"mpma.kind": "benchmark", "mpma.suite": suite.name, "mpma.model": m.spec})  # fmt: skip
    try:
        for entry in suite.entries:
            folder = Path(entry.path or (dataset_paths or {}).get(entry.dataset) or root / entry.dataset)
            if not folder.is_dir():
                line = f"{entry.name}: skipped, {folder} does not exist"
                results["skipped"][entry.name] = line
                say(line)
                continue
            key = (entry.dataset, str(folder), json.dumps(entry.options, sort_keys=True))
            fresh = key not in loaded and key not in unreadable
            if fresh:
                t0 = time.perf_counter()
                try:
                    loaded[key] = read_benchmark(entry.dataset, folder, entry.options)
                except BenchmarkError as err:  # this dataset's entries are not scored; the others still run
                    unreadable[key] = f"{entry.dataset} could not be read: {err}"
            if key in unreadable:
                results["entries"].setdefault(entry.dataset, {})[entry.protocol] = {
                    "split": entry.split, "split_checksum": None, "images": 0, "paired": {},
                    "models": {m.name: {"error": unreadable[key]} for m in models},
                }  # fmt: skip
                say(f"{entry.name}: not scored: {unreadable[key]}")
                continue
            if fresh:
                data = loaded[key]
                if lead:
                    _write_problems(out / "problems" / f"{entry.dataset}.jsonl", data)
                results["datasets"][entry.dataset] = {
                    "path": str(folder), "version": data.version(), "files": data.files, "counts": data.counts(),
                    "problems_file": str(out / "problems" / f"{entry.dataset}.jsonl"), "notes": data.notes,
                    "parse_seconds": time.perf_counter() - t0, "options": entry.options,
                }  # fmt: skip
            data = loaded[key]
            records, split, note = _select(data, entry)
            if not records:
                line = f"{entry.name}: skipped, no records in split {entry.split!r}" + (
                    " with boxes" if entry.protocol == "grounding" else "")  # fmt: skip
                results["skipped"][entry.name] = line
                say(line)
                continue
            block: dict[str, Any] = {"split": split, "split_checksum": split_checksum(records),
                                     "images": len(records), "models": {}, "paired": {}}  # fmt: skip
            if note:
                block["note"] = note
            done: dict[str, EntryResult] = {}
            for m in models:
                timing: dict[str, Any] = {}
                child = _open_child(loggers[m.name], m, entry, suite, mlflow, tracking_uri, experiment, out, rank)
                # a protocol that trains: the Trainer's run nested under the entry's, with what it evaluated
                nested = {**train_tracking, "parent_run_id": child.run_id, "params": {
                    "benchmark.suite": suite.name, "benchmark.entry": entry.name, "benchmark.model": m.spec,
                    "benchmark.dataset_version": data.version(), "benchmark.split_checksum": block["split_checksum"],
                }}  # fmt: skip
                try:
                    r = _run_entry(m, data, entry, records, cache_dir=cache, batch_size=batch_size, workers=workers,
                                   device=device, n_resamples=n_resamples, min_count=min_count, timing=timing,
                                   folder=folder, out=out, tracking=nested, rank=rank,
                                   world_size=world_size)  # fmt: skip
                except ValueError as err:
                    child.close("FAILED")
                    block["models"][m.name] = {"error": str(err)}
                    say(f"{entry.name} [{m.name}]: not scored: {err}")
                    continue
                except BaseException:
                    child.close("FAILED")
                    raise
                if r is None:  # another rank than 0: its share of the images went to rank 0
                    child.close()
                    continue
                done[m.name] = r
                if seeded := r.info.get("seeded_split"):  # a set without splits was cut: its test part
                    block.update(split="test (seeded)", split_checksum=seeded["checksums"]["test"],
                                 images=seeded["images"]["test"], note=seeded["note"])  # fmt: skip
                saved = save_samples(samples_path(out, entry.name, m.name), r, split_checksum=block["split_checksum"],
                                     entry=entry.name, model=m.name)  # fmt: skip
                block["models"][m.name] = {"headline": r.headline, "metrics": r.metrics, "info": r.info,
                                           "timing": timing, "samples": str(saved)}  # fmt: skip
                _log_child(child, entry, block, r, data)
                value = r.metrics.get(r.headline, math.nan)
                ci = r.metrics.get(f"{r.headline}_ci95")
                band = (
                    f" [{ci[0]:.3f}, {ci[1]:.3f}]"
                    if ci and None not in ci and not any(map(math.isnan, ci))
                    else ""
                )
                say(f"{entry.name} [{m.name}]: {r.headline} {value:.3f}{band} ({len(records)} images, "
                    f"{timing.get('seconds', 0):.1f} s{', cached' if timing.get('cached') else ''})")  # fmt: skip
            names = list(done)
            for other in names[1:]:
                block["paired"][f"{other} - {names[0]}"] = _paired(done[names[0]], done[other], n_resamples)
            results["entries"].setdefault(entry.dataset, {})[entry.protocol] = block
            results["references"].setdefault(entry.dataset, {})[entry.protocol] = references_for(
                entry.dataset, entry.protocol
            )
        results["wall_seconds"] = time.perf_counter() - start
        for m in models:
            logger = loggers[m.name]
            results["models"][m.name]["mlflow_run_id"] = logger.run_id
            logger.log_params({"benchmark": {
                "suite": suite.name, "model": m.spec, "data_root": str(root),
                "dataset_versions": {d: v["version"] for d, v in results["datasets"].items()},
                "split_checksums": {f"{d}/{p}": b["split_checksum"] for d, ps in results["entries"].items()
                                    for p, b in ps.items()},
            }})  # fmt: skip
    finally:
        for logger in loggers.values():
            logger.close()
    if not lead:
        return None
    (out / RESULTS_FILE).write_text(json.dumps(json_safe(results), indent=1) + "\n", encoding="utf-8")
    results["page"] = str(write_page(results, out / "benchmark.html"))
    return results


def _write_problems(path: Path, data: BenchmarkData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in data.problems:
            f.write(json.dumps({"file": p.file, "row": p.row, "reason": p.reason, "detail": p.detail}) + "\n")


def _quiet(line: str) -> None:
    """Another rank than 0 prints nothing (rank 0 says every line once)."""


def _open_child(parent, model, entry, suite, mlflow, uri, experiment, out, rank):
    """The entry's MLflow run under the model's suite run (opened before the entry runs, so that a protocol that
    trains nests the Trainer's run under it); a no-op logger on the other ranks."""
    tracking = TrackingConfig(enabled=mlflow, uri=uri, experiment=experiment,
                              run_name=f"{entry.name} [{model.name}]", system_metrics=False,
                              parent_run_id=parent.run_id)  # fmt: skip
    tags = {"mpma.kind": "benchmark-entry", "mpma.suite": suite.name, "mpma.entry": entry.name}
    return build_logger(
        tracking, rank=rank, run_dir=out / "runs" / model.name / entry.name.replace("/", "-"), tags=tags
    )


def _log_child(child, entry, block, result, data) -> None:
    """The entry's parameters and metrics on its child run, which ends here."""
    try:
        child.log_params({"entry": {"dataset": entry.dataset, "protocol": entry.protocol, "split": block["split"],
                                    "split_checksum": block["split_checksum"], "images": block["images"],
                                    "dataset_version": data.version(), "options": entry.options,
                                    **({"label_fraction_checksums": result.info["split_checksums"]}
                                       if "split_checksums" in result.info else {})}})  # fmt: skip
        child.log_metrics({k.replace("@", "_at_").replace("%", "pct"): v
                           for k, v in loggable_metrics(result.metrics).items()}, step=0)  # fmt: skip
    finally:
        child.close()
