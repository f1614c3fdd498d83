"""How often does a seeded label fraction leave a label without a positive, and what does coverage add? (seconds)

On NIH ChestX-ray14's real label table (``Data_Entry_2017_v2020.csv``, shipped gzipped by torchxrayvision) and its
train_val split, for each seed of ``--seeds``: the benchmark's plain patient-level subset at ``--fraction``
(`mpma_ds.data.subsets.patient_subset`, what ``data.label_fraction`` keeps) — which of the 14 labels it leaves
without a positive image — and the covered subset (``data.label_fraction_cover``, `cover_labels`): how many
patients / images coverage adds.

    python benchmarks/bench_label_cover.py                      # torchxrayvision's table, proxy split
    python benchmarks/bench_label_cover.py --train-val-list /data/nih-cxr14/train_val_list.txt --fraction 0.1

The train_val split is NIH's ``train_val_list.txt`` when given. torchxrayvision does not ship that list; without
it a **proxy** split stands in, patient-wise as the official one: every patient with a box image (the boxes are on
test images) and then patients in a fixed hashed order go to test until it holds the official list's 25,596
images; the other patients are train_val (the official train_val_list holds 86,524 images). The figures on the
real list differ by sampling noise, not in kind. Writes benchmarks/results/bench_label_cover.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np

from data_tools.benchmarks.common import read_list, read_rows
from data_tools.benchmarks.nih import NIH_LABELS
from mpma_ds.data.subsets import LabelCover, cover_labels, patient_score, patient_subset

OFFICIAL_TEST_IMAGES = 25_596
"""Images in NIH's test_list.txt (the official train_val_list.txt holds the other 86,524)."""


def xrv_table(name: str) -> Path:
    """A table of torchxrayvision's data folder, found without importing the package (installed --no-deps)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"torchxrayvision is not installed: give the table ({name}) by path")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def read_table(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(images, patients, positives (N, 14) bool)`` of the Data_Entry table."""
    header, rows = read_rows(path, ("Image Index", "Finding Labels", "Patient ID"))
    i_img, i_lab, i_pat = (header.index(c) for c in ("Image Index", "Finding Labels", "Patient ID"))
    index = {n: c for c, n in enumerate(NIH_LABELS)}
    images, patients, positives = [], [], []
    for row in rows:
        images.append(row[i_img].strip())
        patients.append(row[i_pat].strip())
        flags = np.zeros(len(NIH_LABELS), dtype=bool)
        for name in row[i_lab].split("|"):
            if name.strip() in index:
                flags[index[name.strip()]] = True
        positives.append(flags)
    return images, patients, np.stack(positives)


def proxy_train_val(images: list[str], patients: list[str], boxed: set[str]) -> np.ndarray:
    """(N,) bool: the proxy train_val split (module docstring)."""
    per_patient = Counter(patients)
    test = {p for im, p in zip(images, patients) if im in boxed}
    held = sum(per_patient[p] for p in test)
    for p in sorted(per_patient, key=lambda p: patient_score(p, seed=-1)):
        if held >= OFFICIAL_TEST_IMAGES:
            break
        if p not in test:
            test.add(p)
            held += per_patient[p]
    return np.array([p not in test for p in patients])


def measure(patients: list[str], positives: np.ndarray, fraction: float, seeds: range) -> dict:
    """Per seed: the labels the plain subset leaves without a positive, and what coverage adds."""
    cover = LabelCover(NIH_LABELS, positives)
    rows = []
    for seed in seeds:
        plain = patient_subset(patients, fraction, seed)
        _, added = cover_labels(patients, plain, cover, seed)
        rows.append({"seed": seed, "images": int(plain.sum()), "missing": added["labels"],
                     "patients_added": added["patients_added"], "samples_added": added["samples_added"]})  # fmt: skip
    hit = [r for r in rows if r["missing"]]
    return {
        "fraction": fraction,
        "seeds": len(rows),
        "mean_subset_images": float(np.mean([r["images"] for r in rows])),
        "share_of_seeds_missing_a_label": len(hit) / len(rows),
        "seeds_missing_each_label": dict(Counter(n for r in rows for n in r["missing"]).most_common()),
        "mean_patients_added": float(np.mean([r["patients_added"] for r in rows])),
        "mean_images_added": float(np.mean([r["samples_added"] for r in rows])),
        "mean_patients_added_where_needed": float(np.mean([r["patients_added"] for r in hit])) if hit else 0.0,
        "mean_images_added_where_needed": float(np.mean([r["samples_added"] for r in hit])) if hit else 0.0,
        "max_images_added": max(r["samples_added"] for r in rows),
        "per_seed": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--table", type=Path, default=None, help="Data_Entry_2017_v2020.csv[.gz] (default: torchxrayvision's)"
    )
    p.add_argument(
        "--train-val-list", type=Path, default=None, help="NIH's train_val_list.txt (default: proxy split)"
    )
    p.add_argument("--bbox", type=Path, default=None, help="BBox_List_2017.csv[.gz] for the proxy split")
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--seeds", type=int, default=100, help="seeds 0 .. N-1")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_label_cover.json")
    a = p.parse_args()
    images, patients, positives = read_table(a.table or xrv_table("Data_Entry_2017_v2020.csv.gz"))
    if a.train_val_list:
        listed = set(read_list(a.train_val_list))
        train = np.array([im in listed for im in images])
        split = f"train_val_list {a.train_val_list}"
    else:
        _, rows = read_rows(a.bbox or xrv_table("BBox_List_2017.csv.gz"), ("Image Index",))
        train = proxy_train_val(images, patients, {r[0].strip() for r in rows})
        split = "proxy train_val (no train_val_list.txt given; see the docstring)"
    train_patients = [pt for pt, ok in zip(patients, train.tolist()) if ok]
    result = measure(train_patients, positives[train], a.fraction, range(a.seeds))
    result.update(split=split, train_images=int(train.sum()), train_patients=len(set(train_patients)),
                  positives_in_train={n: int(c) for n, c in zip(NIH_LABELS, positives[train].sum(axis=0).tolist())})  # fmt: skip
    print(f"NIH ChestX-ray14, {split}: {result['train_images']} images of {result['train_patients']} patients")
    print(
        f"fraction {a.fraction:g}, seeds 0..{a.seeds - 1}: ~{result['mean_subset_images']:.0f} images per subset"
    )
    print(f"plain subset leaves a label without positives for {result['share_of_seeds_missing_a_label']:.0%} "
          f"of the seeds; by label: {result['seeds_missing_each_label']}")  # fmt: skip
    print(f"coverage adds {result['mean_patients_added']:.2f} patients / {result['mean_images_added']:.2f} images "
          f"per seed on average ({result['mean_patients_added_where_needed']:.2f} / "
          f"{result['mean_images_added_where_needed']:.2f} where it adds any; at most {result['max_images_added']} "
          "images)")  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
