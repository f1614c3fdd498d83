"""CheXpert as its download unpacks (``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/`` holding ``train.csv``,
``valid.csv``, the images under ``train/patientNNNNN/studyN/viewN_frontal.jpg``; the test labels as
``test_labels.csv`` when present), with the 14 labels or the 5 competition ones and the uncertainty policies of
Irvin et al. 2019 (U-Ignore, U-Ones, U-Zeros); and CheXpert 5x200 (GLoRIA's ``chexpert_5x200.csv``: 200
training images for each competition label that is the image's only positive one) as a 5-class set."""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.benchmarks.common import (
    BENCHMARKS,
    BenchmarkData,
    BenchmarkError,
    BenchRecord,
    RowProblem,
    as_float,
    find_file,
    read_rows,
    require_file,
)

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)  # fmt: skip
COMPETITION_LABELS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
"""The 5 labels of the CheXpert competition (and of the 5x200 zero-shot set)."""
POLICIES = ("ignore", "ones", "zeros")


@dataclass(frozen=True)
class ChexpertOptions:
    labels: str = "competition"
    """``competition`` (5) or ``all`` (14)."""
    uncertainty: str = "ignore"
    """What an uncertain (-1) label becomes: ``ignore`` (left out, NaN), ``ones`` (1) or ``zeros`` (0)."""
    frontal_only: bool = True
    """Only frontal films (the usual protocol)."""
    train: str | None = None
    """The training table (default: ``train.csv`` under the root)."""
    valid: str | None = None
    test: str | None = None
    """The test-label table (default: ``test_labels.csv`` when present)."""
    check_images: bool = True


def _policy(value: float, policy: str) -> float:
    if value == -1.0:
        return {"ignore": math.nan, "ones": 1.0, "zeros": 0.0}[policy]
    return value


def resolve_image(root: Path, table: Path, rel: str) -> str | None:
    """A table's ``Path`` (``CheXpert-v1.0-small/train/...``, or ``test/...``) as a file under the root."""
    rel = rel.strip()
    parts = Path(rel).parts
    for cand in (root / rel, table.parent / rel, table.parent / Path(*parts[1:]) if len(parts) > 1 else None):
        if cand is not None and os.path.isfile(cand):
            return str(cand)
    return None


def _read_table(
    root: Path, table: Path, split: str, names: tuple[str, ...], opts: ChexpertOptions, problems: list[RowProblem]
) -> list[BenchRecord]:
    header, rows = read_rows(table, ("Path", *names))
    col = {h: i for i, h in enumerate(header)}
    i_path, cols = col["Path"], [col[n] for n in names]
    i_view = col.get("Frontal/Lateral")
    # a dict lookup per cell: float() and a policy call per cell made a 223k-row table take 15 s
    code = {v: _policy(float(v), opts.uncertainty) for v in ("1.0", "0.0", "-1.0", "1", "0", "-1")}
    code[""] = math.nan
    pick = operator.itemgetter(*cols) if len(cols) > 1 else (lambda row: (row[cols[0]],))
    out = []
    for n, row in enumerate(rows, 1):
        if len(row) < len(header):
            problems.append(
                RowProblem(table.name, n, "bad_row", f"{len(row)} fields, the header has {len(header)}")
            )
            continue
        rel = row[i_path].strip()
        if opts.frontal_only and (
            (i_view is not None and row[i_view].strip() == "Lateral") or (i_view is None and "lateral" in rel)
        ):
            continue
        try:
            values = tuple(map(code.__getitem__, pick(row)))
        except KeyError:
            problems.append(RowProblem(table.name, n, "bad_value", f"{rel}: a label is not 1, 0, -1 or blank"))
            continue
        cut = rel.find("patient")
        patient = rel[cut : rel.find("/", cut)] if cut >= 0 else rel
        path = rel
        if opts.check_images:
            found = resolve_image(root, table, rel)
            if found is None:
                problems.append(RowProblem(table.name, n, "missing_image", f"{rel} is not under {root}"))
                continue
            path = found
        out.append(BenchRecord(rel, path, patient, split, values))
    return out


