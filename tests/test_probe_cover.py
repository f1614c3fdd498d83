"""The benchmark's ``linear_probe`` label-covers its image-level fractions with the finetune protocol's rule
(`cover_labels`, the image as the unit, the order that drew the subset): a rare label a 1 % subset misses is back in
``auroc_mean@1%`` and recorded as ``cover`` beside the checksum of the final subset; a label with no positive in the
train split stays out with its note; a single-label set's missing classes are covered alike. Off (the suite entry's
``label_fraction_cover: false``): today's subset and checksum exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_tools.benchmarks.common import fraction_order, fraction_subset, subset_checksum
from mpma_ds.benchmark.protocols import linear_probe, probe_cover
from mpma_ds.benchmark.suite import SuiteError, load_suite
from mpma_ds.data.subsets import LabelCover

NAMES = ("Common", "Rare", "Absent")
N_TRAIN, N_TEST, DIM = 400, 120, 8


def embeddings(targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, DIM) L2-normalised embeddings where each label's positives lean along their own axis."""
    x = rng.normal(size=(len(targets), DIM)) * 0.5
    x[:, : targets.shape[1]] += 2.0 * (targets == 1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def multilabel_data() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train keys, targets (Common ~40 %, Rare on 3 images, Absent never, one uncertain -1) and embeddings; a test
    split holding positives and negatives of all three."""
    rng = np.random.default_rng(0)
    keys = [f"img{i:04d}" for i in range(N_TRAIN)]
    train = np.zeros((N_TRAIN, 3))
    train[:, 0] = rng.random(N_TRAIN) < 0.4
    train[[17, 203, 388], 1] = 1
    train[5, 1] = -1  # uncertain: not a positive, for coverage as for the fit
    test = np.zeros((N_TEST, 3))
    test[:, 0] = rng.random(N_TEST) < 0.4
    test[::6, 1] = 1
    test[::10, 2] = 1
    return keys, train, test, embeddings(train, rng), embeddings(test, rng)


def probe(keys, train, test, train_emb, test_emb, *, seed, cover, names=NAMES, multiclass=False):
    return linear_probe(train_emb, train, keys, test_emb, test, names, rows=[f"t{i}" for i in range(len(test))],
                        fractions=(0.01, 0.1, 1.0), seeds=(seed,), min_count=1, n_resamples=0,
                        multiclass=multiclass, cover=cover)  # fmt: skip


def seed_missing(keys: list[str], train: np.ndarray, fraction: float) -> int:
    """A seed whose plain ``fraction`` subset holds no Rare positive, and Common positives and negatives."""
    for seed in range(200):
        take, _ = fraction_subset(keys, fraction, seed)
        if not (train[take, 1] == 1).any() and len(set(train[take, 0])) == 2:
            return seed
    raise AssertionError("no such seed")


def test_a_rare_label_the_1pct_subset_misses_is_covered_and_recorded():
    keys, train, test, train_emb, test_emb = multilabel_data()
    seed = seed_missing(keys, train, 0.01)
    plain_take, plain_digest = fraction_subset(keys, 0.01, seed)

    off = probe(keys, train, test, train_emb, test_emb, seed=seed, cover=False)
    block = off.info["split_checksums"]["@1%"]
    assert len(plain_take) == 4  # ceil(1 % of 400)
    assert block == {"checksum": plain_digest, "images": 4, "fraction": 0.01, "seed": seed}
    assert "auroc@1%/Rare" not in off.metrics and "auroc@1%/Common" in off.metrics
    assert any(n.startswith("@1%: column 1: the training subset has 0 positives") for n in off.info["notes"])
    assert off.metrics["auroc_mean@1%"] == off.metrics["auroc@1%/Common"]  # the mean is over one label

    on = probe(keys, train, test, train_emb, test_emb, seed=seed, cover=True)
    block = on.info["split_checksums"]["@1%"]
    first = min((i for i in range(N_TRAIN) if train[i, 1] == 1), key=lambda i: fraction_order(keys, seed)[i])
    take = sorted([*plain_take, first])
    assert block["cover"] == {"labels": ["Rare"], "patients_added": 1, "samples_added": 1, "uncovered": ["Absent"]}
    assert block["images"] == 5 and block["checksum"] == subset_checksum(keys, take) != plain_digest
    assert "@1%: label coverage added 1 image(s) so that Rare have a positive" in on.info["notes"]
    assert math.isfinite(on.metrics["auroc@1%/Rare"])
    assert on.metrics["auroc_mean@1%"] == pytest.approx(
        (on.metrics["auroc@1%/Common"] + on.metrics["auroc@1%/Rare"]) / 2
    )
    # a label without any positive in the train split stays out, with its note, covered or not
    assert "auroc@1%/Absent" not in on.metrics
    assert any(n.startswith("@1%: column 2: the training subset has 0 positives") for n in on.info["notes"])
    # 100 %: nothing to cover, the plain checksum, no cover record; the same metrics either way
    assert on.info["split_checksums"]["@100%"] == off.info["split_checksums"]["@100%"]
    assert "cover" not in on.info["split_checksums"]["@100%"]
    assert on.metrics["auroc_mean@100%"] == off.metrics["auroc_mean@100%"]


def test_nothing_missing_keeps_the_plain_checksum_and_covered_subsets_stay_nested():
    keys, train, *_ = multilabel_data()
    cover = LabelCover(NAMES, train == 1)
    for seed in range(40):
        covered = []
        for frac in (0.01, 0.05, 0.2, 0.6):
            take, digest = fraction_subset(keys, frac, seed)
            final, added = probe_cover(keys, take, cover, seed)
            if not added["labels"]:
                assert final == take and subset_checksum(keys, final) == digest
            assert set(added["labels"]) == {n for c, n in enumerate(NAMES[:2]) if not (train[take, c] == 1).any()}
            assert (train[final, :2] == 1).any(axis=0).all()
            covered.append(set(final))
        assert all(a <= b for a, b in zip(covered, covered[1:])), seed


def test_single_label_classes_are_covered_too():
    rng = np.random.default_rng(1)
    names = ("normal", "pneumonia", "COVID-19")
    cls = np.zeros(300, dtype=np.int64)
    cls[rng.choice(300, 10, replace=False)] = 1
    cls[[41, 250]] = 2
    train = np.eye(3)[cls]
    test = np.eye(3)[np.arange(60) % 3]
    keys = [f"x{i:03d}" for i in range(300)]
    seed = next(s for s in range(200) if set(cls[fraction_subset(keys, 0.01, s)[0]]) == {0})
    args = (keys, train, test, embeddings(train, rng), embeddings(test, rng))
    off = probe(*args, seed=seed, cover=False, names=names, multiclass=True)
    assert (
        math.isnan(off.metrics["accuracy@1%"]) and "@1%: the training subset holds one class" in off.info["notes"]
    )
    on = probe(*args, seed=seed, cover=True, names=names, multiclass=True)
    block = on.info["split_checksums"]["@1%"]
    assert block["cover"]["labels"] == ["pneumonia", "COVID-19"] and block["cover"]["samples_added"] == 2
    assert block["images"] == 5 and 0 <= on.metrics["accuracy@1%"] <= 1


def test_a_suite_entry_turns_coverage_off_and_bad_values_are_refused(tmp_path):
    def suite(entry: str):
        path = tmp_path / "s.yaml"
        path.write_text(f"name: s\nentries:\n  - {entry}\n")
        return load_suite(path)

    assert suite("{dataset: rsna-pneumonia, protocol: linear_probe}").entries[0].label_fraction_cover is True
    off = suite("{dataset: rsna-pneumonia, protocol: linear_probe, label_fraction_cover: false}")
    assert off.entries[0].label_fraction_cover is False
    with pytest.raises(SuiteError, match=r"label_fraction_cover is true or false, got 'no'$"):
        suite("{dataset: rsna-pneumonia, protocol: linear_probe, label_fraction_cover: 'no'}")
    with pytest.raises(
        SuiteError, match=r"only to linear_probe \(a finetune entry: set: \[data.label_fraction_cover"
    ):
        suite("{dataset: rsna-pneumonia, protocol: finetune, label_fraction_cover: false}")
    with pytest.raises(SuiteError, match=r"label_fraction_cover applies only to linear_probe$"):
        suite("{dataset: rsna-pneumonia, protocol: zero_shot, label_fraction_cover: true}")
