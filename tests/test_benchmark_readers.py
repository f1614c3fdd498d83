"""The benchmark readers on the *whole* real label tables that torchxrayvision ships (read in place), with the
counts checked against what each dataset's paper or page publishes; and malformed rows reported per row."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.benchmarks import BENCHMARKS, BenchmarkError, read_benchmark
from data_tools.benchmarks.chexpert import COMPETITION_LABELS, make_5x200


def xrv_tables() -> Path | None:
    """torchxrayvision's data folder, found without importing the package (installed --no-deps: its imports fail)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if (folder / "Data_Entry_2017_v2020.csv.gz").is_file() else None


TABLES = xrv_tables()
if TABLES is None:
    pytest.skip("torchxrayvision (pip install --no-deps) carries the real tables", allow_module_level=True)
PARSE_BUDGET_S = 60.0
"""Generous for a shared 2-core machine; the note's figures give the real parse times."""


def _timed(dataset: str, options: dict):
    start = time.perf_counter()
    data = read_benchmark(dataset, TABLES, options)
    seconds = time.perf_counter() - start
    print(f"\n{dataset}: {len(data.records)} rows parsed in {seconds:.2f} s")
    assert seconds < PARSE_BUDGET_S
    return data


def test_registry_lists_the_readers():
    assert {"nih-cxr14", "chexpert", "chexpert-5x200", "rsna-pneumonia"} <= set(BENCHMARKS.names())


def test_nih_full_table_counts_match_the_dataset_page():
    data = _timed("nih-cxr14", {"check_images": False})
    c = data.counts()
    # NIH Clinical Center README (ChestX-ray14): 112,120 frontal images of 30,805 patients, 984 boxes on 880 images
    assert (c["images"], c["patients"], c["boxes"], c["images_with_boxes"]) == (112120, 30805, 984, 880)
    # the README's per-label image counts
    assert c["positives"]["Infiltration"] == 19894 and c["positives"]["Effusion"] == 13317
    assert c["positives"]["Hernia"] == 227 and c["positives"]["Pneumonia"] == 1431
    assert c["problems"] == {}
    assert data.notes == ["no test_list.txt / train_val_list.txt: every image is in split 'all'"]


def test_nih_google2019_expert_labels():
    data = _timed("nih-cxr14", {"check_images": False, "labels": "google2019"})
    c = data.counts()
    # Majkowska et al. 2019: 1,962 test and 2,414 validation images with 4 adjudicated labels
    assert c["images"] == 4376 and c["splits"] == {"test": 1962, "validate": 2414}
    assert data.label_names == ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
    assert c["positives"]["Pneumothorax"] == 238


def test_chexpert_full_training_table():
    data = _timed("chexpert", {"train": str(TABLES / "chexpert_train.csv.gz"), "check_images": False,
                               "frontal_only": False, "labels": "all"})  # fmt: skip
    c = data.counts()
    # CheXpert v1.0 train.csv: 223,414 images of 64,540 patients; Irvin et al. 2019 Table 1 positives
    assert (c["images"], c["patients"]) == (223414, 64540)
    assert c["positives"]["Pleural Effusion"] == 86187 and c["positives"]["No Finding"] == 22381
    assert c["positives"]["Support Devices"] == 116001


def test_chexpert_uncertainty_policies_and_frontal_filter():
    opts = {"train": str(TABLES / "chexpert_train.csv.gz"), "check_images": False}
    ignore = read_benchmark("chexpert", TABLES, opts)
    ones = read_benchmark("chexpert", TABLES, {**opts, "uncertainty": "ones"})
    assert ignore.label_names == COMPETITION_LABELS
    assert len(ignore.records) == 191027  # frontal films of train.csv
    i = COMPETITION_LABELS.index("Atelectasis")
    n_unc = sum(r.labels[i] != r.labels[i] for r in ignore.records) - sum(
        r.labels[i] != r.labels[i] for r in ones.records
    )
    assert n_unc > 0  # the uncertain ones: NaN under U-Ignore, 1 under U-Ones
    assert ones.counts()["positives"]["Atelectasis"] - ignore.counts()["positives"]["Atelectasis"] == n_unc


