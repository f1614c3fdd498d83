"""`mimic-cxr` reader: a MIMIC-CXR(-JPG) tree with JPG, PNG or DICOM images (SPEC §4.1).

INPUT/files/pNN/pSUBJECT/sSTUDY/<dicom_id>.{jpg,dcm}
INPUT/files/pNN/pSUBJECT/sSTUDY.txt
INPUT/mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz]      (each optional)
INPUT/synth_truth.jsonl                                       (a synthetic corpus only: the `truth` of each film)

With `synth_truth.jsonl` present (`data_tools.synth_corpus` writes it) every sample's json gets the film's
`truth` (`data_tools.shard_format.TRUTH_FIELD`); the build maps its boxes to the stored image's pixels.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

from data_tools.shard_format import CHEXPERT_LABELS, TRUTH_FIELD, check_truth
from data_tools.sources.common import (
    IMAGE_SUFFIXES,
    Reject,
    ScanOptions,
    SourceError,
    SourceItem,
    SourceScan,
    check_report,
    dedupe_keys,
    empty_labels,
    hash_split,
    make_key,
    normalize_split,
    parse_label,
    view_allowed,
)
from data_tools.sources.report_text import decode_report, extract_report_text


def find_table(root: Path, stem: str) -> Path | None:
    """`root/<stem>.csv.gz` or `root/<stem>.csv`, whichever exists."""
    for suffix in (".csv.gz", ".csv"):
        path = root / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def read_table(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a (gzipped) CSV as dicts; a missing required column is a `SourceError`."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise SourceError(f"{path}: not a readable gzip file ({exc}); re-download or gunzip it") from None
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
    return list(reader)


TRUTH_FILE = "synth_truth.jsonl"
"""The synthetic corpus's ground truth at the corpus root (`data_tools.synth.corpus.TRUTH_FILE`)."""


def read_truth(path: Path) -> dict[str, dict]:
    """``{dicom_id: truth}`` from a `synth_truth.jsonl` (boxes in the film's own pixels).

    Raises:
        SourceError: a line that is not JSON, lacks ``dicom_id`` / ``truth``, or whose truth breaks the schema.
    """
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                dicom_id, truth = row["dicom_id"], row[TRUTH_FIELD]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SourceError(
                    f"{path}:{lineno}: not a ground-truth line with dicom_id and truth ({exc}); regenerate the "
                    "corpus with python -m data_tools.synth_corpus"
                ) from None
            problems = check_truth(truth)
            if problems:
                raise SourceError(f"{path}:{lineno}: {problems[0]}")
            out[str(dicom_id)] = truth
    return out


def _strip_prefix(name: str, prefix: str) -> str:
    return name[1:] if name.startswith(prefix) and name[1:].isdigit() else name


def scan_mimic_cxr(root: str | Path, opts: ScanOptions) -> SourceScan:
    """Plan every image of a MIMIC-CXR tree, with its report, split, view and CheXpert labels."""
    root = Path(root)
    files = root / "files"
    if not files.is_dir():
        raise SourceError(
            f"{root} has no files/ folder: not a MIMIC-CXR tree (expected files/pNN/pSUBJECT/sSTUDY/)"
        )

    split_by_dicom: dict[str, str] = {}
    split_by_subject: dict[str, str] = {}
    if path := find_table(root, "mimic-cxr-2.0.0-split"):
        for row in read_table(path, ("dicom_id", "subject_id", "split")):
            try:
                split = normalize_split(row["split"])
            except ValueError as exc:
                raise SourceError(f"{path}: {exc}") from None
            split_by_dicom[row["dicom_id"]] = split
            split_by_subject.setdefault(row["subject_id"], split)
    view_by_dicom: dict[str, str] = {}
    if path := find_table(root, "mimic-cxr-2.0.0-metadata"):
        for row in read_table(path, ("dicom_id", "ViewPosition")):
            view_by_dicom[row["dicom_id"]] = row["ViewPosition"].strip().upper()
    labels_by_study: dict[tuple[str, str], dict] = {}
    if path := find_table(root, "mimic-cxr-2.0.0-chexpert"):
        for row in read_table(path, ("subject_id", "study_id", *CHEXPERT_LABELS)):
            try:
                labels = {name: parse_label(row[name]) for name in CHEXPERT_LABELS}
            except ValueError as exc:
                raise SourceError(f"{path}: study {row['study_id']}: {exc}") from None
            labels_by_study[(row["subject_id"], row["study_id"])] = labels
    truth_by_dicom = read_truth(root / TRUTH_FILE) if (root / TRUTH_FILE).is_file() else {}

    scan = SourceScan()
    for group in sorted(os.listdir(files)):
        group_dir = files / group
        if not group_dir.is_dir():
            continue
        for subject_name in sorted(os.listdir(group_dir)):
            subject_dir = group_dir / subject_name
            if not subject_dir.is_dir():
                continue
            subject = _strip_prefix(subject_name, "p")
            entries = sorted(os.listdir(subject_dir))
            study_dirs = {e for e in entries if (subject_dir / e).is_dir()}
            for entry in entries:  # reports whose study folder has no image
                if entry.endswith(".txt") and entry[:-4] not in study_dirs:
                    rel = str((subject_dir / entry).relative_to(root))
                    scan.rejects.append(
                        Reject(rel, "report_without_images", "no image folder for this report", "report")
                    )
            for study_name in sorted(study_dirs):
                _scan_study(root, subject_dir / study_name, subject, study_name, opts, scan, split_by_dicom,
                            split_by_subject, view_by_dicom, labels_by_study, truth_by_dicom)  # fmt: skip
    scan.items = dedupe_keys(scan.items, scan.rejects)
    scan.note_decoded()
    return scan


