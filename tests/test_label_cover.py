"""``data.label_fraction_cover``: the seeded patient-level subset first, unchanged; then, for each label with a
positive in the whole split but none in the subset, the seed's first patient holding one — whole. Deterministic,
independent of the labels' order, nested across fractions, the same from the loader, the ``cls`` label check and
the cached-feature rule; off, today's subset exactly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from loader_testdata import patient_shards, tokenizer_dir

from data_tools.benchmarks.common import BenchRecord, split_checksum
from data_tools.shard_format import DATASET_LABELS_FIELD
from mpma_ds import load_tokenizer
from mpma_ds.data import DataConfig, build_loader
from mpma_ds.data.shards import load_shard_index
from mpma_ds.data.subsets import (
    LabelCover,
    cover_labels,
    patient_score,
    patient_subset,
    shard_subject_ids,
    split_subset,
)
from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.classification import ClsOptions, Labels

NAMES = ("Common", "Rare", "Rarer", "Absent")


def corpus(n_patients: int = 400, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Subjects of 1-3 images each, and (N, 4) positives: a common label, a rare one (4 patients), a rarer one (one
    image of one patient) and one without any positive."""
    rng = np.random.default_rng(seed)
    subjects = [f"p{p}" for p in range(n_patients) for _ in range(int(rng.integers(1, 4)))]
    positives = np.zeros((len(subjects), len(NAMES)), dtype=bool)
    positives[:, 0] = rng.random(len(subjects)) < 0.3
    for p in ("p7", "p77", "p170", "p321"):
        positives[subjects.index(p), 1] = True
    positives[subjects.index("p250") + 0, 2] = True
    return subjects, positives


def first_holder(subjects: list[str], column: np.ndarray, seed: int) -> str:
    """The rule spelled out: the holder of a positive with the lowest score."""
    return min({s for s, pos in zip(subjects, column.tolist()) if pos}, key=lambda s: (patient_score(s, seed), s))


def test_adds_the_seeds_first_holder_of_each_missing_label_whole_patients_only():
    subjects, positives = corpus()
    cover = LabelCover(NAMES, positives)
    for seed in range(20):
        plain = patient_subset(subjects, 0.01, seed)
        keep, added = cover_labels(subjects, plain, cover, seed)
        assert (keep | ~plain).all()  # the plain subset is kept as it is
        missing = [c for c in range(3) if not positives[plain, c].any()]
        assert added["labels"] == [NAMES[c] for c in missing] and added["uncovered"] == ["Absent"]
        expected = {first_holder(subjects, positives[:, c], seed) for c in missing}
        new = {s for s, k, p in zip(subjects, keep.tolist(), plain.tolist()) if k and not p}
        assert new == expected and added["patients_added"] == len(expected)
        assert added["samples_added"] == int(keep.sum() - plain.sum())
        assert positives[keep, :3].any(axis=0).all()  # every label with a positive somewhere is covered
        by_patient: dict[str, set[bool]] = {}
        for s, k in zip(subjects, keep.tolist()):
            by_patient.setdefault(s, set()).add(k)
        assert all(len(v) == 1 for v in by_patient.values())  # no patient split
        again, _ = cover_labels(subjects, plain, cover, seed)
        assert np.array_equal(again, keep)  # deterministic
        order = [2, 0, 3, 1]  # the labels' order does not matter
        shuffled, _ = cover_labels(
            subjects, plain, LabelCover(tuple(NAMES[c] for c in order), positives[:, order]), seed
        )
        assert np.array_equal(shuffled, keep)


def test_nothing_missing_adds_nothing_and_keeps_the_checksum():
    subjects, positives = corpus()
    records = [BenchRecord(f"k{i}", f"/x/{i}.png", s, "train") for i, s in enumerate(subjects)]
    common = LabelCover(NAMES[:1], positives[:, :1])  # the common label is in every 10 % subset
    for seed in range(5):
        plain = patient_subset(subjects, 0.1, seed)
        keep, added = cover_labels(subjects, plain, common, seed)
        assert np.array_equal(keep, plain) and added == {"labels": [], "patients_added": 0, "samples_added": 0,
                                                         "uncovered": []}  # fmt: skip
        assert split_checksum([r for r, k in zip(records, keep) if k]) == split_checksum(
            [r for r, k in zip(records, plain) if k]
        )
        covered, added = cover_labels(subjects, plain, LabelCover(NAMES, positives), seed)
        if added["patients_added"]:  # something added: the checksum of the final subset differs
            assert split_checksum([r for r, k in zip(records, covered) if k]) != split_checksum(
                [r for r, k in zip(records, plain) if k]
            )


def test_covered_subsets_stay_nested_across_fractions():
    subjects, positives = corpus()
    cover = LabelCover(NAMES, positives)
    for seed in range(30):
        kept = [split_subset(subjects, f, seed, split="train", cover=cover)[0] for f in (0.01, 0.1, 0.5)]
        assert (kept[0] <= kept[1]).all() and (kept[1] <= kept[2]).all(), seed


