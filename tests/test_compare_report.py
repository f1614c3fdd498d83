"""The run comparison report (issue 13) on a tracking store filled by real tiny runs: a 6-step mpma_tiny
pretraining (with in-training validation and system metrics), its export, the evaluation of the export and of a
random twin (with grounding overlays), and the linear probe at two label fractions from the export and from
random weights — the same path the demo takes, at test size. One module-scoped store for every test here."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from finetune_testdata import feature_cache, finetune_overrides, ft_shards, recipe_name
from train_testdata import ROOT, TINY_RECIPE, prepared_base, tiny_overrides, tiny_shards, tiny_tokenizer

from mpma_ds.tracking.lineage import PAIR_TAG, PARENT_TAG

pytestmark = pytest.mark.slow

EXPERIMENT = "cmp"
FRACTIONS = ("0.5", "1.0")


@dataclass(frozen=True)
class Store:
    uri: str
    root: Path
    pretrain_id: str
    eval_ids: dict[str, str]
    """init -> run id."""
    ft: dict[tuple[str, str], dict]
    """(init, fraction) -> the run's summary.json."""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    from mpma_ds.recipes import find_recipe
    from mpma_ds.runner.evaluate import run_evaluation
    from mpma_ds.runner.export import export_checkpoint
    from mpma_ds.runner.trainer import train
    from mpma_ds.training import load_recipe
    from mpma_ds.training.recipe import FinetuneRecipe

    base = prepared_base(tmp_path_factory)
    ft_shards(base)
    root = Path(base) / "compare"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking = {"tracking.enabled": True, "tracking.uri": uri, "tracking.experiment": EXPERIMENT}
    pre = train(load_recipe(TINY_RECIPE, tiny_overrides(base, root / "pretrain", **tracking, **{
        "train.max_steps": 6, "train.eval_every": 3, "train.save_every": 6, "tracking.run_name": "tiny-pretrain",
        "tracking.system_metrics_interval_s": 0.5})))  # fmt: skip
    exported = export_checkpoint(root / "pretrain", root / "exported")
    common = dict(shards=tiny_shards(base), split="validate", tracking_uri=uri, experiment=EXPERIMENT, batch_size=8,
                  n_resamples=50, grounding=2, device="cpu", min_count=1)  # fmt: skip
    evals = {
        "pretrained": run_evaluation(model=exported, out_dir=root / "eval-pre", name="pre", **common)["run_id"],
        "random": run_evaluation(
            random_init="mpma_tiny",
            recipe=root / "pretrain" / "recipe.yaml",
            tokenizer=tiny_tokenizer(base),
            out_dir=root / "eval-rnd",
            name="rnd",
            **common,
        )["run_id"],  # fmt: skip
    }
    ft = {}
    for init in ("pretrained", "random"):
        for fraction in FRACTIONS:
            tag = f"lp-{init}-{fraction}"
            overrides = finetune_overrides(
                base, "linear_probe", root / tag, init=exported if init == "pretrained" else "random",
                **tracking, **{"tracking.run_name": tag, "data.label_fraction": fraction,
                               "task.linear_probe.cache_dir": feature_cache(base) / "cmp"},
            )  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):
                ft[(init, fraction)] = train(load_recipe(find_recipe(recipe_name("linear_probe")), overrides,
                                                         cls=FinetuneRecipe))  # fmt: skip
    return Store(uri, root, pre["mlflow_run_id"], evals, ft)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    from mpma_ds.tracking.report import write_report

    return write_report(EXPERIMENT, tmp_path_factory.mktemp("report"), tracking_uri=store.uri, n_resamples=200)


def test_children_are_nested_under_the_pretraining_run_and_random_runs_paired(store, report):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.uri)
    runs = {
        r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    }
    assert len(runs) == 7
    children = [runs["eval-pre-validate"]] + [runs[f"lp-pretrained-{f}"] for f in FRACTIONS]
    random = [runs["eval-rnd-validate"]] + [runs[f"lp-random-{f}"] for f in FRACTIONS]
    assert all(r.data.tags[PARENT_TAG] == store.pretrain_id for r in children)  # what mlflow ui nests by
    assert all(PARENT_TAG not in r.data.tags for r in random)
    assert [r.data.tags[PAIR_TAG] for r in children] == [r.data.tags[PAIR_TAG] for r in random]
    assert runs["lp-pretrained-0.5"].data.tags[PAIR_TAG] == "linear_probe|labels=0.5|seed=0|subset_seed=0"
    # MLflow's system metrics reached the pretraining run
    assert runs["tiny-pretrain"].data.metrics.get("system/cpu_utilization_percentage", -1) >= 0

    (group,) = report.groups  # one pretraining run: one group, nothing left over
    assert group.parent.run_id == store.pretrain_id
    assert sorted(r.name for r in group.children) == [
        "eval-pre-validate",
        "lp-pretrained-0.5",
        "lp-pretrained-1.0",
    ]
    assert sorted(r.name for r in group.partners) == ["eval-rnd-validate", "lp-random-0.5", "lp-random-1.0"]


