"""Weighted training mixtures (``data.train_sources``): exact shares, determinism from the seed, exact
mid-epoch resume, per-source counts in the loader stats and in MLflow, and one-line refusals."""

from __future__ import annotations

import json
import sys
from collections import Counter

import mlflow
import numpy as np
import pytest
from loader_testdata import read_samples, shard_root, tokenizer_dir, write_shard
from train_testdata import ROOT, prepared_base, tiny_overrides, tiny_shards
from train_testdata import pretrain_argv as _argv

from mpma_ds import load_tokenizer
from mpma_ds.config import ConfigError
from mpma_ds.data import DataConfig, build_loader
from mpma_ds.data.config import TrainSource
from mpma_ds.data.mixture import Mixture, mixture_stream, quotas
from mpma_ds.data.shards import load_shard_index

sys.path.insert(0, str(ROOT / "launch"))
import pretrain  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(shard_root(str(tmp_path_factory.getbasetemp())))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(tokenizer_dir(str(tmp_path_factory.getbasetemp())))


def three_sources(shards: str, weights=(6, 3, 1)) -> list[TrainSource]:
    """Three disjoint sources from the train shards: shards 0-1, shard 2, shard 3."""
    tars = [str(p) for p in load_shard_index(f"{shards}/train").paths]
    parts = [",".join(tars[:2]), tars[2], tars[3]]
    return [
        TrainSource(name=n, shards=p, weight=w) for n, p, w in zip(("mimic", "chexpert", "roco"), parts, weights)
    ]


def make_cfg(shards: str, **kw) -> DataConfig:
    base = dict(backend="wds", train_sources=three_sources(shards), val_shards=f"{shards}/validate", image_size=32,
                max_text_len=48, num_workers=0, shuffle_buffer=8)  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def test_shares_over_10k_samples_are_exact_and_resume_reproduces_the_sequence():
    """Pure plan: 3 sources of 700 / 300 / 90 samples at 6:3:1, epochs of 10k samples."""
    counts = [100] * 7 + [150, 150] + [90]
    mixture = Mixture(("a", "b", "c"), (6.0, 3.0, 1.0), ((0, 7), (7, 9), (9, 10)))
    source_of = mixture.source_of_shard()
    starts = np.cumsum([0] + counts)
    shard_of_id = np.searchsorted(starts, np.arange(sum(counts)), side="right") - 1
    streams = [mixture_stream(counts, mixture, epoch=e, seed=4, epoch_length=10_000) for e in range(2)]
    for stream in streams:
        share = np.bincount(source_of[shard_of_id[stream]], minlength=3) / len(stream)
        assert np.abs(share - [0.6, 0.3, 0.1]).max() <= 0.02
        assert share.tolist() == [0.6, 0.3, 0.1]  # largest remainder: exact to one sample
    # each source is read in whole passes: within an epoch the small source repeats only after a full pass
    c_ids = streams[0][source_of[shard_of_id[streams[0]]] == 2]
    assert sorted(c_ids[:90].tolist()) == list(range(sum(counts) - 90, sum(counts)))
    # deterministic from (seed, epoch); another seed gives another order
    again = mixture_stream(counts, mixture, epoch=1, seed=4, epoch_length=10_000)
    assert np.array_equal(again, streams[1])
    assert not np.array_equal(mixture_stream(counts, mixture, epoch=1, seed=5, epoch_length=10_000), streams[1])
    assert quotas((6.0, 3.0, 1.0), 7).tolist() == [4, 2, 1] and quotas((1.0, 1.0, 1.0), 10).sum() == 10


