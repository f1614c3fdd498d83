"""Per-sample scores saved with a suite run, so two *separate* runs can be paired sample by sample later.

Every (entry, model) writes ``OUT/samples/<dataset>/<protocol>/<model>.npz``: the record keys of its rows
(``rows``), the per-sample arrays its metrics come from (zero-shot scores and targets, VQA answers, grounding hits,
retrieval embeddings ...) and, as JSON, the split checksum and how to score them (the metric function by import
path, its keyword arguments, the metric keys). ``mpma-benchmark --compare DIR_A DIR_B --out DIR`` reads two runs'
files and writes ``DIR/paired.json``: B - A of every metric both scored with a paired bootstrap interval over the
rows both evaluated — refused (one line) when an entry's split checksums differ, i.e. the two runs evaluated
different images.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpma_ds.benchmark.protocols import EntryResult
from mpma_ds.eval.bootstrap import paired_difference
from mpma_ds.fileio import atomic_write_text
from mpma_ds.tracking.params import json_safe

SAMPLES_DIR = "samples"
PAIRED_FILE = "paired.json"


def samples_path(out: Path, entry_name: str, model: str) -> Path:
    return Path(out) / SAMPLES_DIR / entry_name / f"{model}.npz"


def _scoring_sets(pair: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pair's scored array sets: one, or one per linear-probe fraction (``multi``)."""
    if "multi" in pair:
        return [{"name": m["name"], "fn": m["fn"], "arrays": m["arrays"], "kwargs": m["kwargs"], "keys": [m["key"]]}
                for m in pair["multi"]]  # fmt: skip
    return [
        {"name": "", "fn": pair["fn"], "arrays": pair["arrays"], "kwargs": pair["kwargs"], "keys": pair["keys"]}
    ]


def save_samples(path: Path, result: EntryResult, *, split_checksum: str, entry: str, model: str) -> Path:
    """Write ``result``'s per-sample arrays (see the module docstring)."""
    sets = _scoring_sets(result.pair)
    arrays: dict[str, np.ndarray] = {"rows": np.asarray(result.pair["rows"], dtype=str)}
    described = []
    for i, s in enumerate(sets):
        for j, a in enumerate(s["arrays"]):
            arrays[f"s{i}_a{j}"] = np.asarray(a)
        described.append({"name": s["name"], "fn": f"{s['fn'].__module__}:{s['fn'].__qualname__}",
                          "keys": list(s["keys"]), "kwargs": json_safe(dict(s["kwargs"])), "arrays": len(s["arrays"])})  # fmt: skip
    meta = {"entry": entry, "model": model, "split_checksum": split_checksum, "sets": described}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    tmp.replace(path)
    return path


