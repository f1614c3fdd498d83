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
