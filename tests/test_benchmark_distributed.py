"""``mpma-benchmark`` over 2 ranks through the real launcher (``deepspeed --num_gpus 2 launch/benchmark.py``: 2 gloo
CPU processes) against the same suite in one process: each rank streams its share of every dataset's images,
rank 0 gathers the per-sample outputs in record order, scores and alone writes. The metrics of results.json and
the per-sample npz files equal the 1-rank run's; the feature cache is written once (by rank 0, no part or temporary
file left) and a later 1-rank run reads it; an entry of 1 image (fewer than the ranks) leaves rank 1 without images
and still runs. Bad input seen by 2 ranks is one line (rank 0's) and exit 2.

The protocols that train (``finetune`` on RSNA at 2 label fractions, ``vqa`` on VQA-RAD) run the Trainer on both
ranks with global batch 8 = micro-batch 4 × 2 ranks, against 1 rank × 2 accumulation steps (the equivalence
tests/test_finetune_distributed.py holds the fine-tuning tasks to): the same losses step by step, metrics, subset
checksums and per-sample rows in the same order; rank 0 alone keeps the predictions, writes and opens the MLflow
runs (sqlite stores: the 1-rank run's, each once). A global batch 2 ranks cannot split (SLAKE's 12 = 3 × 4 on
1 rank) is that entry's one line from rank 0, the others still run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_benchmark_readers import TABLES
from test_scale_out import _one_thread
from train_testdata import ROOT, tiny_export

from data_tools.synth.bench_layout import layout_chexpert_5x200, layout_nih, layout_rsna, layout_vqa
from mpma_ds.benchmark.samples import load_samples
from mpma_ds.cli.benchmark import main
from mpma_ds.distributed import free_port
from mpma_ds.tracking import read_metrics_jsonl
from mpma_ds.tracking.lineage import PARENT_TAG

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
LAUNCHER = ROOT / "launch" / "benchmark.py"
SIZE = 64
SUITE = """name: two-ranks
entries:
  - {dataset: nih-cxr14, protocol: zero_shot, max_images: 1}
  - {dataset: nih-cxr14, protocol: grounding}
  - {dataset: chexpert-5x200, protocol: zero_shot_accuracy}
  - {dataset: rsna-pneumonia, protocol: linear_probe, fractions: [0.5, 1.0]}
"""


# global batch 8: micro-batch 4 on each of 2 ranks, or 4 x 2 accumulation steps in one process
SHORT = "[train.epochs=1, train.global_batch_size=8, train.micro_batch_size=4, train.log_every=1]"
# SLAKE's global batch 12 takes 3 steps of 4 on 1 rank; 2 ranks x 4 cannot make it: refused on 2 ranks alone
TRAINER_SUITE = f"""name: two-ranks-trainer
entries:
  - {{dataset: slake, protocol: vqa, set: [train.epochs=1, train.global_batch_size=12, train.micro_batch_size=4]}}
  - {{dataset: rsna-pneumonia, protocol: finetune, fractions: [0.5, 1.0], set: {SHORT}}}
  - {{dataset: vqa-rad, protocol: vqa, set: {SHORT}}}
