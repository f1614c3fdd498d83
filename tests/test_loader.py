"""The streaming loader on real shards built by data_tools: both backends agree, ranks split exactly,
resume is exact, faults are skipped and counted, errors are clear."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from loader_testdata import IMG, faulty_shards, shard_root, tokenizer_dir
from PIL import Image

from mpma_ds import load_tokenizer
from mpma_ds.config import build
from mpma_ds.data import DataConfig, build_loader
from mpma_ds.data.plan import seeded_rng
from mpma_ds.data.shards import load_shard_index
from mpma_ds.data.stream import SampleRow
from mpma_ds.data.transforms import draw_aug_params

BACKENDS = ["wds", "dali"]
STD = 0.5  # DataConfig's default image_std: one gray level is 1 / 255 / STD in tensor units
GRAY_LEVEL = 1.0 / 255.0 / STD


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    return str(shard_root(str(tmp_path_factory.getbasetemp())))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return load_tokenizer(tokenizer_dir(str(tmp_path_factory.getbasetemp())))


@pytest.fixture(scope="session")
def train_keys(shards) -> list[str]:
    index = load_shard_index(f"{shards}/train")
    return list(index.keys)


def make_cfg(backend: str, shards: str, **kw) -> DataConfig:
    base = dict(
        backend=backend, train_shards=f"{shards}/train", val_shards=f"{shards}/validate", image_size=IMG,
        max_text_len=48, num_workers=2, shuffle_buffer=16,
    )  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def take(info, n: int) -> list[dict]:
    it = iter(info.loader)
    return [next(it) for _ in range(n)]


def valid_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]


def by_key(batches: list[dict], field: str) -> dict[str, torch.Tensor]:
    return {k: b[field][i] for b in batches for i, (k, ok) in enumerate(zip(b["key"], b["valid"])) if ok}


def test_backends_agree_on_contract_samples_and_pixels(shards, tokenizer, train_keys):
    """Same keys, dtypes, shapes; the same samples per epoch; eval images within one gray level."""
    eval_batches, train_sets = {}, {}
    for backend in BACKENDS:
        cfg = make_cfg(backend, shards)
        info = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=7, train=False)
        assert info.num_samples == len(train_keys) and info.steps_per_epoch == -(-len(train_keys) // 8)
        eval_batches[backend] = list(info.loader)  # one pass
        info.close()
        cfg = make_cfg(backend, shards, augment=False)
        info = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=7, train=True)
        batches = take(info, 2 * info.steps_per_epoch)  # two epochs of the endless train loader
        info.close()
        half = info.steps_per_epoch
        train_sets[backend] = (Counter(valid_keys(batches[:half])), Counter(valid_keys(batches[half:])))
    wds_b, dali_b = eval_batches["wds"], eval_batches["dali"]
    assert len(wds_b) == len(dali_b) == -(-len(train_keys) // 8)
    for a, b in zip(wds_b, dali_b):
        assert set(a) == set(b) == {
            "image", "input_ids", "attention_mask", "mlm_labels", "labels", "valid", "key", "text", "meta",
        }  # fmt: skip
        for field, dtype, shape in [
            ("image", torch.float32, (8, 1, IMG, IMG)),
            ("input_ids", torch.int64, (8, 48)),
            ("attention_mask", torch.int64, (8, 48)),
            ("mlm_labels", torch.int64, (8, 48)),
            ("labels", torch.float32, (8, 14)),
            ("valid", torch.bool, (8,)),
        ]:
            assert a[field].dtype == b[field].dtype == dtype, field
            assert tuple(a[field].shape) == tuple(b[field].shape) == shape, field
    # eval: same order, so batches match sample for sample (valid slots)
    assert valid_keys(wds_b) == valid_keys(dali_b) == train_keys
    img_w, img_d = by_key(wds_b, "image"), by_key(dali_b, "image")
    worst = max(float((img_w[k] - img_d[k]).abs().max()) for k in train_keys)
    assert worst <= 2 * GRAY_LEVEL + 1e-6, f"eval images differ by {worst * 255 * STD:.2f} gray levels"
    ids_w, ids_d = by_key(wds_b, "input_ids"), by_key(dali_b, "input_ids")
    assert all(torch.equal(ids_w[k], ids_d[k]) for k in train_keys)  # same text, same fixed-seed masks
    lab_w, lab_d = by_key(wds_b, "labels"), by_key(dali_b, "labels")
    assert all(torch.equal(lab_w[k].nan_to_num(9), lab_d[k].nan_to_num(9)) for k in train_keys)
    # train without augmentation: every sample exactly once per epoch in both backends
    for backend, (first, second) in train_sets.items():
        assert first == second == Counter(train_keys), backend


@pytest.mark.parametrize("backend,workers", [("wds", 0), ("wds", 2), ("dali", 2), ("synthetic", 0)])
def test_rank_split_covers_split_once(shards, tokenizer, train_keys, backend, workers):
    """World sizes 1, 2, 3: equal batches per rank; valid samples = the whole split, none repeated."""
    expected = Counter(train_keys) if backend != "synthetic" else None
    for world in (1, 2, 3):
        cfg = make_cfg(backend, shards, num_workers=workers, synthetic_samples=37)
        seen: Counter = Counter()
        steps = set()
        for rank in range(world):
            info = build_loader(cfg, rank, world, batch_size=4, tokenizer=tokenizer, seed=3, train=True)
            batches = take(info, info.steps_per_epoch)
            steps.add(len(batches))
            assert all(b["image"].shape[0] == 4 for b in batches)
            seen.update(valid_keys(batches))
            info.close()
        assert len(steps) == 1, f"world {world}: unequal batches per rank {steps}"
        if expected is None:
            assert len(seen) == 37 and set(seen.values()) == {1}
        else:
            assert seen == expected, f"world {world}"


@pytest.mark.parametrize("backend", BACKENDS + ["synthetic"])
def test_resume_gives_the_uninterrupted_batches(shards, tokenizer, backend):
    cfg = make_cfg(backend, shards, rotation_degrees=5.0, brightness=0.1, contrast=0.1)

    def build():
        return build_loader(cfg, 1, 2, batch_size=4, tokenizer=tokenizer, seed=11, train=True)

    reference = build()
    steps = reference.steps_per_epoch
    k, more = steps + 2, 4  # resume inside the second epoch, read across nothing twice
    ref = take(reference, k + more)[k:]
    reference.close()
    first = build()
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON (DeepSpeed client state)
    first.close()
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 2
    resumed = build()
    resumed.load_state_dict(state)
    got = take(resumed, more)
    resumed.close()
    for a, b in zip(ref, got):
        assert a["key"] == b["key"]
        for field in ("image", "input_ids", "attention_mask", "mlm_labels", "valid"):
            assert torch.equal(a[field], b[field]), field


def test_state_is_small_and_checked(shards, tokenizer):
    info = build_loader(make_cfg("wds", shards), 0, 2, batch_size=4, tokenizer=tokenizer, seed=1)
    take(info, 3)
    state = info.state_dict()
    assert len(json.dumps(state)) < 1000
    other = build_loader(make_cfg("wds", shards), 0, 3, batch_size=4, tokenizer=tokenizer, seed=1)
    with pytest.raises(ValueError, match="world_size=2"):
        other.load_state_dict(state)


def test_eval_pass_is_deterministic_and_unaugmented(shards, tokenizer):
    cfg = make_cfg("wds", shards, rotation_degrees=10.0, brightness=0.3)
    info = build_loader(cfg, 0, 1, split="validate", batch_size=4, tokenizer=tokenizer, seed=5, train=False)
    one, two = list(info.loader), list(info.loader)
    assert len(one) == len(two) == info.steps_per_epoch
    for a, b in zip(one, two):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["mlm_labels"], b["mlm_labels"])  # fixed-seed masking: comparable val loss
    assert info.num_samples == len(valid_keys(one))


@pytest.mark.parametrize("backend", BACKENDS)
def test_faulty_samples_are_skipped_and_counted(tmp_path_factory, tokenizer, backend):
    folder, expected, good = faulty_shards(str(tmp_path_factory.getbasetemp()))
    cfg = make_cfg(backend, "", train_shards=str(folder))
    info = build_loader(cfg, 0, 1, batch_size=4, tokenizer=tokenizer, seed=2, train=True)
    batches = take(info, info.steps_per_epoch)
    stats = info.stats()
    info.close()
    assert Counter(valid_keys(batches)) == Counter(good)
    assert stats["skipped_samples"] == sum(expected.values()), stats
    for reason, n in expected.items():
        assert stats[f"skipped_{reason}"] == n, (reason, stats)


def test_missing_or_empty_shards_are_clear_errors(tmp_path, tokenizer, shards):
    with pytest.raises(FileNotFoundError, match="no shards"):
        build_loader(make_cfg("wds", "", train_shards=""), 0, 1, batch_size=2, tokenizer=tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="build_shards"):
        build_loader(
            make_cfg("dali", "", train_shards=str(tmp_path / "empty")), 0, 1, batch_size=2, tokenizer=tokenizer
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(
            make_cfg("wds", "", train_shards=f"{tmp_path}/shard-{{0..3}}.tar"),
            0,
            1,
            batch_size=2,
            tokenizer=tokenizer,
        )
    (tmp_path / "noidx").mkdir()
    (tmp_path / "noidx" / "shard-000000.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(FileNotFoundError, match="wds2idx"):
        build_loader(
            make_cfg("wds", "", train_shards=str(tmp_path / "noidx")), 0, 1, batch_size=2, tokenizer=tokenizer
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_resampled_stream_has_declared_epoch_length(shards, tokenizer, backend):
    cfg = make_cfg(backend, shards, resampled=True, epoch_length=20, num_workers=0 if backend == "wds" else 1)
    info = build_loader(cfg, 0, 2, batch_size=3, tokenizer=tokenizer, seed=4)
    assert info.num_samples == 20 and info.steps_per_epoch == 4
    batches = take(info, 12)  # three epochs
    assert info.stats()["epoch"] == 3  # after the last batch of epoch 2 the position is epoch 3, batch 0
    epochs = [valid_keys(batches[i : i + 4]) for i in (0, 4, 8)]
    assert [len(e) for e in epochs] == [10, 10, 10]
    assert epochs[0] != epochs[1]


def test_augmented_pipelines_match_across_backends(shards, tokenizer):
    """The DALI decode pipeline and the PIL path compute the same transform from the same parameters."""
    cfg = make_cfg("dali", shards, image_size=48, rotation_degrees=8.0, brightness=0.2, contrast=0.2, hflip=True)
    stream = build_loader(cfg, 0, 1, batch_size=4, tokenizer=tokenizer, seed=3).loader
    yy, xx = np.mgrid[0:200, 0:160]
    pixels = (127 + 100 * np.sin(xx / 13.0) * np.cos(yy / 17.0)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    data = np.frombuffer(buf.getvalue(), np.uint8)
    rows = [SampleRow(data, "t", {}, "k", True, (160, 200))] * 4
    params = [draw_aug_params(cfg, 160, 200, seeded_rng(i)) for i in range(4)]
    dali, undecodable = stream._decode(rows, params)  # (4, 1, 48, 48)
    assert undecodable == set()
    image = Image.open(io.BytesIO(buf.getvalue()))
    host = torch.stack([stream.transform.apply(image, p) for p in params])  # (4, 1, 48, 48)
    stream.close()
    assert len({(p.top, p.left, p.flip) for p in params}) > 1  # the parameters really vary
    diff = (dali - host).abs()
    # rotation fill edges differ (anti-aliased vs hard corners): compare those only on average
    centre = diff[:, :, 10:-10, 10:-10]
    assert float(centre.max()) <= 8 * GRAY_LEVEL, float(centre.max()) * 255 * STD
    assert float(diff.mean()) <= 3 * GRAY_LEVEL, float(diff.mean()) * 255 * STD


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="data.backend"):
        DataConfig(backend="torch")
    with pytest.raises(ValueError, match="data.crop_scale"):
        DataConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="data.image_mean"):
        DataConfig(in_chans=3, image_mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="data.mlm_probability"):
        DataConfig(mlm_probability=1.0)
    assert DataConfig(mlm_probability=0.0).mlm_probability == 0.0  # fine-tuning: no MLM masking
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="data.label_fraction"):
            DataConfig(label_fraction=bad)
    with pytest.raises(ValueError, match="unknown key data.shards"):
        build(DataConfig, {"shards": "x"}, prefix="data")
    assert build(DataConfig, {"crop_ratio": [0.8, 1.2]}, prefix="data").crop_ratio == (0.8, 1.2)


def test_synthetic_pairs_are_correlated(tokenizer):
    cfg = DataConfig(backend="synthetic", image_size=32, max_text_len=48, synthetic_samples=64, in_chans=3,
                     image_mean=(0.5,), image_std=(0.5,))  # fmt: skip
    info = build_loader(cfg, 0, 1, batch_size=16, tokenizer=tokenizer, seed=0, train=False)
    batches = list(info.loader)
    assert batches[0]["image"].shape == (16, 3, 32, 32)
    for batch in batches:
        for text, labels in zip(batch["text"], batch["labels"]):
            assert ("pleural effusion" in text) == bool(labels[9] == 1)  # CheXpert index 9: Pleural Effusion
            assert ("lungs are clear" in text) == bool(labels[8] == 1)  # 8: No Finding


@pytest.mark.gpu
def test_dali_mixed_decode_matches_cpu_decode(shards, tokenizer):
    """On a GPU machine: ``mixed`` (nvJPEG) decode gives the CPU pipeline's images within a few gray levels."""
    out = {}
    for device in ("cpu", "mixed"):
        cfg = make_cfg("dali", shards, dali_decode=device)
        info = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=1, train=False)
        batches = list(info.loader)
        info.close()
        assert batches[0]["image"].is_cuda == (device == "mixed")
        out[device] = torch.cat([b["image"].cpu() for b in batches])
    assert float((out["cpu"] - out["mixed"]).abs().max()) <= 4 * GRAY_LEVEL


