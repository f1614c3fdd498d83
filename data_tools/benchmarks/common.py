"""What every benchmark reader shares: the evaluated record, the per-row problem, the dataset it returns, and
the helpers for tables (plain, ``.gz`` or ``.zip`` CSVs), image lookup and seeded label-fraction splits.

A benchmark reader reads one public dataset *as its own download unpacks* (``ROOT/<id>/``) and returns a
`BenchmarkData`: one `BenchRecord` per image (labels aligned with ``label_names``, boxes in the pixels of the
released image, the split the dataset's own split file gives), and a `RowProblem` for every row it could not
use — a box outside the image, an unknown label, a missing image, a malformed value — each naming the file and
row. Nothing is dropped silently and nothing crashes on one bad row. Readers never decode images: evaluation
streams them later through ``data_tools.sources.images.encode_image`` (the rules ``build_shards`` uses).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.registry import Registry

BENCHMARKS: Registry = Registry(
    "benchmark dataset",
    "mpma_ds.benchmarks",
    builtins=(
        "data_tools.benchmarks.nih",
        "data_tools.benchmarks.chexpert",
        "data_tools.benchmarks.rsna",
        "data_tools.benchmarks.siim",
        "data_tools.benchmarks.vindr",
        "data_tools.benchmarks.padchest",
        "data_tools.benchmarks.ms_cxr",
        "data_tools.benchmarks.covidx",
        "data_tools.benchmarks.mimic_5x200",
        "data_tools.benchmarks.vqa",
    ),
)
"""Benchmark dataset readers by id (``nih-cxr14`` ...). A reader registers itself where it is defined::

    @BENCHMARKS.register("nih-cxr14", options=NihOptions, task="multilabel")
    def read_nih(root: Path, opts: NihOptions) -> BenchmarkData: ...

``task`` is what its labels are: ``multilabel`` (AUROC per label), ``multiclass`` (one class per image) or ``vqa``
(one record per question, no labels: the answers live in the split files).
Another package adds a reader through the ``mpma_ds.benchmarks`` entry-point group."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


class BenchmarkError(Exception):
    """The dataset cannot be read at all (no label table, a missing column): one line for the CLI."""