"""
# 1 vs 2 ranks train the same weights on the same micro-batches; only the gradient reduction order differs
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """The exported tiny model and the data root (NIH, CheXpert 5x200, RSNA, VQA-RAD / SLAKE; 64 px films)."""
    if TABLES is None:
        pytest.skip("torchxrayvision's label tables are not installed")
    base = tmp_path_factory.getbasetemp()
    root = base / "bench-ranks"
    exported = tiny_export(root / "exported", str(base), SIZE)
    layout_nih(TABLES, root / "data", 30, SIZE, 0)
    layout_chexpert_5x200(TABLES, root / "data", 5, SIZE, 0)
    layout_rsna(TABLES, root / "data", 80, SIZE, 0)
    layout_vqa(root / "data", studies=16, size=SIZE, seed=0)
    return root, exported


def _one_and_two(
    root: Path, suite: str, *models: str, two_exits: int = 0, mlflow: bool = False, batch_size: int = 8
) -> tuple[dict, dict, str]:
    """``suite`` (a YAML text) for ``models`` in this process (``ROOT/one``, one thread, as each rank has) and
    through ``deepspeed --num_gpus 2`` (``ROOT/two``, exiting ``two_exits``): both results and the launcher's
    output. ``mlflow``: each logs to its own sqlite store, ``ROOT/<one|two>.db``."""
    (root / "suite.yaml").write_text(suite)
    argv = [*(a for m in models for a in ("--model", m)), "--suite", str(root / "suite.yaml"), "--data-root",
            str(root.parent / "data"), "--bootstrap", "50", "--workers", "0", "--min-label-count",
            "1", "--batch-size", str(batch_size)]  # fmt: skip
    store = {
        d: ["--tracking-uri", f"sqlite:///{root / d}.db"] if mlflow else ["--no-mlflow"] for d in ("one", "two")
    }
    with _one_thread():
        assert main([*argv, *store["one"], "--out", str(root / "one")]) == 0
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(LAUNCHER), *argv,
           *store["two"], "--out", str(root / "two")]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == two_exits, log[-4000:]
    one, two = (json.loads((root / d / "results.json").read_text()) for d in ("one", "two"))
    return one, two, log


@pytest.fixture(scope="module")
def runs(layout):
    """The streamed protocols' suite, the exported model and its random twin."""
    root, exported = layout
    (root / "streamed").mkdir(exist_ok=True)
    # one image a batch: each image meets the same kernels on 1 rank and on 2, so the features are the same bits
    # and the ranking metrics (AUROC, accuracy) cannot flip on a near-tie of float noise (batch composition
    # changes a CPU matmul's last bits: 5e-8 in the 5x200 logits flipped a 6e-10 gap of two softmax scores)
    return root / "streamed", *_one_and_two(
        root / "streamed", SUITE, str(exported), f"random:{exported}", batch_size=1
    )


@pytest.fixture(scope="module")
def trained(layout):
    """The Trainer protocols' suite, the exported model alone (2 ranks exit 1: SLAKE's entry refused)."""
    root, exported = layout
    (root / "trained").mkdir(exist_ok=True)
    return root / "trained", *_one_and_two(
        root / "trained", TRAINER_SUITE, str(exported), two_exits=1, mlflow=True
    )


def _numbers(value):
    """The metric values of a results block as a flat {path: float} (NaN kept as None)."""
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update({f"{k}/{p}": x for p, x in _numbers(v).items()})
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update({f"{i}/{p}": x for p, x in _numbers(v).items()})
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"": float(value)}
    elif value is None:
        return {"": None}
    return out


def _assert_same(one: dict, two: dict, where: tuple) -> None:
    a, b = _numbers(one), _numbers(two)
    assert set(a) == set(b), where
    for key, x in a.items():
        if x is None:
            assert b[key] is None, (*where, key)
        else:
            assert b[key] == pytest.approx(x, rel=1e-5, abs=1e-6), (*where, key)


def test_two_ranks_give_the_one_rank_metrics(runs):
    _, one, two, log = runs
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert set(two["entries"]) == set(one["entries"]) == {"nih-cxr14", "chexpert-5x200", "rsna-pneumonia"}
    for dataset, protocols in one["entries"].items():
        for protocol, block in protocols.items():
            other = two["entries"][dataset][protocol]
            assert other["split_checksum"] == block["split_checksum"] and other["images"] == block["images"]
            for name, m in block["models"].items():
                assert "error" not in m, (dataset, protocol, m)
                _assert_same(m["metrics"], other["models"][name]["metrics"], (dataset, protocol, name))
                assert other["models"][name]["info"]["images_rejected"] == m["info"]["images_rejected"] == 0
            _assert_same(block["paired"], other["paired"], (dataset, protocol, "paired"))
    ground = two["entries"]["nih-cxr14"]["grounding"]["models"]["exported"]
    assert ground["metrics"]["pairs"] >= 2  # the boxed images of both ranks were scored
    assert two["entries"]["nih-cxr14"]["zero_shot"]["images"] == 1  # rank 1 streamed no image of it
    assert log.count("results: ") == 1  # rank 0 alone reports


