"""The node cache's budget is the node's: two processes (two ranks of a node) share one cache folder whose
budget holds three of the twelve shards they both read, each in its own order, fetched from a real HTTP server
process. While they run, the folder never holds (or has reserved) more than the budget plus one shard; every
shard a process was handed is intact when it reads it (nothing in use is evicted); and the shards do get
evicted and fetched again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from remote_servers import free_port, start_http, stop

from mpma_ds.data.shard_cache import ShardCache

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 12
ROUNDS = 2

RANK = r"""
import hashlib, json, sys, time
from data_tools.remote import ObjectInfo
from mpma_ds.data.shard_cache import ShardCache

root, budget_gb, order, urls = sys.argv[1], float(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
cache = ShardCache(root, budget_gb)
items = list(urls.items()) * %(rounds)d
if order == "reverse":
    items.reverse()
bad = []
for n, (url, (size, digest)) in enumerate(items):
    if n %% 2:  # as DALI does: pinned while a reader may open it, then unpinned
        path = cache.path(url, ObjectInfo(size), pin=True)
        time.sleep(0.02)  # the other rank fetches and evicts meanwhile
        data = path.read_bytes()
        cache.unpin([url])
    else:  # as the wds reader does: opened, then read at leisure
        with cache.open(url, ObjectInfo(size)) as handle:
            time.sleep(0.02)
            data = handle.read()
    if hashlib.sha256(data).hexdigest() != digest:
        bad.append(url)
cache.close()
print(json.dumps({"fetched": cache.fetched, "evicted": cache.evicted, "bad": bad}))
"""


def test_two_ranks_share_one_budget_and_never_lose_a_shard_in_use(tmp_path):
    import hashlib

    served = tmp_path / "served"
    served.mkdir()
    rng = np.random.default_rng(0)
    sizes = rng.integers(60_000, 120_000, SHARDS).tolist()
    for i, size in enumerate(sizes):
        (served / f"shard-{i:06d}.tar").write_bytes(rng.bytes(size))
    port = free_port()
    server = start_http(served, port)
    urls = {
        f"http://127.0.0.1:{port}/{p.name}": (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(served.glob("*.tar"))
    }
    budget = 3 * 90_000
    root = tmp_path / "cache"
    cache = ShardCache(root, budget / 1e9)
    ranks = [
        subprocess.Popen(  # noqa: S603
            [
                sys.executable,
                "-c",
                RANK % {"rounds": ROUNDS},
                str(root),
                str(budget / 1e9),
                order,
                json.dumps(urls),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        for order in ("forward", "reverse")
    ]
    peak = 0
    try:
        while any(r.poll() is None for r in ranks):
            peak = max(peak, cache.usage())  # copies and the reservations of fetches under way
            time.sleep(0.005)
        results = [json.loads(r.communicate(timeout=60)[0]) for r in ranks]
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()
        stop(server)
    assert all(r.returncode == 0 for r in ranks)
    assert [r["bad"] for r in results] == [[], []]
    assert 0 < peak <= budget + max(sizes)
    assert cache.usage() <= budget
    evicted = sum(r["evicted"] for r in results)
    fetched = sum(r["fetched"] for r in results)
    assert evicted > SHARDS and fetched > SHARDS  # the budget forced eviction and fetching again
    assert fetched - evicted == len([p for p in root.iterdir() if p.suffix != ".lock"])


def _full_of_pinned_shards(tmp_path):
    """Two caches on one folder (two ranks of a node) with a budget of 2.5 shards of 1000 bytes: rank A pins two
    and rank B one, so the folder is over budget with every shard in use."""
    import data_tools.remote as remote_mod

    a, b = (ShardCache(tmp_path / "cache", budget_gb=2500 / 1e9) for _ in range(2))
    for n, cache in enumerate((a, a, b)):
        cache.path(f"s3://b/shard-{n}.tar", remote_mod.ObjectInfo(1000), data=bytes([n]) * 1000, pin=True)
    assert a.usage() == 3000
    return a, b


def test_a_fetch_over_a_budget_held_by_shards_in_use_waits_then_fails_in_one_line(tmp_path, monkeypatch):
    from data_tools.remote import ObjectInfo
    from mpma_ds.data import shard_cache

    a, b = _full_of_pinned_shards(tmp_path)
    monkeypatch.setattr(shard_cache, "WAIT_S", 0.5)
    start = time.monotonic()
    try:
        b.path("s3://b/shard-3.tar", ObjectInfo(1000), data=b"\3" * 1000)
    except shard_cache.ShardCacheFull as err:
        message = str(err)
    else:
        raise AssertionError("a fetch past the budget with every shard in use went ahead")
    assert time.monotonic() - start >= 0.5
    assert "\n" not in message and "raise data.shard_cache_gb" in message, message
    assert a.usage() == 3000  # the reservation was taken back; nothing in use was evicted
    assert not list((tmp_path / "cache").glob("*.tmp-*"))
    a.close()
    b.close()


def test_a_fetch_waiting_for_room_goes_ahead_once_a_shard_comes_free(tmp_path, monkeypatch):
    import threading

    from data_tools.remote import ObjectInfo
    from mpma_ds.data import shard_cache

    a, b = _full_of_pinned_shards(tmp_path)
    monkeypatch.setattr(shard_cache, "WAIT_S", 30.0)
    threading.Timer(0.3, a.unpin, [["s3://b/shard-0.tar"]]).start()
    start = time.monotonic()
    copy = b.path("s3://b/shard-3.tar", ObjectInfo(1000), data=b"\3" * 1000)
    assert 0.3 <= time.monotonic() - start < 30.0
    assert copy.read_bytes() == b"\3" * 1000
    assert not (tmp_path / "cache" / a.name_of("s3://b/shard-0.tar")).exists()  # the shard that came free went
    assert a.usage() == 3000
    a.close()
    b.close()
