"""What fine-tuning needs from the loader: label fractions (deterministic, nested, patient-level, the same for
every backend and world size, resumable), no MLM masking at ``mlm_probability: 0``, and one plain pass over the
train split for feature extraction."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from loader_testdata import patient_shards, tokenizer_dir

from mpma_ds import load_tokenizer
from mpma_ds.data import DataConfig, build_loader
from mpma_ds.data.masking import IGNORE_INDEX
from mpma_ds.data.plan import rank_range
from mpma_ds.data.shards import load_shard_index
from mpma_ds.data.subsets import meta_subject, patient_score, patient_subset

FRACTIONS = (0.2, 0.5, 1.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """``(shard folder, {key: patient})``: 60 patients, 1-3 images each, 12+ shards."""
    folder = tmp_path_factory.mktemp("patients")
    return str(folder), patient_shards(folder)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(tokenizer_dir(str(tmp_path_factory.getbasetemp())))


def make_cfg(backend: str, shards: str, **kw) -> DataConfig:
    base = dict(
        backend=backend, train_shards=shards, val_shards=shards, image_size=16, max_text_len=24, num_workers=0,
        shuffle_buffer=8,
    )  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def valid_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]


def epoch_keys(cfg: DataConfig, tokenizer, *, world: int = 1, train: bool = True, seed: int = 3) -> Counter:
    """Valid keys of one epoch over all ranks (train: the first epoch of the endless loader)."""
    seen: Counter = Counter()
    for rank in range(world):
        info = build_loader(cfg, rank, world, batch_size=4, tokenizer=tokenizer, seed=seed, train=train)
        it = iter(info.loader)
        seen.update(valid_keys([next(it) for _ in range(info.steps_per_epoch)]))
        info.close()
    return seen


def test_patient_subset_rule_is_nested_patient_level_and_seeded():
    rng = np.random.default_rng(1)
    subjects = [f"p{int(p)}" for p in rng.integers(0, 300, 1000)]  # 1000 images of ~300 patients
    keeps = {f: patient_subset(subjects, f, seed=0) for f in (0.01, 0.1, 0.5, 1.0)}
    assert keeps[1.0].all()
    assert 0 < keeps[0.01].sum() < keeps[0.1].sum() < keeps[0.5].sum() < 1000
    for low, high in ((0.01, 0.1), (0.1, 0.5), (0.5, 1.0)):
        assert not (keeps[low] & ~keeps[high]).any(), f"{low} is not inside {high}"
    by_patient = defaultdict(set)
    for s, k in zip(subjects, keeps[0.1].tolist()):
        by_patient[s].add(k)
    assert all(len(v) == 1 for v in by_patient.values()), "a patient was split"
    patients = sorted(set(subjects))
    kept_share = np.mean([patient_score(p, 0) < 0.5 for p in patients])
    assert 0.4 < kept_share < 0.6  # the score spreads patients evenly over [0, 1)
    assert np.array_equal(patient_subset(subjects, 0.1, seed=0), keeps[0.1])  # deterministic
    assert not np.array_equal(patient_subset(subjects, 0.1, seed=1), keeps[0.1])
    assert np.array_equal(patient_subset(list(reversed(subjects)), 0.1, 0), keeps[0.1][::-1])  # order-free
    with pytest.raises(ValueError, match="label fraction"):
        patient_subset(subjects, 0.0, 0)


def test_label_fraction_is_nested_patient_level_and_deterministic(corpus, tokenizer):
    folder, patient_of = corpus
    kept = {}
    for fraction in FRACTIONS:
        cfg = make_cfg("wds", folder, label_fraction=fraction, label_fraction_seed=7)
        kept[fraction] = epoch_keys(cfg, tokenizer)
        assert set(kept[fraction].values()) == {1}, "a sample seen twice in an epoch"
    assert set(kept[1.0]) == set(patient_of)
    assert 0 < len(kept[0.2]) < len(kept[0.5]) < len(kept[1.0])
    assert set(kept[0.2]) < set(kept[0.5]) < set(kept[1.0])
    for fraction in (0.2, 0.5):
        patients_in = {patient_of[k] for k in kept[fraction]}
        partly = {p for p in patients_in if {k for k, q in patient_of.items() if q == p} - set(kept[fraction])}
        assert not partly, f"patients partly in the {fraction} subset: {partly}"
        # the loader's rule is patient_subset over the shards' subject ids (JSON subject_id, else the key)
        keys = sorted(patient_of)
        rule = patient_subset([patient_of[k] for k in keys], fraction, 7)
        assert {k for k, ok in zip(keys, rule.tolist()) if ok} == set(kept[fraction])
    again = epoch_keys(make_cfg("wds", folder, label_fraction=0.5, label_fraction_seed=7), tokenizer, seed=99)
    assert again == kept[0.5]  # same subset whatever the run's shuffle seed
    other = epoch_keys(make_cfg("wds", folder, label_fraction=0.5, label_fraction_seed=8), tokenizer)
    assert set(other) != set(kept[0.5])


def test_subset_is_the_same_for_every_backend_and_world_size(corpus, tokenizer):
    folder, _ = corpus
    reference = None
    for backend in ("wds", "dali"):
        for world in (1, 2, 3):
            cfg = make_cfg(backend, folder, label_fraction=0.5, label_fraction_seed=7, num_workers=1)
            seen = epoch_keys(cfg, tokenizer, world=world)
            assert set(seen.values()) == {1}, (backend, world)
            reference = reference or seen
            assert seen == reference, (backend, world)


def test_loader_info_reports_the_subset(corpus, tokenizer):
    folder, patient_of = corpus
    cfg = make_cfg("wds", folder, label_fraction=0.5, label_fraction_seed=7)
    info = build_loader(cfg, 0, 2, batch_size=4, tokenizer=tokenizer, seed=0)
    subset = info.subset
    assert set(subset) == {"fraction", "seed", "samples_kept", "samples_total", "patients_kept", "patients_total"}
    assert (subset["fraction"], subset["seed"]) == (0.5, 7)
    assert subset["samples_total"] == len(patient_of) and subset["patients_total"] == len(set(patient_of.values()))
    assert info.num_samples == subset["samples_kept"] < subset["samples_total"]
    assert 0 < subset["patients_kept"] < subset["patients_total"]
    assert info.steps_per_epoch == math.ceil(math.ceil(subset["samples_kept"] / 2) / 4)
    val = build_loader(cfg, 0, 1, split="validate", batch_size=4, tokenizer=tokenizer, train=False)
    assert val.subset is None and val.num_samples == len(patient_of)  # only the train split is cut
    whole = build_loader(make_cfg("wds", folder), 0, 1, batch_size=4, tokenizer=tokenizer)
    assert whole.subset is None


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_the_rule_on_cached_features_gives_the_loaders_subset(corpus, tokenizer, backend):
    """The linear probe extracts the whole train split once and applies `patient_subset` to its features:
    that keeps the very samples a loader with the same label fraction reads."""
    folder, _ = corpus
    info = build_loader(
        make_cfg(backend, folder), 0, 1, split="train", batch_size=8, tokenizer=tokenizer, train=False
    )
    cached = [
        (k, meta_subject(m, k)) for b in info.loader for k, m, ok in zip(b["key"], b["meta"], b["valid"]) if ok
    ]
    info.close()
    keep = patient_subset([subject for _, subject in cached], 0.2, seed=7)
    subset = make_cfg(backend, folder, label_fraction=0.2, label_fraction_seed=7)
    assert {k for (k, _), ok in zip(cached, keep.tolist()) if ok} == set(epoch_keys(subset, tokenizer))


def test_empty_subset_is_a_clear_error(corpus, tokenizer):
    folder, _ = corpus
    for backend in ("wds", "synthetic"):
        cfg = make_cfg(backend, folder, label_fraction=1e-9, label_fraction_seed=4, synthetic_samples=40)
        with pytest.raises(ValueError, match=r"label_fraction=1e-09.*label_fraction_seed=4.*train split"):
            build_loader(cfg, 0, 1, batch_size=4, tokenizer=tokenizer)


@pytest.mark.parametrize("backend", ["wds", "dali", "synthetic"])
def test_resume_with_a_subset_is_exact(corpus, tokenizer, backend):
    folder, _ = corpus
    cfg = make_cfg(
        backend, folder, label_fraction=0.5, label_fraction_seed=7, rotation_degrees=5.0, num_workers=1,
        synthetic_samples=120,
    )  # fmt: skip

    def build():
        return build_loader(cfg, 1, 2, batch_size=4, tokenizer=tokenizer, seed=11)

    reference = build()
    k, more = reference.steps_per_epoch + 1, 3  # resume inside the second epoch
    it = iter(reference.loader)
    ref = [next(it) for _ in range(k + more)][k:]
    reference.close()
    first = build()
    it = iter(first.loader)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["subset"] == first.subset
    resumed = build()
    resumed.load_state_dict(state)
    it = iter(resumed.loader)
    got = [next(it) for _ in range(more)]
    resumed.close()
    for a, b in zip(ref, got):
        assert a["key"] == b["key"]
        for field in ("image", "input_ids", "mlm_labels", "valid"):
            assert torch.equal(a[field], b[field]), field
    other = build_loader(make_cfg(backend, folder, synthetic_samples=120), 1, 2, batch_size=4, tokenizer=tokenizer,
                         seed=11)  # fmt: skip
    with pytest.raises(ValueError, match="label_fraction"):
        other.load_state_dict(state)  # the whole split is another data order


def test_synthetic_subset_is_patient_level_and_nested(tokenizer):
    kept = {}
    for fraction in FRACTIONS:
        cfg = DataConfig(backend="synthetic", image_size=16, max_text_len=24, synthetic_samples=120,
                         label_fraction=fraction, label_fraction_seed=2)  # fmt: skip
        info = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, train=False)
        batches = list(info.loader)
        kept[fraction] = {
            k: m["subject_id"] for b in batches for k, m, ok in zip(b["key"], b["meta"], b["valid"].tolist()) if ok
        }
        assert info.num_samples == len(kept[fraction])
    assert len(kept[1.0]) == 120 and set(kept[0.2]) < set(kept[0.5]) < set(kept[1.0])
    for fraction in (0.2, 0.5):
        patients = set(kept[fraction].values())
        assert {k for k, p in kept[1.0].items() if p in patients} == set(kept[fraction])  # whole patients
        assert np.array_equal(  # the rule the linear probe applies to cached features
            patient_subset(list(kept[1.0].values()), fraction, 2),
            np.array([k in kept[fraction] for k in kept[1.0]]),
        )


@pytest.mark.parametrize("backend", ["wds", "dali", "synthetic"])
def test_mlm_probability_zero_masks_nothing(corpus, tokenizer, backend):
    folder, _ = corpus
    cfg = make_cfg(backend, folder, mlm_probability=0.0, synthetic_samples=24)
    info = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=1, train=True)
    it = iter(info.loader)
    batches = [next(it) for _ in range(3)]
    info.close()
    for batch in batches:
        plain = tokenizer(batch["text"], truncation=True, max_length=24, padding="max_length", return_tensors="pt")
        assert torch.equal(batch["input_ids"], plain["input_ids"])
        assert (batch["mlm_labels"] == IGNORE_INDEX).all()


@pytest.mark.parametrize("backend,world", [("wds", 1), ("wds", 2), ("dali", 1), ("dali", 3)])
def test_one_plain_pass_over_the_train_split(corpus, tokenizer, backend, world):
    """``split="train", train=False``: every training sample once, in shard order, unaugmented, repeatable."""
    folder, patient_of = corpus
    cfg = make_cfg(backend, folder, rotation_degrees=20.0, brightness=0.5, contrast=0.5, num_workers=1)
    plain = make_cfg(backend, folder, augment=False, num_workers=1)
    order: list[str] = []
    for rank in range(world):
        info = build_loader(
            cfg, rank, world, split="train", batch_size=4, tokenizer=tokenizer, seed=5, train=False
        )
        one, two = list(info.loader), list(info.loader)
        assert len(one) == len(two) == info.steps_per_epoch
        ref = build_loader(
            plain, rank, world, split="train", batch_size=4, tokenizer=tokenizer, seed=6, train=False
        )
        flat = list(ref.loader)
        for a, b, c in zip(one, two, flat):
            assert a["key"] == b["key"] == c["key"]
            assert torch.equal(a["valid"], b["valid"])
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])  # no augmentation
            assert torch.equal(a["input_ids"], b["input_ids"])
        lo, hi = rank_range(len(patient_of), rank, world)
        flags = torch.cat([b["valid"] for b in one]).tolist()
        assert flags == [True] * (hi - lo) + [False] * (len(flags) - (hi - lo))  # only the remainder is padding
        order += valid_keys(one)
        info.close()
        ref.close()
    index = load_shard_index(folder)
    assert order == list(index.keys) and len(order) == len(patient_of)  # every sample once, file order