def test_pairs_differences_and_intervals(store, report):
    from mpma_ds.eval.bootstrap import paired_difference
    from mpma_ds.eval.classification import multilabel_auroc
    from mpma_ds.tracking.pairs import FROM_INTERVALS, PAIRED, interval_from_two

    rows = {(p.task, p.label_fraction, p.metric): p for p in report.pairs}
    # fine-tuning: the logged test AUROCs, their difference, the paired bootstrap over the saved predictions
    for fraction in FRACTIONS:
        p = rows[("linear_probe", float(fraction), "test/auroc_macro")]
        pre, rnd = (store.ft[(i, fraction)]["test"]["test/auroc_macro"] for i in ("pretrained", "random"))
        assert (p.pretrained, p.random) == pytest.approx((pre, rnd))
        assert p.difference == pytest.approx(pre - rnd) and p.interval == PAIRED
        preds = [__import__("torch").load(store.root / f"lp-{i}-{fraction}" / "test_predictions.pt") for i in
                 ("pretrained", "random")]  # fmt: skip
        arrays = [(q["scores"].numpy(), q["targets"].numpy()) for q in preds]
        expect = paired_difference(multilabel_auroc, *arrays, keys=["auroc_macro"], n_resamples=200,
                                   names=preds[0]["names"], min_each=1)["auroc_macro"]  # fmt: skip
        assert p.difference_ci95 == pytest.approx(expect["difference_ci95"])
        assert p.difference_ci95[0] <= p.difference <= p.difference_ci95[1]
    # evaluation: no per-sample predictions, so the interval comes from the two logged ones
    results = {i: json.loads((store.root / d / "results.json").read_text())["metrics"]
               for i, d in (("pretrained", "eval-pre"), ("random", "eval-rnd"))}  # fmt: skip
    p = rows[("evaluation (validate)", None, "eval/i2t_R_at_1")]
    a, b = results["pretrained"]["i2t_R@1"], results["random"]["i2t_R@1"]
    assert (p.pretrained, p.random, p.difference) == pytest.approx((a, b, a - b)) and p.interval == FROM_INTERVALS
    ci_a, ci_b = results["pretrained"]["i2t_R@1_ci95"], results["random"]["i2t_R@1_ci95"]
    assert p.difference_ci95 == pytest.approx(interval_from_two(a, b, ci_a, ci_b))
    half = math.hypot((ci_a[1] - ci_a[0]) / 2, (ci_b[1] - ci_b[0]) / 2)
    assert p.difference_ci95 == pytest.approx([a - b - half, a - b + half])
    assert ("evaluation (validate)", None, "eval/pointing_game") in rows


def test_what_changed_between_the_runs(report):
    diffs = {d.kind: d for d in report.diffs}
    ft = diffs["finetune"]
    assert ft.task == "linear_probe" and ft.title == "fine-tuning: linear_probe" and len(ft.runs) == 4
    assert {"init.from", "data.label_fraction", "train.output_dir", "tracking.run_name"} <= set(ft.differing)
    assert "train.lr" in ft.identical and "train.lr" not in ft.differing
    by_name = dict(zip((r.name for r in ft.runs), range(len(ft.runs))))
    assert ft.differing["data.label_fraction"][by_name["lp-random-0.5"]] == "0.5"
    ev = diffs["eval"]
    assert "eval.model" in ev.differing and "eval.split" in ev.identical
    assert "pretrain" not in diffs  # a single pretraining run: nothing to compare it with


