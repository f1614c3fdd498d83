"""Retries against real network faults: `fault_proxy.py`, its own process, sits between the clients and a moto
S3 server process and resets or answers ``503 SlowDown`` to the first connections; clients reach it through
``AWS_ENDPOINT_URL`` only. Through the faults the ``wds`` stream and the node cache read the very bytes of the
local build, and ``remote_retries`` counts exactly the faults the proxy served; a store that stays down ends
in one line naming the URL, with nothing half-written left behind."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_remote_shards
from remote_servers import (
    connections_cut,
    env,
    faults_served,
    free_port,
    s3_env,
    s3_with,
    start_fault_proxy,
    stop,
    upload_tree,
)
from test_remote_shards import assert_same, eval_pass, make_cfg

from data_tools import remote
from data_tools.remote import RemoteError
from mpma_ds.data import build_loader, samples
from mpma_ds.data.shard_cache import ShardCache
from mpma_ds.data.shards import load_shard_index

BUCKET = "faulty"
PREFIX = f"s3://{BUCKET}/build"
FAULTS = 3

local = test_remote_shards.local  # the module's fixtures: its real build and tokenizer
tokenizer = test_remote_shards.tokenizer


@pytest.fixture(scope="module")
def moto_port(local):
    with s3_with(Path(local), PREFIX) as port:
        yield port


@pytest.fixture
def proxy(moto_port, tmp_path, request):
    """``(port, log)`` of a fault proxy in front of the moto server; ``request.param``: ``(mode, faults)``."""
    mode, faults = request.param
    port, log = free_port(), tmp_path / "faults.log"
    proc = start_fault_proxy(moto_port, port, mode, faults, log)
    try:
        yield port, log
    finally:
        stop(proc)


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


@pytest.mark.parametrize("proxy", [("reset", FAULTS), ("slowdown", FAULTS)], indirect=True, ids=["reset", "503"])
def test_wds_streams_the_same_bytes_through_faults_and_counts_them(
    proxy, moto_port, local, tokenizer, quick_backoff, monkeypatch
):
    """The loader is built (listing, ``.idx``, manifest) straight from the server; its batches are then read
    through the proxy in small ranged GETs, the first ones faulted."""
    port, log = proxy
    monkeypatch.setattr(samples, "REMOTE_BLOCK", 4096)
    want = eval_pass(make_cfg(f"{local}/validate"), tokenizer)
    with env(s3_env(moto_port)):
        info = build_loader(
            make_cfg(f"{PREFIX}/validate/"), 0, 1, split="validate", batch_size=4, tokenizer=tokenizer, seed=3,
            train=False,
        )  # fmt: skip
    try:
        with env(s3_env(port)):
            got = list(info.loader)
        stats = info.stats()
    finally:
        info.close()
    assert faults_served(log) == FAULTS
    assert stats["remote_retries"] == FAULTS
    tars = sum(p.stat().st_size for p in Path(local, "validate").glob("*.tar"))
    assert tars // 2 < stats["remote_bytes"] <= tars  # the samples' bytes: no tar padding, nothing read twice
    assert stats["skipped_samples"] == 0
    assert_same(got, want)


@pytest.mark.parametrize("proxy", [("reset", FAULTS), ("slowdown", FAULTS)], indirect=True, ids=["reset", "503"])
def test_shard_cache_fetches_the_same_bytes_through_faults(proxy, local, tmp_path, quick_backoff):
    """The node cache (what DALI reads) fetches every shard whole through the faults: listing included, every
    retry is counted once, and each cached copy equals the local build's shard byte for byte."""
    port, log = proxy
    before = remote.COUNTS["remote_retries"]
    with env(s3_env(port)):
        index = load_shard_index(f"{PREFIX}/validate/")
        cache = ShardCache(tmp_path / "cache", budget_gb=1.0)
        copies = [cache.path(str(url), info) for url, info in zip(index.paths, index.infos)]
    assert faults_served(log) == FAULTS
    assert remote.COUNTS["remote_retries"] - before == FAULTS
    for url, copy in zip(index.paths, copies):
        assert copy.read_bytes() == (Path(local) / "validate" / remote.basename(url)).read_bytes()