@BENCHMARKS.register("chexpert", options=ChexpertOptions, task="multilabel")
def read_chexpert(root: Path, opts: ChexpertOptions) -> BenchmarkData:
    """train.csv -> split ``train``, valid.csv -> ``validate``, test labels -> ``test`` (each when present; the
    training table is required)."""
    root = Path(root)
    if opts.uncertainty not in POLICIES:
        raise BenchmarkError(f"chexpert: uncertainty {opts.uncertainty!r} is not one of {', '.join(POLICIES)}")
    if opts.labels not in ("competition", "all"):
        raise BenchmarkError(f"chexpert: labels {opts.labels!r} is not 'competition' or 'all'")
    names = COMPETITION_LABELS if opts.labels == "competition" else CHEXPERT_LABELS
    problems: list[RowProblem] = []
    train = require_file(root, opts.train, ("train.csv",), "CheXpert training table")
    files = {"train": str(train)}
    records = _read_table(root, train, "train", names, opts, problems)
    notes = []
    for key, given, default, split in (
        ("valid", opts.valid, "valid.csv", "validate"), ("test", opts.test, "test_labels.csv", "test"),
    ):  # fmt: skip
        path = Path(given) if given else find_file(root, (default,))
        if path is None:
            notes.append(f"no {default}: no {split} split")
            continue
        files[key] = str(path)
        records += _read_table(root, path, split, names, opts, problems)
    return BenchmarkData("chexpert", names, records, problems, files, notes)


# --------------------------------------------------------------------------------------------------- 5x200
@dataclass(frozen=True)
class Chexpert5x200Options:
    table: str | None = None
    """GLoRIA's ``chexpert_5x200.csv`` (default: under the root)."""
    check_images: bool = True


def one_positive(values: dict[str, float]) -> str | None:
    """The one competition label that is 1 while the other four are 0 or blank (GLoRIA's rule), else None."""
    pos = [n for n in COMPETITION_LABELS if values.get(n) == 1.0]
    rest_ok = all(values.get(n) in (0.0,) or math.isnan(values.get(n, math.nan)) for n in COMPETITION_LABELS
                  if n not in pos)  # fmt: skip
    return pos[0] if len(pos) == 1 and rest_ok else None


def make_5x200(train_table: Path, seed: int = 0, per_class: int = 200) -> list[dict[str, object]]:
    """Rows of a 5x200 table drawn from a CheXpert training table as GLoRIA draws it: frontal films whose only
    positive competition label is the class, ``per_class`` of each, by ``seed``. Each row: ``Path`` and the five
    labels (1.0 / 0.0)."""
    header, rows = read_rows(train_table, ("Path", *COMPETITION_LABELS))
    col = {h: i for i, h in enumerate(header)}
    pools: dict[str, list[str]] = {n: [] for n in COMPETITION_LABELS}
    for row in rows:
        if "Frontal/Lateral" in col and row[col["Frontal/Lateral"]] != "Frontal":
            continue
        values = {n: as_float(row[col[n]]) for n in COMPETITION_LABELS}
        cls = one_positive(values)
        if cls is not None:
            pools[cls].append(row[col["Path"]])
    rng = np.random.default_rng(seed)
    out = []
    for cls in COMPETITION_LABELS:
        pool = pools[cls]
        if len(pool) < per_class:
            raise BenchmarkError(f"{train_table}: only {len(pool)} films have {cls} as their only positive label")
        for i in sorted(rng.choice(len(pool), per_class, replace=False).tolist()):
            out.append({"Path": pool[i], **{n: float(n == cls) for n in COMPETITION_LABELS}})
    return out


@BENCHMARKS.register("chexpert-5x200", options=Chexpert5x200Options, task="multiclass")
def read_chexpert_5x200(root: Path, opts: Chexpert5x200Options) -> BenchmarkData:
    """Every row as a ``test`` record whose labels are one-hot over the 5 classes; a row without exactly one
    positive class is a problem (``not_one_class``)."""
    root = Path(root)
    table = require_file(root, opts.table, ("chexpert_5x200.csv",), "CheXpert 5x200 table")
    header, rows = read_rows(table, ("Path", *COMPETITION_LABELS))
    col = {h: i for i, h in enumerate(header)}
    problems: list[RowProblem] = []
    records = []
    for n, row in enumerate(rows, 1):
        rel = row[col["Path"]].strip()
        try:
            values = {c: as_float(row[col[c]]) for c in COMPETITION_LABELS}
        except ValueError:
            problems.append(RowProblem(table.name, n, "bad_value", f"{rel}: a label is not a number"))
            continue
        if sum(values[c] == 1.0 for c in COMPETITION_LABELS) != 1:
            problems.append(RowProblem(table.name, n, "not_one_class", f"{rel}: not exactly one positive class"))
            continue
        path = rel
        if opts.check_images:
            found = resolve_image(root, table, rel)
            if found is None:
                problems.append(RowProblem(table.name, n, "missing_image", f"{rel} is not under {root}"))
                continue
            path = found
        patient = next((p for p in Path(rel).parts if p.startswith("patient")), rel)
        labels = tuple(1.0 if values[c] == 1.0 else 0.0 for c in COMPETITION_LABELS)
        records.append(BenchRecord(rel, path, patient, "test", labels))
    return BenchmarkData(
        "chexpert-5x200", COMPETITION_LABELS, records, problems, {"table": str(table)}, task="multiclass"
    )