def _assert_same_samples(root: Path, count: int) -> None:
    """The per-sample npz files of ``ROOT/two`` hold the rows (same order) and values of ``ROOT/one``'s."""
    files = sorted((root / "two" / "samples").rglob("*.npz"))
    assert len(files) == count
    for path in files:
        meta_a, rows_a, arrays_a = load_samples(root / "one" / path.relative_to(root / "two"))
        meta_b, rows_b, arrays_b = load_samples(path)
        assert rows_b == rows_a and meta_b["split_checksum"] == meta_a["split_checksum"]  # same rows, same order
        assert meta_b["sets"] == meta_a["sets"] and len(arrays_b) == len(arrays_a)
        for set_a, set_b in zip(arrays_a, arrays_b):
            for a, b in zip(set_a, set_b, strict=True):
                if a.dtype.kind in "US":  # finding names, gold classes, VQA answers
                    assert b.tolist() == a.tolist(), path
                else:
                    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=str(path))


def _written(root: Path) -> dict[str, set[str]]:
    return {
        d: {str(p.relative_to(root / d)) for p in (root / d).rglob("*") if p.is_file()} for d in ("one", "two")
    }


def test_two_ranks_save_the_same_per_sample_rows(runs):
    _assert_same_samples(runs[0], 8)  # 4 entries x 2 models


def test_the_feature_cache_is_written_once_and_read_back(runs):
    root, one, _, _ = runs
    cache = root / "two" / "cache"
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    # per model: nih zero_shot (1 image), chexpert 5x200, rsna test and train; no part or temporary file left
    assert len(files) == 8 and all(f.endswith(".pt") and ".tmp" not in f for f in files), files
    written = _written(root)
    assert written["two"] == written["one"]  # rank 1 wrote nothing of its own
    out = root / "again"
    argv = ["--model", str(root.parent / "exported"), "--suite", str(root / "suite.yaml"), "--data-root",
            str(root.parent / "data"), "--bootstrap", "50", "--workers", "0", "--min-label-count", "1",
            "--cache-dir", str(cache), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    block = again["entries"]["rsna-pneumonia"]["linear_probe"]["models"]["exported"]
    assert block["timing"]["cached"]
    first = one["entries"]["rsna-pneumonia"]["linear_probe"]["models"]["exported"]["metrics"]
    assert block["metrics"]["auroc_mean@100%"] == pytest.approx(first["auroc_mean@100%"], rel=1e-5, nan_ok=True)


def _runs(root: Path, d: str) -> dict[str, Path]:
    """The Trainer run folders of ``ROOT/<d>`` by their path under ``finetune/``."""
    return {str(s.parent.relative_to(root / d / "finetune")): s.parent for s in (root / d).rglob("summary.json")}


def test_trainer_protocols_on_two_ranks_equal_one_rank_with_accumulation(trained):
    root, one, two, log = trained
    assert set(two["entries"]) == set(one["entries"]) == {"slake", "rsna-pneumonia", "vqa-rad"}
    for dataset, protocols in one["entries"].items():
        if dataset == "slake":  # refused on 2 ranks (test_a_global_batch_two_ranks_cannot_split_is_one_line)
            continue
        for protocol, block in protocols.items():
            other = two["entries"][dataset][protocol]
            assert other["split_checksum"] == block["split_checksum"] and other["images"] == block["images"]
            m, o = block["models"]["exported"], other["models"]["exported"]
            assert "error" not in m and "error" not in o, (m, o)
            _assert_same(m["metrics"], o["metrics"], (dataset, protocol))
            assert o["info"]["images_rejected"] == m["info"]["images_rejected"] == 0
    # the label fractions' subsets: the same patients kept (checksums) and trained on by the Trainer
    ft_one, ft_two = (r["entries"]["rsna-pneumonia"]["finetune"]["models"]["exported"]["info"] for r in (one, two))
    assert ft_two["split_checksums"] == ft_one["split_checksums"] and len(ft_one["split_checksums"]) == 2
    assert [r["subset"] for r in ft_two["runs"].values()] == [r["subset"] for r in ft_one["runs"].values()]
    runs_one, runs_two = _runs(root, "one"), _runs(root, "two")
    assert (
        sorted(runs_two) == sorted(n for n in runs_one if "slake" not in n) and len(runs_two) == 3
    )  # 2 fractions, vqa
    for name, run in runs_two.items():
        a, b = (json.loads((r / "summary.json").read_text()) for r in (runs_one[name], run))
        assert (a["world_size"], a["accumulation"], b["world_size"], b["accumulation"]) == (1, 2, 2, 1), name
        assert a["step"] == b["step"] > 0
        losses = [{r["step"]: r["loss"] for r in read_metrics_jsonl(r / "metrics.jsonl") if "loss" in r}
                  for r in (runs_one[name], run)]  # fmt: skip
        assert sorted(losses[0]) == list(range(1, a["step"] + 1))
        assert losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL), name
    assert log.count("results: ") == 1 and log.count("vqa-rad/vqa [exported]: accuracy_overall") == 1


