"""What every source reader shares: the planned sample, the reject, the scan options and the rules
for keys, splits, labels and reports.

Each reader walks its input once, in a sorted (deterministic) order, and returns a `SourceScan`:
the `SourceItem`s that go to the image workers and the `Reject`s already known from the metadata
(missing or empty reports, filtered views, reports without images, missing image files). Image-level
problems (corrupt files, no codec, size) are found later by the workers, as `ImageRejected`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_tools.registry import Registry
from data_tools.shard_format import CHEXPERT_LABELS, SPLIT_SYNONYMS
from data_tools.sources.report_text import DEFAULT_SECTIONS, count_content_words

SOURCES: Registry = Registry(
    "source format",
    "mpma_ds.sources",
    builtins=(
        "data_tools.sources.mimic",
        "data_tools.sources.iu",
        "data_tools.sources.manifest",
        "data_tools.sources.vqa",
    ),
)
"""The corpus formats ``build_shards --format`` reads, by name. A reader registers itself where it is defined::

    @SOURCES.register("mimic-cxr", kind="report")
    def scan_mimic_cxr(root: Path, opts: ScanOptions, vqa_lang: str = "en") -> SourceScan: ...

``kind`` is what its samples are: ``report`` (image-report pairs, ``shard_format.REPORT_FIELDS``) or ``vqa``
(questions, ``shard_format.VQA_FIELDS``). Another package adds a reader through the ``mpma_ds.sources``
entry-point group."""

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
KNOWN_VIEWS: tuple[str, ...] = (
    "PA", "AP", "LATERAL", "LL", "RL", "LAT", "AP AXIAL", "PA AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD",
    "LLD", "RLD", "LAO", "RAO", "LPO", "RPO", "LLO", "RLO", "OBLIQUE", "XTABLE LATERAL", "SWIMMERS",
)  # fmt: skip
"""View positions `--views` may name: MIMIC-CXR's `ViewPosition` values and DICOM's defined terms."""
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]+")


class SourceError(Exception):
    """The input cannot be read at all (wrong folder, missing column ...): a one-line message for the CLI."""


class ImageRejected(Exception):
    """An input image that cannot go into a shard; `reason` is the code written to `rejects.jsonl`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ScanOptions:
    """Filters and split rules applied while scanning (all part of the build's identity)."""

    sections: tuple[str, ...] = DEFAULT_SECTIONS
    """Report sections kept, in this order (standard names of `data_tools.sources.report_text`)."""
    views: tuple[str, ...] | None = ("PA", "AP")
    """View positions kept; `None` keeps all. Images whose view is unknown are kept."""
    min_words: int = 3
    """Reports with fewer words (after section extraction) are rejected."""
    val_fraction: float = 0.05
    """Share of patients hashed into `validate` when no official split exists."""
    test_fraction: float = 0.05
    """Share of patients hashed into `test` when no official split exists."""
    image_dir: str | None = None
    """iu-xray only: folder holding the images (default: `<input>/images`, else `<input>`)."""
    allow_shared_patients: bool = False
    """Accept a split file that puts one patient in two splits (leakage between them); refused by default."""
    follow_outside_links: bool = False
    """Read reports / images that are symbolic links leading outside the input tree; rejected by default
    (`symlink_outside_input`)."""


@dataclass
class SourceItem:
    """One input image planned for a shard."""

    key: str
    """Sample key, unique within the build, only `[A-Za-z0-9_-]`."""
    image_path: str
    """Absolute path of the source image file."""
    input: str
    """The image path relative to the input (for rejects and messages)."""
    text: str
    """Report text stored in `<key>.txt`."""
    meta: dict
    """`<key>.json` minus width/height (`shard_format.REPORT_FIELDS`, or `VQA_FIELDS` for a VQA sample)."""

    @property
    def split(self) -> str:
        return self.meta["split"]


@dataclass
class Reject:
    """One line of `rejects.jsonl`."""

    input: str
    """Path of the rejected input relative to the input root."""
    reason: str
    """Stable reason code, e.g. `corrupt_image`, `empty_report`, `view_filtered`."""
    detail: str
    kind: str = "image"
    """`image` (an input image that is not in any shard) or `report` (a report with no image)."""
    key: str | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SourceScan:
    items: list[SourceItem] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Lines about the input worth telling the user (e.g. a VQA set without a validation file)."""
    decoded: dict[str, list[str]] = field(default_factory=dict)
    """Reports that were not UTF-8: encoding used -> their input paths (`note_decoded` turns it into notes)."""

    def note_decoded(self) -> None:
        """One warning note per encoding used for reports that were not UTF-8."""
        for encoding, paths in sorted(self.decoded.items()):
            self.notes.append(
                f"{len(paths)} report(s) were not UTF-8 and were decoded as {encoding} (check them), "
                f"e.g. {paths[0]}"
            )

    @property
    def num_images(self) -> int:
        """Input images seen: planned items plus image-kind rejects."""
        return len(self.items) + sum(r.kind == "image" for r in self.rejects)


def empty_labels() -> dict[str, int | None]:
    return {name: None for name in CHEXPERT_LABELS}


def parse_label(value) -> int | None:
    """`"1.0"`, `1`, `"-1"`, `""`, `None` -> 1 / 0 / -1 / None (anything else is an error)."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    text = str(value).strip()
    if text == "" or text.lower() in ("nan", "none", "null"):
        return None
    number = float(text)
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {value!r} is not one of 1, 0, -1 or blank")
    return int(number)


