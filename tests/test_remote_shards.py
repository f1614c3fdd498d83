"""Shards on object stores, against real servers on loopback: a moto S3 server process and ``python -m
http.server``. The loader reads the same samples from ``s3://`` / ``http://`` as from disk; each fault is one
line (missing object or bucket, no credentials, access denied, a shard changed since the manifest) or retried
and counted (the server going away for a moment)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from loader_testdata import shard_root, tokenizer_dir
from remote_servers import (
    env,
    free_port,
    s3_env,
    s3_with,
    start_http,
    start_moto,
    stop,
)

from data_tools import remote
from data_tools.remote import ChangedObject, RemoteError
from data_tools.verify_shards import verify_shards
from mpma_ds import load_tokenizer
from mpma_ds.data import DataConfig, build_loader, samples
from mpma_ds.data.shards import load_shard_index

BUCKET = "shards"
PREFIX = f"s3://{BUCKET}/build"


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> str:
    return str(shard_root(str(tmp_path_factory.getbasetemp())))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(tokenizer_dir(str(tmp_path_factory.getbasetemp())))


@pytest.fixture(scope="module")
def s3(local):
    """A moto server with the local build uploaded under ``s3://shards/build/``; yields its port, the AWS
    variables pointing at it."""
    with s3_with(Path(local), PREFIX) as port, env(s3_env(port)):
        yield port


def make_cfg(train: str, val: str = "", **kw) -> DataConfig:
    base = dict(backend="wds", train_shards=train, val_shards=val or train, image_size=32, max_text_len=48,
                num_workers=0, shuffle_buffer=16)  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def eval_pass(cfg: DataConfig, tokenizer, split: str = "validate") -> list[dict]:
    info = build_loader(cfg, 0, 1, split=split, batch_size=4, tokenizer=tokenizer, seed=3, train=False)
    try:
        return list(info.loader)
    finally:
        info.close()


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        for field in ("image", "input_ids", "valid"):
            assert torch.equal(x[field], y[field]), field


@pytest.mark.parametrize(
    "form",
    [
        f"{PREFIX}/train",
        f"{PREFIX}/train/",
        f"{PREFIX}/train/shard-*.tar",
        f"{PREFIX}/train/shard-{{000000..000003}}.tar",
    ],
)
def test_s3_reads_the_same_samples_as_local_disk(s3, local, tokenizer, form):
    """Folder (a listed prefix), glob and brace forms; the brace form lists nothing."""
    index = load_shard_index(f"{local}/train")
    if "{" in form:
        form = form.replace("000003", f"{len(index.paths) - 1:06d}")
    remote_index = load_shard_index(form)
    assert remote_index.keys == index.keys
    assert [remote.basename(p) for p in remote_index.paths] == [p.name for p in index.paths]
    assert all(i is not None and i.size > 0 and i.etag for i in remote_index.infos)
    assert_same(
        eval_pass(make_cfg(form), tokenizer, "train"), eval_pass(make_cfg(f"{local}/train"), tokenizer, "train")
    )


def test_s3_training_stream_and_resume_match_local(s3, local, tokenizer):
    """The byte source does not change the sample order: the same train batches, and a resume from a state
    saved on local shards continues identically on ``s3://`` ones."""
    kw = dict(num_workers=2, rotation_degrees=5.0)

    def build(spec):
        return build_loader(make_cfg(spec, **kw), 1, 2, batch_size=4, tokenizer=tokenizer, seed=11)

    ref = build(f"{local}/train")
    it = iter(ref.loader)
    want = [next(it) for _ in range(5)]
    ref.close()
    first = build(f"{PREFIX}/train")
    it = iter(first.loader)
    got = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = build(f"{PREFIX}/train")
    resumed.load_state_dict(state)
    it = iter(resumed.loader)
    got += [next(it) for _ in range(3)]
    resumed.close()
    assert_same(want, got)


