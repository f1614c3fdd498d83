"""SIIM-ACR Pneumothorax Segmentation (Kaggle 2019) as its download unpacks: ``train-rle.csv`` (``ImageId,
EncodedPixels``: ``-1`` for no pneumothorax, else the mask as run-length pairs over the 1024 x 1024 image read
column by column, each start relative to the previous run's end — Kaggle's ``mask2rle``; several rows for an image
with several regions) and the DICOMs under ``dicom-images-train/<study>/<series>/<ImageId>.dcm``. The label is
Pneumothorax; each region's box is its mask's bounding box. No test labels were released: a seeded 70 / 15 / 15 %
image split, as for RSNA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

SIZE = 1024


@dataclass(frozen=True)
class SiimOptions:
    table: str | None = None
    """``train-rle.csv`` (default: under the root)."""
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    check_images: bool = True


def _runs(rle: str, size: int) -> list[tuple[int, int]]:
    """The ``(first, last)`` column-major pixel indices of each run of a Kaggle relative RLE mask.

    Raises:
        ValueError: an odd count of numbers, a negative length, or a run past the image's last pixel.
    """
    nums = [int(v) for v in rle.split()]
    if len(nums) % 2 or not nums:
        raise ValueError(f"{len(nums)} numbers, expected (start, length) pairs")
    out, pos = [], 0
    for start, length in zip(nums[0::2], nums[1::2]):
        if start < 0 or length <= 0:
            raise ValueError(f"run ({start}, {length}) is not a non-negative start and a positive length")
        pos += start
        end = pos + length - 1  # the run's last pixel, column-major index
        if end >= size * size:
            raise ValueError(f"a run ends at pixel {end}, past the {size}x{size} image")
        out.append((pos, end))
        pos = end + 1
    return out


def rle_box(rle: str, size: int = SIZE) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (x1/y1 exclusive) of a Kaggle relative RLE mask, without drawing the mask.

    Raises:
        ValueError: as `rle_mask`.
    """
    x0 = y0 = size
    x1 = y1 = 0
    for pos, end in _runs(rle, size):
        c0, c1 = pos // size, end // size  # columns = x
        x0, x1 = min(x0, c0), max(x1, c1 + 1)
        if c0 == c1:
            y0, y1 = min(y0, pos % size), max(y1, end % size + 1)
        else:  # the run wraps into the next column: it covers the whole height between
            y0, y1 = 0, size
    return x0, y0, x1, y1


def rle_mask(rle: str, size: int = SIZE) -> np.ndarray:
    """The (size, size) bool mask (rows = y) of a Kaggle relative RLE (read column by column).

    Raises:
        ValueError: an odd count of numbers, a negative length, or a run past the image's last pixel.
    """
    flat = np.zeros(size * size, dtype=bool)  # column-major: index = x * size + y
    for pos, end in _runs(rle, size):
        flat[pos : end + 1] = True
    return flat.reshape(size, size).T


@BENCHMARKS.register("siim-pneumothorax", options=SiimOptions, task="multilabel")
def read_siim(root: Path, opts: SiimOptions) -> BenchmarkData:
    root = Path(root)
    table = require_file(root, opts.table, ("train-rle.csv", "stage_2_train.csv"), "SIIM-ACR RLE table")
    header, rows = read_rows(table, ("ImageId", "EncodedPixels"))
    col = {h: i for i, h in enumerate(header)}
    problems: list[RowProblem] = []
    label: dict[str, float] = {}
    first: dict[str, int] = {}
    boxes: dict[str, list[Box]] = {}
    for n, row in enumerate(rows, 1):
        image, rle = row[col["ImageId"]].strip(), row[col["EncodedPixels"]].strip()
        first.setdefault(image, n)
        if rle == "-1":
            if label.get(image) == 1.0:
                problems.append(RowProblem(table.name, n, "conflicting_rows", f"{image}: -1 after a mask row"))
                continue
            label[image] = 0.0
            continue
        try:
            x0, y0, x1, y1 = rle_box(rle)
        except ValueError as err:
            problems.append(RowProblem(table.name, n, "bad_mask", f"{image}: {err}"))
            continue
        if label.get(image) == 0.0:
            problems.append(RowProblem(table.name, n, "conflicting_rows", f"{image}: a mask after a -1 row"))
            continue
        label[image] = 1.0
        boxes.setdefault(image, []).append(Box("Pneumothorax", x0, y0, x1, y1, (SIZE, SIZE)))
    split = seeded_split(list(label), tuple(opts.fractions), opts.split_seed)
    paths = locate_images(root, {k: (table.name, first[k]) for k in label}, lambda k: (f"{k}.dcm",),
                          check=opts.check_images, problems=problems)  # fmt: skip
    records = [BenchRecord(image, paths[image], image, split[image], (y,), boxes.get(image, []))
               for image, y in label.items() if image in paths]  # fmt: skip
    notes = [seeded_split_note(opts.fractions, opts.split_seed)]
    return BenchmarkData("siim-pneumothorax", ("Pneumothorax",), records, problems, {"rle": str(table)}, notes)