@pytest.mark.parametrize("proxy", [("slowdown", -1)], indirect=True, ids=["down"])
def test_a_store_down_past_the_retries_is_one_line_and_leaves_nothing(
    proxy, moto_port, tokenizer, tmp_path, quick_backoff
):
    """Every request answered 503: the stream (DataLoader workers included) stops with one line naming the
    shard's URL, never skipping its samples; the cache keeps no partial copy; the CLI prints one line."""
    port, log = proxy
    with env(s3_env(moto_port)):
        index = load_shard_index(f"{PREFIX}/validate/")
        info = build_loader(
            make_cfg(f"{PREFIX}/validate/", num_workers=2), 0, 1, split="validate", batch_size=4,
            tokenizer=tokenizer, seed=3, train=False,
        )  # fmt: skip
    url = str(index.paths[0])
    try:
        with env(s3_env(port)), pytest.raises(RemoteError) as err:
            list(info.loader)
    finally:
        info.close()
    line = remote.one_line(err.value)
    assert "\n" not in line and "Traceback" not in line
    assert f"{PREFIX}/validate/shard-" in line and f"did not answer after {remote.ATTEMPTS} tries" in line

    cache = ShardCache(tmp_path / "cache", budget_gb=1.0)
    with env(s3_env(port)), pytest.raises(RemoteError, match=f"{url}: the store did not answer") as err:
        cache.path(url, index.infos[0])
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock") == []
    served = faults_served(log)
    assert served >= 2 * remote.ATTEMPTS

    done = subprocess.run(  # the real CLI, real backoff (0.25 + 0.5 + 1 + 2 + 4 s)
        [sys.executable, "-m", "data_tools.verify_shards", f"{PREFIX}/validate/"],
        capture_output=True, text=True, timeout=120, env={**subprocess_env(), **s3_env(port)}, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{PREFIX}/validate" in lines[0] and f"did not answer after {remote.ATTEMPTS} tries" in lines[0]
    assert faults_served(log) - served == remote.ATTEMPTS  # one listing, six tries, nothing more


def subprocess_env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@contextlib.contextmanager
def down_after_first_checkpoint(run: Path, trigger: Path) -> Iterator[None]:
    """While the block runs, touch ``trigger`` (arming the fault proxy) once ``run`` has its first complete
    checkpoint."""
    import threading

    stopped = threading.Event()

    def arm() -> None:
        while not list(run.glob("checkpoints/*/complete.json")) and not stopped.is_set():
            time.sleep(0.05)
        trigger.touch()

    watcher = threading.Thread(target=arm)
    watcher.start()
    try:
        yield
    finally:
        stopped.set()
        watcher.join()


def pretrain_through_proxy(
    moto_port: int, tmp_path_factory, tmp_path: Path, faults: int, monkeypatch, **extra: object
) -> tuple[int, list[str], Path, Path]:
    """The pretraining CLI (in-process) on the tiny shards uploaded to ``s3://faulty/tiny/``, read through a
    reset proxy armed once the run has its first checkpoint; ``(exit code, overrides, run folder, proxy log)``."""

    from train_testdata import ROOT, prepared_base, pretrain_argv, tiny_overrides, tiny_shards

    sys.path.insert(0, str(ROOT / "launch"))
    import pretrain

    base = prepared_base(tmp_path_factory)
    with env(s3_env(moto_port)):
        upload_tree(tiny_shards(base) / "train", f"s3://{BUCKET}/tiny/train")
    monkeypatch.setattr(samples, "REMOTE_BLOCK", 4096)  # a request every few samples, all run long
    port, log, trigger = free_port(), tmp_path / "faults.log", tmp_path / "down"
    proxy = start_fault_proxy(moto_port, port, "reset", faults, log, trigger)
    run = tmp_path / "run"
    shards = f"s3://{BUCKET}/tiny/train/"
    overrides = tiny_overrides(
        base, run, **{"data.train_shards": shards, "train.eval_every": 0, "train.max_steps": 12, **extra}
    )
    try:
        with down_after_first_checkpoint(run, trigger), env(s3_env(port)):
            code = pretrain.main(pretrain_argv(overrides))
    finally:
        stop(proxy)
    return code, overrides, run, log


@pytest.mark.e2e  # about a minute on 2 shared cores: make test-e2e
def test_pretraining_logs_remote_retries_and_bytes_to_mlflow(
    moto_port, tmp_path_factory, tmp_path, quick_backoff, monkeypatch
):
    """Mid-run the proxy cuts the live connections and resets the next 3: the run finishes, and MLflow has
    ``data/remote_retries`` (every fault retried, none more) and ``data/remote_bytes`` (growing, about the
    shards' bytes per epoch read) beside the other ``data/`` metrics."""
    import mlflow

    db = tmp_path / "mlflow.db"
    tracking = {"tracking.enabled": True, "tracking.uri": f"sqlite:///{db}", "tracking.system_metrics": False}
    code, _, _, log = pretrain_through_proxy(
        moto_port, tmp_path_factory, tmp_path, FAULTS, monkeypatch, **tracking
    )
    assert code == 0
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    client = mlflow.tracking.MlflowClient()
    retries = [m.value for m in client.get_metric_history(run.info.run_id, "data/remote_retries")]
    read = [m.value for m in client.get_metric_history(run.info.run_id, "data/remote_bytes")]
    assert len(retries) == len(read) == 12
    assert retries[0] == 0 and FAULTS <= retries[-1] <= FAULTS + connections_cut(log)
    assert faults_served(log) == FAULTS
    assert read == sorted(read) and read[0] > 0
    from train_testdata import prepared_base, tiny_shards

    shard_bytes = sum(
        p.stat().st_size for p in (tiny_shards(prepared_base(tmp_path_factory)) / "train").glob("*.tar")
    )
    assert read[-1] >= shard_bytes  # 12 steps of 8 cover the tiny train split at least once


@pytest.mark.e2e  # about a minute on 2 shared cores: make test-e2e
def test_pretraining_whose_store_goes_down_stops_with_one_line_and_resumes_later(
    moto_port, tmp_path_factory, tmp_path, capsys, quick_backoff, monkeypatch
):
    """Once the run has a checkpoint the store goes down for good (every live connection cut, every new one
    reset): the run stops with one stderr line naming the shard URL and exit 6, its newest checkpoint
    complete; once the store answers, ``--resume auto`` finishes."""
    from train_testdata import ROOT, pretrain_argv

    sys.path.insert(0, str(ROOT / "launch"))
    import pretrain

    code, overrides, run, log = pretrain_through_proxy(moto_port, tmp_path_factory, tmp_path, -1, monkeypatch)
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if "cpp_extension.py" not in x]
    assert code == 6 and len(lines) == 1, lines
    assert lines[0].startswith("pretrain.py: error: s3://faulty/tiny/train/shard-"), lines[0]
    assert f"did not answer after {remote.ATTEMPTS} tries" in lines[0] and "--resume auto" in lines[0]
    assert faults_served(log) >= remote.ATTEMPTS - 1  # the first try failed on a live connection cut
    assert list(run.glob("checkpoints/*/complete.json"))
    with env(s3_env(moto_port)):
        assert pretrain.main(pretrain_argv(overrides, "--resume", "auto")) == 0
    assert "done: step 12" in capsys.readouterr().out


