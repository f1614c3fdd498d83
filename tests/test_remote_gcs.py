"""``gs://`` shards against a real GCS JSON-API server process on loopback (gcp-storage-emulator), reached
through gcsfs's standard ``STORAGE_EMULATOR_HOST``: a listed prefix reads the same samples as local disk, and a
missing bucket is one line naming the URL."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_remote_shards
from remote_servers import env, faults_served, free_port, gcs_env, start_fault_proxy, start_gcs, stop, upload_tree
from test_remote_shards import assert_same, eval_pass, make_cfg

from data_tools import remote
from data_tools.remote import RemoteError
from data_tools.verify_shards import verify_shards
from mpma_ds.data import build_loader
from mpma_ds.data.shard_cache import ShardCache
from mpma_ds.data.shards import load_shard_index

pytest.importorskip("gcsfs")
PREFIX = "gs://shards/build"
FAULTS = 3

local = test_remote_shards.local  # the module's fixtures: its real build and tokenizer
tokenizer = test_remote_shards.tokenizer


@pytest.fixture(scope="module")
def gcs(local):
    port = free_port()
    proc = start_gcs(port)
    try:
        with env(gcs_env(port)):
            fs, _ = remote.filesystem(PREFIX)
            fs.mkdir("shards")
            upload_tree(Path(local), PREFIX)
            yield port
    finally:
        stop(proc)


def test_gs_prefix_reads_the_same_samples_as_local_disk(gcs, local, tokenizer):
    index = load_shard_index(f"{local}/validate")
    listed = load_shard_index(f"{PREFIX}/validate/")
    assert listed.keys == index.keys
    assert [remote.basename(p) for p in listed.paths] == [p.name for p in index.paths]
    assert all(i is not None and i.size > 0 for i in listed.infos)
    assert_same(
        eval_pass(make_cfg(f"{PREFIX}/validate/"), tokenizer), eval_pass(make_cfg(f"{local}/validate"), tokenizer)
    )
    report = verify_shards(PREFIX, progress=False)
    assert report.ok, report.problems


def test_gs_missing_bucket_and_object_are_one_line(gcs, tokenizer):
    cases = {
        "gs://no-such-bucket/train/": "gs://no-such-bucket/train/ does not exist",
        f"{PREFIX}/train/shard-999999.tar": f"{PREFIX}/train/shard-999999.tar does not exist",
    }
    for spec, message in cases.items():
        with pytest.raises(RemoteError, match=message) as err:
            build_loader(make_cfg(spec), 0, 1, batch_size=2, tokenizer=tokenizer, train=False)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["reset", "slowdown"], ids=["reset", "503"])
def test_gs_retries_are_counted_once_each_through_faults(gcs, local, tmp_path, mode, monkeypatch):
    """A fault proxy (its own process) in front of the GCS server resets or answers 503 to the first
    connections: gcsfs's own retry loop is off, so ``remote_retries`` counts exactly the faults served, and the
    node cache's copies still equal the local build's shards byte for byte."""
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    port, log = free_port(), tmp_path / "faults.log"
    proxy = start_fault_proxy(gcs, port, mode, FAULTS, log)
    try:
        before = remote.COUNTS["remote_retries"]
        with env(gcs_env(port)):
            index = load_shard_index(f"{PREFIX}/validate/")
            cache = ShardCache(tmp_path / "cache", budget_gb=1.0)
            copies = [cache.path(str(url), info) for url, info in zip(index.paths, index.infos)]
    finally:
        stop(proxy)
    assert faults_served(log) == FAULTS
    assert remote.COUNTS["remote_retries"] - before == FAULTS
    for url, copy in zip(index.paths, copies):
        assert copy.read_bytes() == (Path(local) / "validate" / remote.basename(url)).read_bytes()
