"""Per-sample scores saved with a benchmark run and ``mpma-benchmark --compare``: two separate runs' files paired
row by row (B - A with a paired interval, over the rows both evaluated), the linear probe's fractions each paired,
and the refusal (one line) when the runs evaluated different images. Fast: the protocols' pure-numpy paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpma_ds.benchmark.protocols import EntryResult, linear_probe
from mpma_ds.benchmark.samples import compare_runs, load_samples, samples_path, save_samples
from mpma_ds.cli.benchmark import main
from mpma_ds.eval.vqa import vqa_accuracy

QUESTIONS = 60
VOCAB = ("yes", "no", "left lung", "heart")


def _vqa(rng: np.random.Generator, rows: list[str], gold: np.ndarray, types: np.ndarray, p_right: float):
    right = rng.random(len(rows)) < p_right
    predicted = np.where(right, gold, "heart")
    kw = {"answer_vocab": VOCAB}
    return EntryResult(vqa_accuracy(predicted, gold, types, **kw), "accuracy_overall",
                       {"fn": vqa_accuracy, "arrays": [predicted, gold, types], "keys": ["accuracy_overall"],
                        "kwargs": kw, "rows": rows})  # fmt: skip


def _run(folder, model: str, results: dict[str, EntryResult], checksum: str = "c0ffee") -> None:
    """A benchmark run folder as run_benchmark leaves it: results.json and the samples files."""
    entries: dict = {}
    for name, r in results.items():
        dataset, protocol = name.split("/")
        entries.setdefault(dataset, {})[protocol] = {
            "split_checksum": checksum,
            "models": {model: {"metrics": r.metrics}},
        }
        save_samples(samples_path(folder, name, model), r, split_checksum=checksum, entry=name, model=model)
    (folder / "results.json").write_text(json.dumps({"suite": "mine", "models": {model: {}}, "entries": entries}))


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    rows = [f"vqa-rad_test_{i}" for i in range(QUESTIONS)]
    gold = rng.choice(np.asarray(VOCAB), QUESTIONS)
    types = np.where(np.isin(gold, ["yes", "no"]), "CLOSED", "OPEN")
    emb = rng.normal(size=(80, 8))
    y = (emb[:, :1] + rng.normal(size=(80, 1)) > 0).astype(float)
    keys = [f"img{i}" for i in range(80)]
    noise = rng.normal(size=(80, 8))  # b's features carry nothing of the label: a worse probe on the same rows
    probe = {
        m: linear_probe(
            x[:50],
            y[:50],
            keys[:50],
            x[50:],
            y[50:],
            ("Pneumonia",),
            rows=keys[50:],
            fractions=(0.2, 1.0),
            seeds=(0,),
            min_count=2,
            n_resamples=50,
        )  # fmt: skip
        for m, x in (("a", emb), ("b", noise))
    }
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    # run B evaluated the questions in another order and lost one: pairing goes by key, over the common rows
    order = rng.permutation(QUESTIONS)[1:]
    va = _vqa(rng, rows, gold, types, 0.3)
    vb = _vqa(rng, [rows[i] for i in order], gold[order], types[order], 0.8)
    _run(a, "pretrained", {"vqa-rad/vqa": va, "rsna-pneumonia/linear_probe": probe["a"]})
    _run(b, "twin", {"vqa-rad/vqa": vb, "rsna-pneumonia/linear_probe": probe["b"]})
    return a, b, va, vb, order


def test_saved_samples_read_back(runs):
    a, _, va, _, _ = runs
    meta, rows, arrays = load_samples(samples_path(a, "vqa-rad/vqa", "pretrained"))
    assert meta["split_checksum"] == "c0ffee" and meta["sets"][0]["fn"] == "mpma_ds.eval.vqa:vqa_accuracy"
    assert rows == va.pair["rows"]
    assert [x.tolist() for x in arrays[0]] == [np.asarray(x).tolist() for x in va.pair["arrays"]]


def test_compare_pairs_two_separate_runs_by_key(runs, tmp_path):
    a, b, va, vb, order = runs
    report = compare_runs(a, b, tmp_path / "cmp", n_resamples=200)
    block = report["entries"]["vqa-rad"]["vqa"]
    assert block["rows_paired"] == QUESTIONS - 1
    d = block["paired"]["accuracy_overall"]
    common = set(vb.pair["rows"])
    keep = [i for i, r in enumerate(va.pair["rows"]) if r in common]
    acc_a = vqa_accuracy(*[np.asarray(x)[keep] for x in va.pair["arrays"]], answer_vocab=VOCAB)["accuracy_overall"]
    assert d["a"] == pytest.approx(acc_a) and d["b"] == pytest.approx(vb.metrics["accuracy_overall"])
    assert d["difference"] == pytest.approx(d["b"] - d["a"]) and d["difference"] > 0.2
    lo, hi = d["difference_ci95"]
    assert lo <= d["difference"] <= hi and lo > 0  # B answers 80 % right, A 30 %: the paired interval says so
    lp = report["entries"]["rsna-pneumonia"]["linear_probe"]["paired"]
    assert set(lp) == {"auroc_mean@20%", "auroc_mean@100%"}
    assert lp["auroc_mean@100%"]["difference"] < 0  # the noise features' probe is worse
    assert json.loads((tmp_path / "cmp" / "paired.json").read_text())["b"]["model"] == "twin"


def test_compare_cli_prints_the_table_and_refuses_other_splits(runs, tmp_path, capsys):
    a, b, *_ = runs
    assert main(["--compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "vqa-rad/vqa" in out and "accuracy_overall" in out and "B: twin" in out
    results = json.loads((b / "results.json").read_text())
    results["entries"]["vqa-rad"]["vqa"]["split_checksum"] = "0ther"
    (b / "results.json").write_text(json.dumps(results))
    assert main(["--compare", str(a), str(b), "--out", str(tmp_path / "cmp2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vqa-rad/vqa: the runs evaluated different images" in err
    assert not (tmp_path / "cmp2" / "paired.json").exists()
