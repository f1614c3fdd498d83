"""``mpma-benchmark --suite vqa`` end to end: VQA-RAD and SLAKE laid out as their downloads unpack (synthetic
questions about synthetic films, SLAKE with its Chinese questions interleaved), an exported tiny model and its random
twin each fine-tuned through the Trainer (a 1-epoch run of the suite's recipe), accuracy overall / CLOSED / OPEN with
intervals and paired differences; then the twin alone in a second, separate run, paired with the first run's model
per question through the saved samples (``--compare``)."""

from __future__ import annotations

import json

import pytest
from train_testdata import tiny_export

from data_tools.synth.bench_layout import layout_vqa
from mpma_ds.benchmark.samples import load_samples
from mpma_ds.benchmark.suite import load_suite
from mpma_ds.cli.benchmark import main

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-e2e (minutes: four short fine-tuning runs)
SIZE = 64
SHORT = "[train.epochs=1, train.log_every=1]"


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = base / "bench-vqa"
    exported = tiny_export(root / "exported", str(base), SIZE)
    made = layout_vqa(root / "data", studies=40, size=96, seed=0)
    suite = root / "short-vqa.yaml"  # the shipped suite's entries with a 1-epoch run
    shipped = load_suite("vqa")
    suite.write_text("name: short-vqa\nentries:\n" + "".join(
        f"  - {{dataset: {e.dataset}, protocol: vqa, recipe: {e.recipe}, set: {SHORT}}}\n" for e in shipped.entries
    ))  # fmt: skip
    argv = ["--suite", str(suite), "--data-root", str(root / "data"), "--no-mlflow", "--bootstrap", "200",
            "--workers", "0"]  # fmt: skip
    assert (
        main(["--model", str(exported), "--model", f"random:{exported}", *argv, "--out", str(root / "out")]) == 0
    )
    return root, made, argv, json.loads((root / "out" / "results.json").read_text())


def test_both_sets_fine_tuned_and_tested_for_both_models(vqa_run):
    root, _, _, results = vqa_run
    assert results["skipped"] == {}
    assert {d: set(p) for d, p in results["entries"].items()} == {"vqa-rad": {"vqa"}, "slake": {"vqa"}}
    for dataset, protocols in results["entries"].items():
        block = protocols["vqa"]
        assert (
            block["split"] == "test"
            and block["images"] == results["datasets"][dataset]["counts"]["splits"]["test"]
        )
        for name, m in block["models"].items():
            met = m["metrics"]
            assert met["questions"] == block["images"] - m["info"]["images_rejected"] > 0, (dataset, name)
            assert met["questions_closed"] + met["questions_open"] == met["questions"]
            for key in ("accuracy_overall", "accuracy_closed"):
                lo, hi = met[f"{key}_ci95"]
                assert 0 <= lo <= met[key] <= hi <= 1
            # trained through the Trainer: its run folder, summary and per-question predictions
            run = root / "out" / "finetune" / name / f"{dataset}-vqa"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["task"] == "vqa" and summary["step"] == m["info"]["steps"] > 0
            assert summary["test"]["test/accuracy_overall"] == pytest.approx(met["accuracy_overall"])
        d = block["paired"]["random-exported - exported"]["accuracy_overall"]
        a, b = (block["models"][n]["metrics"]["accuracy_overall"] for n in ("exported", "random-exported"))
        assert d["difference"] == pytest.approx(b - a)


def test_slake_reads_english_questions_and_reports_the_others(vqa_run):
    _, made, _, results = vqa_run
    slake = results["datasets"]["slake"]
    written = sum(
        len(json.loads((made["slake"] / f).read_text())) for f in ("train.json", "validation.json", "test.json")
    )
    assert slake["counts"]["problems"] == {"lang_filtered": written // 2}  # every Chinese copy, reported by row
    assert slake["counts"]["images"] == written // 2
    rows = [json.loads(line) for line in open(slake["problems_file"])]
    assert rows[0]["file"] == "train.json" and rows[0]["row"] == 2 and rows[0]["reason"] == "lang_filtered"


def test_a_separate_run_pairs_per_question_through_the_saved_samples(vqa_run, capsys):
    root, _, argv, first = vqa_run
    exported = root / "exported"
    suite = argv[argv.index("--suite") + 1]
    only_rad = root / "rad-only.yaml"
    only_rad.write_text("\n".join(line for line in open(suite).read().splitlines() if "slake" not in line) + "\n")
    args = [*argv, "--suite", str(only_rad), "--model", f"random:{exported}", "--out", str(root / "twin")]
    assert main(args) == 0
    block = first["entries"]["vqa-rad"]["vqa"]
    meta, rows, _ = load_samples(root / "out" / "samples" / "vqa-rad" / "vqa" / "exported.npz")
    assert (
        meta["split_checksum"] == block["split_checksum"]
        and len(rows) == block["models"]["exported"]["metrics"]["questions"]
    )
    capsys.readouterr()
    cmp = root / "cmp"
    assert main(["--compare", str(root / "out"), str(root / "twin"), "--name", "exported", "--name",
                 "random-exported", "--out", str(cmp), "--bootstrap", "200"]) == 0  # fmt: skip
    assert "vqa-rad/vqa" in capsys.readouterr().out
    report = json.loads((cmp / "paired.json").read_text())
    assert set(report["entries"]) == {"vqa-rad"} and report["skipped"] == {
        "slake/vqa": "not run (or no per-sample scores saved) in both"
    }
    paired = report["entries"]["vqa-rad"]["vqa"]
    assert paired["rows_paired"] == len(rows)
    twin = json.loads((root / "twin" / "results.json").read_text())["entries"]["vqa-rad"]["vqa"]
    d = paired["paired"]["accuracy_overall"]
    assert d["a"] == pytest.approx(block["models"]["exported"]["metrics"]["accuracy_overall"])
    assert d["b"] == pytest.approx(twin["models"]["random-exported"]["metrics"]["accuracy_overall"])
    assert d["difference"] == pytest.approx(d["b"] - d["a"])
    lo, hi = d["difference_ci95"]
    assert lo <= d["difference"] <= hi
