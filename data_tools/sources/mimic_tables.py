"""MIMIC-CXR's three tables (`mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz]`), read once, and the checks
that a table really describes the tree beside it.

What goes wrong with these tables in practice, and what is done about it:
- a table re-saved by pandas writes integer ids as `50000001.0`: ids are parsed as numbers where they are
  integral (`parse_id`);
- a table that matches no study / image of the tree (another corpus's, or ids spelled otherwise) would
  silently leave every sample unlabelled or hash-split: that is an error; one that matches only some is a
  note with the counts;
- two rows that disagree about one image (two views, two splits) or one study (two label sets): the
  images concerned are rejected as `conflicting_metadata`, naming the rows;
- a split name other than train / validate / test or their usual synonyms is refused with the list.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.shard_format import CHEXPERT_LABELS
from data_tools.sources.common import SourceError, SourceScan, normalize_split, parse_id, parse_label

SPLIT_STEM = "mimic-cxr-2.0.0-split"
METADATA_STEM = "mimic-cxr-2.0.0-metadata"
CHEXPERT_STEM = "mimic-cxr-2.0.0-chexpert"


def find_table(root: Path, stem: str) -> Path | None:
    """`root/<stem>.csv.gz` or `root/<stem>.csv`, whichever exists."""
    for suffix in (".csv.gz", ".csv"):
        path = root / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def read_table(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a (gzipped) CSV as dicts; an unreadable file or a missing required column is a `SourceError`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise SourceError(f"{path}: not a readable gzip file ({exc}); re-download or gunzip it") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise SourceError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
    return rows


@dataclass
class MimicTables:
    """What the tables say, by image (`dicom_id`), patient (`subject_id`) and study (`(subject, study)`), plus
    what the scan of the tree found, for `check_matches`."""

    split_path: Path | None = None
    metadata_path: Path | None = None
    chexpert_path: Path | None = None
    split_by_dicom: dict[str, str] = field(default_factory=dict)
    split_by_subject: dict[str, str] = field(default_factory=dict)
    view_by_dicom: dict[str, str] = field(default_factory=dict)
    labels_by_study: dict[tuple[str, str], dict] = field(default_factory=dict)
    conflicts: dict[str, str] = field(default_factory=dict)
    """`dicom_id` (or `p<subject>/s<study>`) -> why its rows disagree; those images are rejected."""
    studies_seen: set[tuple[str, str]] = field(default_factory=set)
    studies_labelled: set[tuple[str, str]] = field(default_factory=set)
    dicoms_seen: set[str] = field(default_factory=set)

    def check_matches(self, scan: SourceScan) -> None:
        """Refuse a table that matches nothing in the tree; note one that matches only part of it."""
        if not self.studies_seen:
            return
        checks = []
        if self.chexpert_path and self.labels_by_study:
            matched = len(self.studies_labelled)
            example = next(iter(self.labels_by_study))
            checks.append((self.chexpert_path, matched, len(self.studies_seen), "studies", f"p{example[0]}/s{example[1]}",
                           "their labels are blank"))  # fmt: skip
        if self.split_path and self.split_by_dicom:
            matched = len(self.dicoms_seen & self.split_by_dicom.keys())
            checks.append((self.split_path, matched, len(self.dicoms_seen), "images", next(iter(self.split_by_dicom)),
                           "their split is their patient's, else a hash of the patient id"))  # fmt: skip
        if self.metadata_path and self.view_by_dicom:
            matched = len(self.dicoms_seen & self.view_by_dicom.keys())
            checks.append((self.metadata_path, matched, len(self.dicoms_seen), "images",
                           next(iter(self.view_by_dicom)), "their view is unknown (kept by --views)"))  # fmt: skip
        seen_study = sorted(self.studies_seen)[0]
        for path, matched, total, what, table_example, consequence in checks:
            if matched == 0:
                tree_example = (
                    f"p{seen_study[0]}/s{seen_study[1]}" if what == "studies" else sorted(self.dicoms_seen)[0]
                )
                raise SourceError(
                    f"{path}: matches none of the {total} {what} under files/ (its ids look like {table_example}, "
                    f"the tree's like {tree_example}); use the table of this corpus, or remove it"
                )
            if matched < total:
                scan.notes.append(
                    f"{path.name} covers {matched} of the {total} {what} under files/; for the other "
                    f"{total - matched}, {consequence}"
                )


def read_tables(root: Path) -> MimicTables:
    """Read whichever of the three tables `root` holds.

    Raises:
        SourceError: an unreadable table, a missing column, an unknown split name or a bad label value.
    """
    tables = MimicTables()
    if path := find_table(root, SPLIT_STEM):
        tables.split_path = path
        first_row: dict[str, int] = {}
        for lineno, row in enumerate(read_table(path, ("dicom_id", "subject_id", "split")), start=2):
            try:
                split = normalize_split(row["split"])
            except ValueError as exc:
                raise SourceError(f"{path}: line {lineno}: {exc}") from None
            dicom_id, subject = row["dicom_id"].strip(), parse_id(row["subject_id"])
            before = tables.split_by_dicom.get(dicom_id)
            if before is not None and before != split:
                tables.conflicts[dicom_id] = (
                    f"{path.name} lines {first_row[dicom_id]} and {lineno} put dicom_id {dicom_id} in two splits "
                    f"({before}, {split})"
                )
            first_row.setdefault(dicom_id, lineno)
            tables.split_by_dicom.setdefault(dicom_id, split)
            tables.split_by_subject.setdefault(subject, split)
    if path := find_table(root, METADATA_STEM):
        tables.metadata_path = path
        first_row = {}
        for lineno, row in enumerate(read_table(path, ("dicom_id", "ViewPosition")), start=2):
            dicom_id, view = row["dicom_id"].strip(), (row["ViewPosition"] or "").strip().upper()
            before = tables.view_by_dicom.get(dicom_id)
            if before is not None and before != view:
                tables.conflicts[dicom_id] = (
                    f"{path.name} lines {first_row[dicom_id]} and {lineno} give dicom_id {dicom_id} two views "
                    f"({before or 'blank'}, {view or 'blank'})"
                )
            first_row.setdefault(dicom_id, lineno)
            tables.view_by_dicom.setdefault(dicom_id, view)
    if path := find_table(root, CHEXPERT_STEM):
        tables.chexpert_path = path
        first_study_row: dict[tuple[str, str], int] = {}
        for lineno, row in enumerate(read_table(path, ("subject_id", "study_id", *CHEXPERT_LABELS)), start=2):
            study = (parse_id(row["subject_id"]), parse_id(row["study_id"]))
            try:
                labels = {name: parse_label(row[name]) for name in CHEXPERT_LABELS}
            except ValueError as exc:
                raise SourceError(f"{path}: line {lineno}: study {study[1]}: {exc}") from None
            before = tables.labels_by_study.get(study)
            if before is not None and before != labels:
                tables.conflicts[f"p{study[0]}/s{study[1]}"] = (
                    f"{path.name} lines {first_study_row[study]} and {lineno} give study {study[1]} two different "
                    "label sets"
                )
            first_study_row.setdefault(study, lineno)
            tables.labels_by_study.setdefault(study, labels)
    return tables