def test_gloria_5x200_from_the_real_table_is_one_class_each(tmp_path):
    rows = make_5x200(TABLES / "chexpert_train.csv.gz", seed=0)
    assert len(rows) == 1000
    assert {c: sum(r[c] == 1.0 for r in rows) for c in COMPETITION_LABELS} == dict.fromkeys(
        COMPETITION_LABELS, 200
    )
    assert make_5x200(TABLES / "chexpert_train.csv.gz", seed=0) == rows  # seeded
    table = tmp_path / "chexpert_5x200.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["Path", *COMPETITION_LABELS])
        w.writeheader()
        w.writerows(rows)
    data = read_benchmark("chexpert-5x200", tmp_path, {"check_images": False})
    assert len(data.records) == 1000 and data.task == "multiclass" and not data.problems


def test_rsna_full_table_counts_match_the_kaggle_page():
    data = _timed(
        "rsna-pneumonia", {"table": str(TABLES / "kaggle_stage_2_train_labels.csv.zip"), "check_images": False}
    )
    c = data.counts()
    # Kaggle RSNA Pneumonia stage 2 train: 26,684 images (one per patientId), 9,555 boxes on 6,012 positive images
    assert (c["images"], c["patients"], c["boxes"], c["images_with_boxes"]) == (26684, 26684, 9555, 6012)
    assert c["positives"] == {"Pneumonia": 6012}
    assert c["splits"] == {"test": 4002, "train": 18679, "validate": 4003}  # the seeded 70 / 15 / 15 %
    again = read_benchmark("rsna-pneumonia", TABLES, {"table": str(TABLES / "kaggle_stage_2_train_labels.csv.zip"),
                                                      "check_images": False})  # fmt: skip
    assert [r.split for r in again.records] == [r.split for r in data.records]


# ---------------------------------------------------------------------------------------------- malformed rows
def _nih_tree(tmp_path: Path) -> Path:
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    with gzip.open(TABLES / "Data_Entry_2017_v2020.csv.gz", "rt") as f:
        lines = [next(f) for _ in range(6)]
    lines.append("00099999_000.png,Dragon Scale,0,99999,50,M,PA,2048,2048,0.14,0.14\n")  # unknown label
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(lines))
    ids = [line.split(",")[0] for line in lines[1:]]
    for image in ids[:-2]:  # the last two have no image file
        Image.new("L", (64, 64), 128).save(root / "images" / image)
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        f"{ids[0]},Atelectasis,100,100,50,50\n"
        f"{ids[0]},Atelectasis,1000,1000,80,80\n"  # outside the 1024 px image
        f"{ids[1]},Fracture,10,10,10,10\n"  # not a ChestX-ray14 label
        f"{ids[1]},Mass,ten,10,10,10\n"  # not a number
    )
    return root


def test_malformed_rows_are_reported_per_row_not_dropped(tmp_path):
    root = _nih_tree(tmp_path)
    data = read_benchmark("nih-cxr14", root)
    lines = [p.line() for p in data.problems]
    assert lines[0] == "Data_Entry_2017_v2020.csv row 6: unknown_label: 00099999_000.png: Dragon Scale"
    assert lines[1].startswith("BBox_List_2017.csv row 2: box_outside_image")
    assert lines[2] == "BBox_List_2017.csv row 3: unknown_label: 'Fracture' is not a ChestX-ray14 label"
    assert lines[3].startswith("BBox_List_2017.csv row 4: bad_value")
    missing = [p for p in data.problems if p.reason == "missing_image"]
    assert [p.row for p in missing] == [5, 6]
    assert len(data.records) == 4 and len(data.records[0].boxes) == 1
    # every row is either a record or a reported problem
    assert len(data.records) + len(missing) == 6


def test_unreadable_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(BenchmarkError, match="no ChestX-ray14 label table"):
        read_benchmark("nih-cxr14", tmp_path)
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,Target\n")
    with pytest.raises(BenchmarkError, match="no column 'x'"):
        read_benchmark("rsna-pneumonia", tmp_path)
    with pytest.raises(BenchmarkError, match="unknown option"):
        read_benchmark("rsna-pneumonia", tmp_path, {"tabel": "x"})


