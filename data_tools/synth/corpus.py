"""A small synthetic corpus in the exact MIMIC-CXR-JPG layout, deterministic per seed (`generate_corpus`).

The CLI is `python -m data_tools.synth_corpus --out DIR --studies N --seed S [--with-faults] [--workers K]`;
it writes::

    DIR/files/pNN/p<subject>/s<study>/<dicom_id>.jpg    grayscale chest films (PA / AP / LATERAL)
    DIR/files/pNN/p<subject>/s<study>.txt                the MIMIC-style report of the study
    DIR/mimic-cxr-2.0.0-split.csv.gz                     dicom_id,study_id,subject_id,split
    DIR/mimic-cxr-2.0.0-metadata.csv.gz                  dicom_id,subject_id,study_id,...,ViewPosition,Rows,Columns,...
    DIR/mimic-cxr-2.0.0-chexpert.csv.gz                  subject_id,study_id + the 14 CheXpert labels
    DIR/synth_corpus.json                                the arguments and the summary
    DIR/synth_faults.json                                with --with-faults: [{"kind", "path", ...}]
    DIR/synth_truth.jsonl                                per film: what is drawn in it, where (boxes)

The findings of each study are drawn in its films (`data_tools.synth.images`) and written in its
report (`data_tools.synth.reports`); the chexpert CSV holds the same labels. Every random choice
comes from the seed, the study plan is made in one process and each film has its own seed, so the
bytes do not depend on ``workers``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import multiprocessing
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.shard_format import CHEXPERT_LABELS, SPLITS
from data_tools.synth.images import DRAWN_IN_VIEW, render_with_regions
from data_tools.synth.reports import (
    DEFAULT_NORMAL_RATE,
    PATHOLOGIES,
    check_rates,
    labels_of,
    sample_findings,
    write_report,
)

SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)  # fmt: skip
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
FAULT_KINDS = (
    "truncated_jpeg", "empty_file", "not_an_image", "empty_report", "report_without_images", "image_without_report",
)  # fmt: skip
TRUTH_FILE = "synth_truth.jsonl"
"""What each film shows, one JSON line per film (see `truth_rows` and docs/data_tools_corpus.md)."""
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}


@dataclass
class ImagePlan:
    dicom_id: str
    view: str
    height: int
    width: int
    seed: int
    fault: str | None = None


@dataclass
class StudyPlan:
    subject_id: int
    study_id: int
    split: str
    date: str
    time: str
    findings: dict[str, dict[str, Any]]
    report: str | None
    images: list[ImagePlan] = field(default_factory=list)
    fault: str | None = None

    @property
    def folder(self) -> str:
        return f"files/p{str(self.subject_id)[:2]}/p{self.subject_id}/s{self.study_id}"


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))


def _unique(rng: np.random.Generator, low: int, high: int, taken: set[int]) -> int:
    while True:
        value = int(rng.integers(low, high))
        if value not in taken:
            taken.add(value)
            return value


def _views(rng: np.random.Generator, lateral_fraction: float) -> list[str]:
    if rng.random() < 0.25:
        return ["AP", "LATERAL"] if rng.random() < lateral_fraction * 0.15 else ["AP"]
    if rng.random() < lateral_fraction:
        return ["PA", "LATERAL", "LATERAL"] if rng.random() < 0.1 else ["PA", "LATERAL"]
    return ["PA"]


def _image(rng: np.random.Generator, view: str, min_size: int, max_size: int) -> ImagePlan:
    """Film sizes: the longer (vertical) side in [min_size, max_size], portrait aspect 1.0-1.25."""
    height = int(rng.integers(min_size, max_size + 1))
    width = round(height / rng.uniform(1.0, 1.25))
    return ImagePlan(_dicom_id(rng), view, height, width, int(rng.integers(2**62)))


def plan_corpus(
    studies: int,
    seed: int,
    *,
    min_size: int,
    max_size: int,
    lateral_fraction: float,
    with_faults: bool,
    eval_fraction: float = 0.1,
    normal_rate: float = DEFAULT_NORMAL_RATE,
    negation_rates: dict[str, float] | None = None,
) -> list[StudyPlan]:
    """Decide every patient, study, label, report and film (not the pixels) from the seed."""
    negation_rates = check_rates(normal_rate, negation_rates)
    rng = np.random.default_rng(seed)
    subjects: list[tuple[int, str, int]] = []  # (subject_id, sex, number of studies)
    taken_subjects: set[int] = set()
    remaining = studies
    while remaining > 0:
        n = min(remaining, int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15])))
        subjects.append((_unique(rng, 10_000_000, 20_000_000, taken_subjects), "MF"[int(rng.integers(2))], n))
        remaining -= n
    # Split by patient, ~80/10/10 by default (eval_fraction of the patients in each of validate and test), with at
    # least one patient in validate and test once there are three.
    order = rng.permutation(len(subjects))
    n_eval = max(1, round(eval_fraction * len(subjects))) if len(subjects) >= 3 else 0
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[subjects[idx][0]] = "validate" if rank < n_eval else "test" if rank < 2 * n_eval else "train"

    taken_studies: set[int] = set()
    plans: list[StudyPlan] = []
    for subject_id, sex, n in sorted(subjects):
        year = 2110 + int(rng.integers(80))
        for k in range(n):
            views = _views(rng, lateral_fraction)
            findings = sample_findings(
                rng, portable=views[0] == "AP", normal_rate=normal_rate, negation_rates=negation_rates
            )
            report = write_report(findings, views, rng, sex)
            day = int(rng.integers(1, 28))
            plan = StudyPlan(
                subject_id=subject_id,
                study_id=_unique(rng, 50_000_000, 60_000_000, taken_studies),
                split=split_of[subject_id],
                date=f"{year + k:04d}{int(rng.integers(1, 13)):02d}{day:02d}",
                time=f"{int(rng.integers(24)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}.{int(rng.integers(1000)):03d}",
                findings=findings,
                report=report,
                images=[_image(rng, v, min_size, max_size) for v in views],
            )
            plans.append(plan)
    if with_faults:
        plans += _plan_faults(rng, plans, taken_studies, min_size, max_size)
    return plans


def _plan_faults(rng, plans: list[StudyPlan], taken: set[int], min_size: int, max_size: int) -> list[StudyPlan]:
    """One extra train study per fault kind, attached to existing train patients."""
    train = [p for p in plans if p.split == "train"] or plans
    out = []
    for i, kind in enumerate(FAULT_KINDS):
        base = train[i % len(train)]
        findings = sample_findings(rng, portable=False)
        # A repeat frontal film is the truncated one, so the default view filter still reaches it.
        views = ["PA", "PA"] if kind == "truncated_jpeg" else ["PA"]
        study = StudyPlan(
            subject_id=base.subject_id,
            study_id=_unique(rng, 50_000_000, 60_000_000, taken),
            split=base.split,
            date=base.date,
            time=base.time,
            findings=findings,
            report=write_report(findings, views, rng, "F"),
            images=[_image(rng, v, min_size, max_size) for v in views],
            fault=kind,
        )
        if kind in ("truncated_jpeg", "empty_file", "not_an_image"):
            study.images[-1].fault = kind
        elif kind == "empty_report":
            study.report = ""
        elif kind == "report_without_images":
            study.images = []
        elif kind == "image_without_report":
            study.report = None
        out.append(study)
    return out


def _render_job(job: tuple[int, str, dict, ImagePlan]) -> tuple[int, int, dict[str, list[list[int]]]]:
    """Render one film and write it to its path (runs in a worker process): `(job number, bytes, regions)`."""
    number, path, findings, im = job
    data, regions = render_with_regions(findings, im.view, im.height, im.width, im.seed)
    if im.fault == "truncated_jpeg":
        data = data[: len(data) * 2 // 5]
    elif im.fault == "empty_file":
        data = b""
    elif im.fault == "not_an_image":
        data = b"%PDF-1.4\nThis file is a scanned requisition form, not a radiograph.\n"
    Path(path).write_bytes(data)
    return number, len(data), regions


def _write_csv_gz(path: Path, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """A gzip CSV with a fixed header time and no file name in it, so equal rows give equal bytes."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(text.getvalue().encode("utf-8"))