def test_report_files_tables_and_cli(store, report, tmp_path, capsys):
    from mpma_ds.cli.compare import main
    from mpma_ds.tracking.report_html import SECTIONS

    out = report.html.parent
    assert sorted(p.name for p in report.plots) == ["eval_over_steps.png", "label_efficiency.png",
                                                     "training_finetune.png", "training_pretrain.png"]  # fmt: skip
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 10_000 for p in report.plots)
    page = report.html.read_text()
    assert all(f'<section id="{sid}"><h2>{title}</h2>' in page for sid, title in SECTIONS)
    assert 'src="http' not in page and "<script" not in page  # self-contained, opens offline
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4 + 4 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)  # plots + gallery
    # the gallery: each overlay the pretrained evaluation logged, under its finding, beside the random twin's
    index = json.loads((store.root / "eval-pre" / "grounding" / "overlays.json").read_text())
    assert len(index) == 2
    for finding in {e["finding"] for e in index}:
        assert f"<h4>{finding} (" in page
    (gallery,) = report_html_gallery(report)
    assert (
        gallery.pretrained_run == store.eval_ids["pretrained"] and gallery.random_run == store.eval_ids["random"]
    )
    pairs = [p for items in gallery.findings.values() for p in items]
    assert sorted(p.key for p in pairs) == sorted(e["key"] for e in index)
    assert all(p.pretrained is not None and p.random is not None for p in pairs)  # the same examples from both
    # the map drawn is the one every default plays, named on the page beside both models' pointing game
    from mpma_ds.eval.grounding import BEST_MAP

    assert {e["map"] for e in index} == {BEST_MAP} and gallery.map == BEST_MAP
    assert all(p.pretrained.map == p.random.map == BEST_MAP for p in pairs)
    assert set(gallery.pointing) == {"pretrained", "random", "chance"}
    assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", gallery.pointing["random"])
    assert f"map: <code>{BEST_MAP}</code>; pointing game over the whole split: pretrained " in page
    with open(out / "pairs.csv", newline="") as fh:
        pairs_csv = list(csv.DictReader(fh))
    assert len(pairs_csv) == len(report.pairs) == len(json.loads((out / "pairs.json").read_text()))
    runs_json = json.loads((out / "runs.json").read_text())
    assert {r["name"]: r["parent"] for r in runs_json}["lp-pretrained-1.0"] == store.pretrain_id

    # the command: --runs by name selects the pretraining run with its children and their random partners;
    # by id prefix a fine-tuning run alone (its partner comes along); --filter goes to search_runs
    argv = ["--experiment", EXPERIMENT, "--tracking-uri", store.uri, "--bootstrap", "50", "--smooth", "0.5"]
    assert main([*argv, "--runs", "tiny-pretrain", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    tree = printed.split("runs grouped")[1].split("pretrained vs random")[0]
    assert "pretraining run tiny-pretrain" in tree and "├─ lp-pretrained-0.5" in tree
    assert "┆  lp-random-0.5" in tree and "├─ lp-random" not in tree  # partners, never children
    assert f"report: {tmp_path / 'a' / 'report.html'}" in printed
    assert len(json.loads((tmp_path / "a" / "runs.json").read_text())) == 7
    one = store.ft[("pretrained", "0.5")]["mlflow_run_id"]
    assert main([*argv, "--runs", one[:8], "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    names = sorted(r["name"] for r in json.loads((tmp_path / "c" / "runs.json").read_text()))
    assert names == ["lp-pretrained-0.5", "lp-random-0.5"]
    assert main([*argv, "--filter", "tags.mpma.init = 'random'", "--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "runs.json").read_text())
    assert sorted(r["name"] for r in rows) == ["eval-rnd-validate", "lp-random-0.5", "lp-random-1.0"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--experiment", "nope"], "no experiment 'nope' at"),
        (["--runs", "no-such-run"], "no run named or with id 'no-such-run' in experiment 'cmp'; runs there:"),
        (["--metric", "eval/nope"], "no run of 'cmp' has metric(s) eval/nope"),
        (["--filter", "tags.mpma.task = 'vqa'"], "no run of experiment 'cmp'"),
        (["--filter", "this is not a filter"], "cannot read the runs: MlflowException"),
        (["--smooth", "1.5"], "--smooth 1.5: must be in [0, 1)"),
        (["--experiment", "empty"], "experiment 'empty' at"),
    ],
)
def test_bad_input_is_one_line(store, tmp_path, capsys, extra, needle):
    from mlflow.tracking import MlflowClient

    from mpma_ds.cli.compare import main

    client = MlflowClient(store.uri)
    if client.get_experiment_by_name("empty") is None:
        client.create_experiment("empty")
    argv = ["--experiment", EXPERIMENT, "--tracking-uri", store.uri, "--out", str(tmp_path / "r"), *extra]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error:" in err[0] and needle in err[0], err
    if extra[-1] == "empty":
        assert "has no runs" in err[0]
    assert not (tmp_path / "r" / "report.html").exists()


def report_html_gallery(report):
    """The gallery read back from the store the way the report reads it."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from mpma_ds.tracking.report_html import grounding_gallery

    with tempfile.TemporaryDirectory() as work:
        return grounding_gallery(MlflowClient(report.uri), report.groups, Path(work))


# ------------------------------------------------------------------------------------------ a real browser
CHECK_SCRIPT = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const heads = [...document.querySelectorAll('section > h2')].map(h => h.textContent);
  const out = document.createElement('pre'); out.id = 'browser-check';
  out.textContent = JSON.stringify({images: imgs.length, broken: bad, headings: heads});
  document.body.appendChild(out);
});</script>"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_opens_in_headless_chromium(report, tmp_path):
    """The page in a real browser, offline: every image decodes (naturalWidth > 0), every section heading is there;
    the screenshot is kept (printed path; also copied to test-artifacts/)."""
    from mpma_ds.tracking.report_html import SECTIONS

    browser = chromium()
    if browser is None:
        pytest.skip("no chromium: install it with `make browser` (apt-get install chromium) to run this test")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    # a copy of the page with a check script (the report itself has none): the browser writes what it saw
    checked = tmp_path / "checked.html"
    checked.write_text(report.html.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = subprocess.run([*flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"chromium did not run the page: rc {dom.returncode}\n{dom.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["broken"] == [] and seen["images"] >= 8, seen
    assert seen["headings"] == [title for _, title in SECTIONS]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1400,2400", "--hide-scrollbars", f"--screenshot={shot}",
                    report.html.as_uri()], capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
    keep = ROOT / "test-artifacts"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "compare_report.png")
    print(f"\nscreenshot of the report: {shot} (copied to {keep / 'compare_report.png'})")


# ------------------------------------------------------------------------------------------ small pieces
def test_ema_smoothing_is_debiased_and_skips_nan():
    from mpma_ds.tracking.report_plots import ema

    assert ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    out = ema([4.0, 4.0, float("nan"), 4.0, 0.0], 0.5)
    assert out[:4] == pytest.approx([4.0, 4.0, 4.0, 4.0])  # a constant stays put (no pull towards 0)
    # the NaN is skipped: the EMA of 4, 4, 4, 0 (weights 0.5^k on the k-th newest), over the weights' sum
    assert out[4] == pytest.approx(0.5 * (0 + 0.5 * 4 + 0.25 * 4 + 0.125 * 4) / (1 - 0.5**4))


def test_parent_outside_the_store_is_not_nested(tmp_path):
    """A fine-tuning run from a pretraining run logged elsewhere keeps mpma.pretrain_run but gets no parent tag
    (MLflow would show an orphan); one in the store gets it."""
    from mlflow.tracking import MlflowClient

    from mpma_ds.tracking import TrackingConfig, build_logger
    from mpma_ds.tracking.lineage import lineage_tags

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="lineage", system_metrics=False)
    first = build_logger(cfg, rank=0, run_dir=tmp_path / "a")
    first.close()
    ids = {}
    for name, parent in (("elsewhere", "0" * 32), ("here", first.run_id)):
        lg = build_logger(cfg, rank=0, run_dir=tmp_path / name, tags=lineage_tags(parent, "pretrained", "k"))
        ids[name] = lg.run_id
        lg.close()
    client = MlflowClient(cfg.uri)
    elsewhere, here = (client.get_run(ids[n]).data.tags for n in ("elsewhere", "here"))
    assert PARENT_TAG not in elsewhere and elsewhere["mpma.pretrain_run"] == "0" * 32
    assert here[PARENT_TAG] == first.run_id and here[PAIR_TAG] == "k"


def test_caller_parent_wins_over_the_lineage_parent(tmp_path):
    """``tracking.parent_run_id`` (a benchmark entry's run) nests the run under it even when its lineage names a
    pretraining run in the same store; that run stays in mpma.pretrain_run."""
    import dataclasses

    from mlflow.tracking import MlflowClient

    from mpma_ds.tracking import TrackingConfig, build_logger
    from mpma_ds.tracking.lineage import lineage_tags

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="lineage", system_metrics=False)
    runs = {}
    for name in ("pretrain", "entry"):
        lg = build_logger(cfg, rank=0, run_dir=tmp_path / name)
        runs[name] = lg.run_id
        lg.close()
    nested = dataclasses.replace(cfg, parent_run_id=runs["entry"])
    lg = build_logger(
        nested, rank=0, run_dir=tmp_path / "ft", tags=lineage_tags(runs["pretrain"], "pretrained", "k")
    )
    lg.close()
    tags = MlflowClient(cfg.uri).get_run(lg.run_id).data.tags
    assert tags[PARENT_TAG] == runs["entry"] and tags["mpma.pretrain_run"] == runs["pretrain"]
