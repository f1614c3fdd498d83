"""The ``finetune`` protocol end to end: RSNA Pneumonia laid out for real ids (DICOMs), its records built into shards
through a manifest, and the ``cls`` task fine-tuned through the Trainer at two label fractions: test AUROC with
intervals, each fraction's subset checksummed — and that subset is the one the Trainer trained on (the CheXpert path,
as before). NIH on its own 14 labels (Hernia, Emphysema ...: ``task.cls.labels: dataset``) and COVIDx's three
classes (softmax, accuracy) through the same protocol; PadChest, which has no split, cut by a seeded patient-level
split and tested on its test part; a fraction leaving a label without positives is label-covered (the seed's first
patient holding it added, recorded beside the checksum) or, coverage off, refused with one line before anything is
built, and the command exits 1. In MLflow (a sqlite store) each Trainer run is a child of the suite
entry's run, itself a child of the model's suite run, with the suite, dataset version and split checksum as its
params."""

from __future__ import annotations

import json

import pytest
from test_benchmark_readers import TABLES
from train_testdata import tiny_export

from data_tools.benchmarks import read_benchmark
from data_tools.benchmarks.nih import NIH_LABELS
from data_tools.synth.bench_layout import layout_covidx, layout_nih, layout_padchest, layout_rsna
from mpma_ds.benchmark.samples import load_samples
from mpma_ds.cli.benchmark import main
from mpma_ds.tracking.lineage import PARENT_TAG

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-e2e (minutes: two short fine-tuning runs)
SIZE = 64
PADCHEST = ["normal", "cardiomegaly", "pleural effusion"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = base / "bench-finetune"
    exported = tiny_export(root / "exported", str(base), SIZE)
    layout_rsna(TABLES, root / "data", 120, SIZE, 0)
    layout_nih(TABLES, root / "data", 30, SIZE, 0, per_label=3)
    layout_covidx(root / "data", 45, SIZE, 0)
    layout_padchest(TABLES, root / "data", 40, SIZE, 0)
    suite = root / "ft.yaml"
    suite.write_text(
        "name: ft\nentries:\n"
        "  - {dataset: rsna-pneumonia, protocol: finetune, fractions: [0.5, 1.0], set: [train.epochs=1]}\n"
        "  - {dataset: nih-cxr14, protocol: finetune, fractions: [1.0], set: [train.epochs=1]}\n"
        "  - {dataset: covidx, protocol: finetune, fractions: [1.0], set: [train.epochs=2]}\n"
        f"  - {{dataset: padchest, protocol: finetune, fractions: [1.0], options: {{labels: {PADCHEST}}}, "
        "set: [train.epochs=1]}\n"
    )
    uri = f"sqlite:///{root / 'mlflow.db'}"  # a real local store: the Trainer runs nest under the entry's run
    argv = ["--model", str(exported), "--suite", str(suite), "--data-root", str(root / "data"), "--out",
            str(root / "out"), "--tracking-uri", uri, "--bootstrap", "100", "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    return root, json.loads((root / "out" / "results.json").read_text())


def test_each_fraction_fine_tuned_and_tested_with_intervals(run):
    root, results = run
    block = results["entries"]["rsna-pneumonia"]["finetune"]
    m = block["models"]["exported"]
    met, info = m["metrics"], m["info"]
    assert (
        m["headline"] == "auroc_mean@100%"
        and met["train_images"] == results["datasets"]["rsna-pneumonia"]["counts"]["splits"]["train"]
    )
    for tag in ("@50%", "@100%"):
        summary = json.loads((root / "out" / "finetune" / "exported" / "rsna-pneumonia-finetune" / tag.strip("@")
                              .replace("%", "pct") / "summary.json").read_text())  # fmt: skip
        assert summary["task"] == "cls" and summary["label_fraction"] == float(tag[1:-1]) / 100
        assert summary["test"]["test/auroc_macro"] == pytest.approx(met[f"auroc_mean{tag}"], nan_ok=True)
        assert f"auroc_mean{tag}_ci95" in met
    # the checksummed subset is the Trainer's: the same images kept
    half = info["split_checksums"]["@50%"]
    assert 0 < half["images"] < met["train_images"] == info["split_checksums"]["@100%"]["images"]
    assert info["runs"]["@50%"]["subset"]["samples_kept"] == half["images"]
    assert m["info"]["images_rejected"] == 0  # every test DICOM decoded into the shards
    meta, rows, _ = load_samples(root / "out" / "samples" / "rsna-pneumonia" / "finetune" / "exported.npz")
    assert [s["name"] for s in meta["sets"]] == ["auroc_mean@50%", "auroc_mean@100%"]
    test = read_benchmark("rsna-pneumonia", root / "data" / "rsna-pneumonia").split("test")
    assert sorted(rows) == sorted(r.key for r in test) and len(rows) == block["images"]  # paired by record key


def _summary(root, entry: str, tag: str) -> dict:
    folder = root / "out" / "finetune" / "exported" / entry / tag.strip("@").replace("%", "pct")
    return json.loads((folder / "summary.json").read_text())


def test_rsna_stays_on_the_chexpert_path(run):
    root, results = run
    info = results["entries"]["rsna-pneumonia"]["finetune"]["models"]["exported"]["info"]
    assert info["label_mode"] == "chexpert" and info["labels"] == ["Pneumonia"]
    assert _summary(root, "rsna-pneumonia-finetune", "@100%")["labels"] == ["Pneumonia"]


def test_nih_fine_tuned_on_its_own_fourteen_labels(run):
    root, results = run
    block = results["entries"]["nih-cxr14"]["finetune"]
    m = block["models"]["exported"]
    assert "error" not in m, m
    met, info = m["metrics"], m["info"]
    assert m["headline"] == "auroc_mean@100%" and info["label_mode"] == "dataset"
    assert info["labels"] == list(NIH_LABELS)
    summary = _summary(root, "nih-cxr14-finetune", "@100%")
    assert summary["labels"] == list(NIH_LABELS) and min(summary["train_positives"].values()) >= 1
    assert summary["test"]["test/auroc_macro"] == pytest.approx(met["auroc_mean@100%"])
    assert 0 <= met["auroc_mean@100%"] <= 1 and len(met["auroc_mean@100%_ci95"]) == 2
    per_label = [k.split("/", 1)[1] for k in met if k.startswith("auroc@100%/")]
    assert per_label and set(per_label) <= set(NIH_LABELS)
    test = read_benchmark("nih-cxr14", root / "data" / "nih-cxr14").split("test")
    _, rows, _ = load_samples(root / "out" / "samples" / "nih-cxr14" / "finetune" / "exported.npz")
    assert sorted(rows) == sorted(r.key for r in test) and m["info"]["images_rejected"] == 0


def test_covidx_fine_tuned_as_three_classes_reports_accuracy(run):
    root, results = run
    m = results["entries"]["covidx"]["finetune"]["models"]["exported"]
    assert "error" not in m, m
    met, info = m["metrics"], m["info"]
    assert m["headline"] == "accuracy@100%" and info["label_mode"] == "column"
    assert info["labels"] == ["normal", "pneumonia", "COVID-19"]
    summary = _summary(root, "covidx-finetune", "@100%")
    assert summary["test"]["test/accuracy"] == pytest.approx(met["accuracy@100%"])
    lo, hi = met["accuracy@100%_ci95"]
    assert 0 <= lo <= met["accuracy@100%"] <= hi <= 1
    assert {f"f1@100%/{c}" for c in info["labels"]} & set(met)
    meta, rows, _ = load_samples(root / "out" / "samples" / "covidx" / "finetune" / "exported.npz")
    assert [s["name"] for s in meta["sets"]] == ["accuracy@100%"]
    test = read_benchmark("covidx", root / "data" / "covidx").split("test")
    assert sorted(rows) == sorted(r.key for r in test)


def test_padchest_without_a_split_is_cut_patient_wise_and_tested_on_its_test_part(run):
    from mpma_ds.benchmark.finetune import split_records

    root, results = run
    block = results["entries"]["padchest"]["finetune"]
    m = block["models"]["exported"]
    assert "error" not in m, m
    info = m["info"]
    assert info["label_mode"] == "dataset" and info["labels"] == PADCHEST
    seeded = info["seeded_split"]
    assert "seeded 0.7/0.1/0.2 split (seed 0)" in seeded["note"] and block["note"] == seeded["note"]
    assert (block["split"], block["images"], block["split_checksum"]) == (
        "test (seeded)",
        seeded["images"]["test"],
        seeded["checksums"]["test"],
    )
    data = read_benchmark("padchest", root / "data" / "padchest", {"labels": PADCHEST})
    records, again = split_records(data, "test")
    assert again == seeded  # the same split, each part checksummed
    parts: dict[str, set] = {}
    for r in records:
        parts.setdefault(r.patient, set()).add(r.split)
    assert all(len(p) == 1 for p in parts.values()) and any(
        sum(r.patient == p for r in records) > 1 for p in parts
    )
    _, rows, _ = load_samples(root / "out" / "samples" / "padchest" / "finetune" / "exported.npz")
    assert sorted(rows) == sorted(r.key for r in records if r.split == "test")
    assert info["images_rejected"] == 0 and m["metrics"]["train_images"] == seeded["images"]["train"]
    assert 0 <= m["metrics"]["auroc_mean@100%"] <= 1


def test_a_fraction_leaving_a_label_without_positives_is_one_line_before_any_build(run, tmp_path, capsys):
    root, _ = run
    suite = tmp_path / "few.yaml"  # coverage turned off: the seeded 5 % subset alone holds no Hernia
    suite.write_text(
        "name: few\nentries:\n  - {dataset: nih-cxr14, protocol: finetune, fractions: [0.05, 1.0], "
        "set: [data.label_fraction_cover=false]}\n"
    )
    argv = ["--model", str(root / "exported"), "--suite", str(suite), "--data-root", str(root / "data"), "--out",
            str(tmp_path / "out"), "--no-mlflow", "--bootstrap", "0", "--workers", "0"]  # fmt: skip
    assert main(argv) == 1  # the suite's other entries would be written; the command fails
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    err = results["entries"]["nih-cxr14"]["finetune"]["models"]["exported"]["error"]
    assert "\n" not in err and err.startswith("nih-cxr14: label fraction 0.05 (seed 0) keeps "), err
    assert "Hernia" in err and err.endswith("drop 0.05 from the entry's fractions, or choose other seeds")
    out, stderr = capsys.readouterr()
    assert "not scored: " + err in out
    assert stderr.strip().splitlines()[-1].endswith(f": error: not scored: nih-cxr14/finetune [exported]: {err}")
    assert not (tmp_path / "out" / "cache" / "shards").exists() and not (tmp_path / "out" / "finetune").exists()


def test_the_same_fraction_runs_label_covered_and_says_what_was_added(run, tmp_path, capsys):
    """The benchmark's default: the 5 % subset gets the seed's first patient holding each missing label; the
    checksum is of that final subset, what was added sits beside it, in the Trainer's subset and MLflow params."""
    from mlflow.tracking import MlflowClient

    from data_tools.benchmarks.common import split_checksum
    from mpma_ds.data.subsets import LabelCover, cover_labels, patient_subset

    root, _ = run
    suite = tmp_path / "covered.yaml"
    suite.write_text(
        "name: covered\nentries:\n  - {dataset: nih-cxr14, protocol: finetune, fractions: [0.05], "
        "set: [train.epochs=1]}\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--model", str(root / "exported"), "--suite", str(suite), "--data-root", str(root / "data"), "--out",
            str(tmp_path / "out"), "--tracking-uri", uri, "--bootstrap", "0", "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    m = json.loads((tmp_path / "out" / "results.json").read_text())["entries"]["nih-cxr14"]["finetune"]["models"]
    info = m["exported"]["info"]
    block = info["split_checksums"]["@5%"]
    data = read_benchmark("nih-cxr14", root / "data" / "nih-cxr14")
    train = data.split("train")
    subjects, positives = [r.patient for r in train], data.label_matrix(train) == 1
    plain = patient_subset(subjects, 0.05, 0)
    keep, added = cover_labels(subjects, plain, LabelCover(tuple(data.label_names), positives), 0)
    assert "Hernia" in block["cover"]["labels"] and block["cover"] == added and added["patients_added"] >= 1
    assert block["images"] == int(keep.sum()) == int(plain.sum()) + added["samples_added"]
    assert block["checksum"] == split_checksum([r for r, k in zip(train, keep) if k])
    assert block["checksum"] != split_checksum([r for r, k in zip(train, plain) if k])
    trainer = info["runs"]["@5%"]["subset"]  # the Trainer kept the very same subset
    assert trainer["samples_kept"] == block["images"] and trainer["cover"] == added
    summary = json.loads((tmp_path / "out" / "finetune" / "exported" / "nih-cxr14-finetune" / "5pct"
                          / "summary.json").read_text())  # fmt: skip
    assert min(summary["train_positives"].values()) >= 1
    assert f"data.label_fraction_cover added {added['patients_added']} patient(s)" in capsys.readouterr().out
    params = MlflowClient(tracking_uri=uri).get_run(info["runs"]["@5%"]["mlflow_run_id"]).data.params
    assert params["data.label_fraction_cover"] == "true"
    assert params["subset.cover.patients_added"] == str(added["patients_added"])
    assert json.loads(params["subset.cover.labels"]) == added["labels"]


def test_trainer_runs_are_children_of_the_entry_run(run):
    from mlflow.tracking import MlflowClient

    root, results = run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mpma-benchmark").experiment_id], max_results=100)
    suite_run = results["models"]["exported"]["mlflow_run_id"]
    entries = {r.data.tags.get("mpma.entry"): r for r in runs if r.data.tags.get("mpma.kind") == "benchmark-entry"}
    assert {e: r.data.tags.get(PARENT_TAG) for e, r in entries.items()} == {
        f"{d}/finetune": suite_run for d in ("rsna-pneumonia", "nih-cxr14", "covidx", "padchest")
    }
    entry = entries["rsna-pneumonia/finetune"]
    block = results["entries"]["rsna-pneumonia"]["finetune"]
    trainer_runs = [
        r for r in runs
        if r.data.tags.get("mpma.kind") == "finetune" and r.data.params.get("benchmark.entry") == "rsna-pneumonia/finetune"
    ]  # fmt: skip
    expected = {r["mlflow_run_id"] for r in block["models"]["exported"]["info"]["runs"].values()}
    assert {r.info.run_id for r in trainer_runs} == expected and len(expected) == 2  # one per label fraction
    for r in trainer_runs:
        assert r.data.tags[PARENT_TAG] == entry.info.run_id  # nested, not a sibling of the suite run
        assert r.data.params["benchmark.suite"] == "ft"
        assert r.data.params["benchmark.dataset_version"] == results["datasets"]["rsna-pneumonia"]["version"]
        assert r.data.params["benchmark.split_checksum"] == block["split_checksum"]
