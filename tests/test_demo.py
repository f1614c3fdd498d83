"""`python launch/demo.py` (make demo) end to end at toy size: every stage runs for real (synthetic corpus, shards,
tokenizer, synthetic VQA-RAD set, `deepspeed --num_gpus 2` ZeRO-3 pretraining on 2 CPU processes, export,
evaluation of the pretrained model and a random twin, linear probes and VQA fine-tuning of both), the tables and
the `mlflow ui` line are printed, results.json and MLflow hold every run, and a rerun reuses every stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpma_ds.eval.grounding import BEST_MAP

REPO = Path(__file__).resolve().parents[1]


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "demo.py"),
        "--out",
        str(out),
        "--studies",
        "40",
        "--steps",
        "3",
        "--label-fractions",
        "0.5,1.0",
        "--min-label-count",
        "1",
        "--bound-cache",  # not the user's cache: the bound is measured (and logged) by this demo
        str(out.parent / "bound-cache"),
        "--measure-bound",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU demo path (2 gloo processes)")
def test_demo_end_to_end_and_rerun(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "demo"
    res = _demo(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout
    for stage in ("[1/9] synthetic corpus", "[4/9] synthetic VQA-RAD", "[5/9] pretraining", "[7/9] evaluation",
                  "[8/9] supervised bound", "[9/9] downstream"):  # fmt: skip
        assert f"{stage}" in text and "reused" not in text
    assert "/usr/bin/ld" not in text + res.stderr  # what DeepSpeed's op probes print goes to the stage logs
    assert re.search(r"^ +pretrained +random-init$", text, re.M)  # the table's header
    rows = [ln for ln in text.splitlines() if ln.startswith(("image->", "report->", "zero-shot AUROC (mean)"))]
    cell = r"n/a|(\d\.\d{3})(?: \[(\d\.\d{3}), (\d\.\d{3})\])?"
    table = {re.split(r"\s{2,}", ln)[0]: re.findall(cell, ln[len(re.split(r"\s{2,}", ln)[0]) :]) for ln in rows}
    assert set(table) >= {"image->report R@1", "report->image R@10", "zero-shot AUROC (mean)",
                          "image->report R@1, abnormal", "report->image R@1, abnormal"}  # fmt: skip
    for label, values in table.items():
        assert len(values) == 2, (label, values)
        for value, low, high in values:  # "n/a" matches with empty groups
            if value:
                assert 0.0 <= float(value) <= 1.0, (label, value)
                assert not low or float(low) <= float(value) <= float(high), (label, value, low, high)
    uri = "sqlite:///" + str(out.resolve() / "mlflow.db")
    assert f"mlflow ui --backend-store-uri {uri}" in text
    report = out.resolve() / "report" / "report.html"  # the comparison report, its path printed
    assert re.search(rf"^report: +{re.escape(str(report))} ", text, re.M) and report.is_file()
    assert (out / "report" / "pairs.json").is_file() and (out / "report" / "label_efficiency.png").is_file()

    # the run folder, the export and the evaluations are where the demo says
    summary = json.loads((out / "pretrain" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["world_size"] == 2 and summary["zero_stage"] == 3
    assert (out / "exported" / "model.safetensors").is_file()
    assert (out / "exported" / "text_encoder" / "tokenizer.json").is_file()
    pre = json.loads((out / "eval" / "pretrained" / "results.json").read_text())
    rnd = json.loads((out / "eval" / "random-init" / "results.json").read_text())
    assert pre["metrics"]["eval_samples"] == rnd["metrics"]["eval_samples"] > 0
    assert rnd["evaluated"].startswith("random-init:mpma_tiny")

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mpma-demo")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    finetune = {f"demo-{t}" for t in ("vqa-pretrained", "vqa-random")}
    finetune |= {f"demo-linear_probe-{i}-{f}" for i in ("pretrained", "random") for f in ("0.5", "1.0")}
    assert set(runs) == {"demo-pretrain", "eval-pretrained-validate", "eval-random-init-validate",
                         "demo-supervised-bound"} | finetune  # fmt: skip
    bound_run = runs["demo-supervised-bound"].data.tags
    assert bound_run["mpma.task"] == "cls" and bound_run["mpma.init"] == "random"
    assert runs["demo-pretrain"].info.run_id == summary["mlflow_run_id"]
    loss_steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss")]
    assert loss_steps and max(loss_steps) <= 3 and len(loss_steps) == len(set(loss_steps))
    assert runs["eval-random-init-validate"].data.tags["mpma.eval_of"] == rnd["evaluated"]
    assert runs["eval-pretrained-validate"].data.tags["mpma.kind"] == "eval"

    # downstream: every fine-tuning run tagged, pretrained ones pointing at the pretraining run
    for name in finetune:
        tags = runs[name].data.tags
        assert tags["mpma.kind"] == "finetune" and tags["mpma.task"] in ("vqa", "linear_probe"), name
        assert tags["mpma.init"] == ("pretrained" if "pretrained" in name else "random"), name
        if tags["mpma.init"] == "pretrained":
            assert tags["mpma.pretrain_run"] == summary["mlflow_run_id"], name
            assert tags["mlflow.parentRunId"] == summary["mlflow_run_id"], name  # nested in mlflow ui
    assert runs["eval-pretrained-validate"].data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    # results.json holds the three tables, every value a number in [0, 1] (or null where a split has none)
    results = json.loads((out / "results.json").read_text())
    assert set(results["linear_probe"]) == {"0.5", "1.0"} and set(results["vqa"]) >= {"overall", "closed", "open"}
    for entry in [*results["linear_probe"].values(), *(results["vqa"][k] for k in ("overall", "closed", "open"))]:
        for init in ("pretrained", "random"):
            assert entry[init] is None or 0.0 <= entry[init] <= 1.0, entry
    assert results["linear_probe"]["0.5"]["pretrained_subset"]["fraction"] == 0.5
    # the comparison report's pairs are the demo's own paired differences, read back from MLflow
    pairs = json.loads((out / "report" / "pairs.json").read_text())
    for fraction in ("0.5", "1.0"):
        (row,) = [r for r in pairs if r["task"] == "linear_probe" and r["label_fraction"] == float(fraction)]
        entry = results["linear_probe"][fraction]
        if entry["difference"] is not None:
            assert row["interval"] == "paired bootstrap"
            assert row["difference"] == pytest.approx(entry["difference"])
            assert row["difference_ci95"] == pytest.approx(entry["difference_ci95"])
    assert results["pretrain_eval"]["i2t_R@1"]["pretrained"] >= 0
    for key in ("i2t_R@10", "i2t_R@1_abnormal", "t2i_R@1_abnormal"):
        entry = results["pretrain_eval"][key]
        assert set(entry) == {"pretrained", "random", "ci95_pretrained", "ci95_random"}, key
    # issue 25's keys: the zero-shot AUROC with its supervised bound (3 steps on the truth, measured and cached),
    # the pointing game with its chance level and map; every target's verdict
    zs = results["pretrain_eval"]["zero_shot_auroc"]
    assert set(zs) == {"pretrained", "random", "supervised_bound", "ci95_pretrained", "ci95_random",
                       "ci95_supervised_bound"}  # fmt: skip
    bound = results["supervised_bound"]
    assert bound["steps"] == 3 and bound["cached"] is False and bound["auroc"] == zs["supervised_bound"]
    assert (out.parent / "bound-cache" / f"{bound['key']}.json").is_file()
    pg = results["pretrain_eval"]["pointing_game"]
    assert {"pretrained", "random", "chance", "ci95_pretrained", "ci95_random"} <= set(pg)
    assert pg["map"] == BEST_MAP  # the demo plays (and its gallery draws) the best measured map
    assert set(results["targets"]) == {"zero_shot_auroc", "i2t_R@10", "pointing_game", "downstream"}
    for name, target in results["targets"].items():
        assert target["verdict"] in ("holds", "missed", "not measured"), name
        assert f"[{target['verdict']:^12}] {target['target']}: {target['measured']}" in text, name
    assert re.search(r"^targets \(issue 25\): \d of 4 hold$", text, re.M)
    assert "supervised bound of the zero-shot AUROC" in text
    # the report's gallery names the map and shows both models' pointing game
    page = report.read_text(encoding="utf-8")
    assert f"map: <code>{BEST_MAP}</code>" in page and "pointing game over the whole split: pretrained" in page
    assert results["pretrain_eval"]["zero_shot_reference"] == "truth"  # the synthetic shards carry it
    assert "label efficiency" in text and "linear probe AUROC" in text and "VQA accuracy" in text
    # the linear probes of one model shared one feature extraction per split; frozen VQA cached its own
    assert len(list((out / "feature_cache").glob("*/train.pt"))) == 4  # (image, fused) x (pretrained, random)

    # the compare line the demo prints for a user to paste runs as printed (from the repository root, with the
    # environment's `python` first on PATH) and rewrites the same report
    (line,) = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("compare runs:")]
    report.unlink()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    pasted = subprocess.run(line, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert pasted.returncode == 0, pasted.stderr[-3000:]
    assert report.is_file() and f"report: {report}" in pasted.stdout

    # a rerun reuses every stage and prints the same tables
    again = _demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": reused") == 9
    assert [
        ln for ln in again.stdout.splitlines() if ln.startswith(("image->", "report->", "zero-shot AUROC (mean)"))
    ] == rows


def test_fresh_never_deletes_a_folder_that_is_not_a_demos(tmp_path):
    """`--fresh` deletes --out: pointed at a folder of the user's (no .stages/ or logs/), it is refused with one
    line and nothing is deleted (it used to remove the whole folder)."""
    mine = tmp_path / "mine"
    (mine / "run" / "checkpoints").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    res = subprocess.run(
        [sys.executable, str(REPO / "launch" / "demo.py"), "--out", str(mine), "--fresh"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("demo: error:")]
    assert res.returncode == 1 and len(errors) == 1, res.stderr[-2000:]
    assert "not a demo's work folder" in errors[0]
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "run" / "checkpoints").is_dir()
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "run"]


def test_an_edited_recipe_pretrains_again(tmp_path, monkeypatch):
    """The pretraining stage's settings hold the resolved recipe, not only the demo's --set overrides: editing
    `pretrain_tiny` (or a default it leaves alone) must not reuse a model trained by the old one."""
    import shutil

    import mpma_ds.runner.demo as demo_mod
    from mpma_ds.cli.demo import parse_args
    from mpma_ds.recipes import find_recipe

    demo = demo_mod.Demo(parse_args(["--out", str(tmp_path / "demo")]))
    shipped = demo.pretrain_settings({"seed": 0})
    assert json.loads(json.dumps(shipped)) == shipped  # compares equal to its marker's JSON copy (a rerun reuses)
    assert shipped["recipe"]["train"]["max_steps"] == demo.args.steps  # the overrides are in it
    edited = tmp_path / "pretrain_tiny.yaml"
    shutil.copy(find_recipe("pretrain_tiny"), edited)
    edited.write_text(edited.read_text().replace("w_mlm: 4.0", "w_mlm: 2.0"))
    monkeypatch.setattr(demo_mod, "find_recipe", lambda name: edited)
    changed = demo.pretrain_settings({"seed": 0})
    assert changed != shipped and changed["recipe"]["model"]["overrides"]["w_mlm"] == 2.0
