"""PadChest (BIMCV) as its download unpacks: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (one row per
image; ``Labels`` a Python-style list of the report's findings, ``Localizations`` their anatomical locations —
regions, not boxes) and the 16-bit PNGs under ``<ImageDir>/<ImageID>`` (folders 0 ... 54). PadChest has no
official split: every image is in split ``all`` (``test`` falls back to it). The labels evaluated are
``labels`` (default: the findings KAD / CheXzero report zero-shot on); an image is positive when its list holds
the finding, negative otherwise; a row whose label list does not parse is a problem."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from data_tools.benchmarks.common import (
    BENCHMARKS,
    BenchmarkData,
    BenchRecord,
    RowProblem,
    read_rows,
    require_file,
)

DEFAULT_LABELS: tuple[str, ...] = (
    "atelectasis", "cardiomegaly", "consolidation", "pleural effusion", "pneumonia", "pneumothorax", "nodule",
    "mass", "emphysema", "pulmonary fibrosis", "hiatal hernia", "infiltrates", "pleural thickening", "normal",
)  # fmt: skip


@dataclass(frozen=True)
class PadchestOptions:
    table: str | None = None
    labels: tuple[str, ...] = DEFAULT_LABELS
    projections: tuple[str, ...] = ("PA", "AP", "AP_horizontal")
    """Projections kept (PadChest also holds laterals and costal views)."""
    check_images: bool = True


@BENCHMARKS.register("padchest", options=PadchestOptions, task="multilabel")
def read_padchest(root: Path, opts: PadchestOptions) -> BenchmarkData:
    root = Path(root)
    table = require_file(root, opts.table, ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",),
                         "PadChest label table")  # fmt: skip
    header, rows = read_rows(table, ("ImageID", "ImageDir", "PatientID", "Projection", "Labels"))
    col = {h: i for i, h in enumerate(header)}
    wanted = tuple(str(x) for x in opts.labels)
    index = {n: i for i, n in enumerate(wanted)}
    problems: list[RowProblem] = []
    records = []
    parsed: dict[str, tuple[str, ...]] = {}  # label lists repeat a lot: parse each distinct string once
    for n, row in enumerate(rows, 1):
        if len(row) < len(header):
            problems.append(
                RowProblem(table.name, n, "bad_row", f"{len(row)} fields, the header has {len(header)}")
            )
            continue
        if row[col["Projection"]] not in opts.projections:
            continue
        image, text = row[col["ImageID"]], row[col["Labels"]]
        if text not in parsed:
            try:
                value = ast.literal_eval(text) if text else None
            except (ValueError, SyntaxError):
                value = None
            parsed[text] = tuple(str(v).strip() for v in value) if isinstance(value, list) else None
        found = parsed[text]
        if found is None:
            problems.append(RowProblem(table.name, n, "bad_value", f"{image}: Labels {text[:60]!r} is not a list"))
            continue
        labels = [0.0] * len(wanted)
        for name in found:
            if name in index:
                labels[index[name]] = 1.0
        path = image
        if opts.check_images:
            cand = root / row[col["ImageDir"]] / image
            if not cand.is_file():
                problems.append(
                    RowProblem(
                        table.name, n, "missing_image", f"{row[col['ImageDir']]}/{image} is not under {root}"
                    )
                )
                continue
            path = str(cand)
        records.append(BenchRecord(image, path, row[col["PatientID"]], "all", tuple(labels)))
    return BenchmarkData("padchest", wanted, records, problems, {"labels": str(table)},
                         ["PadChest has no official split: every image is in split 'all'"])  # fmt: skip
