"""``mpma-benchmark`` over every (dataset, protocol) of ``cxr-full``: each of its datasets laid out small (64 px
films; NIH, CheXpert, RSNA, SIIM-ACR, VinDr-CXR and PadChest for real ids and rows of their tables, COVIDx with
made-up ids, MIMIC 5x200 and MS-CXR on a synthetic MIMIC-CXR-JPG corpus and its drawn boxes) and a tiny export run
through a copy of the suite that only shortens it (fine-tuning at 100 % of the labels for one epoch; MIMIC 5x200
with 3 images a class, PadChest on 3 common labels). Every entry of ``cxr-full`` ends with a metric or one line
saying why not — none is silently missing — and VinDr-CXR, SIIM-ACR and PadChest's linear probe (on the seeded
patient-level split) give numbers."""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml
from test_benchmark_readers import TABLES
from train_testdata import tiny_export

from data_tools.synth.bench_layout import (
    layout_all,
    layout_chexpert,
    layout_covidx,
    layout_mimic,
    layout_padchest,
    layout_siim,
    layout_vindr,
)
from mpma_ds.benchmark.suite import load_suite
from mpma_ds.cli.benchmark import main

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-e2e (minutes: a fine-tuning run per dataset)
SIZE = 64
SHORTER = {
    "finetune": {"fractions": [1.0], "set": ["train.epochs=1"]},
    "mimic-5x200": {"options": {"split": "all", "per_class": 3}},
    "padchest": {"options": {"labels": ["normal", "cardiomegaly", "pleural effusion"]}},
}
"""What the test's copy of cxr-full changes, by protocol or dataset (nothing else)."""


def shortened_suite(path) -> list[tuple[str, str]]:
    """cxr-full's entries with `SHORTER` applied, written to ``path``; returns its (dataset, protocol) pairs."""
    from importlib import resources

    full = load_suite("cxr-full")
    raw = yaml.safe_load((resources.files("mpma_ds.benchmark") / "suites" / "cxr-full.yaml").read_text())
    for e in raw["entries"]:
        for key in (e["protocol"], e["dataset"]):
            e.update(SHORTER.get(key, {}))
    raw["name"] = "cxr-full-short"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return [(e.dataset, e.protocol) for e in full.entries]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = base / "bench-full"
    data = root / "data"
    start = time.perf_counter()
    layout_all(TABLES, data, n=60, size=SIZE, seed=0, per_label=3)
    layout_chexpert(TABLES, data, 60, SIZE)
    layout_covidx(data, 60, SIZE)
    layout_padchest(TABLES, data, 60, SIZE)
    layout_vindr(TABLES, data, 70, SIZE, per_label=4)
    layout_siim(TABLES, data, 60, SIZE)
    layout_mimic(data, 90, SIZE)
    laid_out = time.perf_counter() - start
    exported = tiny_export(root / "exported", str(base), SIZE)
    pairs = shortened_suite(root / "suite.yaml")
    argv = ["--model", str(exported), "--suite", str(root / "suite.yaml"), "--data-root", str(data), "--out",
            str(root / "out"), "--no-mlflow", "--bootstrap", "50", "--workers", "0", "--min-label-count", "2",
            "--batch-size", "32"]  # fmt: skip
    start = time.perf_counter()
    rc = main(argv)
    print(f"\nlaid out in {laid_out:.1f} s; cxr-full (shortened) ran in {time.perf_counter() - start:.1f} s")
    return rc, pairs, json.loads((root / "out" / "results.json").read_text())


def _outcome(results: dict, dataset: str, protocol: str) -> tuple[str, object]:
    """("metric", value) / ("error", line) / ("skipped", line) / ("missing", None) of one entry."""
    name = f"{dataset}/{protocol}"
    if name in results["skipped"]:
        return "skipped", results["skipped"][name]
    block = results["entries"].get(dataset, {}).get(protocol)
    if block is None:
        return "missing", None
    m = block["models"]["exported"]
    if "error" in m:
        return "error", m["error"]
    return "metric", m["metrics"].get(m["headline"])


def test_every_cxr_full_entry_has_a_metric_or_one_line_why_not(run):
    rc, pairs, results = run
    outcomes = {f"{d}/{p}": _outcome(results, d, p) for d, p in pairs}
    assert not [n for n, (kind, _) in outcomes.items() if kind == "missing"], outcomes
    for name, (kind, value) in outcomes.items():
        if kind != "metric":
            assert isinstance(value, str) and value.strip() and "\n" not in value, (name, value)
        else:
            assert isinstance(value, float), (name, value)
    assert not results["skipped"], results["skipped"]  # every dataset was laid out and found
    # a refused entry fails the command (exit 1) after the others ran; none refused: exit 0
    assert rc == (1 if any(kind == "error" for kind, _ in outcomes.values()) else 0)
    print("\n" + "\n".join(f"{n}: {k} {v}" for n, (k, v) in outcomes.items()))