def _label_cell(value: int | None) -> str:
    return "" if value is None else f"{float(value):.1f}"


def union_box(boxes: list[list[int]]) -> list[int] | None:
    """The smallest `[x0, y0, x1, y1]` holding every box (None for none)."""
    if not boxes:
        return None
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def film_truth(drawn: dict[str, dict], boxes: dict[str, list[list[int]]]) -> dict[str, dict[str, Any]]:
    """The `truth` of one film (shard_format.TRUTH_DOC), in the film's own pixels.

    Args:
        drawn: the findings this film draws (name -> the study's entry, with its ``side`` when it has one).
        boxes: where each was drawn, as `render_with_regions` returns them (one box per drawn part).
    """
    truth: dict[str, dict[str, Any]] = {}
    for name in CHEXPERT_LABELS:
        if name == "No Finding":
            continue
        present = name in drawn
        truth[name] = {
            "present": present,
            "side": drawn[name].get("side") if present else None,
            "box": union_box(boxes.get(name, [])) if present else None,
        }
    normal = not any(truth[name]["present"] for name in PATHOLOGIES)
    truth["No Finding"] = {"present": normal, "side": None, "box": None}
    return {name: truth[name] for name in CHEXPERT_LABELS}


def truth_rows(plans: list[StudyPlan], regions: list[dict]) -> list[dict]:
    """One `synth_truth.jsonl` row per film, in plan order (`regions`: by film, as `render_with_regions`)."""
    rows = []
    films = [(study, im) for study in plans for im in study.images]
    for number, (st, im) in enumerate(films):
        drawn = {
            name: dict(st.findings[name])
            for name in CHEXPERT_LABELS
            if name in DRAWN_IN_VIEW[im.view] and st.findings.get(name, {}).get("state") in (1, -1)
        }
        rows.append({
            "path": f"{st.folder}/{im.dicom_id}.jpg", "dicom_id": im.dicom_id, "subject_id": str(st.subject_id),
            "study_id": str(st.study_id), "split": st.split, "view": im.view, "width": im.width,
            "height": im.height, "fault": im.fault or st.fault, "labels": labels_of(st.findings), "drawn": drawn,
            "boxes": regions[number], "truth": film_truth(drawn, regions[number]),
        })  # fmt: skip
    return rows


