"""The synthetic MIMIC-CXR-JPG corpus: layout, CSVs, determinism, report <-> label agreement,
findings visible in the films, and the broken inputs of --with-faults."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from data_tools.shard_format import CHEXPERT_LABELS
from data_tools.synth.corpus import FAULT_KINDS, METADATA_COLUMNS, generate_corpus, plan_corpus
from data_tools.synth.images import DRAWN_IN_VIEW, render_radiograph, render_with_regions
from data_tools.synth.reports import labels_of
from data_tools.synth_corpus import main

STUDIES, SEED = 70, 7

# Independent of the generator's phrase lists: how a reader (or a CheXpert-style labeller) finds a
# mention, a negation and a hedge in a sentence.
KEYWORDS = {
    "Atelectasis": r"atelecta",
    "Cardiomegaly": r"cardiomegaly|heart size|heart is|cardiac silhouette",
    "Consolidation": r"consolidat",
    "Edema": r"edema",
    "Enlarged Cardiomediastinum": r"mediastin",
    "Fracture": r"fracture",
    "Lung Lesion": r"nodule|\bmass\b",
    "Lung Opacity": r"opacit",
    "No Finding": r"no acute cardiopulmonary",
    "Pleural Effusion": r"effusion",
    "Pleural Other": r"pleural thickening|apical cap",
    "Pneumonia": r"pneumonia",
    "Pneumothorax": r"pneumothorax",
    "Support Devices": r"\btubes?\b|catheter|\blines?\b|pacemaker",
}
NEGATION = re.compile(r"\bno\b|\bnormal\b|\bwithout\b")
HEDGE = re.compile(r"possible|cannot be excluded|cannot exclude|questionable|\bmay\b|\bmight\b|\bcould\b")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    summary = generate_corpus(out, STUDIES, SEED, with_faults=True)
    return out, summary


def read_csv_gz(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def faults_of(root: Path) -> dict[str, dict]:
    return {f["kind"]: f for f in json.loads((root / "synth_faults.json").read_text())}


def report_body(text: str) -> str:
    """The FINDINGS / IMPRESSION part of a report, on one line."""
    match = re.search(r"^ *(FINDINGS|IMPRESSION)", text, flags=re.M)
    assert match, f"no FINDINGS or IMPRESSION section in:\n{text}"
    return " ".join(text[match.start() :].split()).lower()


def test_layout_and_csvs(corpus):
    root, summary = corpus
    faults = faults_of(root)
    _, split_rows = read_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz")
    meta_cols, meta_rows = read_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    chex_cols, chex_rows = read_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    split_cols = read_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz")[0]
    assert split_cols == ["dicom_id", "study_id", "subject_id", "split"]
    assert meta_cols == list(METADATA_COLUMNS) and "ViewPosition" in meta_cols and "Rows" in meta_cols
    assert chex_cols == ["subject_id", "study_id", *CHEXPERT_LABELS]

    jpgs = sorted(root.glob("files/p*/p*/s*/*.jpg"))
    assert len(jpgs) == len(split_rows) == len(meta_rows) == summary["images"] + 6  # fault films: 2+1+1+1+0+1
    path_re = re.compile(r"files/p(\d\d)/p(\d{8})/s(\d{8})/([0-9a-f]{8}(-[0-9a-f]{8}){4})\.jpg")
    by_dicom = {r["dicom_id"]: r for r in split_rows}
    for jpg in jpgs:
        m = path_re.fullmatch(str(jpg.relative_to(root)))
        assert m, jpg
        assert m.group(2).startswith(m.group(1))
        row = by_dicom[m.group(4)]
        assert (row["subject_id"], row["study_id"]) == (m.group(2), m.group(3))

    # Several studies per patient, 1-3 films per study, PA/AP and LATERAL views.
    per_study: dict[str, list[str]] = {}
    for r in meta_rows:
        per_study.setdefault(r["study_id"], []).append(r["ViewPosition"])
    assert {len(v) for v in per_study.values()} <= {1, 2, 3} and {1, 2} <= {len(v) for v in per_study.values()}
    assert {r["ViewPosition"] for r in meta_rows} == {"PA", "AP", "LATERAL"}
    studies_per_subject = {}
    for r in chex_rows:
        studies_per_subject.setdefault(r["subject_id"], set()).add(r["study_id"])
    assert max(len(s) for s in studies_per_subject.values()) >= 2

    # Splits by patient, roughly 80/10/10, each big enough to evaluate on.
    split_of_subject: dict[str, set[str]] = {}
    for r in split_rows:
        split_of_subject.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_subject.values()), "a patient spans two splits"
    counts = summary["splits"]
    assert set(counts) == {"train", "validate", "test"}
    assert counts["validate"]["patients"] >= 3 and counts["test"]["patients"] >= 3
    assert counts["train"]["patients"] > 5 * counts["validate"]["patients"] * 0.8

    # Every regular film decodes at the size the metadata gives; every regular study has a report.
    broken = {faults[k]["path"] for k in ("truncated_jpeg", "empty_file", "not_an_image")}
    meta_by_dicom = {r["dicom_id"]: r for r in meta_rows}
    for jpg in jpgs[:40]:
        if str(jpg.relative_to(root)) in broken:
            continue
        with Image.open(jpg) as im:
            assert im.mode == "L" and im.format == "JPEG"
            row = meta_by_dicom[jpg.stem]
            assert im.size == (int(row["Columns"]), int(row["Rows"]))
            assert 320 <= max(im.size) <= 640
    # Label values are exactly 1.0 / 0.0 / -1.0 / blank; No Finding is never 0.
    values = {r[name] for r in chex_rows for name in CHEXPERT_LABELS}
    assert values == {"1.0", "0.0", "-1.0", ""}
    assert {r["No Finding"] for r in chex_rows} <= {"1.0", ""}


def check_report_against_labels(text: str, labels: dict[str, str], where: str) -> str:
    """Assert that ``text`` states, hedges, negates or leaves out each finding as ``labels`` say.

    Returns the report's section shape.
    """
    assert text.lstrip().startswith("FINAL REPORT") and "INDICATION:" in text and "___" in text, where
    has_f, has_i = " FINDINGS: " in text, " IMPRESSION: " in text
    shape = ("combined" if "FINDINGS AND IMPRESSION:" in text else "findings+impression" if has_f and has_i
             else "findings_only" if has_f else "impression_only")  # fmt: skip
    sentences = re.split(r"(?<=\.)\s+", report_body(text))
    for name in CHEXPERT_LABELS:
        value = labels[name]
        mentions = [s for s in sentences if re.search(KEYWORDS[name], s)]
        stated = [s for s in mentions if not NEGATION.search(s) and not HEDGE.search(s)]
        context = f"{name}={value!r} in {where}:\n{text}"
        if name == "No Finding":
            assert bool(mentions) == (value == "1.0"), context
        elif value == "1.0":
            assert stated, context
        elif value == "-1.0":
            assert not stated and any(HEDGE.search(s) for s in mentions), context
        elif value == "0.0":
            assert not stated and any(NEGATION.search(s) for s in mentions), context
        else:
            assert value == "" and not mentions, context
    return shape


def test_reports_agree_with_labels_in_the_written_corpus(corpus):
    root, _ = corpus
    _, chex_rows = read_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert len(chex_rows) >= STUDIES
    for row in chex_rows:
        path = root / f"files/p{row['subject_id'][:2]}/p{row['subject_id']}/s{row['study_id']}.txt"
        check_report_against_labels(path.read_text(), row, str(path))


def test_reports_agree_with_labels_over_many_planned_studies():
    """Planning (labels + reports, no pixels) is cheap: check 1,500 studies for every label state."""
    plans = plan_corpus(1500, 11, min_size=320, max_size=640, lateral_fraction=0.6, with_faults=False)
    shapes: dict[str, int] = {}
    seen = {name: set() for name in CHEXPERT_LABELS}
    for plan in plans:
        labels = {k: "" if v is None else f"{float(v):.1f}" for k, v in labels_of(plan.findings).items()}
        shape = check_report_against_labels(plan.report, labels, f"study {plan.study_id}")
        shapes[shape] = shapes.get(shape, 0) + 1
        for name, value in labels.items():
            seen[name].add(value)
    assert set(shapes) == {"findings+impression", "findings_only", "impression_only", "combined"}
    assert shapes["findings+impression"] > 0.5 * len(plans)
    for name in CHEXPERT_LABELS:
        expected = {"1.0", ""} if name == "No Finding" else {"1.0", "0.0", ""}
        assert expected <= seen[name], (name, seen[name])
    for name in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Edema", "Consolidation", "Pneumonia"):
        assert "-1.0" in seen[name], name


def test_laterality_and_sizes_in_text(corpus):
    root, _ = corpus
    texts = [p.read_text() for p in sorted(root.glob("files/p*/p*/s*.txt"))]
    body = " ".join(report_body(t) for t in texts if t.strip())
    assert re.search(r"\b(left|right)\b[^.]*effusion", body)
    assert re.search(r"\d\.\d cm (nodule|mass)", body)
    assert re.search(r"(small|moderate|large) (left|right|bilateral)", body)


def _gray(findings: dict, view: str = "PA", seed: int = 0, h: int = 480, w: int = 400) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render_radiograph(findings, view, h, w, seed))), dtype=np.float32)


def heart_width(img: np.ndarray) -> float:
    """Width of the bright run around the midline at heart level, as a share of the image width."""
    h, w = img.shape
    prof = img[int(0.52 * h) : int(0.60 * h)].mean(0)
    lung = np.median(np.r_[prof[int(0.18 * w) : int(0.26 * w)], prof[int(0.74 * w) : int(0.82 * w)]])
    above = prof > (lung + prof[w // 2]) / 2
    left = right = w // 2
    while left > 0 and above[left - 1]:
        left -= 1
    while right < w - 1 and above[right + 1]:
        right += 1
    return (right - left + 1) / w


def region(img: np.ndarray, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    h, w = img.shape
    return img[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_findings_are_visible_against_the_same_film_without_them(seed):
    normal = _gray({}, seed=seed)
    # Cardiomegaly: a measurably wider heart shadow (cardiothoracic-ratio-like width).
    cm = _gray({"Cardiomegaly": {"state": 1, "severity": "moderate"}}, seed=seed)
    assert heart_width(cm) > 1.25 * heart_width(normal)
    assert 0.2 < heart_width(normal) < 0.36
    # Left effusion: the left base (image right) is brighter, the right base unchanged.
    eff = _gray({"Pleural Effusion": {"state": 1, "side": "left", "size": "moderate"}}, seed=seed)
    left_base, right_base = (0.62, 0.74, 0.62, 0.82), (0.62, 0.74, 0.18, 0.38)
    assert region(eff, *left_base).mean() > region(normal, *left_base).mean() + 25
    assert abs(region(eff, *right_base).mean() - region(normal, *right_base).mean()) < 2
    # An uncertain effusion is drawn, but fainter.
    unc = _gray({"Pleural Effusion": {"state": -1, "side": "left", "size": "small"}}, seed=seed)
    assert region(normal, *left_base).mean() < region(unc, *left_base).mean() < region(eff, *left_base).mean()
    # Right pneumothorax: a dark rim along the right (image left) chest wall, from the apex down.
    ptx = _gray({"Pneumothorax": {"state": 1, "side": "right", "size": "large"}}, seed=seed)
    rim = (normal - ptx) > 15
    ys, xs = np.nonzero(rim)
    assert len(ys) > 1500 and xs.mean() < 0.3 * normal.shape[1] and ys.mean() < 0.6 * normal.shape[0]
    assert ptx[rim].mean() < 0.6 * normal[rim].mean()
    # A 4 cm mass in the left upper lobe: a bright round opacity there and nowhere else.
    mass = _gray({"Lung Lesion": {"state": 1, "side": "left", "zone": "upper", "size_cm": 4.0}}, seed=seed)
    diff = mass - normal
    ys, xs = np.nonzero(diff > 30)
    assert len(ys) > 200 and xs.mean() > 0.6 * normal.shape[1] and ys.mean() < 0.4 * normal.shape[0]
    # Bilateral edema: perihilar haze on both sides.
    edema = _gray({"Edema": {"state": 1, "severity": "severe"}}, seed=seed)
    for hilum in ((0.38, 0.50, 0.25, 0.35), (0.38, 0.50, 0.65, 0.75)):
        assert region(edema, *hilum).mean() > region(normal, *hilum).mean() + 15
    # Support devices: bright tubes.
    dev = _gray({"Support Devices": {"state": 1, "devices": ["ett", "ngt"]}}, seed=seed)
    assert (dev - normal > 60).sum() > 300 and dev.max() > normal.max() + 20
    # A right rib fracture changes the right hemithorax only.
    fx = _gray({"Fracture": {"state": 1, "side": "right", "rib": 6}}, seed=seed)
    changed = np.nonzero(np.abs(fx - normal) > 8)
    assert len(changed[1]) > 20 and changed[1].max() < 0.5 * normal.shape[1]


def test_lateral_view_shows_effusion_and_cardiomegaly():
    normal = _gray({}, view="LATERAL")
    eff = _gray({"Pleural Effusion": {"state": 1, "side": "bilateral", "size": "large"}}, view="LATERAL")
    assert region(eff, 0.55, 0.72, 0.55, 0.78).mean() > region(normal, 0.55, 0.72, 0.55, 0.78).mean() + 20
    cm = _gray({"Cardiomegaly": {"state": 1, "severity": "severe"}}, view="LATERAL")
    assert (cm - normal > 20).sum() > 500


def test_findings_visible_across_the_corpus(corpus):
    """In the generated corpus itself, positives differ from negatives in the frontal films."""
    root, _ = corpus
    _, meta = read_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    _, chex = read_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    labels = {r["study_id"]: r for r in chex}
    broken = {Path(f["path"]).stem for f in faults_of(root).values()}
    widths = {"1.0": [], "neg": []}
    for r in meta:
        if r["ViewPosition"] != "PA" or r["dicom_id"] in broken or r["study_id"] not in labels:
            continue
        path = root / f"files/p{r['subject_id'][:2]}/p{r['subject_id']}/s{r['study_id']}/{r['dicom_id']}.jpg"
        value = labels[r["study_id"]]["Cardiomegaly"]
        if value in ("1.0", "0.0", ""):
            widths["1.0" if value == "1.0" else "neg"].append(
                heart_width(np.asarray(Image.open(path), np.float32))
            )
    assert len(widths["1.0"]) >= 3 and len(widths["neg"]) >= 10, {k: len(v) for k, v in widths.items()}
    assert np.mean(widths["1.0"]) > np.mean(widths["neg"]) + 0.05
    assert np.min(widths["1.0"]) > np.median(widths["neg"])


def test_faults_are_present_and_broken(corpus):
    root, summary = corpus
    faults = faults_of(root)
    assert set(faults) == set(FAULT_KINDS)
    assert {f["kind"] for f in summary["faults"]} == set(FAULT_KINDS)
    truncated = root / faults["truncated_jpeg"]["path"]
    assert truncated.read_bytes()[:2] == b"\xff\xd8" and not truncated.read_bytes().endswith(b"\xff\xd9")
    with pytest.raises(OSError):
        with Image.open(truncated) as im:
            im.load()
    assert (root / faults["empty_file"]["path"]).stat().st_size == 0
    with pytest.raises(UnidentifiedImageError):
        Image.open(root / faults["not_an_image"]["path"])
    assert (root / faults["empty_report"]["path"]).read_text() == ""
    assert any((root / faults["empty_report"]["path"]).with_suffix("").glob("*.jpg"))
    report_only = root / faults["report_without_images"]["path"]
    assert report_only.read_text().strip() and not report_only.with_suffix("").exists()
    image_only = root / faults["image_without_report"]["path"]
    assert image_only.is_file() and not image_only.parent.with_suffix(".txt").exists()
    # The truncated film's study still has a good film next to it, which must be kept by build_shards.
    good = [p for p in truncated.parent.glob("*.jpg") if p != truncated]
    assert len(good) == 1 and Image.open(good[0]).size[0] > 0


def test_truth_file_says_what_each_film_draws_and_where(corpus):
    root, summary = corpus
    rows = [json.loads(line) for line in (root / "synth_truth.jsonl").read_text().splitlines()]
    assert len(rows) == len(list(root.glob("files/p*/p*/s*/*.jpg")))
    assert sum(row["fault"] is None for row in rows) == summary["images"]
    _, chexpert = read_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    labels = {r["study_id"]: r for r in chexpert}
    sided = 0
    for row in rows:
        assert (root / row["path"]).is_file() and row["path"].endswith(row["dicom_id"] + ".jpg")
        if row["fault"] is not None:
            continue
        with Image.open(root / row["path"]) as img:
            assert img.size == (row["width"], row["height"])
        assert set(row["drawn"]) <= DRAWN_IN_VIEW[row["view"]] and set(row["boxes"]) == set(row["drawn"])
        for name, entry in row["drawn"].items():
            assert entry["state"] in (1, -1) and labels[row["study_id"]][name] == f"{float(entry['state']):.1f}"
            assert row["labels"][name] == entry["state"]
            for x0, y0, x1, y1 in row["boxes"][name]:
                assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
            if row["view"] != "LATERAL" and entry.get("side") in ("left", "right"):
                (x0, _, x1, _), *_ = row["boxes"][name]  # the patient's left is on the image's right
                assert ((x0 + x1) / 2 > row["width"] / 2) == (entry["side"] == "left"), (row, name)
                sided += 1
        for name in DRAWN_IN_VIEW[row["view"]] - set(row["drawn"]):
            assert labels[row["study_id"]][name] in ("", "0.0")
    assert sided > 10


def test_regions_do_not_change_the_pixels():
    findings = {"Pleural Effusion": {"state": 1, "side": "bilateral", "size": "moderate"},
                "Support Devices": {"state": 1, "devices": ["ett", "pacemaker"], "ett_cm": 4.0}}  # fmt: skip
    for view in ("PA", "LATERAL"):
        jpeg, regions = render_with_regions(findings, view, 300, 260, 11)
        assert jpeg == render_radiograph(findings, view, 300, 260, 11)
        assert (
            len(regions["Pleural Effusion"]) == (2 if view == "PA" else 1) and len(regions["Support Devices"]) == 3
        )


def test_deterministic_and_independent_of_workers(tmp_path):
    kwargs = {"with_faults": True, "min_size": 128, "max_size": 256}
    one = generate_corpus(tmp_path / "one", 40, SEED, workers=1, **kwargs)
    two = generate_corpus(tmp_path / "two", 40, SEED, workers=2, **kwargs)
    hashes = tree_hashes(tmp_path / "one")
    assert len(hashes) > 100 and hashes == tree_hashes(tmp_path / "two")
    assert "synth_truth.jsonl" in hashes
    assert one["prevalence"] == two["prevalence"] and one["images"] == two["images"]
    generate_corpus(tmp_path / "other", 40, SEED + 1, **kwargs)
    assert tree_hashes(tmp_path / "other") != hashes


def test_cli_help_errors_and_no_overwrite(tmp_path, capsys):
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.synth_corpus", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--with-faults" in result.stdout
    assert main(["--out", str(tmp_path / "c"), "--studies", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--studies" in err[0]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["--out", str(foreign), "--studies", "2"]) == 2
    assert "not empty" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    assert main(["--out", str(tmp_path / "ok"), "--studies", "3", "--seed", "1"]) == 0
    assert "label prevalence" in capsys.readouterr().out
    # Rerunning over its own earlier output regenerates it in place, and says so.
    assert main(["--out", str(tmp_path / "ok"), "--studies", "2", "--seed", "1"]) == 0
    assert f"replacing the synthetic corpus in {tmp_path / 'ok'}" in capsys.readouterr().err
    # --workers 0 is refused, as build_shards refuses it (it used to be clamped to 1 here)
    assert main(["--out", str(tmp_path / "w"), "--studies", "2", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["synth_corpus: error: --workers 0 is below 1; give --workers >= 1"]
    assert not (tmp_path / "w").exists()
    assert len(list((tmp_path / "ok").glob("files/p*/p*/s*.txt"))) == 2


def test_findings_are_learnable_at_low_resolution(tmp_path):
    """A linear probe on 32x32 frontal films already predicts the main labels of held-out films."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import roc_auc_score

    root = tmp_path / "small"
    generate_corpus(root, 300, 3, min_size=96, max_size=128)
    _, meta = read_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    _, chex = read_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    _, split = read_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz")
    labels = {r["study_id"]: r for r in chex}
    split_of = {r["dicom_id"]: r["split"] for r in split}
    x, rows, train = [], [], []
    for r in meta:
        if r["ViewPosition"] == "LATERAL":
            continue
        path = root / f"files/p{r['subject_id'][:2]}/p{r['subject_id']}/s{r['study_id']}/{r['dicom_id']}.jpg"
        a = np.asarray(Image.open(path).resize((32, 32)), np.float32)
        x.append(((a - a.mean()) / (a.std() + 1e-6)).ravel())
        rows.append(labels[r["study_id"]])
        train.append(split_of[r["dicom_id"]] == "train")
    x, train = np.stack(x), np.array(train)
    # Held out: the validate + test patients and a fifth of the train patients' films, for enough positives.
    held = ~train | (np.arange(len(x)) % 5 == 0)
    for name, floor in (
        ("Cardiomegaly", 0.9),
        ("Pleural Effusion", 0.9),
        ("Support Devices", 0.8),
        ("No Finding", 0.8),
    ):
        y = np.array([row[name] == "1.0" for row in rows])
        assert y[~held].sum() >= 5 and y[held].sum() >= 3, name
        probe = RidgeClassifier(alpha=10.0).fit(x[~held], y[~held])
        auroc = roc_auc_score(y[held], probe.decision_function(x[held]))
        assert auroc > floor, (name, auroc)