@dataclass(frozen=True)
class Box:
    """A finding's box ``[x0, y0, x1, y1]`` (x1/y1 exclusive) in a ``frame`` of ``(width, height)`` pixels: the
    released image's size (NIH's PNGs and RSNA's DICOMs are 1024 x 1024); evaluation scales it to the image it
    decodes, so a box stays right on a smaller copy of the film."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    frame: tuple[int, int] | None = None
    phrase: str = ""
    """The phrase the box grounds (MS-CXR's report phrase); empty: the finding's own name is the query."""

    def scaled(
        self, width: int, height: int, original: tuple[int, int] | None = None
    ) -> tuple[float, float, float, float]:
        """The box in an image of ``width`` x ``height`` pixels decoded from a file of ``original`` size: a box
        without a frame is in the file's own pixels (VinDr's DICOMs differ in size)."""
        fw, fh = self.frame or original or (width, height)
        sx, sy = width / fw, height / fh
        return self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy


@dataclass
class BenchRecord:
    """One evaluated image."""

    key: str
    """Unique within the dataset (the dataset's own image id)."""
    image: str
    """Path of the image file (absolute), or the id where images were not looked up."""
    patient: str
    split: str
    """``train`` / ``validate`` / ``test`` (the dataset's own split file), or ``all`` when it has none."""
    labels: tuple[float, ...] = ()
    """Aligned with `BenchmarkData.label_names`: 1 / 0 / -1 (uncertain) / NaN (not stated)."""
    boxes: list[Box] = field(default_factory=list)
    text: str = ""
    """A phrase or report (MS-CXR phrases, MIMIC reports); empty for label-only datasets."""


@dataclass(frozen=True)
class RowProblem:
    """One row the reader could not use (or used in part), in the order met."""

    file: str
    row: int
    """1-based data row (the header is row 0)."""
    reason: str
    """Stable code: ``missing_image``, ``unknown_label``, ``box_outside_image``, ``bad_value`` ..."""
    detail: str

    def line(self) -> str:
        return f"{self.file} row {self.row}: {self.reason}: {self.detail}"


@dataclass
class BenchmarkData:
    """What a reader returns."""

    dataset: str
    label_names: tuple[str, ...]
    records: list[BenchRecord]
    problems: list[RowProblem] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    """Tables read: name -> path."""
    notes: list[str] = field(default_factory=list)
    task: str = "multilabel"

    def split(self, name: str) -> list[BenchRecord]:
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, object]:
        """Images, patients, boxes, images with boxes, positives per label, images per split, problems by reason."""
        y = self.label_matrix(self.records)
        return {
            "images": len(self.records),
            "patients": len({r.patient for r in self.records}),
            "boxes": sum(len(r.boxes) for r in self.records),
            "images_with_boxes": sum(bool(r.boxes) for r in self.records),
            "positives": {n: int((y[:, i] == 1).sum()) for i, n in enumerate(self.label_names)},
            "splits": dict(sorted(Counter(r.split for r in self.records).items())),
            "problems": dict(sorted(Counter(p.reason for p in self.problems).items())),
        }

    def label_matrix(self, records: Sequence[BenchRecord]) -> np.ndarray:
        """(N, C) float64 labels of ``records`` (NaN where not stated)."""
        out = np.full((len(records), len(self.label_names)), np.nan)
        for i, r in enumerate(records):
            if r.labels:
                out[i] = r.labels
        return out

    def version(self) -> str:
        """A fingerprint of the tables read (their names, sizes and the first 1 MiB of each): the dataset
        version logged with the results, cheap enough for 200 MB tables."""
        h = hashlib.sha256()
        for name, path in sorted(self.files.items()):
            p = Path(path)
            if p.is_dir():  # a tree read whole (MIMIC): its name only
                h.update(f"{name}:{p.name}:dir".encode())
                continue
            h.update(f"{name}:{p.name}:{p.stat().st_size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- tables
def find_file(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (plain, ``.gz`` or ``.zip``) under ``root``, searched at the top then one level
    down (downloads often unpack into a folder of their own name)."""
    for name in names:
        for base in (root, *sorted(p for p in root.iterdir() if p.is_dir())) if root.is_dir() else ():
            for cand in (base / name, base / f"{name}.gz", base / f"{name}.zip"):
                if cand.is_file():
                    return cand
    return None


def require_file(root: Path, given: str | None, names: Sequence[str], what: str) -> Path:
    """``given`` (a path) or the first of ``names`` found under ``root``; a clear error otherwise."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise BenchmarkError(f"{what} {path} does not exist")
        return path
    found = find_file(root, names)
    if found is None:
        raise BenchmarkError(
            f"{root}: no {what} ({' / '.join(names)}, plain, .gz or .zip); point at it with the reader's options"
        )
    return found


def open_text(path: Path) -> io.TextIOBase:
    """A text stream of a plain, gzip or single-member zip CSV."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    if path.suffix == ".zip":
        archive = zipfile.ZipFile(path)
        members = [n for n in archive.namelist() if not n.endswith("/")]
        return io.TextIOWrapper(archive.open(members[0]), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_rows(path: Path, required: Sequence[str]) -> tuple[list[str], Iterator[list[str]]]:
    """``(header, rows)`` of a CSV (header whitespace stripped); a missing required column is an error naming it.
    Rows are lists (``csv.reader``: several times faster than ``DictReader`` on 200k rows)."""
    stream = open_text(path)
    reader = csv.reader(stream)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise BenchmarkError(f"{path} is empty (no header row)") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise BenchmarkError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
    return header, reader


def read_list(path: Path) -> list[str]:
    """The non-blank lines of a list file (``test_list.txt``)."""
    with open_text(path) as f:
        return [line.strip() for line in f if line.strip()]


def as_float(text: str) -> float:
    """``"1.0"`` -> 1.0; blank -> NaN; anything else that is not a number raises ``ValueError``."""
    text = text.strip()
    return math.nan if text == "" else float(text)


# --------------------------------------------------------------------------------------------------- images
class ImageIndex:
    """File name -> path of every image under a root, from one walk (a stat per row of a 112k-row table would
    take minutes on a network file system; one walk takes seconds). Built only when first asked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, str] | None = None

    def _build(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.lower().endswith(IMAGE_SUFFIXES):
                    out.setdefault(name, os.path.join(dirpath, name))
        return out

    def find(self, name: str) -> str | None:
        if self._by_name is None:
            self._by_name = self._build()
        return self._by_name.get(name)


def locate_images(
    root: Path, rows: Mapping[str, tuple[str, int]], names: Callable[[str], Sequence[str]], *, check: bool,
    problems: list[RowProblem],
) -> dict[str, str]:  # fmt: skip
    """Image id -> its file under ``root`` (one walk: `ImageIndex`), the first of ``names(id)`` found; an id with
    none is a ``missing_image`` problem at its table row (``rows``: id -> (table file name, 1-based row)) and is
    left out of the result. Without ``check``: every id -> itself (the images are not looked up)."""
    if not check:
        return {image: image for image in rows}
    index = ImageIndex(root)
    found: dict[str, str] = {}
    for image, (file, row) in rows.items():
        path = next((p for p in map(index.find, names(image)) if p is not None), None)
        if path is None:
            problems.append(
                RowProblem(file, row, "missing_image", f"{' / '.join(names(image))} is not under {root}")
            )
            continue
        found[image] = path
    return found


# --------------------------------------------------------------------------------------------------- splits
def seeded_split(keys: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Key -> train / validate / test: a ``seed`` permutation of the sorted keys cut at the fractions (the
    literature's split of a set released without test labels: RSNA, SIIM), noted by `seeded_split_note`."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise BenchmarkError(f"split fractions {fractions} are not three shares summing to 1")
    order = sorted(keys)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    out = {}
    for rank, j in enumerate(perm.tolist()):
        out[order[j]] = "train" if rank < n_train else "validate" if rank < n_train + n_val else "test"
    return out


def seeded_split_note(fractions: Sequence[float], seed: int) -> str:
    return f"seeded {'/'.join(f'{f:g}' for f in fractions)} split (seed {seed})"


def fraction_order(keys: Sequence[str], seed: int) -> np.ndarray:
    """(N,) int64: each key's place in ``seed``'s permutation of the sorted keys — the order `fraction_subset`
    draws from (a fraction keeps the keys placed below ceil(fraction * N)), and the one label coverage follows."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    perm = np.random.default_rng(seed).permutation(len(order))
    place = np.empty(len(order), dtype=np.int64)
    place[np.asarray(order, dtype=np.int64)[perm]] = np.arange(len(order))
    return place


def fraction_subset(keys: Sequence[str], fraction: float, seed: int) -> tuple[list[int], str]:
    """``(indices, checksum)`` of a seeded ``fraction`` of ``keys`` (the MRM/MaCo 1 % / 10 % / 100 % training
    subsets): a permutation of the sorted keys by ``seed`` (`fraction_order`), its first ceil(fraction * N); the
    checksum (`subset_checksum`) is written into the results so a split can be compared across runs and machines."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} is not in (0, 1]")
    take = np.flatnonzero(fraction_order(keys, seed) < max(1, math.ceil(fraction * len(keys)))).tolist()
    return take, subset_checksum(keys, take)


def subset_checksum(keys: Sequence[str], take: Sequence[int]) -> str:
    """sha256 (16 hex) of ``keys[i]`` for the ascending indices ``take``: which training images a fraction kept."""
    return hashlib.sha256("\n".join(keys[i] for i in take).encode()).hexdigest()[:16]


def split_checksum(records: Sequence[BenchRecord]) -> str:
    """sha256 (16 hex) of the sorted keys of a split: which images a metric was computed on."""
    return hashlib.sha256("\n".join(sorted(r.key for r in records)).encode()).hexdigest()[:16]