def test_siim_full_rle_table():
    data = _timed(
        "siim-pneumothorax", {"table": str(TABLES / "siim-pneumothorax-train-rle.csv.gz"), "check_images": False}
    )
    c = data.counts()
    # SIIM-ACR stage 2 train-rle.csv: 12,047 images, 2,669 with pneumothorax (several regions on some)
    assert (c["images"], c["positives"]["Pneumothorax"], c["images_with_boxes"]) == (12047, 2669, 2669)
    assert c["boxes"] == 3576 and c["problems"] == {}
    assert all(0 <= b.x0 < b.x1 <= 1024 and 0 <= b.y0 < b.y1 <= 1024 for r in data.records for b in r.boxes)


def test_rle_box_is_the_masks_bounding_box():
    from data_tools.benchmarks.siim import rle_box, rle_mask

    size = 16
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[3:7, 5:9] = 1  # rows y 3..6, columns x 5..8
    mask[10, 12] = 1
    flat = mask.T.flatten()  # Kaggle's mask2rle reads column by column
    runs, prev_end, i = [], 0, 0
    while i < len(flat):
        if flat[i]:
            j = i
            while j < len(flat) and flat[j]:
                j += 1
            runs += [i - prev_end, j - i]
            prev_end, i = j, j
        else:
            i += 1
    assert rle_box(" ".join(map(str, runs)), size) == (5, 3, 13, 11)
    assert (rle_mask(" ".join(map(str, runs)), size) == mask.astype(bool)).all()
    with pytest.raises(ValueError, match="past the 16x16 image"):
        rle_box("250 10", size)
    with pytest.raises(ValueError, match="pairs"):
        rle_box("1 2 3", size)


def test_vindr_full_kaggle_table():
    data = _timed("vindr-cxr", {"train": str(TABLES / "vinbigdata-train.csv.gz"), "check_images": False})
    c = data.counts()
    # VinDr-CXR (Nguyen et al. 2022): 15,000 training scans; the Kaggle train.csv's 36,096 finding boxes
    assert (c["images"], c["boxes"]) == (15000, 36096)
    assert c["positives"]["Aortic enlargement"] == 3067 and c["positives"]["Pneumothorax"] == 96
    assert data.notes == ["no annotations_test.csv: the training images only (split 'train')"]


def test_padchest_full_table_every_row_accounted():
    every = ("PA", "AP", "AP_horizontal", "L", "COSTAL", "EXCLUDE", "UNK")
    data = _timed("padchest", {"check_images": False, "projections": list(every)})
    c = data.counts()
    # the 01.02.19 table: 160,861 rows of 67,625 patients (Bustos et al. 2020: 160,868 images, 67,625 patients);
    # 103 rows have no label list, each reported
    assert c["images"] + c["problems"]["bad_value"] == 160861 and c["problems"] == {"bad_value": 103}
    assert c["patients"] == 67594  # the patients of the rows with labels
    frontal = read_benchmark("padchest", TABLES, {"check_images": False})
    assert len(frontal.records) == 110554 and frontal.counts()["positives"]["pulmonary fibrosis"] > 0


def _dicom_pixels(path: str) -> np.ndarray:
    import pydicom

    return pydicom.dcmread(path).pixel_array.astype(np.float32) / 16  # the layout stores 8 bits in 12


