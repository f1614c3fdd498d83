"""VQA-RAD and SLAKE as their downloads unpack (``ROOT/vqa-rad/``: ``trainset.json`` / ``valset.json`` /
``testset.json`` + ``images/``; ``ROOT/slake/``: ``train.json`` / ``validation.json`` / ``test.json`` + ``imgs/``),
read by the same layout readers ``build_shards --format vqa-rad|slake`` uses (``data_tools.sources.vqa``), so the
benchmark and a user's own shards see the same questions, keys, splits and rejects.

One record per question (``key``: the shard sample key, ``text``: the question, ``patient``: the image, which
stands for the patient: VQA sets carry no patient ids); every entry the layout reader rejects (a missing image, an
answer type that is neither CLOSED nor OPEN, a filtered language ...) is a `RowProblem` naming the split file and
entry. The ``vqa`` protocol builds VQA shards of the folder and fine-tunes on them through the Trainer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from data_tools.benchmarks.common import BENCHMARKS, BenchmarkData, BenchmarkError, BenchRecord, RowProblem
from data_tools.sources.common import SourceError
from data_tools.sources.vqa import LAYOUTS, scan_vqa

_WHERE = re.compile(r"^(?P<file>.+)\[(?P<index>\d+)\]$")


@dataclass(frozen=True)
class VqaOptions:
    lang: str = "en"
    """SLAKE: the questions of this ``q_lang`` (``en``, ``zh``) or ``all`` (VQA-RAD is English only)."""


def read_vqa(fmt: str, root: Path, opts: VqaOptions) -> BenchmarkData:
    """The questions of a VQA-RAD (``fmt="vqa-rad"``) or SLAKE folder; `BenchmarkError` when it is not one."""
    root = Path(root)
    try:
        scan = scan_vqa(fmt, root, opts.lang)
    except SourceError as err:
        raise BenchmarkError(str(err)) from None
    problems = []
    for reject in scan.rejects:
        where = _WHERE.match(reject.input)  # "testset.json[12]": the entry's file and 0-based index
        file, row = (where["file"], int(where["index"]) + 1) if where else (reject.input, 0)
        problems.append(RowProblem(file, row, reject.reason, reject.detail))
    records = [
        BenchRecord(item.key, item.image_path, str(item.meta["subject_id"]), str(item.meta["split"]),
                    text=item.text)
        for item in scan.items
    ]  # fmt: skip
    layout = LAYOUTS[fmt]
    files = {split: str(root / name) for split, name, _ in layout.split_files if (root / name).is_file()}
    return BenchmarkData(fmt, (), records, problems, files, list(scan.notes), task="vqa")


@BENCHMARKS.register("vqa-rad", options=VqaOptions, task="vqa")
def read_vqa_rad(root: Path, opts: VqaOptions) -> BenchmarkData:
    return read_vqa("vqa-rad", root, opts)


@BENCHMARKS.register("slake", options=VqaOptions, task="vqa")
def read_slake(root: Path, opts: VqaOptions) -> BenchmarkData:
    return read_vqa("slake", root, opts)