def test_trainer_protocols_on_two_ranks_save_the_same_per_sample_rows(trained):
    root = trained[0]
    _assert_same_samples(root, 2)  # finetune (both fractions' scores) and vqa (per question)
    written = _written(root)
    # rank 1's only files: its own ZeRO optimizer shard and rank state in each Trainer checkpoint; the shards built
    # once (by rank 0, then found finished by rank 1), no build state left behind
    extra = written["two"] - written["one"]
    slake = {f for f in written["one"] - written["two"] if "slake" in f}  # trained on 1 rank only
    assert written["one"] - slake <= written["two"] and len(extra) == 6, sorted(extra)
    assert all("/checkpoints/" in f and ("rank_1_" in f or "rank_state_00001" in f) for f in extra), sorted(extra)
    shards = {f.split("/")[2] for f in written["two"] if f.startswith("cache/shards/")}
    assert len(shards) == 4 and not any("/.build/" in f for f in written["two"])  # rsna + manifest, vqa-rad, slake


def _mlflow_runs(store: Path) -> list[tuple[str, str, str]]:
    """(run name, its parent's name, status) of every run in a sqlite store, sorted."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("mpma-benchmark").experiment_id], max_results=100)
    names = {r.info.run_id: r.info.run_name for r in runs}
    return sorted((r.info.run_name, names.get(r.data.tags.get(PARENT_TAG), ""), r.info.status) for r in runs)


def test_trainer_protocols_on_two_ranks_open_each_mlflow_run_once(trained):
    """Rank 0 alone logs: the suite run, an entry run per entry, a Trainer run per fine-tuning nested under its
    entry's — as many as one process opens (SLAKE's Trainer run aside: refused on 2 ranks, its entry run FAILED)."""
    root = trained[0]
    one, two = _mlflow_runs(root / "one.db"), _mlflow_runs(root / "two.db")
    assert [r for r in two if "slake" not in r[0]] == [r for r in one if "slake" not in r[0]]
    assert len(two) == 7 and ("slake/vqa [exported]", "benchmark-two-ranks-trainer-exported", "FAILED") in two
    assert sum(name.endswith("fine-tune") or "fine-tune @" in name for name, _, _ in two) == 3  # 2 fractions, vqa


def test_a_global_batch_two_ranks_cannot_split_is_one_line(trained):
    """SLAKE's global batch 12 is refused on 2 ranks (not on 1): one line, rank 0's, exit 1 (the fixture), no
    traceback, and the entries after it still train on both ranks in step."""
    _, one, two, log = trained
    assert "error" not in one["entries"]["slake"]["vqa"]["models"]["exported"]
    refused = two["entries"]["slake"]["vqa"]["models"]["exported"]["error"]
    assert refused.startswith("train.global_batch_size=12 is not a multiple of train.micro_batch_size=4")
    errors = [line for line in log.splitlines() if "error:" in line]
    assert errors == [f"benchmark.py: error: not scored: slake/vqa [exported]: {refused}"], errors
    assert log.count(refused) == 2 and "Traceback" not in log  # rank 0's entry line and its error line
    assert "accuracy_overall" in two["entries"]["vqa-rad"]["vqa"]["models"]["exported"]["metrics"]


def test_bad_input_on_two_ranks_is_one_line(monkeypatch, capsys, tmp_path):
    """A suite that does not exist, seen by each of 2 ranks (their RANK / WORLD_SIZE; it fails before any process
    group, as under the launcher): both exit 2, rank 0 alone says the one line."""
    said = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        code = main(["--model", "random:mpma_tiny", "--tokenizer", str(tmp_path), "--suite", "nope", "--data-root",
                     str(tmp_path), "--out", str(tmp_path / "out")])  # fmt: skip
        said[rank] = (code, capsys.readouterr().err.strip().splitlines())
    assert said[0][0] == said[1][0] == 2
    assert len(said[0][1]) == 1 and "error: unknown suite 'nope'" in said[0][1][0] and said[1][1] == []
    assert not (tmp_path / "out").exists()