def test_mixture_loader_is_deterministic_resumes_exactly_and_counts_per_source(shards, tokenizer):
    cfg = make_cfg(shards, epoch_length=60)

    def build():
        return build_loader(cfg, 0, 2, batch_size=5, tokenizer=tokenizer, seed=7)

    reference = build()
    steps = reference.steps_per_epoch
    assert steps == 6 and reference.num_samples == 60
    it = iter(reference.loader)
    ref = [next(it) for _ in range(steps + 4)]
    stats = reference.stats()
    reference.close()
    # per-source counts of this rank over the batches read: they sum to the valid samples read
    valid = sum(int(b["valid"].sum()) for b in ref)
    counted = {k: v for k, v in stats.items() if k.startswith("samples/")}
    assert set(counted) == {"samples/mimic", "samples/chexpert", "samples/roco"}
    assert sum(counted.values()) == valid and stats["skipped_samples"] == 0
    # both ranks of one epoch: the shares are the weights' exactly
    keys_epoch = []
    for rank in (0, 1):
        info = build_loader(cfg, rank, 2, batch_size=5, tokenizer=tokenizer, seed=7)
        it = iter(info.loader)
        keys_epoch += [k for b in (next(it) for _ in range(steps)) for k, ok in zip(b["key"], b["valid"]) if ok]
        info.close()
    source_keys = {s.name: set(load_shard_index(s.shards).keys) for s in cfg.train_sources}
    per = Counter(next(n for n, ks in source_keys.items() if k in ks) for k in keys_epoch)
    assert per == {"mimic": 36, "chexpert": 18, "roco": 6}
    # resume mid-epoch 1 (a state that went through JSON): the same batches as the uninterrupted run
    first = build()
    it = iter(first.loader)
    for _ in range(steps + 1):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["mixture"] == {"mimic": 6.0, "chexpert": 3.0, "roco": 1.0}
    resumed = build()
    resumed.load_state_dict(state)
    it = iter(resumed.loader)
    got = [next(it) for _ in range(3)]
    assert resumed.stats() == stats
    resumed.close()
    for a, b in zip(ref[steps + 1 :], got):
        assert a["key"] == b["key"]
    # the same sources at other weights are another mixture: the saved position is refused
    other = build_loader(make_cfg(shards, epoch_length=60, train_sources=three_sources(shards, (1, 1, 1))), 0, 2,
                         batch_size=5, tokenizer=tokenizer, seed=7)  # fmt: skip
    with pytest.raises(ValueError, match="exact resume needs the same data.train_sources"):
        other.load_state_dict(state)
    other.close()


def test_bad_mixtures_are_one_line(shards, tokenizer, tmp_path):
    sources = three_sources(shards)
    with pytest.raises(ValueError, match="train_shards and data.train_sources are both set"):
        DataConfig(train_sources=sources, train_shards=f"{shards}/train")
    with pytest.raises(ValueError, match="names must be unique"):
        DataConfig(train_sources=[sources[0], sources[0]])
    with pytest.raises(ValueError, match="runs on data.backend wds only .*: set data.backend=wds") as err:
        DataConfig(train_sources=sources, backend="dali")
    assert "\n" not in str(err.value)
    with pytest.raises((ValueError, ConfigError), match="weight must be > 0"):
        TrainSource(name="x", shards="s", weight=0)
    # a VQA source mixed into image-report pretraining
    vqa = tmp_path / "vqa"
    vqa.mkdir()
    samples = read_samples(load_shard_index(f"{shards}/train").paths[3])
    for sample in samples:
        meta = json.loads(sample["json"])
        meta["source"] = "vqa-rad"
        sample["json"] = json.dumps(meta).encode()
    write_shard(vqa / "shard-000000.tar", samples)
    cfg = make_cfg(shards, train_sources=[sources[0], TrainSource(name="vqa", shards=str(vqa), weight=1)])
    with pytest.raises(
        ValueError, match="mixes sample kinds .*'vqa': 'vqa'.* give each kind its own recipe"
    ) as err:
        build_loader(cfg, 0, 1, batch_size=4, tokenizer=tokenizer)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.e2e
def test_pretraining_logs_samples_and_validation_per_source_to_mlflow(tmp_path_factory, tmp_path):
    base = prepared_base(tmp_path_factory)
    root = tiny_shards(base)
    tars = sorted(str(p) for p in (root / "train").glob("shard-*.tar"))
    val = root / "validate"
    sources = (
        f"[{{name: big, shards: '{','.join(tars[:-1])}', weight: 3, val_shards: '{val}'}}, "
        f"{{name: small, shards: '{tars[-1]}'}}]"
    )
    db = tmp_path / "mlflow.db"
    overrides = tiny_overrides(
        base, tmp_path / "run",
        **{"data.train_shards": "", "data.train_sources": sources, "data.epoch_length": 32, "train.max_steps": 4,
           "train.eval_every": 4, "train.eval_max_batches": 2, "train.save_every": 0, "tracking.enabled": True, "tracking.uri": f"sqlite:///{db}",
           "tracking.system_metrics": False},
    )  # fmt: skip
    assert pretrain.main(_argv(overrides)) == 0
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    client = mlflow.tracking.MlflowClient()
    big = [m.value for m in client.get_metric_history(run.info.run_id, "data/samples/big")]
    small = [m.value for m in client.get_metric_history(run.info.run_id, "data/samples/small")]
    # 4 steps x 8 samples = 32 = one epoch: 3:1 → 24 and 8 samples, counted as they are read
    assert big[-1] == 24 and small[-1] == 8
    assert big == sorted(big) and len(big) == 4
    # validation per source: the source with val_shards is reported under eval/big/, beside eval/ (val_shards);
    # its shards are the same validate split here, so the numbers agree
    metrics = run.data.metrics
    per_source = {k[len("eval/big/") :]: v for k, v in metrics.items() if k.startswith("eval/big/")}
    assert per_source and not any(k.startswith("eval/small/") for k in metrics)
    for name, value in per_source.items():
        assert value == pytest.approx(metrics[f"eval/{name}"], nan_ok=True), name
