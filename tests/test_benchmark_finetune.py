"""The ``finetune`` protocol end to end: RSNA Pneumonia laid out for real ids (DICOMs), its records built into shards
through a manifest, and the ``cls`` task fine-tuned through the Trainer at two label fractions: test AUROC with
intervals, each fraction's subset checksummed — and that subset is the one the Trainer trained on. NIH, whose labels
are not all CheXpert findings, is refused with one line. In MLflow (a sqlite store) each Trainer run is a child of
the suite entry's run, itself a child of the model's suite run, with the suite, dataset version and split checksum
as its params."""

from __future__ import annotations

import json

import pytest
from test_benchmark_readers import TABLES
from train_testdata import tiny_export

from data_tools.benchmarks import read_benchmark
from data_tools.synth.bench_layout import layout_nih, layout_rsna
from mpma_ds.benchmark.samples import load_samples
from mpma_ds.cli.benchmark import main
from mpma_ds.tracking.lineage import PARENT_TAG

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-e2e (minutes: two short fine-tuning runs)
SIZE = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = base / "bench-finetune"
    exported = tiny_export(root / "exported", str(base), SIZE)
    layout_rsna(TABLES, root / "data", 120, SIZE, 0)
    layout_nih(TABLES, root / "data", 30, SIZE, 0)
    suite = root / "ft.yaml"
    suite.write_text(
        "name: ft\nentries:\n"
        "  - {dataset: rsna-pneumonia, protocol: finetune, fractions: [0.5, 1.0], set: [train.epochs=1]}\n"
        "  - {dataset: nih-cxr14, protocol: finetune, fractions: [1.0], set: [train.epochs=1]}\n"
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


def test_a_dataset_whose_labels_are_not_chexpert_findings_is_refused(run):
    _, results = run
    err = results["entries"]["nih-cxr14"]["finetune"]["models"]["exported"]["error"]
    assert "protocol finetune trains the cls task on CheXpert findings" in err and "Emphysema" in err


def test_trainer_runs_are_children_of_the_entry_run(run):
    from mlflow.tracking import MlflowClient

    root, results = run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mpma-benchmark").experiment_id], max_results=100)
    suite_run = results["models"]["exported"]["mlflow_run_id"]
    entries = {r.data.tags.get("mpma.entry"): r for r in runs if r.data.tags.get("mpma.kind") == "benchmark-entry"}
    assert {e: r.data.tags.get(PARENT_TAG) for e, r in entries.items()} == {
        "rsna-pneumonia/finetune": suite_run,
        "nih-cxr14/finetune": suite_run,
    }
    assert entries["nih-cxr14/finetune"].info.status == "FAILED"  # refused: no Trainer run under it
    entry = entries["rsna-pneumonia/finetune"]
    block = results["entries"]["rsna-pneumonia"]["finetune"]
    trainer_runs = [r for r in runs if r.data.tags.get("mpma.kind") == "finetune"]
    expected = {r["mlflow_run_id"] for r in block["models"]["exported"]["info"]["runs"].values()}
    assert {r.info.run_id for r in trainer_runs} == expected and len(expected) == 2  # one per label fraction
    for r in trainer_runs:
        assert r.data.tags[PARENT_TAG] == entry.info.run_id  # nested, not a sibling of the suite run
        assert r.data.params["benchmark.suite"] == "ft"
        assert r.data.params["benchmark.entry"] == "rsna-pneumonia/finetune"
        assert r.data.params["benchmark.dataset_version"] == results["datasets"]["rsna-pneumonia"]["version"]
        assert r.data.params["benchmark.split_checksum"] == block["split_checksum"]
