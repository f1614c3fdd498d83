"""COVIDx CXR (Wang et al., COVID-Net) as its download unpacks: ``train.txt`` / ``val.txt`` / ``test.txt`` (one
image per line: ``patient_id filename class data_source``) and the images under ``train/``, ``val/`` and ``test/``.
Single-label: the classes are ``negative`` / ``positive`` (COVIDx CXR-2 and later) or ``normal`` / ``pneumonia`` /
``COVID-19`` (COVIDx v8 and before), told from the files; the literature (MRM, MaCo) reports accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_tools.benchmarks.common import (
    BENCHMARKS,
    BenchmarkData,
    BenchmarkError,
    BenchRecord,
    RowProblem,
    find_file,
    read_list,
)

BINARY = ("negative", "positive")
THREE_CLASS = ("normal", "pneumonia", "COVID-19")


@dataclass(frozen=True)
class CovidxOptions:
    check_images: bool = True


@BENCHMARKS.register("covidx", options=CovidxOptions, task="multiclass")
def read_covidx(root: Path, opts: CovidxOptions) -> BenchmarkData:
    root = Path(root)
    files = {
        s: find_file(root, (f"{name}.txt",))
        for s, name in (("train", "train"), ("validate", "val"), ("test", "test"))
    }
    if files["test"] is None:
        raise BenchmarkError(f"{root}: no test.txt (COVIDx split file: patient_id filename class source per line)")
    lines = {s: read_list(p) for s, p in files.items() if p is not None}
    seen = {line.split()[2] for ls in lines.values() for line in ls if len(line.split()) >= 3}
    classes = BINARY if seen & set(BINARY) else THREE_CLASS
    index = {c: i for i, c in enumerate(classes)}
    problems: list[RowProblem] = []
    records = []
    for split, ls in lines.items():
        name = files[split].name
        folder = {"validate": "val"}.get(split, split)
        for n, line in enumerate(ls, 1):
            parts = line.split()
            if len(parts) < 3:
                problems.append(
                    RowProblem(name, n, "bad_row", f"{line[:60]!r}: expected patient_id filename class source")
                )
                continue
            patient, filename, cls = parts[0], parts[1], parts[2]
            if cls not in index:
                problems.append(
                    RowProblem(
                        name, n, "unknown_label", f"{filename}: class {cls!r} is not one of {', '.join(classes)}"
                    )
                )
                continue
            path = filename
            if opts.check_images:
                cand = root / folder / filename
                if not cand.is_file():
                    problems.append(
                        RowProblem(name, n, "missing_image", f"{folder}/{filename} is not under {root}")
                    )
                    continue
                path = str(cand)
            labels = tuple(1.0 if i == index[cls] else 0.0 for i in range(len(classes)))
            records.append(BenchRecord(f"{folder}/{filename}", path, patient, split, labels))
    return BenchmarkData(
        "covidx", classes, records, problems, {s: str(p) for s, p in files.items() if p}, task="multiclass"
    )
