"""The shard format (SPEC §4.2), written once: members, JSON fields, labels, split names, the `.idx`.

`data_tools` writes and verifies shards with it and `mpma_ds.data` reads them with it, so both sides
agree by construction. It imports only the standard library.

A shard `OUT/<split>/shard-NNNNNN.tar` holds samples of three members, `<key>.jpg` (8-bit grayscale
baseline JPEG), `<key>.txt` (UTF-8 text: the report, or the question of a VQA sample) and `<key>.json`
(the fields below). Next to it, `shard-NNNNNN.idx` is a DALI webdataset index in exactly the format of
DALI's `wds2idx` tool (`IndexCreator`):

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> <ext> <data offset> <size> <member name> ...   (one line per sample)

where a sample is a run of consecutive regular-file members sharing the same basename (the name up to
the first `.` after the last `/`), the data offset is the byte offset of the member's data (its header
offset + 512) and members are listed in tar order. Older DALI releases write `v1.1` lines of
`<ext> <offset> <size>` groups without names; `parse_index` reads both.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
from pathlib import Path

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
"""The 14 CheXpert observations, in the column order of `mimic-cxr-2.0.0-chexpert.csv`."""

LABEL_VALUES: tuple[int | None, ...] = (1, 0, -1, None)
"""What a label may hold in `<key>.json`: positive, negative, uncertain, unknown/blank."""

SPLITS: tuple[str, ...] = ("train", "validate", "test")
"""Split names (MIMIC-CXR's), in the order builds list them."""

SPLIT_SYNONYMS: dict[str, str] = {
    "train": "train",
    "training": "train",
    "validate": "validate",
    "val": "validate",
    "valid": "validate",
    "validation": "validate",
    "dev": "validate",
    "test": "test",
    "testing": "test",
}
"""Split spellings a split file, a manifest or a command may use -> the name of `SPLITS` they mean."""

SAMPLE_MEMBERS: tuple[str, ...] = ("jpg", "txt", "json")
"""The members of every sample, image-report and VQA alike (a built shard holds exactly these)."""

REQUIRED_MEMBERS: tuple[str, ...] = ("jpg", "txt")
"""The members a reader cannot do without (a sample missing one is skipped and counted)."""

SIZE_FIELDS: tuple[str, ...] = ("width", "height")
"""The original image size, known only after decoding: always the last fields of `<key>.json`."""

REPORT_FIELDS: tuple[str, ...] = (
    "source",
    "subject_id",
    "study_id",
    "image_id",
    "view",
    "split",
    "labels",
    *SIZE_FIELDS,
)
"""`<key>.json` of an image-report sample, in the order written. `subject_id` / `study_id` are strings,
`labels` maps every name of `CHEXPERT_LABELS` to a value of `LABEL_VALUES`. A sample built from a synthetic
corpus also holds `truth` (`TRUTH_FIELD`, before the size fields)."""

TRUTH_FIELD = "truth"
"""The optional ground truth of an image-report sample, written only when the source knows what the image shows
(a synthetic corpus: `data_tools.synth`, read from its `synth_truth.jsonl`); real corpora have no such key.
Separate from `labels`, which are read off the report (blank where the report is silent, -1 where it hedges)::

    "truth": {"<CheXpert name>": {"present": bool, "side": "left" | "right" | "bilateral" | null,
                                  "box": [x0, y0, x1, y1] | null}, ...}

- one entry for each of the 14 `CHEXPERT_LABELS`, in that order;
- `present`: the finding is drawn in this image (label 1 at full strength, or -1 at reduced strength; a
  lateral film draws no pneumothorax, fracture, apical cap or mediastinal widening, so there it is false even
  when the study has one). "No Finding" is present iff no pathology is present: Support Devices are not a
  pathology (CheXpert's rule), so a normal film with a tube is "No Finding";
- `side`: the patient's side of a lateralised finding (radiographs show the patient's left on the image's
  right); null when absent or not lateralised (Cardiomegaly, Edema, Enlarged Cardiomediastinum, Support
  Devices, No Finding);
- `box`: integer pixels of the *stored* JPEG (after the build's resize; x right, y down, x1 / y1 exclusive),
  the smallest box holding every drawn part (both sides of a bilateral finding; for Support Devices all the
  tubes, lines and the pacemaker); null when absent and for No Finding.

`scale_truth` maps the boxes from the source image's pixels to the stored image's; `check_truth` validates one.
"""

DATASET_LABELS_FIELD = "dataset_labels"
"""The optional labels of an image-report sample under its *dataset's own* names (a `manifest`'s `dataset_labels`
column: NIH's Hernia, VinDr's ILD, PadChest's findings ...), written only when the source has them, before the
size fields: ``{"<name>": 1 | 0 | -1 | null, ...}`` (values of `LABEL_VALUES`), the same names on every sample of
a build. `labels` stays the CheXpert-14 field; the ``cls`` task reads this one with ``task.cls.labels: dataset``."""

CLASS_FIELD = "class"
"""The optional single class of an image-report sample (a `manifest`'s `class` column: COVIDx's normal / pneumonia
/ COVID-19), a string, written only when the source has one, before the size fields; the ``cls`` task reads it with
``task.cls.labels: column`` and ``label_column: class`` (multi-class: softmax cross-entropy, accuracy)."""

OPTIONAL_FIELDS: tuple[str, ...] = (TRUTH_FIELD, DATASET_LABELS_FIELD, CLASS_FIELD)
"""Fields an image-report `<key>.json` holds only when its source knows them, in the order written."""


VQA_FIELDS: tuple[str, ...] = (
    "source",
    "subject_id",
    "study_id",
    "image_id",
    "view",
    "split",
    "labels",
    "qid",
    "question",
    "answer",
    "answer_raw",
    "answer_type",
    "question_type",
    "content_type",
    "q_lang",
    *SIZE_FIELDS,
)
"""`<key>.json` of a VQA sample (`source` in `VQA_SOURCES`), in the order written: the image-report
fields (subject_id = study_id = the image id, view null, all 14 labels null) plus the QA entry: `qid`
(string), `question`, `answer` (normalised by `normalize_answer`), `answer_raw` (as in the source),
`answer_type` (one of `ANSWER_TYPES`), `question_type`, `content_type` (SLAKE; null for VQA-RAD),
`q_lang`. `<key>.txt` holds the question text."""

VQA_SOURCES: tuple[str, ...] = ("vqa-rad", "slake")
"""`source` values of VQA samples."""

ANSWER_TYPES: tuple[str, ...] = ("CLOSED", "OPEN")
"""VQA answer types: CLOSED (yes/no and other fixed choices) and OPEN (free answers)."""

INDEX_VERSION = "v1.2"
"""The `.idx` version written (DALI `wds2idx`, with member names)."""


def scale_truth(truth: dict, source_size: tuple[int, int], stored_size: tuple[int, int]) -> dict:
    """``truth`` with its boxes mapped from the source image's ``(width, height)`` to the stored one's.

    A box keeps every pixel it covered: its low edges round down, its high edges up, clipped to the image, and
    it is at least one pixel wide and high.
    """
    (w, h), (tw, th) = source_size, stored_size
    sx, sy = tw / w, th / h
    out = {}
    for name, entry in truth.items():
        entry = dict(entry)
        if entry.get("box") is not None:
            x0, y0, x1, y1 = entry["box"]
            nx0 = min(tw - 1, max(0, math.floor(x0 * sx)))
            ny0 = min(th - 1, max(0, math.floor(y0 * sy)))
            nx1 = max(nx0 + 1, min(tw, math.ceil(x1 * sx)))
            ny1 = max(ny0 + 1, min(th, math.ceil(y1 * sy)))
            entry["box"] = [nx0, ny0, nx1, ny1]
        out[name] = entry
    return out


TRUTH_SIDES: tuple[str | None, ...] = ("left", "right", "bilateral", None)
"""Values of a `truth` entry's `side`."""


def check_truth(truth: object, size: tuple[int, int] | None = None) -> list[str]:
    """Problems of a `truth` value against `TRUTH_FIELD`'s schema (empty when it is valid).

    Args:
        truth: the value of ``meta["truth"]``.
        size: the stored image's ``(width, height)``; when given, boxes must lie inside it.
    """
    if not isinstance(truth, dict):
        return [f"truth is {type(truth).__name__}, not an object"]
    problems = []
    if list(truth) != list(CHEXPERT_LABELS):
        missing = [n for n in CHEXPERT_LABELS if n not in truth]
        extra = [n for n in truth if n not in CHEXPERT_LABELS]
        problems.append(f"truth must list the 14 CheXpert labels in order (missing {missing}, unknown {extra})")
    for name, entry in truth.items():
        if not isinstance(entry, dict) or set(entry) != {"present", "side", "box"}:
            problems.append(f"truth[{name!r}] must be {{present, side, box}}, got {entry!r}")
            continue
        if not isinstance(entry["present"], bool):
            problems.append(f"truth[{name!r}].present must be true or false, got {entry['present']!r}")
        if entry["side"] not in TRUTH_SIDES:
            problems.append(f"truth[{name!r}].side must be left, right, bilateral or null, got {entry['side']!r}")
        box = entry["box"]
        if box is None:
            continue
        if not entry["present"]:
            problems.append(f"truth[{name!r}] is absent but has a box")
        ok = (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
        )
        if not ok or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
            problems.append(
                f"truth[{name!r}].box must be [x0, y0, x1, y1] integers with x0 < x1, y0 < y1, got {box!r}"
            )
        elif size is not None and (box[2] > size[0] or box[3] > size[1]):
            problems.append(f"truth[{name!r}].box {box} reaches outside the {size[0]}x{size[1]} image")
    if isinstance(truth.get("No Finding"), dict) and not problems:
        others = any(truth[n]["present"] for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices"))
        if truth["No Finding"]["present"] == others:
            problems.append("truth['No Finding'].present must be true exactly when no pathology is present")
    return problems


def json_fields(source: str) -> tuple[str, ...]:
    """The `<key>.json` fields of a sample from `source` (`VQA_FIELDS` or `REPORT_FIELDS`)."""
    return VQA_FIELDS if source in VQA_SOURCES else REPORT_FIELDS


def normalize_answer(text: str) -> str:
    """A VQA answer as compared and stored: stripped, lower-cased, whitespace collapsed to one space."""
    return " ".join(str(text).lower().split())


def index_path(tar_path: str | Path) -> Path:
    """The `.idx` beside `shard-NNNNNN.tar`."""
    return Path(tar_path).with_suffix(".idx")


def split_name(name: str) -> tuple[str, str]:
    """`("dir/key", "ext.more")` for `"dir/key.ext.more"`, as `wds2idx.IndexCreator.split_name`."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def format_index(members: list[tuple[str, int, int]]) -> str:
    """The `.idx` text for tar members `[(name, data_offset, size), ...]` in tar order.

    Raises:
        ValueError: no sample at all (DALI's tool refuses an empty tar the same way).
    """
    bundles: list[list[tuple[str, int, int, str]]] = []
    last = None
    for name, offset, size in members:
        base, ext = split_name(name)
        if not base or base.endswith("/"):  # hidden files, as wds2idx
            continue
        if base != last:
            bundles.append([])
            last = base
        bundles[-1].append((ext, offset, size, name))
    if not bundles:
        raise ValueError("webdataset tar file is empty")
    lines = [f"{INDEX_VERSION} {len(bundles)}\n"]
    for bundle in bundles:
        lines.append(" ".join(" ".join(map(str, component)) for component in bundle) + "\n")
    return "".join(lines)


def tar_members(tar_path: str | Path) -> list[tuple[str, int, int]]:
    """`[(name, data_offset, size)]` of the regular files in a tar, read from its real headers."""
    with tarfile.open(tar_path, mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]


def index_from_tar(tar_path: str | Path) -> str:
    """The `.idx` text of an existing tar, computed from its headers."""
    return format_index(tar_members(tar_path))


_INT_RE = re.compile(r"-?[0-9]+")


def parse_index(text: str, path: str | Path | None = None) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Parse `.idx` text (v1.2 with member names, or v1.1 without) into samples in file order.

    Args:
        text: the index file's content.
        path: the index file, named in error messages; v1.1 keys (which the file does not hold) are
            `<path stem>/<sample number:06d>`.

    Returns:
        `[(key, [(ext, offset, size), ...]), ...]`; blank lines are skipped.

    Raises:
        ValueError: not a wds2idx index, a malformed line (`path:line: ...`), or fewer/more samples than
            the header says.
    """
    where = str(path) if path is not None else "index"
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise ValueError(f"{where} is not a wds2idx index (first line {lines[:1]}); recreate it with wds2idx")
    header = lines[0].split()
    stem = Path(path).stem if path is not None else "index"
    out: list[tuple[str, list[tuple[str, int, int]]]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        width = 4 if header[0] == "v1.2" else 3
        if len(fields) % width:
            group = "'ext offset size name'" if width == 4 else "'ext offset size'"
            raise ValueError(f"{where}:{lineno}: expected groups of {group}")
        groups = [fields[i : i + width] for i in range(0, len(fields), width)]
        if not all(_INT_RE.fullmatch(g[1]) and _INT_RE.fullmatch(g[2]) for g in groups):
            raise ValueError(f"{where}:{lineno}: offset/size not integers")
        # A negative value parses: the reader drops that sample (`bad_offset`) instead of the whole shard.
        members = [(g[0], int(g[1]), int(g[2])) for g in groups]
        key = split_name(groups[0][3])[0] if width == 4 else f"{stem}/{lineno - 2:06d}"
        out.append((key, members))
    if len(header) > 1 and header[1].isdigit() and int(header[1]) != len(out):
        raise ValueError(
            f"{where}: header says {header[1]} samples but lists {len(out)}; recreate it with wds2idx"
        )
    return out


def read_index(path: str | Path) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """`parse_index` of the file at `path` (errors name the file)."""
    return parse_index(Path(path).read_text(encoding="utf-8"), path)


# ---------------------------------------------------------------------------------------------- what a build holds

SHARD_KINDS: dict[str, str] = {
    "report": "image-report pairs: python -m data_tools.build_shards --format mimic-cxr (or iu-xray, manifest)",
    "vqa": "image-question-answer samples: python -m data_tools.build_shards --format vqa-rad (or slake)",
}
"""What a build holds (`manifest.json`'s `kind`) -> what that is and the command that builds it."""


def kind_of_format(fmt: str | None) -> str | None:
    """The kind of build a `--format` (or a sample's `source`) makes; None when unknown."""
    if fmt in VQA_SOURCES:
        return "vqa"
    if fmt in ("mimic-cxr", "iu-xray", "manifest"):
        return "report"
    return None


def build_manifest_of(path: str | Path) -> Path | None:
    """The `manifest.json` of the build holding `path` (a shard tar, a split folder or the build folder)."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent) if path.is_dir() else (path.parent, path.parent.parent):
        candidate = folder / "manifest.json"
        if candidate.is_file():
            return candidate
    return None


def build_kind(manifest_path: str | Path) -> str | None:
    """`manifest.json`'s `kind`; for a build written before it was recorded, the kind of its `source.format`;
    None when the file cannot be read or says neither."""
    try:
        manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("kind") in SHARD_KINDS:
        return manifest["kind"]
    return kind_of_format((manifest.get("source") or {}).get("format"))


def wrong_kind(paths: list[str | Path] | str | Path, expected: str, reader: str) -> str | None:
    """One line when the build holding `paths` is not of kind `expected`, else None (also when no manifest
    says: shards copied without their manifest are read as they are).

    Args:
        paths: shard tars or folders of one shard set.
        expected: a key of `SHARD_KINDS`.
        reader: who reads them, for the message (`pretraining`, `train_tokenizer`, `task vqa`).
    """
    seen: set[Path] = set()
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        manifest = build_manifest_of(path)
        if manifest is None or manifest in seen:
            continue
        seen.add(manifest)
        kind = build_kind(manifest)
        if kind is not None and kind != expected:
            return (
                f"{path} holds {SHARD_KINDS[kind].split(':')[0]} ({manifest} says kind {kind}), but {reader} reads "
                f"{SHARD_KINDS[expected]}"
            )
    return None