def _function(spec: str) -> Callable[..., Mapping[str, Any]]:
    module, _, name = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def load_samples(path: Path) -> tuple[dict[str, Any], list[str], list[list[np.ndarray]]]:
    """``(meta, rows, arrays per scoring set)`` of a file `save_samples` wrote."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        rows = [str(r) for r in z["rows"]]
        arrays = [[z[f"s{i}_a{j}"] for j in range(s["arrays"])] for i, s in enumerate(meta["sets"])]
    return meta, rows, arrays


def paired_rows(
    rows_a: Sequence[str], sets_a: Sequence[dict], rows_b: Sequence[str], sets_b: Sequence[dict], n_resamples: int
) -> dict[str, Any]:
    """B - A per metric over the rows both evaluated (each set: ``name, fn, arrays, kwargs, keys``; sets paired by
    name). The two must have been scored with the same settings (labels, answer set ...): else a note."""
    in_b = set(rows_b)
    common = [r for r in rows_a if r in in_b]
    if not common or not n_resamples:
        return {}
    ia, ib = {r: i for i, r in enumerate(rows_a)}, {r: i for i, r in enumerate(rows_b)}
    sa, sb = np.asarray([ia[r] for r in common]), np.asarray([ib[r] for r in common])
    theirs = {s["name"]: s for s in sets_b}
    out: dict[str, Any] = {}
    for mine in sets_a:
        other = theirs.get(mine["name"])
        if other is None:
            continue
        if json.dumps(json_safe(mine["kwargs"]), sort_keys=True) != json.dumps(json_safe(other["kwargs"]), sort_keys=True) \
                or [np.shape(a)[1:] for a in mine["arrays"]] != [np.shape(a)[1:] for a in other["arrays"]]:  # fmt: skip
            out[mine["name"] or "note"] = {"note": "no paired difference: the two were scored with other settings "
                                                   "(labels, answer set or texts differ)"}  # fmt: skip
            continue
        keys = [k for k in mine["keys"] if k in other["keys"]]
        try:  # paired_difference scores its first arrays minus its second: B's first, so d = B - A
            d = paired_difference(mine["fn"], [np.asarray(x)[sb] for x in other["arrays"]],
                                  [np.asarray(x)[sa] for x in mine["arrays"]], keys=keys, n_resamples=n_resamples,
                                  **mine["kwargs"])  # fmt: skip
        except (KeyError, ValueError) as err:  # a metric one model could not score on these rows
            out[mine["name"] or "note"] = {"note": f"no paired difference: {err}"}
            continue
        d = {k: {**v, "a": v["b"], "b": v["a"]} for k, v in d.items()}  # "a" is A's value, "b" B's
        if mine["name"]:  # a linear-probe fraction: its one key under the fraction's metric name
            out[mine["name"]] = d[mine["keys"][0]]
        else:
            out.update(d)
    return out


def result_sets(result: EntryResult) -> list[dict[str, Any]]:
    return _scoring_sets(result.pair)


def _only_model(results: Mapping[str, Any], name: str | None, where: Path) -> str:
    models = list(results["models"])
    if name is not None:
        if name not in models:
            raise ValueError(f"--name {name}: {where} holds models {', '.join(models)}")
        return name
    if len(models) != 1:
        raise ValueError(f"{where} holds {len(models)} models ({', '.join(models)}): choose one with --name")
    return models[0]


def _read_results(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"--compare {folder}: no results.json (give an mpma-benchmark --out folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def compare_runs(
    dir_a: Path, dir_b: Path, out: Path, *, names: Sequence[str | None] = (None, None), n_resamples: int = 1000
) -> dict[str, Any]:
    """Pair model A of benchmark run ``dir_a`` with model B of run ``dir_b`` per sample; writes and returns
    ``OUT/paired.json``.

    Raises:
        ValueError: an entry both ran was evaluated on different images (split checksums differ), a folder
            with several models and no ``names``, or no entry with saved samples in both.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    ra, rb = _read_results(dir_a), _read_results(dir_b)
    ma, mb = _only_model(ra, names[0], dir_a), _only_model(rb, names[1], dir_b)
    report: dict[str, Any] = {"a": {"run": str(dir_a), "model": ma, "suite": ra["suite"]},
                              "b": {"run": str(dir_b), "model": mb, "suite": rb["suite"]},
                              "bootstrap_resamples": n_resamples, "entries": {}, "skipped": {}}  # fmt: skip
    for dataset, protocols in ra["entries"].items():
        for protocol, block in protocols.items():
            name = f"{dataset}/{protocol}"
            other = rb["entries"].get(dataset, {}).get(protocol)
            fa, fb = samples_path(dir_a, name, ma), samples_path(dir_b, name, mb)
            if other is None or not fa.is_file() or not fb.is_file():
                report["skipped"][name] = "not run (or no per-sample scores saved) in both"
                continue
            if block["split_checksum"] != other["split_checksum"]:
                raise ValueError(
                    f"{name}: the runs evaluated different images (split checksum {block['split_checksum']} in "
                    f"{dir_a}, {other['split_checksum']} in {dir_b}); pair runs made on the same data and split"
                )
            (meta_a, rows_a, arr_a), (meta_b, rows_b, arr_b) = load_samples(fa), load_samples(fb)
            sets_a = [{**s, "fn": _function(s["fn"]), "arrays": a} for s, a in zip(meta_a["sets"], arr_a)]
            sets_b = [{**s, "fn": _function(s["fn"]), "arrays": a} for s, a in zip(meta_b["sets"], arr_b)]
            report["entries"].setdefault(dataset, {})[protocol] = {
                "split_checksum": block["split_checksum"], "rows_a": len(rows_a), "rows_b": len(rows_b),
                "rows_paired": len(set(rows_a) & set(rows_b)),
                "paired": paired_rows(rows_a, sets_a, rows_b, sets_b, n_resamples),
            }  # fmt: skip
    if not report["entries"]:
        raise ValueError(f"no entry with per-sample scores in both {dir_a} and {dir_b}: nothing to pair")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PAIRED_FILE, json.dumps(json_safe(report), indent=1) + "\n")
    return report


def format_paired(report: Mapping[str, Any]) -> str:
    """The console table of `compare_runs`: entry, metric, A, B, B - A [95 % paired interval]."""

    def num(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    a, b = report["a"]["model"], report["b"]["model"]
    lines = [f"{'dataset/protocol':<26}{'metric':<22}{'A: ' + a:>20}{'B: ' + b:>20}  B - A [95 % paired]"]
    lines.append("-" * len(lines[0]) + "-" * 20)
    for dataset, protocols in report["entries"].items():
        for protocol, block in protocols.items():
            for key, d in block["paired"].items():
                if "note" in d:
                    lines.append(f"{dataset + '/' + protocol:<26}{key:<22}{d['note']}")
                    continue
                lo, hi = d.get("difference_ci95", [None, None])
                band = f" [{num(lo)}, {num(hi)}]" if lo is not None else ""
                lines.append(f"{dataset + '/' + protocol:<26}{key:<22}{num(d['a']):>20}{num(d['b']):>20}  "
                             f"{num(d['difference'])}{band}")  # fmt: skip
    return "\n".join(lines)
