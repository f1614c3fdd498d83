"""VinDr-CXR as its downloads unpack: the PhysioNet release (``annotations/annotations_train.csv`` and
``annotations_test.csv``, one row per box or per "No finding" per radiologist; DICOMs under ``train/`` and
``test/``) or the Kaggle VinBigData one (``train.csv``, the same rows with ``class_id``). An image is positive for a
finding when any of its radiologists boxed it (the test set's rows are the consensus of five); boxes are in the
DICOM's own pixels (sizes differ), checked against the image when it is decoded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from data_tools.benchmarks.common import (
    BENCHMARKS,
    BenchmarkData,
    BenchRecord,
    Box,
    RowProblem,
    find_file,
    locate_images,
    read_rows,
    require_file,
)

VINDR_LABELS: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis",
)  # fmt: skip
"""The 14 local findings of the Kaggle release (the PhysioNet one splits some; unknown names are reported)."""


@dataclass(frozen=True)
class VindrOptions:
    train: str | None = None
    """``annotations_train.csv`` / Kaggle ``train.csv`` (default: under the root)."""
    test: str | None = None
    """``annotations_test.csv`` (default: under the root when present)."""
    check_images: bool = True


def _read(table: Path, split: str, images: dict, problems: list[RowProblem]) -> None:
    header, rows = read_rows(table, ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max"))
    col = {h: i for i, h in enumerate(header)}
    index = {n: i for i, n in enumerate(VINDR_LABELS)}
    for n, row in enumerate(rows, 1):
        image, name = row[col["image_id"]].strip(), row[col["class_name"]].strip()
        entry = images.setdefault(
            image, {"split": split, "labels": [0.0] * len(VINDR_LABELS), "boxes": [], "row": n}
        )
        if name in ("No finding", "No Finding"):
            continue
        if name not in index:
            problems.append(
                RowProblem(table.name, n, "unknown_label", f"{image}: {name!r} is not a VinDr-CXR finding")
            )
            continue
        entry["labels"][index[name]] = 1.0
        try:
            x0, y0, x1, y1 = (float(row[col[c]]) for c in ("x_min", "y_min", "x_max", "y_max"))
        except ValueError:
            problems.append(RowProblem(table.name, n, "bad_value", f"{image}: {name} without a numeric box"))
            continue
        if not (0 <= x0 < x1 and 0 <= y0 < y1) or math.isnan(x1 + y1):
            problems.append(
                RowProblem(table.name, n, "box_outside_image", f"{image}: box {x0:g},{y0:g},{x1:g},{y1:g}")
            )
            continue
        entry["boxes"].append(Box(name, x0, y0, x1, y1))


@BENCHMARKS.register("vindr-cxr", options=VindrOptions, task="multilabel")
def read_vindr(root: Path, opts: VindrOptions) -> BenchmarkData:
    root = Path(root)
    train = require_file(root, opts.train, ("annotations_train.csv", "train.csv"), "VinDr-CXR annotation table")
    problems: list[RowProblem] = []
    images: dict[str, dict] = {}
    files = {"train": str(train)}
    _read(train, "train", images, problems)
    test = Path(opts.test) if opts.test else find_file(root, ("annotations_test.csv",))
    if test is not None:
        files["test"] = str(test)
        _read(test, "test", images, problems)
    rows = {image: (Path(files[e["split"]]).name, e["row"]) for image, e in images.items()}
    paths = locate_images(root, rows, lambda k: (f"{k}.dicom", f"{k}.dcm", f"{k}.png"), check=opts.check_images,
                          problems=problems)  # fmt: skip
    records = [BenchRecord(image, paths[image], image, e["split"], tuple(e["labels"]), e["boxes"])
               for image, e in images.items() if image in paths]  # fmt: skip
    notes = [] if test is not None else ["no annotations_test.csv: the training images only (split 'train')"]
    return BenchmarkData("vindr-cxr", VINDR_LABELS, records, problems, files, notes)