def test_resume_on_another_world_size_reads_s3_as_local(s3, local, tokenizer):
    """2 ranks (micro-batch 4) stop mid-epoch; their loader positions resume, as the trainer maps them
    (`plan.reshard_positions`), on 1 rank with 2 accumulation steps (the same 2 data ranks: the uninterrupted
    order) and on 1 rank with the micro-batch halved (4 data ranks of 2). From ``s3://`` the resumed streams
    read exactly the samples, in the order, that local shards give under the same change."""
    from mpma_ds.data.plan import reshard_positions

    def keys(info, n: int) -> list[tuple[str, ...]]:
        it = iter(info.loader)
        return [tuple(next(it)["key"]) for _ in range(n)]

    def run(spec: str) -> dict[str, list]:
        def build(rank: int, world: int, batch: int):
            return build_loader(make_cfg(spec), rank, world, batch_size=batch, tokenizer=tokenizer, seed=5)

        firsts = [build(r, 2, 4) for r in range(2)]
        seen = {f"rank{r}": keys(info, 3) for r, info in enumerate(firsts)}  # 3 of the epoch's 5 batches
        states = [json.loads(json.dumps(info.state_dict())) for info in firsts]
        for info in firsts:
            info.close()
        for name, ranks, batch in (("accumulate", 2, 4), ("halved", 4, 2)):
            for d, state in enumerate(reshard_positions(states, ranks, list(range(ranks)))):
                info = build(d, ranks, batch)
                info.load_state_dict(state)
                seen[f"{name}{d}"] = keys(info, 4)  # into the next epoch
                info.close()
        return seen

    remote_run, local_run = run(f"{PREFIX}/train/"), run(f"{local}/train")
    assert remote_run == local_run
    reference = [
        build_loader(make_cfg(f"{local}/train"), r, 2, batch_size=4, tokenizer=tokenizer, seed=5) for r in range(2)
    ]
    for r, info in enumerate(reference):  # 2 ranks → 1 rank × 2 accumulation steps: the uninterrupted order
        assert keys(info, 7) == remote_run[f"rank{r}"] + remote_run[f"accumulate{r}"]
        info.close()


def test_http_shards_brace_and_folder(local, tokenizer, tmp_path, monkeypatch):
    """``python -m http.server`` ignores Range: each shard is then fetched once, whole, into the node cache
    (blocks smaller than the test's shards here, so a block request is a real partial request)."""
    monkeypatch.setattr(samples, "REMOTE_BLOCK", 4096)
    port = free_port()
    proc = start_http(Path(local), port)
    try:
        n = len(load_shard_index(f"{local}/validate").paths)
        base = f"http://127.0.0.1:{port}/validate"
        want = eval_pass(make_cfg(f"{local}/validate"), tokenizer)
        for name, form in (("brace", f"{base}/shard-{{000000..{n - 1:06d}}}.tar"), ("folder", f"{base}/")):
            cfg = make_cfg(form, shard_cache=str(tmp_path / name))
            assert_same(eval_pass(cfg, tokenizer), want)
            assert len(list((tmp_path / name).glob("*-shard-*.tar"))) == n
    finally:
        stop(proc)


def test_missing_object_bucket_and_index_are_one_line(s3, local, tokenizer):
    cases = {
        f"{PREFIX}/train/shard-999999.tar": "s3://shards/build/train/shard-999999.tar does not exist",
        "s3://no-such-bucket/train/": "s3://no-such-bucket/train",
        f"{PREFIX}/nothing-here/": "s3://shards/build/nothing-here/ does not exist",
    }
    for spec, message in cases.items():
        with pytest.raises((RemoteError, FileNotFoundError), match=message) as err:
            build_loader(make_cfg(spec), 0, 1, batch_size=2, tokenizer=tokenizer, train=False)
        assert "\n" not in str(err.value)
    remote.put_bytes(b"not a tar", f"s3://{BUCKET}/noidx/shard-000000.tar")
    with pytest.raises(RemoteError, match="has no index s3://shards/noidx/shard-000000.idx"):
        load_shard_index(f"s3://{BUCKET}/noidx/")


