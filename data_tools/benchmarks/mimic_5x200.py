"""MIMIC-CXR 5x200 image <-> report retrieval (GLoRIA / MGCA) from a MIMIC-CXR-JPG download with its reports
(``files/pNN/pSUBJECT/sSTUDY/*.jpg`` + ``sSTUDY.txt``, ``mimic-cxr-2.0.0-chexpert.csv``, ``-split.csv``,
``-metadata.csv``), read by the shard builder's own MIMIC reader (``data_tools.sources.mimic``: the same report
sections, views and splits). Of the chosen split's frontal images, ``per_class`` (default 200) whose only positive
competition label is the class, drawn by ``seed`` (GLoRIA's rule); each record's text is its report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.benchmarks.chexpert import COMPETITION_LABELS, one_positive
from data_tools.benchmarks.common import BENCHMARKS, BenchmarkData, BenchmarkError, BenchRecord, RowProblem
from data_tools.sources.common import ScanOptions, SourceError
from data_tools.sources.mimic import scan_mimic_cxr


@dataclass(frozen=True)
class Mimic5x200Options:
    split: str = "test"
    """The MIMIC split drawn from (``all``: every split)."""
    per_class: int = 200
    seed: int = 0


@BENCHMARKS.register("mimic-5x200", options=Mimic5x200Options, task="multiclass")
def read_mimic_5x200(root: Path, opts: Mimic5x200Options) -> BenchmarkData:
    try:
        scan = scan_mimic_cxr(Path(root), ScanOptions(views=("PA", "AP")))
    except SourceError as err:
        raise BenchmarkError(str(err)) from None
    problems = [RowProblem(r.input, 0, r.reason, r.detail) for r in scan.rejects if r.reason != "view_filtered"]
    pools: dict[str, list] = {c: [] for c in COMPETITION_LABELS}
    for item in scan.items:
        if opts.split != "all" and item.split != opts.split:
            continue
        labels = item.meta["labels"]
        values = {c: float("nan") if labels.get(c) is None else float(labels[c]) for c in COMPETITION_LABELS}
        cls = one_positive(values)
        if cls is not None:
            pools[cls].append(item)
    rng = np.random.default_rng(opts.seed)
    records = []
    short = {c: len(p) for c, p in pools.items() if len(p) < opts.per_class}
    if len(short) == len(pools):
        raise BenchmarkError(f"{root}: no competition class has {opts.per_class} single-label {opts.split} images "
                             f"({', '.join(f'{c}: {n}' for c, n in short.items())}); lower per_class")  # fmt: skip
    for cls in COMPETITION_LABELS:
        pool = pools[cls]
        if len(pool) < opts.per_class:
            continue
        for i in sorted(rng.choice(len(pool), opts.per_class, replace=False).tolist()):
            item = pool[i]
            labels = tuple(1.0 if c == cls else 0.0 for c in COMPETITION_LABELS)
            records.append(
                BenchRecord(item.key, item.image_path, item.meta["subject_id"], "test", labels, text=item.text)
            )
    notes = [f"{c}: only {n} single-label images, left out" for c, n in short.items()]
    return BenchmarkData("mimic-5x200", COMPETITION_LABELS, records, problems, {"root": str(root)}, notes,
                         task="multiclass")  # fmt: skip