def _write_truth(path: Path, plans: list[StudyPlan], regions: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in truth_rows(plans, regions):
            f.write(json.dumps(row) + "\n")


def _prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the corpus")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "synth_corpus.json").is_file():
            raise ValueError(
                f"--out {out} is not empty and holds no synth_corpus.json; give a new or empty folder"
            )
        # a previous synthetic corpus: regenerate it in place, and say so (it used to go without a word)
        print(f"synth_corpus: replacing the synthetic corpus in {out}", file=sys.stderr, flush=True)
        shutil.rmtree(out / "files", ignore_errors=True)
        for name in ("synth_faults.json", "synth_corpus.json", TRUTH_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate_corpus(
    out: str | Path,
    studies: int,
    seed: int,
    *,
    with_faults: bool = False,
    min_size: int = 320,
    max_size: int = 640,
    lateral_fraction: float = 0.6,
    eval_fraction: float = 0.1,
    normal_rate: float = DEFAULT_NORMAL_RATE,
    negation_rates: dict[str, float] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a synthetic MIMIC-CXR-JPG corpus to ``out`` and return its summary.

    Args:
        out: the corpus root (created; a previous synthetic corpus there is replaced).
        studies: number of regular studies (fault studies come on top).
        seed: the seed of every random choice; same arguments -> byte-identical files.
        with_faults: add one broken input of each kind in `FAULT_KINDS`, listed in synth_faults.json.
        min_size, max_size: range of the longer (vertical) side of the films in pixels.
        lateral_fraction: share of PA studies that also have a lateral film.
        eval_fraction: share of the patients in each of the validate and test splits (the rest train).
        normal_rate: share of studies with no pathology ("No Finding"), `reports.DEFAULT_NORMAL_RATE` by default.
        negation_rates: per finding, how often a report rules it out in words when the study does not have it
            (`reports.DEFAULT_NEGATION_RATES`, which names left out here keep).
        workers: processes rendering films; the output does not depend on it.
        progress: show a tqdm bar.

    Returns:
        {"out", "seed", "patients", "studies", "images", "splits": {split: {"patients", "studies",
        "images"}}, "prevalence": {label: share of regular studies labelled 1}, "faults": [...],
        "bytes", "seconds"}.
    """
    if studies < 1:
        raise ValueError(f"--studies must be at least 1, got {studies}")
    if not 32 <= min_size <= max_size:
        raise ValueError(f"image sizes need 32 <= min_size <= max_size, got {min_size}..{max_size}")
    if not 0.0 <= lateral_fraction <= 1.0:
        raise ValueError(f"lateral_fraction must be in [0, 1], got {lateral_fraction}")
    if not 0.0 < eval_fraction < 0.5:
        raise ValueError(f"eval_fraction must be in (0, 0.5), got {eval_fraction}")
    start = time.perf_counter()
    out = Path(out)
    _prepare_output(out)
    negation_rates = check_rates(normal_rate, negation_rates)
    plans = plan_corpus(studies, seed, min_size=min_size, max_size=max_size, lateral_fraction=lateral_fraction,
                        with_faults=with_faults, eval_fraction=eval_fraction, normal_rate=normal_rate,
                        negation_rates=negation_rates)  # fmt: skip

    jobs = []
    for st in plans:
        folder = out / st.folder
        if st.images:
            folder.mkdir(parents=True, exist_ok=True)
        if st.report is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{folder}.txt").write_text(st.report, encoding="utf-8")
        jobs += [
            (len(jobs) + k, str(folder / f"{im.dicom_id}.jpg"), st.findings, im) for k, im in enumerate(st.images)
        ]

    bar = tqdm(total=len(jobs), desc="synth films", unit="img", disable=not progress)
    total_bytes = 0
    regions: list[dict] = [{}] * len(jobs)  # by job number: the order does not depend on the workers
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for number, n, drawn in pool.imap_unordered(_render_job, jobs, chunksize=4):
                total_bytes += n
                regions[number] = drawn
                bar.update()
    else:
        for job in jobs:
            number, n, drawn = _render_job(job)
            total_bytes += n
            regions[number] = drawn
            bar.update()
    bar.close()
    _write_truth(out / TRUTH_FILE, plans, regions)

    split_rows, meta_rows, chex_rows = [], [], []
    for st in plans:
        views = [im.view for im in st.images]
        desc = ("CHEST (PORTABLE AP)" if views and views[0] == "AP"
                else "CHEST (PA AND LAT)" if "LATERAL" in views else "CHEST (SINGLE VIEW)")  # fmt: skip
        for im in st.images:
            split_rows.append((im.dicom_id, st.study_id, st.subject_id, st.split))
            meta_rows.append((im.dicom_id, st.subject_id, st.study_id, desc, im.view, im.height, im.width, st.date,
                              st.time, desc, _VIEW_MEANING[im.view], "Recumbent" if im.view == "AP" else "Erect"))  # fmt: skip
        if st.report:
            labels = labels_of(st.findings)
            chex_rows.append((st.subject_id, st.study_id, *(_label_cell(labels[n]) for n in CHEXPERT_LABELS)))
    _write_csv_gz(out / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, split_rows)
    _write_csv_gz(out / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta_rows)
    _write_csv_gz(out / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_COLUMNS, chex_rows)

    faults = []
    for st in plans:
        if st.fault in ("truncated_jpeg", "empty_file", "not_an_image"):
            path = f"{st.folder}/{st.images[-1].dicom_id}.jpg"
        elif st.fault == "image_without_report":
            path = f"{st.folder}/{st.images[0].dicom_id}.jpg"
        elif st.fault in ("empty_report", "report_without_images"):
            path = f"{st.folder}.txt"
        else:
            continue
        dicom_ids = [im.dicom_id for im in st.images]
        faults.append({"kind": st.fault, "path": path, "subject_id": st.subject_id, "study_id": st.study_id,
                       "dicom_ids": dicom_ids})  # fmt: skip
    if with_faults:
        (out / "synth_faults.json").write_text(json.dumps(faults, indent=2) + "\n", encoding="utf-8")

    summary = _summarise(plans, seed)
    summary["faults"] = faults
    summary["bytes"] = total_bytes
    args = {"studies": studies, "seed": seed, "with_faults": with_faults, "min_size": min_size,
            "max_size": max_size, "lateral_fraction": lateral_fraction, "eval_fraction": eval_fraction,
            "normal_rate": normal_rate, "negation_rates": negation_rates}  # fmt: skip
    (out / "synth_corpus.json").write_text(json.dumps({"args": args, "summary": summary}, indent=2) + "\n")
    summary["out"] = str(out)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _summarise(plans: list[StudyPlan], seed: int) -> dict[str, Any]:
    regular = [p for p in plans if p.fault is None]
    splits = {}
    for split in SPLITS:
        sts = [p for p in regular if p.split == split]
        splits[split] = {"patients": len({p.subject_id for p in sts}), "studies": len(sts),
                         "images": sum(len(p.images) for p in sts)}  # fmt: skip
    prevalence = {}
    for name in CHEXPERT_LABELS:
        states = [labels_of(p.findings)[name] for p in regular]
        prevalence[name] = round(sum(s == 1 for s in states) / max(1, len(states)), 4)
    return {
        "seed": seed,
        "patients": len({p.subject_id for p in regular}),
        "studies": len(regular),
        "images": sum(len(p.images) for p in regular),
        "splits": splits,
        "prevalence": prevalence,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable table of a `generate_corpus` summary."""
    lines = [f"corpus {summary.get('out', '')}: {summary['patients']} patients, {summary['studies']} studies, "
             f"{summary['images']} images, {summary['bytes'] / 1e6:.1f} MB in {summary.get('seconds', 0):.1f} s"]  # fmt: skip
    lines.append(f"{'split':<10}{'patients':>10}{'studies':>10}{'images':>10}")
    for split, row in summary["splits"].items():
        lines.append(f"{split:<10}{row['patients']:>10}{row['studies']:>10}{row['images']:>10}")
    lines.append("label prevalence (share of studies labelled 1):")
    for name, share in summary["prevalence"].items():
        lines.append(f"  {name:<28}{share:>7.1%}")
    if summary["faults"]:
        lines.append(f"faults ({len(summary['faults'])}, listed in synth_faults.json):")
        lines += [f"  {f['kind']:<24}{f['path']}" for f in summary["faults"]]
    return "\n".join(lines)