def test_off_is_todays_subset_and_the_summary_records_the_cover():
    subjects, positives = corpus()
    keep, summary = split_subset(subjects, 0.01, 3, split="train")
    assert np.array_equal(keep, patient_subset(subjects, 0.01, 3)) and "cover" not in summary
    covered, with_cover = split_subset(subjects, 0.01, 3, split="train", cover=LabelCover(NAMES, positives))
    assert with_cover["cover"]["patients_added"] >= 1 and with_cover["samples_kept"] == int(covered.sum())
    assert with_cover["patients_kept"] == summary["patients_kept"] + with_cover["cover"]["patients_added"]
    assert split_subset(subjects, 1.0, 3, split="train", cover=LabelCover(NAMES, positives))[1] is None
    with pytest.raises(ValueError, match="positives of shape"):
        split_subset(subjects, 0.5, 3, split="train", cover=LabelCover(NAMES, positives[1:]))


def test_single_label_classes_are_covered_too():
    metas = [{"subject_id": f"p{i}", "class": "COVID-19" if i == 33 else ("normal", "pneumonia")[i % 2]}
             for i in range(60)]  # fmt: skip
    labels = Labels(ClsOptions(labels="column", label_column="class"), ["normal", "pneumonia", "COVID-19"])
    cover = labels.cover(labels.targets_from_metas(metas))
    assert cover.positives.sum(axis=0).tolist() == [30, 29, 1]
    seed = next(s for s in range(100) if not patient_subset([m["subject_id"] for m in metas], 0.2, s)[33])
    keep, summary = split_subset([m["subject_id"] for m in metas], 0.2, seed, split="train", cover=cover)
    assert keep[33] and "COVID-19" in summary["cover"]["labels"]


def test_the_cls_check_covers_and_refuses_only_a_label_absent_from_the_split(capsys):
    """Hernia on one patient of eight, a seed whose half leaves it out: covered, said in one line; a split without
    any Hernia is refused even with coverage (``require_positives``)."""
    seed = next(s for s in range(50) if not patient_subset([str(i) for i in range(8)], 0.5, s)[0])
    data = SimpleNamespace(
        label_fraction=0.5, label_fraction_seed=seed, train_shards="TRAIN", label_fraction_cover=True
    )
    ctx, recipe = RunContext(None, 0, 1, 1, {}, torch.device("cpu")), SimpleNamespace(data=data)
    labels = Labels(ClsOptions(labels="dataset", require_positives=True), ["Hernia", "Mass"])
    hernia = [{"subject_id": str(i), DATASET_LABELS_FIELD: {"Hernia": int(i == 0), "Mass": 1}} for i in range(8)]
    assert labels.check_subset(ctx, hernia, recipe)["Hernia"] == 1 and labels.train_cover is not None
    out = capsys.readouterr().out
    assert "data.label_fraction_cover added 1 patient(s), 1 sample(s) so that Hernia have a positive" in out
    never = [dict(m, **{DATASET_LABELS_FIELD: {"Hernia": 0, "Mass": 1}}) for m in hernia]
    with pytest.raises(
        ValueError, match=r"^the train split TRAIN holds no positive training sample for label\(s\) He"
    ):
        labels.check_subset(ctx, never, recipe)


def test_the_loader_keeps_the_covered_subset(tmp_path):
    folder = str(tmp_path / "shards")
    patient_shards(tmp_path / "shards")
    tokenizer = load_tokenizer(tokenizer_dir(str(tmp_path)))
    subjects = shard_subject_ids(load_shard_index(folder))
    cfg = DataConfig(backend="wds", train_shards=folder, val_shards=folder, image_size=16, max_text_len=24,
                     num_workers=0, label_fraction=0.2, label_fraction_seed=7, label_fraction_cover=True)  # fmt: skip
    with pytest.raises(ValueError, match="data.label_fraction_cover needs the labels of the train split"):
        build_loader(cfg, 0, 1, batch_size=4, tokenizer=tokenizer)
    plain = patient_subset(subjects, 0.2, 7)
    rare = np.zeros((len(subjects), 1), dtype=bool)
    rare[int(np.flatnonzero(~plain)[-1]), 0] = True  # the one positive sits outside the plain subset
    info = build_loader(
        cfg, 0, 1, batch_size=4, tokenizer=tokenizer, cover=LabelCover(("Rare",), rare), train=True
    )
    try:
        expected, _ = cover_labels(subjects, plain, LabelCover(("Rare",), rare), 7)
        assert info.num_samples == int(expected.sum()) == info.subset["samples_kept"]
        assert info.subset["cover"]["labels"] == ["Rare"] and info.subset["cover"]["patients_added"] == 1
    finally:
        info.close()
    val = build_loader(cfg, 0, 1, split="validate", batch_size=4, tokenizer=tokenizer, train=False)
    assert val.subset is None  # only the train split is cut (and needs labels)
    val.close()


def test_another_ordering_picks_its_own_first_holder():
    """``scores``: a subset drawn by another rule (the linear probe's image permutation) is covered in its order."""
    subjects, positives = corpus()
    patients = list(dict.fromkeys(subjects))
    reverse = np.arange(len(patients))[::-1].astype(float)  # the last patient first
    rare = LabelCover(NAMES[1:2], positives[:, 1:2])  # on p7, p77, p170, p321
    keep, added = cover_labels(subjects, np.zeros(len(subjects), bool), rare, 0, scores=reverse)
    assert {s for s, k in zip(subjects, keep.tolist()) if k} == {"p321"} and added["patients_added"] == 1
    with pytest.raises(ValueError, match="scores of shape"):
        cover_labels(subjects, np.zeros(len(subjects), bool), rare, 0, scores=reverse[1:])