@pytest.mark.e2e  # a 2-rank launcher run of about a minute: make test-e2e
def test_two_ranks_whose_store_goes_down_stop_with_one_line(moto_port, tmp_path_factory, tmp_path):
    """Under the real launcher (2 gloo ranks), once the run has a checkpoint the store goes down for good: the
    job ends with exit 6 and the one line naming a shard URL, not a wait for the collective timeout (120 s here)
    or a traceback: every rank reads from the same store, so every rank gives up on it."""

    from train_testdata import ROOT, prepared_base, pretrain_argv, tiny_overrides, tiny_shards

    from mpma_ds.distributed import free_port as free_master_port

    base = prepared_base(tmp_path_factory)
    with env(s3_env(moto_port)):
        upload_tree(tiny_shards(base) / "train", f"s3://{BUCKET}/tiny2/train")
    port, log, trigger = free_port(), tmp_path / "faults.log", tmp_path / "down"
    proxy = start_fault_proxy(moto_port, port, "reset", -1, log, trigger)
    run = tmp_path / "run"
    overrides = tiny_overrides(
        base, run, **{"data.train_shards": f"s3://{BUCKET}/tiny2/train/", "train.eval_every": 0,
                      "train.max_steps": 40, "train.collective_timeout_s": 120}
    )  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_master_port()), "launch/pretrain.py", *pretrain_argv(overrides)]  # fmt: skip
    start = time.monotonic()
    try:
        with down_after_first_checkpoint(run, trigger), env(s3_env(port)):
            proc = subprocess.run(
                cmd, cwd=ROOT, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                timeout=600,
            )  # fmt: skip
    finally:
        stop(proxy)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "pretrain.py: error:" in line]
    assert proc.returncode == 6, out[-4000:]
    assert len(errors) == 1 and "s3://faulty/tiny2/train/shard-" in errors[0], out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s: it waited out a collective"
