"""`mimic-cxr` reader: a MIMIC-CXR(-JPG) tree with JPG, PNG or DICOM images (SPEC §4.1).

INPUT/files/pNN/pSUBJECT/sSTUDY/<dicom_id>.{jpg,dcm}
INPUT/files/pNN/pSUBJECT/sSTUDY.txt
INPUT/mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz]      (each optional)
INPUT/synth_truth.jsonl                                       (a synthetic corpus only: the `truth` of each film)

With `synth_truth.jsonl` present (`data_tools.synth_corpus` writes it) every sample's json gets the film's
`truth` (`data_tools.shard_format.TRUTH_FIELD`); the build maps its boxes to the stored image's pixels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_tools.shard_format import TRUTH_FIELD, check_truth
from data_tools.sources.common import (
    IMAGE_SUFFIXES,
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
    outside_link,
    view_allowed,
)
from data_tools.sources.mimic_tables import MimicTables, read_tables
from data_tools.sources.report_text import NotText, decode_report, extract_report_text

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


@SOURCES.register("mimic-cxr", kind="report")
def scan_mimic_cxr(root: str | Path, opts: ScanOptions, vqa_lang: str = "en") -> SourceScan:
    """Plan every image of a MIMIC-CXR tree, with its report, split, view and CheXpert labels."""
    root = Path(root)
    files = root / "files"
    if not files.is_dir():
        raise SourceError(
            f"{root} has no files/ folder: not a MIMIC-CXR tree (expected files/pNN/pSUBJECT/sSTUDY/)"
        )

    tables = read_tables(root)
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
                _scan_study(
                    root, subject_dir / study_name, subject, study_name, opts, scan, tables, truth_by_dicom
                )
    scan.items = dedupe_keys(scan.items, scan.rejects)
    tables.check_matches(scan)
    if tables.split_path:
        if note := check_patient_splits(scan.items, opts.allow_shared_patients, tables.split_path.name):
            scan.notes.append(note)
    scan.note_decoded()
    return scan


def _scan_study(
    root: Path,
    study_dir: Path,
    subject: str,
    study_name: str,
    opts: ScanOptions,
    scan: SourceScan,
    tables: MimicTables,
    truth_by_dicom: dict[str, dict],
) -> None:
    study = _strip_prefix(study_name, "s")
    images = sorted(p for p in study_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    report_path = study_dir.with_name(study_name + ".txt")
    if not images:
        if report_path.is_file():
            rel = str(report_path.relative_to(root))
            scan.rejects.append(Reject(rel, "report_without_images", "the study folder holds no image", "report"))
        return
    tables.studies_seen.add((subject, study))
    problem = None
    text = ""
    if not report_path.is_file():
        problem = ("missing_report", f"no report {report_path.relative_to(root)}")
    elif (link := outside_link(report_path, root)) and not opts.follow_outside_links:
        problem = ("symlink_outside_input", f"report {report_path.relative_to(root)} is {link}")
    else:
        try:
            raw_report, encoding = decode_report(report_path.read_bytes())
        except NotText as exc:
            problem = ("report_not_text", f"report {report_path.relative_to(root)}: {exc}")
        else:
            if encoding:
                scan.decoded.setdefault(encoding, []).append(str(report_path.relative_to(root)))
            text = extract_report_text(raw_report, opts.sections)
            problem = check_report(text, opts.min_words)
    labels = tables.labels_by_study.get((subject, study))
    if labels is not None:
        tables.studies_labelled.add((subject, study))
    labels = labels or empty_labels()
    kept_by_id: dict[str, Path] = {}  # dicom_id -> the image kept (first in sorted order)
    for image in images:
        dicom_id = image.stem
        tables.dicoms_seen.add(dicom_id)
        rel = str(image.relative_to(root))
        key = make_key(f"p{subject}", f"s{study}", dicom_id)
        split = tables.split_by_dicom.get(dicom_id) or tables.split_by_subject.get(subject)
        split = split or hash_split(subject, opts.val_fraction, opts.test_fraction)
        view = tables.view_by_dicom.get(dicom_id) or None
        if problem:
            scan.rejects.append(Reject(rel, problem[0], problem[1], key=key, split=split))
            continue
        if dicom_id in kept_by_id:
            detail = (
                f"dicom_id {dicom_id} again in this study: {kept_by_id[dicom_id].name} is kept, this one is not"
            )
            scan.rejects.append(Reject(rel, "duplicate_image", detail, key=key, split=split))
            continue
        if conflict := tables.conflicts.get(dicom_id) or tables.conflicts.get(f"p{subject}/s{study}"):
            scan.rejects.append(Reject(rel, "conflicting_metadata", conflict, key=key, split=split))
            continue
        if (link := outside_link(image, root)) and not opts.follow_outside_links:
            scan.rejects.append(Reject(rel, "symlink_outside_input", f"image is {link}", key=key, split=split))
            continue
        kept_by_id[dicom_id] = image
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
