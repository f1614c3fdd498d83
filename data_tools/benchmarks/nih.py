"""NIH ChestX-ray14 as the NIH Box folder unpacks: ``Data_Entry_2017_v2020.csv`` (one row per image, labels
``|``-joined), ``train_val_list.txt`` / ``test_list.txt`` (the official patient-wise split), ``BBox_List_2017.csv``
(984 boxes on 880 images, ``x, y, w, h`` in the released 1024 px PNGs) and ``images_0XX/images/*.png``; and the
Google 2019 expert labels (``google2019_nih-chest-xray-labels.csv``: 4 labels on 4,376 images of the test and a
validation set, Majkowska et al., Radiology 2019) as the alternative label set (``labels: google2019``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from data_tools.benchmarks.common import (
    BENCHMARKS,
    BenchmarkData,
    BenchmarkError,
    BenchRecord,
    Box,
    RowProblem,
    find_file,
    locate_images,
    read_list,
    read_rows,
    require_file,
)

NIH_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
"""The 14 findings of ChestX-ray14 ("No Finding" is none of them)."""
GOOGLE2019_LABELS: tuple[str, ...] = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
BOX_ALIASES = {"Infiltrate": "Infiltration"}
"""``BBox_List_2017.csv`` names Infiltration "Infiltrate"."""
RELEASED_SIZE = (1024, 1024)
"""Every released PNG is 1024 x 1024: the frame of the boxes."""


@dataclass(frozen=True)
class NihOptions:
    labels: str = "nih"
    """``nih``: the 14 text-mined labels of the Data_Entry table; ``google2019``: the 4 expert labels (only the
    4,376 images they cover; split from their ``Set Id``)."""
    data_entry: str | None = None
    """The label table (default: ``Data_Entry_2017_v2020.csv`` / ``Data_Entry_2017.csv`` under the root)."""
    bbox: str | None = None
    """The box table (default: ``BBox_List_2017.csv``; none: no boxes)."""
    google2019: str | None = None
    """The expert-label table (default: ``google2019_nih-chest-xray-labels.csv``)."""
    check_images: bool = True
    """Look every image up under the root (a missing one is a row problem); False: label tables only."""


def _boxes(path: Path, known: dict[str, tuple[int, int]], problems: list[RowProblem]) -> dict[str, list[Box]]:
    """Image id -> its boxes; unknown labels, unknown images, bad numbers and boxes outside 1024 px are problems."""
    header, rows = read_rows(path, ("Image Index", "Finding Label"))
    out: dict[str, list[Box]] = {}
    name = path.name
    for n, row in enumerate(rows, 1):
        if len(row) < 6:
            problems.append(
                RowProblem(name, n, "bad_row", f"{len(row)} fields, expected image, label, x, y, w, h")
            )
            continue
        image, label = row[0].strip(), BOX_ALIASES.get(row[1].strip(), row[1].strip())
        if label not in NIH_LABELS:
            problems.append(RowProblem(name, n, "unknown_label", f"{row[1]!r} is not a ChestX-ray14 label"))
            continue
        if image not in known:
            problems.append(RowProblem(name, n, "unknown_image", f"{image} is not in the label table"))
            continue
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            problems.append(RowProblem(name, n, "bad_value", f"box {row[2:6]} is not four numbers"))
            continue
        fw, fh = RELEASED_SIZE
        if not (w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= fw + 0.5 and y + h <= fh + 0.5):
            problems.append(
                RowProblem(
                    name, n, "box_outside_image", f"{image}: x={x:g} y={y:g} w={w:g} h={h:g} not in {fw}x{fh}"
                )
            )
            continue
        out.setdefault(image, []).append(Box(label, x, y, min(x + w, fw), min(y + h, fh), RELEASED_SIZE))
    return out


@BENCHMARKS.register("nih-cxr14", options=NihOptions, task="multilabel")
def read_nih(root: Path, opts: NihOptions) -> BenchmarkData:
    """Every row of the label table as a record (see the module docstring)."""
    root = Path(root)
    table = require_file(
        root, opts.data_entry, ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"), "ChestX-ray14 label table"
    )
    header, rows = read_rows(table, ("Image Index", "Finding Labels", "Patient ID"))
    col = {h: i for i, h in enumerate(header)}
    i_img, i_lab, i_pat = col["Image Index"], col["Finding Labels"], col["Patient ID"]
    problems: list[RowProblem] = []
    entries: dict[str, tuple[str, tuple[float, ...], int]] = {}
    index = {name: i for i, name in enumerate(NIH_LABELS)}
    for n, row in enumerate(rows, 1):
        if len(row) <= max(i_img, i_lab, i_pat):
            problems.append(RowProblem(table.name, n, "bad_row", f"{len(row)} fields, fewer than the header's"))
            continue
        image = row[i_img].strip()
        labels = [0.0] * len(NIH_LABELS)
        unknown = []
        for name in row[i_lab].split("|"):
            name = name.strip()
            if name in index:
                labels[index[name]] = 1.0
            elif name not in ("No Finding", ""):
                unknown.append(name)
        if unknown:  # the row's other labels still count; the unknown one is reported
            problems.append(RowProblem(table.name, n, "unknown_label", f"{image}: {', '.join(unknown)}"))
        if image in entries:
            problems.append(
                RowProblem(table.name, n, "duplicate_image", f"{image} repeats row {entries[image][2]}")
            )
            continue
        entries[image] = (row[i_pat].strip(), tuple(labels), n)

    files = {"data_entry": str(table)}
    notes: list[str] = []
    split = dict.fromkeys(entries, "all")
    test_list, trainval_list = find_file(root, ("test_list.txt",)), find_file(root, ("train_val_list.txt",))
    if test_list and trainval_list:
        files.update(test_list=str(test_list), train_val_list=str(trainval_list))
        for path, name in ((trainval_list, "train"), (test_list, "test")):
            for n, image in enumerate(read_list(path), 1):
                if image in split:
                    split[image] = name
                else:
                    problems.append(
                        RowProblem(path.name, n, "unknown_image", f"{image} is not in the label table")
                    )
    else:
        notes.append("no test_list.txt / train_val_list.txt: every image is in split 'all'")

    box_table = Path(opts.bbox) if opts.bbox else find_file(root, ("BBox_List_2017.csv",))
    boxes: dict[str, list[Box]] = {}
    if box_table is not None:
        files["bbox"] = str(box_table)
        boxes = _boxes(box_table, {k: RELEASED_SIZE for k in entries}, problems)

    label_names: tuple[str, ...] = NIH_LABELS
    if opts.labels == "google2019":
        label_names, entries, split = _google2019(root, opts, entries, problems, files)
    elif opts.labels != "nih":
        raise BenchmarkError(f"nih-cxr14: labels {opts.labels!r} is not 'nih' or 'google2019'")

    paths = locate_images(root, {k: (table.name, e[2]) for k, e in entries.items()}, lambda k: (k,),
                          check=opts.check_images, problems=problems)  # fmt: skip
    records = [BenchRecord(image, paths[image], patient, split[image], labels, boxes.get(image, []))
               for image, (patient, labels, _) in entries.items() if image in paths]  # fmt: skip
    return BenchmarkData("nih-cxr14", label_names, records, problems, files, notes)


def _google2019(root: Path, opts: NihOptions, entries: dict, problems: list[RowProblem], files: dict):
    """The expert labels: only the images they cover, split by their ``Set Id`` (``val`` -> validate)."""
    table = require_file(
        root, opts.google2019, ("google2019_nih-chest-xray-labels.csv",), "Google 2019 expert-label table"
    )
    files["google2019"] = str(table)
    header, rows = read_rows(table, ("Image Index", "Set Id", *GOOGLE2019_LABELS))
    col = {h: i for i, h in enumerate(header)}
    out, split = {}, {}
    for n, row in enumerate(rows, 1):
        image = row[col["Image Index"]].strip()
        if image not in entries:
            problems.append(RowProblem(table.name, n, "unknown_image", f"{image} is not in the label table"))
            continue
        values = []
        for name in GOOGLE2019_LABELS:
            v = row[col[name]].strip().upper()
            values.append(1.0 if v == "YES" else 0.0 if v == "NO" else math.nan)
            if v not in ("YES", "NO"):
                problems.append(RowProblem(table.name, n, "bad_value", f"{image}: {name} is {v!r}, not YES/NO"))
        out[image] = (entries[image][0], tuple(values), entries[image][2])
        split[image] = {"val": "validate", "test": "test"}.get(row[col["Set Id"]].strip(), "all")
    return GOOGLE2019_LABELS, out, split