def test_no_credentials_and_denied_are_one_line(s3, tmp_path):
    bare = {k: None for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    bare.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    with env(bare), pytest.raises(RemoteError, match=f"no credentials for {PREFIX}/train") as err:
        load_shard_index(f"{PREFIX}/train/")
    assert "\n" not in str(err.value)
    port = free_port()
    locked = start_moto(port, INITIAL_NO_AUTH_ACTION_COUNT="0")  # IAM checks on: an unknown key is refused
    try:
        with env(s3_env(port)), pytest.raises(RemoteError, match=f"access denied to {PREFIX}/train") as err:
            load_shard_index(f"{PREFIX}/train/")
        assert "\n" not in str(err.value)
    finally:
        stop(locked)


def test_changed_shard_is_refused_before_and_skipped_during(s3, local, tokenizer):
    """Before: the size differs from manifest.json → refused with one line. During: the object is replaced
    (same size) after it was listed → its reads fail the ETag pin and the samples are skipped and counted."""
    src = f"{PREFIX}/train"
    copy = f"s3://{BUCKET}/changed"
    fs, _ = remote.filesystem(copy)
    fs.copy(f"{BUCKET}/build", f"{BUCKET}/changed", recursive=True)
    shard = f"{copy}/train/shard-000000.tar"
    data = remote.read_bytes(shard)
    remote.put_bytes(data + b"\0" * 512, shard)
    with pytest.raises(
        ChangedObject, match="shard-000000.tar is .* bytes on the store but its manifest.json says"
    ):
        load_shard_index(f"{copy}/train/")
    remote.put_bytes(data, shard)
    total = sum(load_shard_index(f"{src}/").counts())
    info = build_loader(
        make_cfg(f"{copy}/train/"), 0, 1, split="train", batch_size=total, tokenizer=tokenizer, train=False
    )  # fmt: skip  (one batch: the good samples stand in)
    flipped = bytearray(data)
    flipped[-2000] ^= 0xFF  # same size, other content: another ETag
    remote.put_bytes(bytes(flipped), shard)
    try:
        batches = list(info.loader)
        stats = info.stats()
    finally:
        info.close()
    first = load_shard_index(f"{src}/").counts()[0]
    assert stats["skipped_changed_shard"] == first
    keys = {k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok}
    assert len(keys) == total - first


def test_transient_outage_is_retried_and_counted(local, tokenizer, tmp_path):
    """The HTTP server goes away after the listing and comes back 1.5 s later: reads retry with backoff,
    nothing is lost, and the retries are counted in the loader's stats."""
    served = tmp_path / "served"
    shutil.copytree(f"{local}/validate", served / "validate")
    port = free_port()
    proc = start_http(served, port)
    n = len(load_shard_index(f"{local}/validate").paths)
    spec = f"http://127.0.0.1:{port}/validate/shard-{{000000..{n - 1:06d}}}.tar"
    cfg = make_cfg(spec, shard_cache=str(tmp_path / "cache"))
    info = build_loader(cfg, 0, 1, split="validate", batch_size=4, tokenizer=tokenizer, seed=3, train=False)
    stop(proc)
    holder = {}
    restart = threading.Timer(1.5, lambda: holder.setdefault("proc", start_http(served, port)))
    restart.start()
    try:
        got = list(info.loader)
        stats = info.stats()
    finally:
        info.close()
        restart.join()
        time.sleep(0.1)
        stop(holder["proc"])
    assert stats["remote_retries"] >= 1
    assert stats["skipped_samples"] == 0
    assert_same(got, eval_pass(make_cfg(f"{local}/validate"), tokenizer))


def test_http_shard_changed_since_listing_is_skipped_and_counted(local, tokenizer, tmp_path):
    """``python -m http.server`` gives Last-Modified (no ETag) and ignores ``If-Unmodified-Since``: a shard
    replaced after the listing by one of the same size and a later date is refused by the answer's own
    Last-Modified; its samples are skipped and counted as ``changed_shard``, the other shards read."""
    import os

    served = tmp_path / "served"
    shutil.copytree(f"{local}/train", served / "train")
    counts = load_shard_index(f"{local}/train").counts()
    port = free_port()
    proc = start_http(served, port)
    spec = f"http://127.0.0.1:{port}/train/shard-{{000000..{len(counts) - 1:06d}}}.tar"
    cfg = make_cfg(spec, shard_cache=str(tmp_path / "cache"))
    info = build_loader(cfg, 0, 1, split="train", batch_size=sum(counts), tokenizer=tokenizer, train=False)
    assert all(i.etag.startswith(remote.LAST_MODIFIED) for i in info.loader.index.infos)
    shard = served / "train" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    later = shard.stat().st_mtime + 10
    os.utime(shard, (later, later))
    try:
        batches = list(info.loader)
        stats = info.stats()
    finally:
        info.close()
        stop(proc)
    assert stats["skipped_changed_shard"] == counts[0]
    keys = {k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok}
    assert len(keys) == sum(counts) - counts[0]


def test_verify_shards_on_s3(s3, local):
    report = verify_shards(PREFIX, progress=False)
    assert report.ok, report.problems
    assert report.samples == json.loads((Path(local) / "manifest.json").read_text())["written"]


def test_dali_reads_the_same_samples_from_s3_as_from_local_disk(s3, local, tokenizer, tmp_path):
    """DALI (CPU pipeline) over ``s3://``: each rank's part of the epoch is fetched into the node cache and
    read as local files; train batches of both ranks and the eval pass equal DALI's over local shards."""
    pytest.importorskip("nvidia.dali")
    kw = dict(backend="dali", dali_decode="cpu", num_workers=1, shard_cache=str(tmp_path / "cache"))
    for rank in (0, 1):
        got, want = [], []
        for spec, out in ((f"{PREFIX}/train/", got), (f"{local}/train", want)):
            info = build_loader(make_cfg(spec, **kw), rank, 2, batch_size=4, tokenizer=tokenizer, seed=9)
            it = iter(info.loader)
            out += [next(it) for _ in range(info.steps_per_epoch + 1)]  # into the second epoch
            info.close()
        assert_same(got, want)
    cached = list((tmp_path / "cache").glob("*-shard-*.tar"))
    assert cached and all(p.stat().st_size > 0 for p in cached)
    assert_same(
        eval_pass(make_cfg(f"{PREFIX}/validate/", **kw), tokenizer),
        eval_pass(make_cfg(f"{local}/validate", **kw), tokenizer),
    )
    # and the wds backend reads those very samples too
    wds_keys = [b["key"] for b in eval_pass(make_cfg(f"{PREFIX}/validate/"), tokenizer)]
    assert wds_keys == [b["key"] for b in eval_pass(make_cfg(f"{local}/validate", **kw), tokenizer)]


def test_dali_direct_reads_s3_itself_the_same_samples(s3, local, tokenizer, tmp_path):
    """``data.dali_remote=direct``: DALI's own AWS SDK client reads the ``s3://`` objects in place (endpoint
    from ``AWS_ENDPOINT_URL``), with the ``.idx`` written locally from our index; nothing lands in the cache.
    Other stores are refused with one line."""
    pytest.importorskip("nvidia.dali")
    kw = dict(backend="dali", dali_decode="cpu", num_workers=1, shard_cache=str(tmp_path / "cache"))
    for rank in (0, 1):
        got, want = [], []
        for spec, out, extra in (
            (f"{PREFIX}/train/", got, {"dali_remote": "direct"}),
            (f"{local}/train", want, {}),
        ):
            info = build_loader(make_cfg(spec, **kw, **extra), rank, 2, batch_size=4, tokenizer=tokenizer, seed=9)
            it = iter(info.loader)
            out += [next(it) for _ in range(info.steps_per_epoch + 1)]  # into the second epoch
            info.close()
        assert_same(got, want)
    assert not list((tmp_path / "cache").glob("*-shard-*.tar"))
    spec = f"pipe:cat {local}/validate/shard-000000.tar"
    with pytest.raises(ValueError, match="data.dali_remote=direct reads s3:// shards only"):
        build_loader(make_cfg(spec, **kw, dali_remote="direct"), 0, 1, batch_size=4, tokenizer=tokenizer)


def test_dali_cache_budget_too_small_is_one_line(s3, tokenizer, tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = make_cfg(
        f"{PREFIX}/train/", backend="dali", dali_decode="cpu", shard_cache=str(tmp_path), shard_cache_gb=1e-6
    )
    with pytest.raises(ValueError, match="data.shard_cache_gb=1e-06 cannot hold this rank's"):
        info = build_loader(cfg, 0, 1, batch_size=4, tokenizer=tokenizer, seed=9)
        next(iter(info.loader))


def test_evaluate_finds_the_split_under_a_remote_build_root(s3):
    from mpma_ds.runner.evaluate import split_folder

    assert split_folder(PREFIX, "validate") == f"{PREFIX}/validate/"
    assert split_folder(f"{PREFIX}/train/", "validate") == f"{PREFIX}/train/"


def test_pipe_shards_read_the_same_samples(local, tokenizer, tmp_path):
    """webdataset's ``pipe:`` form: the command's output is the shard (fetched whole into the node cache), the
    same command with ``.tar`` → ``.idx`` its index; a failing command is one line."""
    n = len(load_shard_index(f"{local}/validate").paths)
    spec = ",".join(f"pipe:cat {local}/validate/shard-{i:06d}.tar" for i in range(n))
    cfg = make_cfg(spec, shard_cache=str(tmp_path))
    assert_same(eval_pass(cfg, tokenizer), eval_pass(make_cfg(f"{local}/validate"), tokenizer))
    with pytest.raises(RemoteError, match="pipe:cat /nonexistent/shard-000000.tar: the command exited 1"):
        load_shard_index("pipe:cat /nonexistent/shard-000000.tar")


def test_pretrain_with_a_missing_remote_shard_fails_with_one_line(s3, tmp_path_factory, tmp_path, capsys):
    """The CLI: a missing object is found before training starts, one stderr line naming the URL, exit 2."""
    import sys

    from train_testdata import ROOT, prepared_base, pretrain_argv, tiny_overrides

    sys.path.insert(0, str(ROOT / "launch"))
    import pretrain

    base = prepared_base(tmp_path_factory)
    missing = f"{PREFIX}/train/shard-999999.tar"
    overrides = tiny_overrides(base, tmp_path / "run", **{"data.train_shards": missing, "train.eval_every": 0})
    code = pretrain.main(pretrain_argv(overrides))
    # torch may warn once per process that there is no CUDA runtime: not ours
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if "cpp_extension.py" not in x]
    assert code != 0 and len(lines) == 1, lines
    assert lines[0].startswith("pretrain.py: error: ") and f"{missing} does not exist" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_node_cache_refuses_a_shard_replaced_since_its_listing(s3, local, tmp_path):
    """What DALI reads goes through the node cache: a whole-shard fetch is pinned to the version listed, so an
    object replaced after the listing by one of the same size (another ETag on S3, a later Last-Modified over
    HTTP) is `ChangedObject` and leaves no copy; the unchanged ones are fetched byte for byte."""
    import os

    from mpma_ds.data.shard_cache import ShardCache

    copy = f"s3://{BUCKET}/replaced"
    fs, _ = remote.filesystem(copy)
    fs.copy(f"{BUCKET}/build", f"{BUCKET}/replaced", recursive=True)
    served = tmp_path / "served"
    shutil.copytree(f"{local}/validate", served / "validate")
    port = free_port()
    proc = start_http(served, port)
    try:
        n = len(load_shard_index(f"{local}/validate").paths)
        for spec in (f"{copy}/validate/", f"http://127.0.0.1:{port}/validate/shard-{{000000..{n - 1:06d}}}.tar"):
            index = load_shard_index(spec)
            url, info = str(index.paths[0]), index.infos[0]
            data = bytearray(remote.read_bytes(url))
            data[-2000] ^= 0xFF  # same size, other content
            if spec.startswith("s3://"):
                remote.put_bytes(bytes(data), url)
            else:
                shard = served / "validate" / remote.basename(url)
                shard.write_bytes(bytes(data))
                later = shard.stat().st_mtime + 10
                os.utime(shard, (later, later))
            cache = ShardCache(tmp_path / f"cache-{spec[:4]}", budget_gb=1.0)
            with pytest.raises(ChangedObject, match="changed on the store since it was listed"):
                cache.path(url, info)
            assert not [p for p in cache.root.iterdir() if p.suffix != ".lock" and p.name != ".folder.lock"]
            rest = [cache.path(str(u), i) for u, i in zip(index.paths[1:], index.infos[1:])]
            for u, got in zip(index.paths[1:], rest):
                assert got.read_bytes() == (Path(local) / "validate" / remote.basename(str(u))).read_bytes()
    finally:
        stop(proc)
