"""`vqa-rad` and `slake` readers: medical VQA sets in the layouts their users download (SPEC §4.1).

    vqa-rad (as M3AE / MEVF ship it)            slake
    INPUT/trainset.json                         INPUT/train.json
    INPUT/valset.json        (optional)         INPUT/validation.json   (optional)
    INPUT/testset.json                          INPUT/test.json
    INPUT/images/<image_name>                   INPUT/imgs/<img_name>   (img_name may hold a folder)

Each split file is a JSON list of QA entries; VQA-RAD's hold `qid, image_name, question, answer,
answer_type` (CLOSED / OPEN) and `question_type`, SLAKE's `qid, img_id, img_name, question, answer,
q_lang, answer_type, content_type`. Every entry becomes one planned sample (`<key>.txt` = the question,
`<key>.json` = `shard_format.VQA_FIELDS`) or one reject with a reason; a split file that is absent is
no split at all (`SourceScan.notes` says so), never an invented one. The report filters (`--views`,
`--min-words`, `--sections`) do not apply here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_tools.shard_format import ANSWER_TYPES, normalize_answer
from data_tools.sources.common import (
    SOURCES,
    Reject,
    ScanOptions,
    SourceError,
    SourceItem,
    SourceScan,
    dedupe_keys,
    empty_labels,
    make_key,
    outside_link,
)

VQA_LANGS: tuple[str, ...] = ("en", "zh", "all")
"""`--vqa-lang` values: SLAKE's `q_lang` codes, or `all` (VQA-RAD is English only)."""


@dataclass(frozen=True)
class VqaLayout:
    """Where one VQA format keeps its split files and images, and what its fields are called."""

    source: str
    split_files: tuple[tuple[str, str, bool], ...]
    """`(split, file name, required)` in split order."""
    image_dir: str
    image_field: str
    image_id_field: str | None
    """The field holding the image's id (SLAKE `img_id`); None: the image name is the id."""


LAYOUTS: dict[str, VqaLayout] = {
    "vqa-rad": VqaLayout(
        "vqa-rad",
        (("train", "trainset.json", True), ("validate", "valset.json", False), ("test", "testset.json", True)),
        "images",
        "image_name",
        None,
    ),
    "slake": VqaLayout(
        "slake",
        (("train", "train.json", True), ("validate", "validation.json", False), ("test", "test.json", True)),
        "imgs",
        "img_name",
        "img_id",
    ),
}


def _text(value) -> str:
    """A JSON value as stripped text with whitespace collapsed; '' for null, lists and objects."""
    if value is None or isinstance(value, (dict, list, bool)):
        return ""
    return " ".join(str(value).split())


def read_split_file(path: Path) -> list:
    """The entries of one split file.

    Raises:
        SourceError: the file is not valid JSON or not a JSON list.
    """
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} is not valid JSON ({exc}); expected a JSON list of QA entries") from None
    if not isinstance(entries, list):
        raise SourceError(f"{path} holds a JSON {type(entries).__name__}, expected a list of QA entries")
    return entries


def _plan_entry(
    layout: VqaLayout, root: Path, split: str, where: str, entry, lang: str, follow_links: bool = False
) -> SourceItem | Reject:
    """One QA entry -> its planned sample, or the reject that says why it is left out."""

    def reject(reason: str, detail: str, key: str | None = None) -> Reject:
        return Reject(where, reason, detail, key=key, split=split)

    if not isinstance(entry, dict):
        return reject("bad_entry", f"a JSON {type(entry).__name__}, not an object")
    q_lang = _text(entry.get("q_lang")) or "en"
    if lang != "all" and q_lang != lang:
        return reject("lang_filtered", f"q_lang {q_lang} is not --vqa-lang {lang}")
    qid = _text(entry.get("qid"))
    if not qid:
        return reject("missing_qid", "no 'qid'")
    key = make_key(layout.source, split, qid)
    for field in ("question", "answer", layout.image_field):
        if not _text(entry.get(field)):
            reason = "missing_image_name" if field == layout.image_field else f"missing_{field}"
            return reject(reason, f"qid {qid}: '{field}' is missing or empty", key)
    answer_type = _text(entry.get("answer_type")).upper()
    if answer_type not in ANSWER_TYPES:
        detail = f"qid {qid}: answer_type {entry.get('answer_type')!r} is not one of {', '.join(ANSWER_TYPES)}"
        return reject("bad_answer_type", detail, key)
    image_name = str(entry[layout.image_field]).strip()
    images = root / layout.image_dir
    written = images / image_name
    if not Path(os.path.abspath(written)).is_relative_to(os.path.abspath(images)):
        return reject("bad_image_name", f"qid {qid}: {image_name!r} points outside {layout.image_dir}/", key)
    if (link := outside_link(written, root)) and not follow_links:
        return reject("symlink_outside_input", f"qid {qid}: {layout.image_dir}/{image_name} is {link}", key)
    image = written.resolve()
    if not image.is_file():
        return reject("missing_image", f"qid {qid}: {layout.image_dir}/{image_name} does not exist", key)
    image_id = _text(entry.get(layout.image_id_field)) if layout.image_id_field else ""
    group = image_id or image_name  # no patient ids in VQA sets: all questions of one image are one group
    question, answer_raw = _text(entry["question"]), str(entry["answer"])
    meta = {
        "source": layout.source,
        "subject_id": group,
        "study_id": group,
        "image_id": image_name,
        "view": None,
        "split": split,
        "labels": empty_labels(),
        "qid": qid,
        "question": question,
        "answer": normalize_answer(answer_raw),
        "answer_raw": answer_raw,
        "answer_type": answer_type,
        "question_type": _text(entry.get("question_type")) or None,
        "content_type": _text(entry.get("content_type")) or None,
        "q_lang": q_lang,
    }
    return SourceItem(key, str(image), f"{layout.image_dir}/{image_name}", question, meta)


