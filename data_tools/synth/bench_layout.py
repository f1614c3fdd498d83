"""Lay out a benchmark dataset's *download* for real ids with synthetic films: the real label rows of a few hundred
images (from the full public label tables, e.g. the ones torchxrayvision ships), written in the dataset's own
files and folders, each image a film drawn by `data_tools.synth.images` with the row's findings, and a finding
with a box painted as an opacity inside its (real) box. What the benchmark readers and ``mpma-benchmark`` are
tested on end to end, and what the demo benchmarks.

    python -m data_tools.synth.bench_layout --tables TABLE_DIR --out ROOT --images 200 [--vindr --siim ...]

``TABLE_DIR`` holds ``Data_Entry_2017_v2020.csv(.gz)``, ``BBox_List_2017.csv(.gz)``, ``chexpert_train.csv(.gz)``,
``kaggle_stage_2_train_labels.csv.zip`` (and, for the flags below, ``vinbigdata-train.csv.gz``,
``siim-pneumothorax-train-rle.csv.gz``, PadChest's table); ``ROOT/<id>/`` receives ``nih-cxr14``,
``chexpert-5x200`` and ``rsna-pneumonia``, and with

- ``--vindr`` ``vindr-cxr`` (`layout_vindr`: PhysioNet's ``annotations/annotations_{train,test}.csv`` and
  ``{train,test}/<image_id>.dicom`` for real Kaggle ids, every radiologist's row, each box scaled into the film,
  whose own pixels the reader takes VinDr boxes in; a few scans of each of the 14 findings, our test share);
- ``--siim`` ``siim-pneumothorax`` (`layout_siim`: the real ``train-rle.csv`` rows as read — the RLE stays over the
  released 1024 px frame the reader scales from — and DICOMs under ``dicom-images-train/<study>/<series>/``
  darkened inside the decoded mask);
- ``--chexpert`` ``chexpert`` (`layout_chexpert`: real rows of the training table, a fifth of the patients as our
  ``valid.csv``);
- ``--padchest`` ``padchest`` (`layout_padchest`: real rows of its table, which has no split);
- ``--covidx`` ``covidx`` (`layout_covidx`: COVIDx v8's files, made-up ids);
- ``--mimic`` ``mimic-5x200`` and ``ms-cxr`` (`layout_mimic`: a synthetic MIMIC-CXR-JPG corpus, credentialed data
  having no public ids, and MS-CXR's table of the boxes where the corpus drew each finding);
- ``--vqa`` ``vqa-rad`` and ``slake`` (`layout_vqa`: synthetic questions about synthetic films, in each set's own
  files).

``--per-label K`` adds K real rows of each NIH finding (so that each has positives to fine-tune on). The NIH test
list written is *ours* (the box images and a patient-hashed fifth of the others: the official list is not among the
tables); the RSNA DICOMs are 16-bit MONOCHROME2 CR files, plus pydicom-data's real chest CR under one real id when
pydicom-data is installed. Together the flags lay out every dataset of the ``cxr-full`` suite.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.benchmarks.chexpert import COMPETITION_LABELS, make_5x200
from data_tools.benchmarks.common import find_file, read_rows
from data_tools.benchmarks.covidx import THREE_CLASS
from data_tools.benchmarks.nih import NIH_LABELS
from data_tools.synth.corpus import generate_corpus
from data_tools.synth.images import render_radiograph
from data_tools.synth.vqa import generate_vqa

# NIH labels -> the synthetic renderer's CheXpert findings (those it can draw)
_NIH_DRAWN = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
              "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion", "Pneumonia": "Pneumonia",
              "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema"}  # fmt: skip


def _seed(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def film(
    findings: list[str], key: str, size: int, boxes: list[tuple[float, float, float, float]] = (),
    lucent: np.ndarray | None = None,
) -> Image.Image:  # fmt: skip
    """A grey ``size`` px film showing ``findings``, with an opacity painted inside each box (film pixels) and,
    where ``lucent`` ((S, S) in [0, 1]: a mask scaled to the film) is set, air darkening the film (a pneumothorax)."""
    jpeg = render_radiograph({f: {"state": 1} for f in findings}, "PA", size, size, _seed(key))
    img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for x0, y0, x1, y1 in boxes:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max(1.0, (x1 - x0) / 2), max(1.0, (y1 - y0) / 2)
        blob = np.clip(1.0 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2, 0, 1)  # (S, S) an ellipse in the box
        img = img + 110.0 * np.sqrt(blob)
    if lucent is not None:
        img = img * (1.0 - 0.75 * lucent)  # (S, S) no lung markings, near black where the mask covers the film
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")


def _table(tables: Path, *names: str) -> Path:
    found = find_file(tables, names)
    if found is None:
        raise FileNotFoundError(f"{tables}: no {' / '.join(names)} (plain, .gz or .zip)")
    return found


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def layout_nih(tables: Path, out: Path, n: int, size: int = 128, seed: int = 0, per_label: int = 0) -> Path:
    """``out/nih-cxr14``: every box image among the first ``n // 3`` of the box table and ``n`` - those other real
    rows, their Data_Entry rows, box rows, our split lists and ``images_001/images/*.png``; with ``per_label``, also
    that many seeded real rows of each of the 14 findings not already chosen (Hernia is 0.2 % of the table: a few
    hundred random rows hold none, and a fine-tuning protocol refuses a label without training positives)."""
    header, rows = read_rows(_table(tables, "Data_Entry_2017_v2020.csv"), ("Image Index", "Finding Labels"))
    all_rows = {r[0]: r for r in rows}
    bheader, brows = read_rows(_table(tables, "BBox_List_2017.csv"), ("Image Index",))
    brows = list(brows)
    boxed = list(dict.fromkeys(r[0] for r in brows))[: max(1, n // 3)]
    rng = np.random.default_rng(seed)
    others = [k for k in sorted(all_rows) if k not in set(boxed)]
    chosen = boxed + [others[i] for i in sorted(rng.choice(len(others), n - len(boxed), replace=False).tolist())]
    for label in NIH_LABELS if per_label else ():
        have = sum(label in all_rows[k][1].split("|") for k in chosen if k not in set(boxed))  # boxed: test
        pool = [k for k in others if label in all_rows[k][1].split("|") and k not in set(chosen)]
        take = rng.choice(len(pool), min(len(pool), max(0, per_label - have)), replace=False).tolist()
        chosen += [pool[i] for i in sorted(take)]
    root = out / "nih-cxr14"
    _write_csv(root / "Data_Entry_2017_v2020.csv", header, [all_rows[k] for k in chosen])
    keep = [r for r in brows if r[0] in set(boxed)]
    _write_csv(root / "BBox_List_2017.csv", bheader, keep)
    # patient-wise, as the official lists: the box images' patients and a hashed fifth of the others
    test_patients = {all_rows[k][3] for k in boxed}
    test = {k for k in chosen if all_rows[k][3] in test_patients or _seed(all_rows[k][3]) % 5 == 0}
    (root / "test_list.txt").write_text("".join(f"{k}\n" for k in chosen if k in test))
    (root / "train_val_list.txt").write_text("".join(f"{k}\n" for k in chosen if k not in test))
    boxes: dict[str, list] = {}
    for r in keep:
        x, y, w, h = (float(v) * size / 1024 for v in r[2:6])
        boxes.setdefault(r[0], []).append((x, y, x + w, y + h))
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for k in chosen:
        found = sorted({_NIH_DRAWN[f] for f in all_rows[k][1].split("|") if f in _NIH_DRAWN})
        film(found, k, size, boxes.get(k, [])).save(folder / k)
    return root


def layout_chexpert_5x200(tables: Path, out: Path, per_class: int = 40, size: int = 128, seed: int = 0) -> Path:
    """``out/chexpert-5x200``: GLoRIA's 5x200 rule over the real training table (``per_class`` of each class),
    ``chexpert_5x200.csv`` and the films at their ``CheXpert-v1.0-small/train/...`` paths."""
    rows = make_5x200(_table(tables, "chexpert_train.csv"), seed=seed, per_class=per_class)
    root = out / "chexpert-5x200"
    _write_csv(root / "chexpert_5x200.csv", ["Path", *COMPETITION_LABELS],
               [[r["Path"], *(f"{r[c]:.1f}" for c in COMPETITION_LABELS)] for r in rows])  # fmt: skip
    for r in rows:
        path = root / r["Path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        cls = next(c for c in COMPETITION_LABELS if r[c] == 1.0)
        film([cls], r["Path"], size).save(path, quality=92)
    return root


def layout_chexpert(tables: Path, out: Path, n: int, size: int = 128, seed: int = 0) -> Path:
    """``out/chexpert``: ``CheXpert-v1.0-small/train.csv`` and ``valid.csv`` holding the real rows (every view) of
    seeded patients of the training table until ``n`` frontal films, a fifth of the patients (hashed) in
    ``valid.csv`` — the released validation labels are not among the tables —, and a film at each row's ``Path``
    showing its positive findings."""
    table = _table(tables, "chexpert_train.csv", "train.csv")
    header, rows = read_rows(table, ("Path", "Frontal/Lateral", *COMPETITION_LABELS))
    col = {h: i for i, h in enumerate(header)}
    by_patient: dict[str, list[list[str]]] = {}
    for r in rows:
        by_patient.setdefault(next(p for p in Path(r[col["Path"]]).parts if p.startswith("patient")), []).append(r)
    order = sorted(by_patient)
    chosen: list[str] = []
    frontal = 0
    for i in np.random.default_rng(seed).permutation(len(order)).tolist():
        if frontal >= n:
            break
        chosen.append(order[i])
        frontal += sum(r[col["Frontal/Lateral"]] == "Frontal" for r in by_patient[order[i]])
    root = out / "chexpert"
    valid = {p for p in chosen if _seed(p) % 5 == 0}
    for name, part in (("train.csv", [p for p in chosen if p not in valid]), ("valid.csv", sorted(valid))):
        _write_csv(root / "CheXpert-v1.0-small" / name, header, [r for p in sorted(part) for r in by_patient[p]])
    drawable = set(_NIH_DRAWN.values())
    for p in chosen:
        for r in by_patient[p]:
            found = [c for c in header if c in drawable and r[col[c]].strip() == "1.0"]
            path = root / r[col["Path"]]
            path.parent.mkdir(parents=True, exist_ok=True)
            film(found, r[col["Path"]], size).save(path, quality=92)
    return root


def layout_mimic(out: Path, studies: int = 120, size: int = 128, seed: int = 0) -> dict[str, Path]:
    """``out/mimic-5x200``: a synthetic MIMIC-CXR-JPG corpus of ``studies`` frontal studies with reports
    (`data_tools.synth.corpus`; MIMIC-CXR is credentialed: no real ids), a third of its patients in validate and
    test; and ``out/ms-cxr``: ``MS_CXR_Local_Alignment_v1.1.0.csv`` with a row per box of each MS-CXR finding
    where the corpus drew it (its ``synth_truth.jsonl``; the phrase its side and name), over copies of those films
    at their MIMIC paths."""
    from data_tools.benchmarks.ms_cxr import MS_CXR_LABELS

    corpus = out / "mimic-5x200"
    generate_corpus(corpus, studies, seed, min_size=size, max_size=size + size // 4, lateral_fraction=0.0,
                    eval_fraction=0.3)  # fmt: skip
    root = out / "ms-cxr"
    rows = []
    for line in (corpus / "synth_truth.jsonl").read_text(encoding="utf-8").splitlines():
        t = json.loads(line)
        for name in MS_CXR_LABELS:
            side = (t["drawn"].get(name) or {}).get("side")
            phrase = f"{side} {name.lower()}" if side else name.lower()
            for x0, y0, x1, y1 in t["boxes"].get(name, []) if name in t["drawn"] else []:
                split = {"validate": "val"}.get(t["split"], t["split"])
                rows.append([t["dicom_id"], name, phrase, t["path"], x0, y0, x1 - x0, y1 - y0, t["width"],
                             t["height"], split])  # fmt: skip
                if not (root / t["path"]).is_file():
                    (root / t["path"]).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(corpus / t["path"], root / t["path"])
    _write_csv(root / "MS_CXR_Local_Alignment_v1.1.0.csv", ["dicom_id", "category_name", "label_text", "path", "x",
               "y", "w", "h", "image_width", "image_height", "split"], rows)  # fmt: skip
    return {"mimic-5x200": corpus, "ms-cxr": root}


def _dicom(path: Path, img: Image.Image) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    arr = np.asarray(img, dtype=np.uint16) * 16  # 8 -> 12 bits stored
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def layout_rsna(tables: Path, out: Path, n: int, size: int = 128, seed: int = 0) -> Path:
    """``out/rsna-pneumonia``: ``n`` real patientIds (a third positive), their real label rows and a DICOM per id
    under ``stage_2_train_images/``; the first negative id gets pydicom-data's real chest CR when installed."""
    header, rows = read_rows(
        _table(tables, "stage_2_train_labels.csv", "kaggle_stage_2_train_labels.csv"), ("patientId", "Target")
    )
    by_id: dict[str, list[list[str]]] = {}
    for r in rows:
        by_id.setdefault(r[0], []).append(r)
    pos = sorted(k for k, v in by_id.items() if v[0][5] == "1")
    neg = sorted(k for k, v in by_id.items() if v[0][5] == "0")
    rng = np.random.default_rng(seed)
    n_pos = max(1, n // 3)
    chosen = [pos[i] for i in sorted(rng.choice(len(pos), n_pos, replace=False))] + \
             [neg[i] for i in sorted(rng.choice(len(neg), n - n_pos, replace=False))]  # fmt: skip
    root = out / "rsna-pneumonia"
    _write_csv(root / "stage_2_train_labels.csv", header, [r for k in chosen for r in by_id[k]])
    folder = root / "stage_2_train_images"
    folder.mkdir(parents=True, exist_ok=True)
    real = None
    try:
        from pydicom.data import get_testdata_file

        real = get_testdata_file("RG1_UNCR.dcm")  # a real PA chest CR (pydicom-data)
    except Exception:  # noqa: BLE001 - pydicom-data not installed: every file synthetic
        real = None
    for k in chosen:
        target = by_id[k][0][5] == "1"
        if real and not target:
            shutil.copy(real, folder / f"{k}.dcm")
            real = None
            continue
        boxes = [tuple(v * size / 1024 for v in (float(r[1]), float(r[2]), float(r[1]) + float(r[3]),
                                                 float(r[2]) + float(r[4]))) for r in by_id[k] if r[5] == "1"]  # fmt: skip
        _dicom(folder / f"{k}.dcm", film(["Pneumonia"] if target else [], k, size, boxes))
    return root


def slake_from_vqa_rad(vqa_rad: Path, out: Path) -> Path:
    """A SLAKE download (``train.json`` / ``validation.json`` / ``test.json``, ``imgs/xmlab<N>/source.jpg``, the
    fields ``qid, img_id, img_name, question, answer, q_lang, answer_type, content_type``) of the questions of a
    synthetic VQA-RAD set, each English question followed by a Chinese copy (``q_lang: zh``) that the default
    English filter leaves out — as SLAKE's own files interleave both."""
    root = out / "slake"
    shutil.rmtree(root, ignore_errors=True)
    ids: dict[str, int] = {}
    pairs = (("trainset.json", "train.json"), ("valset.json", "validation.json"), ("testset.json", "test.json"))
    for rad_name, slake_name in pairs:
        entries = []
        for e in json.loads((vqa_rad / rad_name).read_text(encoding="utf-8")):
            img_id = ids.setdefault(e["image_name"], len(ids) + 1)
            name = f"xmlab{img_id}/source.jpg"
            if not (root / "imgs" / name).is_file():
                (root / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(vqa_rad / "images" / e["image_name"], root / "imgs" / name)
            entry = {"qid": 2 * e["qid"], "img_id": img_id, "img_name": name, "question": e["question"],
                     "answer": e["answer"], "q_lang": "en", "answer_type": e["answer_type"],
                     "content_type": e["question_type"], "location": "Lung", "modality": "X-Ray"}  # fmt: skip
            entries += [entry, {**entry, "qid": 2 * e["qid"] + 1, "q_lang": "zh", "question": "图片中包含肺吗?"}]
        (root / slake_name).write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return root


def layout_vqa(out: Path, studies: int = 60, size: int = 128, seed: int = 0) -> dict[str, Path]:
    """``OUT/vqa-rad`` (VQA-RAD as M3AE ships it) and ``OUT/slake`` of the synthetic VQA questions
    (`data_tools.synth.vqa`) about a synthetic corpus of ``studies`` frontal films."""
    corpus = out / "_vqa_corpus"
    generate_corpus(corpus, studies, seed, min_size=size, max_size=size + size // 4, lateral_fraction=0.0)
    rad = out / "vqa-rad"
    generate_vqa(corpus, rad, seed=seed, image_size=size, questions_per_image=3)
    slake = slake_from_vqa_rad(rad, out)
    shutil.rmtree(corpus)
    return {"vqa-rad": rad, "slake": slake}


_PADCHEST_DRAWN = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
                   "pleural effusion": "Pleural Effusion", "pneumonia": "Pneumonia", "pneumothorax": "Pneumothorax",
                   "nodule": "Lung Lesion", "mass": "Lung Lesion", "infiltrates": "Lung Opacity"}  # fmt: skip


def layout_padchest(tables: Path, out: Path, n: int, size: int = 128, seed: int = 0) -> Path:
    """``out/padchest``: ``n`` seeded real PA / AP rows of the PadChest table (all of their patients' other PA / AP
    rows too, so that a patient-level split has patients with several films), and ``<ImageDir>/<ImageID>`` films
    showing the drawable findings of each row's ``Labels``."""
    import ast

    table = _table(tables, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
    header, rows = read_rows(table, ("ImageID", "ImageDir", "PatientID", "Projection", "Labels"))
    col = {h: i for i, h in enumerate(header)}
    frontal = [r for r in rows if len(r) == len(header) and r[col["Projection"]] in ("PA", "AP")]
    rng = np.random.default_rng(seed)
    patients = {frontal[i][col["PatientID"]] for i in rng.choice(len(frontal), n, replace=False).tolist()}
    chosen = [r for r in frontal if r[col["PatientID"]] in patients]
    root = out / "padchest"
    _write_csv(root / table.name.removesuffix(".gz"), header, chosen)
    for r in chosen:
        try:
            found = ast.literal_eval(r[col["Labels"]]) if r[col["Labels"]] else []
        except (ValueError, SyntaxError):  # the reader reports the row; its film shows nothing
            found = []
        drawn = sorted({_PADCHEST_DRAWN[str(f).strip()] for f in found if str(f).strip() in _PADCHEST_DRAWN})
        path = root / r[col["ImageDir"]] / r[col["ImageID"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        film(drawn, r[col["ImageID"]], size).save(path)
    return root


COVIDX_DRAWN: dict[str, list[str]] = {
    "normal": [],
    "pneumonia": ["Pneumonia", "Consolidation"],
    "COVID-19": ["Lung Opacity", "Edema"],
}
"""COVIDx class -> the findings its synthetic films show (bilateral hazy opacity for COVID-19, a lobar
consolidation for bacterial pneumonia)."""


def layout_covidx(out: Path, n: int, size: int = 128, seed: int = 0) -> Path:
    """``out/covidx``: COVIDx v8's download layout (``train.txt`` / ``test.txt``: ``patient_id filename class
    source``; images under ``train/`` and ``test/``), ``n`` films of the three classes (normal / pneumonia /
    COVID-19), a fifth of them in test. COVIDx's tables are not among the public ones torchxrayvision ships, so the
    ids are made up (one patient per image, as most COVIDx patients are)."""
    root = out / "covidx"
    rng = np.random.default_rng(seed)
    classes = [THREE_CLASS[i % 3] for i in rng.permutation(n).tolist()]
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for i, cls in enumerate(classes):
        split = "test" if i % 5 == 4 else "train"
        name = f"covidx-{seed}-{i:05d}.png"
        (root / split).mkdir(parents=True, exist_ok=True)
        film(COVIDX_DRAWN[cls], name, size).save(root / split / name)
        lines[split].append(f"P{seed}{i:05d} {name} {cls} synthetic")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("".join(f"{r}\n" for r in rows))
    return root


_VINDR_DRAWN = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
                "Infiltration": "Lung Opacity", "Lung Opacity": "Lung Opacity", "Nodule/Mass": "Lung Lesion",
                "Pleural effusion": "Pleural Effusion", "Pneumothorax": "Pneumothorax"}  # fmt: skip
VINDR_FRAME = 3072
"""The square frame a laid-out VinDr film stands for (the tables carry no image sizes; VinDr's DICOMs are about
2000-3000 px, its largest box corner 3131, 3384): a row's box is scaled by ``size / max(VINDR_FRAME, the image's
largest box corner)`` into the film, whose own pixels the reader takes the boxes in."""
VINDR_HEADER = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
"""PhysioNet's ``annotations_*.csv`` columns."""


def _bad_rows(table: Path, rows: list[int], image: str, err: Exception) -> ValueError:
    """One line naming the table, the rows of ``image`` and what to do (`main` prints it)."""
    where = f"row {rows[0]}" if len(rows) == 1 else f"rows {', '.join(map(str, rows))}"
    return ValueError(f"{table}: {where} ({image}): {err}; fix or drop them, or lay out from an unedited table")


def layout_vindr(tables: Path, out: Path, n: int, size: int = 128, seed: int = 0, per_label: int = 4) -> Path:
    """``out/vindr-cxr``: VinDr-CXR's PhysioNet layout (``annotations/annotations_train.csv`` and
    ``annotations_test.csv``, ``train/<image_id>.dicom`` and ``test/<image_id>.dicom``) for real ids of the Kaggle
    ``train.csv`` (torchxrayvision's ``vinbigdata-train.csv``): ``per_label`` seeded scans of each of the 14
    findings (every fourth of them in test), then "No finding" scans up to ``n`` (every fifth in test). Every row
    of those scans is written as read (each radiologist's), its box scaled into the film (`VINDR_FRAME`). The
    released test set's labels are not among the tables: our test set is that share of the training ids."""
    from data_tools.benchmarks.vindr import VINDR_LABELS

    table = _table(tables, "vinbigdata-train.csv", "train.csv")
    header, rows = read_rows(table, ("image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"))
    col = {h: i for i, h in enumerate(header)}
    by_id: dict[str, list[list[str]]] = {}
    numbers: dict[str, list[int]] = {}  # image id -> its 1-based data rows, for an error naming them
    for number, r in enumerate(rows, 1):
        by_id.setdefault(r[col["image_id"]], []).append(r)
        numbers.setdefault(r[col["image_id"]], []).append(number)
    found = {k: {r[col["class_name"]] for r in v} & set(VINDR_LABELS) for k, v in by_id.items()}
    rng = np.random.default_rng(seed)
    split: dict[str, str] = {}
    for label in VINDR_LABELS:
        pool = sorted(k for k in by_id if label in found[k] and k not in split)
        take = sorted(rng.choice(len(pool), min(len(pool), per_label), replace=False).tolist())
        split.update({pool[i]: "test" if j % 4 == 3 else "train" for j, i in enumerate(take)})
    normal = sorted(k for k in by_id if not found[k])
    take = sorted(rng.choice(len(normal), max(0, n - len(split)), replace=False).tolist())
    split.update({normal[i]: "test" if j % 5 == 4 else "train" for j, i in enumerate(take)})
    root = out / "vindr-cxr"
    written: dict[str, list[list[str]]] = {"train": [], "test": []}
    for k, part in split.items():
        try:
            corners = [float(r[col[c]]) for r in by_id[k] for c in ("x_min", "y_min", "x_max", "y_max")
                       if r[col[c]].strip()]  # fmt: skip
        except ValueError as err:
            raise _bad_rows(table, numbers[k], k, err) from None
        scale = size / max(VINDR_FRAME, *corners, 1.0)
        boxes = []
        for r in by_id[k]:
            coords = [r[col[c]] for c in ("x_min", "y_min", "x_max", "y_max")]
            if all(v.strip() for v in coords):
                box = tuple(float(v) * scale for v in coords)
                boxes.append(box)
                coords = [f"{v:.2f}" for v in box]
            written[part].append([k, r[col["rad_id"]], r[col["class_name"]], *coords])
        path = root / part / f"{k}.dicom"
        path.parent.mkdir(parents=True, exist_ok=True)
        _dicom(path, film(sorted({_VINDR_DRAWN[f] for f in found[k] if f in _VINDR_DRAWN}), k, size, boxes))
    for part, part_rows in written.items():
        _write_csv(root / "annotations" / f"annotations_{part}.csv", VINDR_HEADER, part_rows)
    return root


def layout_siim(tables: Path, out: Path, n: int, size: int = 128, seed: int = 0) -> Path:
    """``out/siim-pneumothorax``: ``n`` real ImageIds of SIIM-ACR's ``train-rle.csv`` (a third with pneumothorax),
    their rows as read (the RLE over the released 1024 px image, the frame the reader scales its boxes from) and a
    DICOM per id under ``dicom-images-train/<study>/<series>/<ImageId>.dcm`` whose film is darkened inside the
    decoded mask, scaled to the film."""
    from data_tools.benchmarks.siim import SIZE, rle_mask

    table = _table(tables, "train-rle.csv", "siim-pneumothorax-train-rle.csv")
    header, rows = read_rows(table, ("ImageId", "EncodedPixels"))
    col = {h: i for i, h in enumerate(header)}
    by_id: dict[str, list[list[str]]] = {}
    numbers: dict[str, list[int]] = {}
    for number, r in enumerate(rows, 1):
        by_id.setdefault(r[col["ImageId"]].strip(), []).append(r)
        numbers.setdefault(r[col["ImageId"]].strip(), []).append(number)
    pos = sorted(k for k, v in by_id.items() if v[0][col["EncodedPixels"]].strip() != "-1")
    neg = sorted(k for k, v in by_id.items() if v[0][col["EncodedPixels"]].strip() == "-1")
    rng = np.random.default_rng(seed)
    n_pos = max(1, n // 3)
    chosen = [pos[i] for i in sorted(rng.choice(len(pos), n_pos, replace=False))] + \
             [neg[i] for i in sorted(rng.choice(len(neg), n - n_pos, replace=False))]  # fmt: skip
    root = out / "siim-pneumothorax"
    _write_csv(root / "train-rle.csv", ["ImageId", "EncodedPixels"],
               [[r[col["ImageId"]], r[col["EncodedPixels"]]] for k in chosen for r in by_id[k]])  # fmt: skip
    for k in chosen:
        rles = [r[col["EncodedPixels"]].strip() for r in by_id[k] if r[col["EncodedPixels"]].strip() != "-1"]
        lucent = None
        if rles:
            try:
                mask = np.any([rle_mask(rle, SIZE) for rle in rles], axis=0)  # (1024, 1024)
            except ValueError as err:
                raise _bad_rows(table, numbers[k], k, err) from None
            small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
            lucent = np.asarray(small, dtype=np.float32) / 255.0  # (S, S)
        path = root / "dicom-images-train" / f"1.2.276.0.7230010.3.1.2.{_seed(k)}" / \
            f"1.2.276.0.7230010.3.1.3.{_seed(k)}" / f"{k}.dcm"  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        _dicom(path, film([], k, size, lucent=lucent))
    return root


def layout_all(
    tables: Path, out: Path, n: int = 200, size: int = 128, seed: int = 0, per_label: int = 0
) -> dict[str, Path]:
    return {
        "nih-cxr14": layout_nih(tables, out, n, size, seed, per_label),
        "chexpert-5x200": layout_chexpert_5x200(tables, out, max(1, math.ceil(n / 5)), size, seed),
        "rsna-pneumonia": layout_rsna(tables, out, n, size, seed),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", required=True, help="folder of the real label tables")
    p.add_argument("--out", required=True, help="the data root receiving one folder per dataset id")
    p.add_argument("--images", type=int, default=200, help="images per dataset")
    p.add_argument("--size", type=int, default=128, help="film size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vqa", action="store_true", help="also lay out vqa-rad/ and slake/ (synthetic questions)")
    p.add_argument("--covidx", action="store_true", help="also lay out covidx/ (COVIDx v8 files, made-up ids)")
    p.add_argument("--padchest", action="store_true", help="also lay out padchest/ (real rows, no split)")
    p.add_argument("--vindr", action="store_true", help="also lay out vindr-cxr/ (real rows, DICOMs)")
    p.add_argument("--chexpert", action="store_true", help="also lay out chexpert/ (real rows, our valid.csv)")
    p.add_argument("--mimic", action="store_true",
                   help="also lay out mimic-5x200/ and ms-cxr/ (a synthetic corpus, its drawn boxes)")  # fmt: skip
    p.add_argument("--siim", action="store_true", help="also lay out siim-pneumothorax/ (real RLE rows, DICOMs)")
    p.add_argument("--per-label", type=int, default=0, help="nih-cxr14: at least this many rows of each finding")
    args = p.parse_args(argv)
    try:
        made = layout_all(Path(args.tables), Path(args.out), args.images, args.size, args.seed, args.per_label)
        if args.covidx:
            made["covidx"] = layout_covidx(Path(args.out), args.images, args.size, args.seed)
        if args.padchest:
            made["padchest"] = layout_padchest(
                Path(args.tables), Path(args.out), args.images, args.size, args.seed
            )
        if args.chexpert:
            made["chexpert"] = layout_chexpert(
                Path(args.tables), Path(args.out), args.images, args.size, args.seed
            )
        if args.mimic:
            made.update(layout_mimic(Path(args.out), args.images, args.size, args.seed))
        if args.vindr:
            made["vindr-cxr"] = layout_vindr(Path(args.tables), Path(args.out), args.images, args.size, args.seed)
        if args.siim:
            made["siim-pneumothorax"] = layout_siim(
                Path(args.tables), Path(args.out), args.images, args.size, args.seed
            )
        if args.vqa:
            made.update(layout_vqa(Path(args.out), max(20, args.images // 3), args.size, args.seed))
    except (FileNotFoundError, ValueError) as err:
        print(f"bench_layout: error: {err}", file=sys.stderr)
        return 2
    for name, path in made.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