def hash_split(patient_id: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the patient id alone, so that no patient spans two splits."""
    u = int(hashlib.sha256(f"mpma-split:{patient_id}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validate"
    return "train"


def normalize_split(value: str) -> str:
    """Map a split spelling to MIMIC's names (`val`, `valid`, `validation`, `dev` -> `validate`, ...).

    Raises:
        ValueError: any other name (a typo such as `tset` would otherwise make a split of its own).
    """
    v = str(value).strip().lower()
    if v in SPLIT_SYNONYMS:
        return SPLIT_SYNONYMS[v]
    raise ValueError(
        f"split name {value!r} is not one of train, validate, test (also accepted: "
        f"{', '.join(k for k, v in SPLIT_SYNONYMS.items() if k != v)})"
    )


def parse_id(value) -> str:
    """A numeric id as written by any tool: `"50000001"`, `50000001`, `"50000001.0"` (pandas re-saving an
    integer column that has a blank) -> `"50000001"`; other text is returned stripped."""
    text = str(value if value is not None else "").strip()
    if _FLOAT_ID.fullmatch(text):
        return text.split(".", 1)[0]
    return text


_FLOAT_ID = re.compile(r"[0-9]+\.0*")


def check_patient_splits(items: list[SourceItem], allow: bool, where: str) -> str | None:
    """A note (`allow`) or raises `SourceError` when a patient's samples lie in more than one split.

    Args:
        items: the planned samples (their `meta["subject_id"]` and split).
        allow: `--allow-shared-patients`: warn instead of refusing.
        where: the file that decided the splits, for the message.
    """
    splits: dict[str, set[str]] = {}
    for item in items:
        subject = item.meta.get("subject_id")
        if subject:
            splits.setdefault(subject, set()).add(item.split)
    shared = sorted(s for s, found in splits.items() if len(found) > 1)
    if not shared:
        return None
    example = f"{shared[0]} in {', '.join(sorted(splits[shared[0]]))}"
    message = f"{len(shared)} patient(s) appear in more than one split of {where} (e.g. {example})"
    if allow:
        return f"{message}: kept as asked (--allow-shared-patients); their splits are not independent"
    raise SourceError(
        f"{message}: that leaks patients between splits; fix the split file, or pass --allow-shared-patients "
        "to build it anyway"
    )


def outside_link(path: Path, root: Path) -> str | None:
    """Why `path` (under `root` as written) must not be read: it is, or passes through, a symbolic link that
    leads outside `root`; None when it stays inside (or is not under `root` at all)."""
    written = Path(os.path.abspath(path))
    top = Path(os.path.abspath(root))
    if not written.is_relative_to(top):
        return None
    real = Path(os.path.realpath(written))
    if real.is_relative_to(Path(os.path.realpath(top))):
        return None
    return f"a symbolic link to {real}, outside the input {top} (--follow-outside-links reads it)"


def make_key(*parts: str, max_len: int = 80) -> str:
    """A sample key from parts: characters other than `[A-Za-z0-9_-]` become `_` (no dots for webdataset)."""
    key = "_".join(_KEY_BAD.sub("_", p).strip("_") for p in parts if p)
    if len(key) > max_len:
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        key = f"{key[: max_len - 11]}_{digest}"
    return key


def check_report(text: str, min_words: int) -> tuple[str, str] | None:
    """`(reason, detail)` if a report text cannot be used, else None."""
    if not text:
        return "empty_report", "the report has no text in the wanted sections"
    words = count_content_words(text)
    if words == 0:
        return "empty_report", "no words beyond de-identification marks (___, XXXX) and punctuation"
    if words < min_words:
        return (
            "report_too_short",
            f"{words} words (de-identification marks not counted), below --min-words {min_words}",
        )
    return None


def view_allowed(view: str | None, views: tuple[str, ...] | None) -> bool:
    """Unknown views pass: the filter acts on what the source states."""
    return views is None or view is None or view.upper() in views


def dedupe_keys(items: list[SourceItem], rejects: list[Reject]) -> list[SourceItem]:
    """Reject later items whose key repeats an earlier one (inputs are in sorted order)."""
    seen: set[str] = set()
    kept = []
    for item in items:
        if item.key in seen:
            rejects.append(
                Reject(item.input, "duplicate_key", f"sample key {item.key} already used", key=item.key)
            )
            continue
        seen.add(item.key)
        kept.append(item)
    return kept