def scan_vqa(fmt: str, root: str | Path, lang: str = "en", follow_outside_links: bool = False) -> SourceScan:
    """Plan one sample per QA entry of a VQA-RAD (`fmt="vqa-rad"`) or SLAKE (`fmt="slake"`) folder.

    Args:
        fmt: `vqa-rad` or `slake`.
        root: the dataset folder.
        lang: keep questions whose `q_lang` is this (`en`, `zh`), or `all`.
        follow_outside_links: read images that are symbolic links leading outside `root`.

    Raises:
        SourceError: not a folder of that layout, a split file that is not a JSON list, or a language
            filter that leaves no question at all.
    """
    layout, root = LAYOUTS[fmt], Path(root)
    if not root.is_dir():
        raise SourceError(f"--input {root} is not a folder; give the {fmt} dataset folder")
    expected = ", ".join(name + ("" if required else " (optional)") for _, name, required in layout.split_files)
    scan = SourceScan()
    for _split, name, required in layout.split_files:
        if required and not (root / name).is_file():
            raise SourceError(f"{root} has no {name}; a {fmt} folder holds {expected} and {layout.image_dir}/")
    if not (root / layout.image_dir).is_dir():
        raise SourceError(f"{root} has no {layout.image_dir}/ folder holding the images of {fmt}")
    planned: list[SourceItem] = []
    langs: set[str] = set()
    for split, name, _required in layout.split_files:
        path = root / name
        if not path.is_file():
            scan.notes.append(f"no {name} in the input: no {split} split (none is made up)")
            continue
        for i, entry in enumerate(read_split_file(path)):
            result = _plan_entry(layout, root, split, f"{name}[{i}]", entry, lang, follow_outside_links)
            if isinstance(entry, dict):
                langs.add(_text(entry.get("q_lang")) or "en")
            if isinstance(result, SourceItem):
                planned.append(result)
            else:
                scan.rejects.append(result)
    filtered = sum(r.reason == "lang_filtered" for r in scan.rejects)
    if filtered and filtered == len(planned) + len(scan.rejects):
        raise SourceError(
            f"--vqa-lang {lang} leaves no question in {root} (q_lang found: {', '.join(sorted(langs))}); "
            "choose one of those or --vqa-lang all"
        )
    scan.items = dedupe_keys(planned, scan.rejects)
    return scan


@SOURCES.register("vqa-rad", kind="vqa")
def scan_vqa_rad(root: str | Path, opts: ScanOptions, vqa_lang: str = "en") -> SourceScan:
    """VQA-RAD's release (one sample per question); ``opts`` does not apply to questions."""
    return scan_vqa("vqa-rad", root, vqa_lang, opts.follow_outside_links)


@SOURCES.register("slake", kind="vqa")
def scan_slake(root: str | Path, opts: ScanOptions, vqa_lang: str = "en") -> SourceScan:
    """SLAKE's release (one sample per question, ``q_lang`` filtered by ``vqa_lang``)."""
    return scan_vqa("slake", root, vqa_lang, opts.follow_outside_links)
