"""`manifest` reader: a CSV or JSONL listing image paths and texts (ROCO / MedICaT-style corpora).

Columns (found by name, first match wins):
- image path (required): `image`, `image_path`, `path`, `file`, `filename`, `file_name`, `img`
  — relative paths are taken from the manifest's folder;
- text (required): `text`, `report`, `caption`, `findings`;
- optional: `split`, `subject_id` / `patient_id`, `study_id`, `image_id`, `view`, and labels either as
  a `labels` column holding a JSON object or as columns named like the 14 CheXpert labels;
- optional, a dataset's own labels (`shard_format.DATASET_LABELS_FIELD`): a `dataset_labels` column holding a JSON
  object of any names -> 1 / 0 / -1 / blank (NIH's Hernia, VinDr's ILD ...). The label set is the names of the
  first row that has one; a later row naming another label stops the build with one line naming the row (a row
  leaving one out has it blank);
- optional, a single class (`shard_format.CLASS_FIELD`): a `class` column (COVIDx's normal / pneumonia /
  COVID-19); blank = unlabelled.

A text with MIMIC-style section headers goes through the section parser; a plain caption is kept whole.
A row whose image file or `image_id` an earlier row already used is rejected as `duplicate`. The manifest
must be UTF-8; another encoding, a malformed row or a ragged CSV line stops the build with one line.
Without a split column the split is a hash of the patient id (or of the image path when there is none).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from pathlib import Path

from data_tools.shard_format import CHEXPERT_LABELS, CLASS_FIELD, DATASET_LABELS_FIELD
from data_tools.sources.common import (
    SOURCES,
    Reject,
    ScanOptions,
    SourceError,
    SourceItem,
    SourceScan,
    check_patient_splits,
    check_report,
    dedupe_keys,
    empty_labels,
    hash_split,
    make_key,
    normalize_split,
    outside_link,
    parse_id,
    parse_label,
    view_allowed,
)
from data_tools.sources.report_text import extract_report_text, has_section_headers, normalize_whitespace

IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "file_name", "img")
TEXT_COLUMNS = ("text", "report", "caption", "findings")
SUBJECT_COLUMNS = ("subject_id", "patient_id", "subject", "patient")


def _unclosed_quote_line(text: str) -> int | None:
    """The line where a quoted CSV cell opens and never closes (``None`` if every quote closes): the csv module
    reads on to the end of the file and reports where it stopped, not where the quote was opened."""
    line, opened, quoted, start_of_cell, prev = 1, None, False, True, ""
    for char in text:
        if quoted:
            if char == '"':
                quoted = False  # a doubled "" re-opens on its second quote below
        elif char == '"' and start_of_cell:
            quoted, opened = True, line
        elif char == '"' and not start_of_cell and opened is not None and prev == '"':
            quoted = True  # the second quote of a doubled "" inside a quoted cell
        if char == "\n":
            line += 1
        if not quoted:
            start_of_cell = char in ",\t\n"
        prev = char
    return opened if quoted else None


def read_manifest_rows(path: Path) -> list[dict]:
    """Rows of a `.csv`, `.tsv`, `.jsonl` (or `.json` list), optionally gzipped."""
    raw = path.read_bytes()
    name = path.name.lower()
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise SourceError(f"{path}: not a readable gzip file ({exc}); re-download it, or gunzip it") from None
        name = name[:-3]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SourceError(
            f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); save the manifest as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}"
        ) from None
    if name.endswith(".jsonl"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}: line {lineno} is not a JSON object")
            rows.append(row)
        return rows
    if name.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SourceError(f"{path}: expected a JSON list of objects (one per sample)")
        return rows
    if name.endswith((".csv", ".tsv")):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if name.endswith(".tsv") else ",", strict=True)
        try:
            rows = list(reader)
        except csv.Error as exc:
            opened = _unclosed_quote_line(text)
            if opened is not None:
                raise SourceError(
                    f'{path}: line {opened} opens a quoted cell that is never closed (a stray "); close the quote '
                    'or double it ("") inside a quoted cell'
                ) from None
            raise SourceError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None
        for lineno, row in enumerate(rows, start=1):
            if None in row:  # csv puts the cells beyond the header under the key None
                raise SourceError(f"{path}: row {lineno} has more cells than the header has columns")
        return rows
    raise SourceError(f"{path}: unknown manifest type (use .csv, .tsv, .jsonl or .json)")


def _pick(columns: set[str], choices: tuple[str, ...]) -> str | None:
    return next((c for c in choices if c in columns), None)


def _labels(row: dict, path: Path, lineno: int) -> dict:
    labels = empty_labels()
    try:
        if row.get("labels") not in (None, ""):
            given = row["labels"] if isinstance(row["labels"], dict) else json.loads(row["labels"])
            unknown = set(given) - set(CHEXPERT_LABELS)
            if unknown:
                raise ValueError(f"unknown label name(s) {sorted(unknown)}")
            labels.update({k: parse_label(v) for k, v in given.items()})
        for name in CHEXPERT_LABELS:
            if name in row:
                labels[name] = parse_label(row[name])
    except (ValueError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: row {lineno}: labels: {exc}") from None
    return labels


def _dataset_labels(row: dict, path: Path, lineno: int, label_set: dict[str, int]) -> dict | None:
    """The row's own labels over ``label_set`` (name -> the row that fixed the set; filled by the first labelled
    row), or None when the row has none."""
    value = row.get(DATASET_LABELS_FIELD)
    if value in (None, ""):
        return None
    try:
        given = value if isinstance(value, dict) else json.loads(value)
        if not isinstance(given, dict) or not given:
            raise ValueError("expected a JSON object of label name -> 1 / 0 / -1 / blank")
        if not label_set:
            label_set.update(dict.fromkeys(given, lineno))
        unknown = [str(k) for k in given if k not in label_set]
        if unknown:
            first = next(iter(label_set.values()))
            raise ValueError(
                f"unknown label(s) {', '.join(map(repr, unknown))}: the label set (row {first}) is "
                f"{', '.join(label_set)}; correct the name, or list every label in row {first}"
            )
        return {name: parse_label(given.get(name)) for name in label_set}
    except (ValueError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: row {lineno}: {DATASET_LABELS_FIELD}: {exc}") from None


@SOURCES.register("manifest", kind="report")
def scan_manifest(path: str | Path, opts: ScanOptions, vqa_lang: str = "en") -> SourceScan:
    """Plan one sample per manifest row."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"manifest {path} is not a file")
    rows = read_manifest_rows(path)
    if not rows:
        raise SourceError(f"{path}: the manifest has no rows")
    columns = set().union(*(r.keys() for r in rows))
    image_col, text_col = _pick(columns, IMAGE_COLUMNS), _pick(columns, TEXT_COLUMNS)
    if image_col is None or text_col is None:
        need = "an image column (" + "/".join(IMAGE_COLUMNS) + ")" if image_col is None else ""
        need += (" and " if need else "") + (
            "a text column (" + "/".join(TEXT_COLUMNS) + ")" if text_col is None else ""
        )
        raise SourceError(f"{path}: needs {need}; found columns {sorted(columns)}")
    subject_col = _pick(columns, SUBJECT_COLUMNS)
    base = path.parent
    scan = SourceScan()
    first_row_of: dict[tuple[str, str], int] = {}  # (what, value) -> the row that used it first
    label_set: dict[str, int] = {}  # the dataset's own label names, in the first labelled row's order
    for lineno, row in enumerate(rows, start=1):
        image_value = str(row.get(image_col) or "").strip()
        if not image_value:
            raise SourceError(f"{path}: row {lineno} has an empty {image_col!r}")
        image = Path(image_value) if Path(image_value).is_absolute() else base / image_value
        subject = parse_id(row.get(subject_col)) if subject_col else ""
        if row.get("split") not in (None, ""):
            try:
                split = normalize_split(str(row["split"]))
            except ValueError as exc:
                raise SourceError(f"{path}: row {lineno}: {exc}") from None
        else:
            split = hash_split(subject or image_value, opts.val_fraction, opts.test_fraction)
        key = make_key(f"m{lineno:07d}", Path(image_value).stem)
        own = _dataset_labels(row, path, lineno, label_set)  # every row checked, rejected ones too
        raw_text = str(row.get(text_col) or "")
        text = (
            extract_report_text(raw_text, opts.sections)
            if has_section_headers(raw_text)
            else normalize_whitespace(raw_text)
        )
        view = str(row.get("view") or "").strip().upper() or None
        image_id = str(row.get("image_id") or "").strip()
        duplicate = None
        for what, value in (("image", str(image.resolve())), ("image_id", image_id)):
            if value and (what, value) in first_row_of:
                duplicate = f"row {lineno}: {what} {value} already used by row {first_row_of[(what, value)]}"
                break
        if duplicate:
            scan.rejects.append(Reject(image_value, "duplicate", duplicate, key=key, split=split))
            continue
        first_row_of[("image", str(image.resolve()))] = lineno
        if image_id:
            first_row_of[("image_id", image_id)] = lineno
        if not image.is_file():
            why = (
                "is a folder, not an image file" if image.is_dir()
                else f"is a broken symbolic link (to {os.readlink(image)})" if image.is_symlink()
                else "does not exist"
            )  # fmt: skip
            scan.rejects.append(
                Reject(image_value, "missing_image", f"row {lineno}: {image} {why}", key=key, split=split)
            )
            continue
        if (link := outside_link(image, base)) and not opts.follow_outside_links:
            detail = f"row {lineno}: {image_value} is {link}"
            scan.rejects.append(Reject(image_value, "symlink_outside_input", detail, key=key, split=split))
            continue
        if problem := check_report(text, opts.min_words):
            scan.rejects.append(
                Reject(image_value, problem[0], f"row {lineno}: {problem[1]}", key=key, split=split)
            )
            continue
        if not view_allowed(view, opts.views):
            detail = f"row {lineno}: view {view} not in --views {','.join(opts.views or ())}"
            scan.rejects.append(Reject(image_value, "view_filtered", detail, key=key, split=split))
            continue
        meta = {
            "source": "manifest",
            "subject_id": subject or None,
            "study_id": str(row.get("study_id") or "").strip() or None,
            "image_id": image_id or Path(image_value).stem,
            "view": view,
            "split": split,
            "labels": _labels(row, path, lineno),
        }
        if own is not None:
            meta[DATASET_LABELS_FIELD] = own
        if str(row.get(CLASS_FIELD) or "").strip():
            meta[CLASS_FIELD] = str(row[CLASS_FIELD]).strip()
        scan.items.append(
            SourceItem(key=key, image_path=str(image.resolve()), input=image_value, text=text, meta=meta)
        )
    scan.items = dedupe_keys(scan.items, scan.rejects)
    if "split" in columns and subject_col:
        if note := check_patient_splits(scan.items, opts.allow_shared_patients, path.name):
            scan.notes.append(note)
    return scan