def test_vindr_layout_reads_back_with_every_finding_in_train_and_test(tmp_path):
    from data_tools.benchmarks.vindr import VINDR_LABELS
    from data_tools.synth.bench_layout import layout_vindr

    root = layout_vindr(TABLES, tmp_path, n=70, size=64, per_label=4)
    assert (root / "annotations" / "annotations_test.csv").is_file()
    data = read_benchmark("vindr-cxr", root)
    c = data.counts()
    # 4 scans of each of the 14 findings (every fourth in test), 14 "No finding" scans (every fifth in test)
    assert c["images"] == 70 and c["splits"] == {"test": 14 + 2, "train": 42 + 12} and c["problems"] == {}
    for split in ("train", "test"):
        y = data.label_matrix(data.split(split))
        assert (y == 1).any(axis=0).all(), split  # each finding has a positive in both splits
    assert all(c["positives"][name] >= 4 for name in VINDR_LABELS)
    boxed = [r for r in data.records if r.boxes]
    assert len(boxed) == 56 and all(Path(r.image).suffix == ".dicom" for r in data.records)
    for r in boxed[:12]:
        img = _dicom_pixels(r.image)
        assert img.shape == (64, 64)
        for b in r.boxes:  # in the DICOM's own pixels (no frame), inside the film
            assert b.frame is None and 0 <= b.x0 < b.x1 <= 64 and 0 <= b.y0 < b.y1 <= 64
    # the opacity is painted inside the real box: brighter there than the film drawn without it
    from data_tools.synth.bench_layout import _VINDR_DRAWN, film

    r = boxed[0]
    drawn = sorted({_VINDR_DRAWN[n] for n, v in zip(VINDR_LABELS, r.labels) if v == 1 and n in _VINDR_DRAWN})
    diff = _dicom_pixels(r.image) - np.asarray(film(drawn, r.key, 64), dtype=np.float32)
    inside = np.zeros((64, 64), dtype=bool)
    for b in r.boxes:
        inside[int(b.y0) : int(np.ceil(b.y1)), int(b.x0) : int(np.ceil(b.x1))] = True
    assert (diff > 1).any() and not (diff[~inside] > 1).any()


def test_siim_layout_reads_back_and_darkens_the_film_inside_the_real_mask(tmp_path):
    from data_tools.benchmarks.siim import rle_box, rle_mask
    from data_tools.synth.bench_layout import film, layout_siim

    root = layout_siim(TABLES, tmp_path, n=30, size=64)
    data = read_benchmark("siim-pneumothorax", root)
    c = data.counts()
    assert c["images"] == 30 and c["positives"]["Pneumothorax"] == 10 and c["images_with_boxes"] == 10
    assert c["problems"] == {} and sum(c["splits"].values()) == 30
    table = {}
    with open(root / "train-rle.csv", newline="") as f:
        for row in csv.DictReader(f):
            table.setdefault(row["ImageId"], []).append(row["EncodedPixels"])
    with gzip.open(TABLES / "siim-pneumothorax-train-rle.csv.gz", "rt", newline="") as f:
        real = {}
        for row in csv.reader(f):
            real.setdefault(row[0], []).append(row[1].strip())
    assert all(real[k] == v for k, v in table.items())  # the real rows, as read
    for r in (r for r in data.records if r.boxes):
        img = _dicom_pixels(r.image)
        assert img.shape == (64, 64)
        for b in r.boxes:  # in the released 1024 px frame; scaled into the film, inside it
            assert b.frame == (1024, 1024)
            x0, y0, x1, y1 = b.scaled(64, 64)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert {(b.x0, b.y0, b.x1, b.y1) for b in r.boxes} == {rle_box(rle) for rle in table[r.key]}
        mask = np.any([rle_mask(rle) for rle in table[r.key]], axis=0)  # (1024, 1024)
        cells = mask.reshape(64, 16, 64, 16).any(axis=(1, 3))  # (64, 64) the film pixels the mask touches
        padded = np.pad(cells, 1)
        near = np.any([padded[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)], axis=0)
        darker = np.asarray(film([], r.key, 64), dtype=np.float32) - img  # (64, 64)
        assert (darker > 1).any() and not (darker[~near] > 1).any(), r.key  # bilinear scaling: one pixel margin


def test_layout_of_a_bad_table_row_is_one_line_naming_it(tmp_path, capsys):
    from data_tools.synth.bench_layout import main

    tables = tmp_path / "tables"
    tables.mkdir()
    for f in TABLES.iterdir():
        if not f.name.startswith(("siim", "vinbigdata")):
            (tables / f.name).symlink_to(f)
    # six negatives, two positives whose masks run past the 1024 x 1024 image (a layout takes both positives)
    (tables / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "".join(
        f"1.2.{i}, {'1048570 20' if i > 6 else '-1'}\n" for i in range(1, 9)))  # fmt: skip
    rc = main(["--tables", str(tables), "--out", str(tmp_path / "out"), "--images", "6", "--size", "32", "--siim"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{tables / 'train-rle.csv'}: row 7 (1.2.7): a run ends at pixel" in err and "fix or drop" in err