def _scan_study(
    root: Path,
    study_dir: Path,
    subject: str,
    study_name: str,
    opts: ScanOptions,
    scan: SourceScan,
    split_by_dicom: dict[str, str],
    split_by_subject: dict[str, str],
    view_by_dicom: dict[str, str],
    labels_by_study: dict[tuple[str, str], dict],
    truth_by_dicom: dict[str, dict],
) -> None:
    study = _strip_prefix(study_name, "s")
    images = sorted(p for p in study_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    report_path = study_dir.with_name(study_name + ".txt")
    for link in sorted(study_dir.iterdir()):  # an image that is a link to nothing: named, not "no image"
        if link.is_symlink() and not link.exists() and link.suffix.lower() in IMAGE_SUFFIXES:
            detail = f"{link.name} is a broken symbolic link (to {os.readlink(link)})"
            scan.rejects.append(Reject(str(link.relative_to(root)), "missing_image", detail, "image"))
    if not images:
        if report_path.is_file():
            rel = str(report_path.relative_to(root))
            scan.rejects.append(Reject(rel, "report_without_images", "the study folder holds no image", "report"))
        return
    problem = None
    text = ""
    if not report_path.is_file():
        problem = ("missing_report", f"no report {report_path.relative_to(root)}")
    else:
        raw_report, encoding = decode_report(report_path.read_bytes())
        if encoding:
            scan.decoded.setdefault(encoding, []).append(str(report_path.relative_to(root)))
        text = extract_report_text(raw_report, opts.sections)
        problem = check_report(text, opts.min_words)
    labels = labels_by_study.get((subject, study)) or empty_labels()
    for image in images:
        dicom_id = image.stem
        rel = str(image.relative_to(root))
        key = make_key(f"p{subject}", f"s{study}", dicom_id)
        split = split_by_dicom.get(dicom_id) or split_by_subject.get(subject)
        split = split or hash_split(subject, opts.val_fraction, opts.test_fraction)
        view = view_by_dicom.get(dicom_id) or None
        if problem:
            scan.rejects.append(Reject(rel, problem[0], problem[1], key=key, split=split))
            continue
        if not view_allowed(view, opts.views):
            detail = f"view {view} not in --views {','.join(opts.views or ())}"
            scan.rejects.append(Reject(rel, "view_filtered", detail, key=key, split=split))
            continue
        meta = {
            "source": "mimic-cxr",
            "subject_id": subject,
            "study_id": study,
            "image_id": dicom_id,
            "view": view,
            "split": split,
            "labels": labels,  # shared by the study's images (never mutated)
        }
        if dicom_id in truth_by_dicom:
            meta[TRUTH_FIELD] = truth_by_dicom[dicom_id]  # source pixels: encode_sample maps them to the stored
        scan.items.append(SourceItem(key=key, image_path=str(image.resolve()), input=rel, text=text, meta=meta))