def test_wds_batches_do_not_depend_on_worker_count(shards, tokenizer):
    """The plan is made on indices before reading: 0 or 2 workers give the same batches, across epochs."""
    runs = []
    for workers in (0, 2):
        cfg = make_cfg("wds", shards, num_workers=workers, rotation_degrees=5.0)
        info = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=9)
        runs.append(take(info, info.steps_per_epoch + 2))
        info.close()
    for a, b in zip(*runs):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])


def test_model_trains_on_loader_batches(shards, tokenizer):
    """The batch contract is what the model takes: one forward/backward of mpma_tiny on a wds batch."""
    from mpma_ds import create_model

    info = build_loader(make_cfg("wds", shards, num_workers=0), 0, 1, batch_size=4, tokenizer=tokenizer, seed=0)
    batch = take(info, 1)[0]
    info.close()
    torch.manual_seed(0)
    model = create_model("mpma_tiny", image_size=IMG, vocab_size=len(tokenizer), max_text_len=48)
    out = model(batch)
    assert {"loss", "loss_mlm", "loss_mim", "loss_global", "loss_local"} <= set(out)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_split_names_pick_their_shards(shards, tokenizer):
    cfg = make_cfg("wds", shards, num_workers=0)
    val = build_loader(cfg, 0, 1, split="validate", batch_size=4, tokenizer=tokenizer, train=False)
    test_as_val = build_loader(cfg, 0, 1, split="test", batch_size=4, tokenizer=tokenizer, train=False)
    assert val.num_samples == test_as_val.num_samples  # no test_shards: test reads val_shards
    cfg = make_cfg("wds", shards, num_workers=0, test_shards=f"{shards}/train")
    test = build_loader(cfg, 0, 1, split="test", batch_size=4, tokenizer=tokenizer, train=False)
    train = build_loader(cfg, 0, 1, split="train", batch_size=4, tokenizer=tokenizer, train=False)
    assert test.num_samples == train.num_samples != val.num_samples
    with pytest.raises(ValueError, match="unknown split"):
        build_loader(cfg, 0, 1, split="holdout", batch_size=4, tokenizer=tokenizer)
