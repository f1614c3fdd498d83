"""RSNA Pneumonia Detection (Kaggle 2018) as its download unpacks: ``stage_2_train_labels.csv`` (one row per box,
``patientId, x, y, width, height, Target``; a negative image is one row with blank box) and the DICOMs under
``stage_2_train_images/<patientId>.dcm`` (1024 x 1024 CR). Kaggle's test labels were never released, so the
literature splits the training set: GLoRIA / MGCA / MRM use 70 / 15 / 15 % train / validate / test by image,
seeded here (``split_seed``) and checksummed in the results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_tools.benchmarks.common import (
    BENCHMARKS,
    BenchmarkData,
    BenchRecord,
    Box,
    RowProblem,
    locate_images,
    read_rows,
    require_file,
    seeded_split,
    seeded_split_note,
)

RSNA_LABELS = ("Pneumonia",)
RELEASED_SIZE = (1024, 1024)


@dataclass(frozen=True)
class RsnaOptions:
    table: str | None = None
    """``stage_2_train_labels.csv`` (default: under the root; ``.zip`` / ``.gz`` read too)."""
    split_seed: int = 0
    """Seed of the 70 / 15 / 15 % image split."""
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    check_images: bool = True


@BENCHMARKS.register("rsna-pneumonia", options=RsnaOptions, task="multilabel")
def read_rsna(root: Path, opts: RsnaOptions) -> BenchmarkData:
    """One record per image (label Pneumonia = Target), its boxes; a box outside 1024 px, a Target that is not
    0/1, a positive row without a box or images that disagree on Target are row problems."""
    root = Path(root)
    table = require_file(root, opts.table, ("stage_2_train_labels.csv",), "RSNA label table")
    header, rows = read_rows(table, ("patientId", "x", "y", "width", "height", "Target"))
    col = {h: i for i, h in enumerate(header)}
    problems: list[RowProblem] = []
    target: dict[str, float] = {}
    first_row: dict[str, int] = {}
    boxes: dict[str, list[Box]] = {}
    name = table.name
    fw, fh = RELEASED_SIZE
    for n, row in enumerate(rows, 1):
        pid = row[col["patientId"]].strip()
        t = row[col["Target"]].strip()
        if t not in ("0", "1"):
            problems.append(RowProblem(name, n, "bad_value", f"{pid}: Target {t!r} is not 0 or 1"))
            continue
        if pid in target and target[pid] != float(t):
            problems.append(
                RowProblem(
                    name, n, "conflicting_rows", f"{pid}: Target {t} but row {first_row[pid]} says otherwise"
                )
            )
            continue
        target.setdefault(pid, float(t))
        first_row.setdefault(pid, n)
        if t == "0":
            continue
        try:
            x, y, w, h = (float(row[col[c]]) for c in ("x", "y", "width", "height"))
        except ValueError:
            problems.append(RowProblem(name, n, "bad_value", f"{pid}: positive row without a numeric box"))
            continue
        if not (w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= fw and y + h <= fh):
            problems.append(RowProblem(name, n, "box_outside_image", f"{pid}: x={x:g} y={y:g} w={w:g} h={h:g} not in {fw}x{fh}"))  # fmt: skip
            continue
        boxes.setdefault(pid, []).append(Box("Pneumonia", x, y, x + w, y + h, RELEASED_SIZE))
    split = seeded_split(list(target), tuple(opts.fractions), opts.split_seed)
    paths = locate_images(root, {pid: (name, first_row[pid]) for pid in target}, lambda pid: (f"{pid}.dcm",),
                          check=opts.check_images, problems=problems)  # fmt: skip
    records = [BenchRecord(pid, paths[pid], pid, split[pid], (t,), boxes.get(pid, []))
               for pid, t in target.items() if pid in paths]  # fmt: skip
    notes = [seeded_split_note(opts.fractions, opts.split_seed)]
    return BenchmarkData("rsna-pneumonia", RSNA_LABELS, records, problems, {"labels": str(table)}, notes)