@pytest.mark.parametrize("dataset", ["vindr-cxr", "siim-pneumothorax"])
def test_vindr_and_siim_entries_give_numbers(run, dataset):
    _, pairs, results = run
    protocols = [p for d, p in pairs if d == dataset]
    assert len(protocols) >= 3
    for protocol in protocols:
        kind, value = _outcome(results, dataset, protocol)
        assert kind == "metric" and not math.isnan(value), (dataset, protocol, kind, value)
        assert results["entries"][dataset][protocol]["models"]["exported"]["info"]["images_rejected"] == 0
    counts = results["datasets"][dataset]["counts"]
    assert counts["problems"] == {} and counts["images_with_boxes"] > 0
    if "grounding" in protocols:  # VinDr: every box in its DICOM's pixels, inside the film
        g = results["entries"][dataset]["grounding"]["models"]["exported"]
        assert g["info"]["box_problems"] == 0 and g["metrics"]["pairs"] >= counts["images_with_boxes"] // 4


def test_padchest_linear_probe_fits_on_the_seeded_split_and_tests_its_test_part(run):
    _, _, results = run
    lp = results["entries"]["padchest"]["linear_probe"]
    ft = results["entries"]["padchest"]["finetune"]
    m = lp["models"]["exported"]
    assert "error" not in m, m
    seeded = m["info"]["seeded_split"]
    assert lp["split"] == "test (seeded)" and "seeded 0.7/0.1/0.2 split (seed 0)" in lp["note"]
    assert (lp["images"], lp["split_checksum"]) == (seeded["images"]["test"], seeded["checksums"]["test"])
    assert m["metrics"]["train_images"] == seeded["images"]["train"]
    assert m["info"]["split_checksums"]["@100%"]["images"] == seeded["images"]["train"]
    if "error" not in ft["models"]["exported"]:  # the same split as finetune's
        assert ft["models"]["exported"]["info"]["seeded_split"] == seeded
    assert 0 <= m["metrics"]["auroc_mean@100%"] <= 1


def test_the_shipped_cxr_full_runs_whole_on_the_same_layout(run, tmp_path_factory, capsys):
    """``--suite cxr-full`` itself (its 1 / 10 / 100 % fractions and epochs): on a few dozen films the seeded 1 % /
    10 % subsets hold no positive of most labels, and the benchmark's label coverage adds the seed's first patient
    of each, so no fine-tuning entry is refused for a fraction without positives (only where the laid-out train
    split lacks a label); a 1 % of one image cannot feed 2 accumulation steps, and MIMIC 5x200 has no 200 images a
    class — each refused entry is one line, the others give numbers, and the command exits 1 naming the first."""
    root = tmp_path_factory.getbasetemp() / "bench-full"
    argv = ["--model", str(root / "exported"), "--suite", "cxr-full", "--data-root", str(root / "data"), "--out",
            str(root / "shipped"), "--cache-dir", str(root / "out" / "cache"), "--no-mlflow", "--bootstrap", "50",
            "--workers", "0", "--min-label-count", "2", "--batch-size", "32"]  # fmt: skip
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    results = json.loads((root / "shipped" / "results.json").read_text())
    outcomes = {e.name: _outcome(results, e.dataset, e.protocol) for e in load_suite("cxr-full").entries}
    assert not [n for n, (kind, _) in outcomes.items() if kind == "missing"], outcomes
    refused = [n for n, (kind, _) in outcomes.items() if kind == "error"]
    assert all("\n" not in outcomes[n][1] for n in refused)
    assert "mimic-5x200/retrieval" in refused and "lower per_class" in outcomes["mimic-5x200/retrieval"][1]
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "not scored:" in err
    for name, (kind, value) in outcomes.items():
        if kind == "metric":
            assert isinstance(value, float), (name, value)
    assert not any(n.startswith(("vindr-cxr/", "siim-pneumothorax/")) and "finetune" not in n for n in refused)
    # a fraction is not refused for lack of positives (RSNA's 1 % may still be one image, too few for 2 ranks)
    lacking = [n for n in refused if n.endswith("/finetune") and "no positive" in outcomes[n][1]]
    assert all("train split" in outcomes[n][1] and "holds no positive" in outcomes[n][1] for n in lacking), (
        outcomes
    )
    covered = [
        c["cover"]
        for d, ps in results["entries"].items()
        if "finetune" in ps
        for c in ps["finetune"]["models"]["exported"].get("info", {}).get("split_checksums", {}).values()
        if c.get("cover")
    ]
    assert any(c["patients_added"] >= 1 for c in covered)  # the small fractions ran because coverage added
