"""The ``cls`` task on a dataset's own label set: a manifest's ``dataset_labels`` / ``class`` columns carried into
the shard JSON (an unknown label stopped with one line naming the file and row), multi-label BCE + AUROC over
names that are not CheXpert findings (NIH's Hernia), multi-class softmax cross-entropy + accuracy (COVIDx's three
classes), a label fraction leaving a label without positives refused when asked — and the CheXpert default as it
was."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from shards_testdata import read_shards

from data_tools.build_shards import BuildError, build_shards
from data_tools.shard_format import CHEXPERT_LABELS, CLASS_FIELD, DATASET_LABELS_FIELD
from data_tools.verify_shards import verify_shards
from mpma_ds.tasks.base import RunContext
from mpma_ds.tasks.classification import ClsOptions, Labels, dataset_targets

COVIDX = ["normal", "pneumonia", "COVID-19"]


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((80, 80), 40 + 20 * i, np.uint8), "L").save(folder / f"im{i}.png")


def test_manifest_dataset_labels_and_class_reach_the_shard_json(tmp_path):
    _images(tmp_path / "img", 4)
    own = [{"Hernia": 1, "Mass": 0}, {"Hernia": 0, "Mass": -1}, {"Mass": 1}, None]
    rows = [{"image": f"img/im{i}.png", "text": "chest film", "split": "train",
             **({"dataset_labels": own[i]} if own[i] else {}), "class": COVIDX[i % 3]} for i in range(4)]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_shards("manifest", manifest, tmp_path / "out", image_size=32, min_size=16, min_words=0, views=None,
                 progress=False)  # fmt: skip
    metas = {
        json.loads(s["json"])["image_id"]: json.loads(s["json"]) for s in read_shards(tmp_path / "out").values()
    }
    assert metas["im0"][DATASET_LABELS_FIELD] == {"Hernia": 1, "Mass": 0}
    assert metas["im1"][DATASET_LABELS_FIELD] == {"Hernia": 0, "Mass": -1}
    assert metas["im2"][DATASET_LABELS_FIELD] == {"Hernia": None, "Mass": 1}  # a left-out label is blank
    assert DATASET_LABELS_FIELD not in metas["im3"]
    assert [metas[f"im{i}"][CLASS_FIELD] for i in range(4)] == [*COVIDX, "normal"]
    assert all(set(m["labels"]) == set(CHEXPERT_LABELS) for m in metas.values())  # the CheXpert field stays
    assert list(metas["im0"])[-2:] == ["width", "height"]
    assert verify_shards(tmp_path / "out", progress=False).problems == []


def test_manifest_unknown_label_is_one_line_naming_file_and_row(tmp_path):
    _images(tmp_path / "img", 3)
    csv = tmp_path / "m.csv"
    cells = ['"{""Hernia"": 1, ""Mass"": 0}"', '"{""Hernia"": 0}"', '"{""Hernai"": 1}"']
    csv.write_text("image,text,dataset_labels\n" + "".join(f"img/im{i}.png,chest film,{c}\n" for i, c in
                                                             enumerate(cells)))  # fmt: skip
    with pytest.raises(BuildError) as err:
        build_shards("manifest", csv, tmp_path / "out", image_size=32, min_size=16, views=None, progress=False)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{csv}: row 3: dataset_labels: unknown label(s) 'Hernai'"), line
    assert "the label set (row 1) is Hernia, Mass" in line and not (tmp_path / "out" / "train").exists()
    csv.write_text('image,text,dataset_labels\nimg/im0.png,chest film,"{""Mass"": 2}"\n')
    with pytest.raises(BuildError, match=r"row 1: dataset_labels: label value 2 is not one of 1, 0, -1"):
        build_shards("manifest", csv, tmp_path / "o2", image_size=32, min_size=16, views=None, progress=False)


def _ctx():
    return RunContext(None, 0, 1, 1, {}, torch.device("cpu"))


def test_multiclass_softmax_loss_and_accuracy():
    labels = Labels(ClsOptions(labels="column", label_column="class"), COVIDX)
    assert not labels.multilabel and labels.num_outputs == 3
    metas = [
        {"class": "COVID-19"},
        {"class": "normal"},
        {"class": "pneumonia"},
        {"class": "odd"},
        {"class": "normal"},
    ]
    targets = labels.targets({"meta": metas})
    assert targets.tolist() == [2, 0, 1, -1, 0]  # a class outside the set: -1, out of loss and metrics
    logits = torch.tensor([[0.0, 0.0, 3.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [9.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    valid = torch.tensor([True, True, True, True, False])  # the last row is padding
    loss = labels.loss(logits, targets, valid)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[:3], targets[:3]).item())  # softmax CE, 3 rows
    m = labels.metrics(logits[:4].numpy(), targets[:4].numpy())
    assert m["accuracy"] == pytest.approx(2 / 3)  # COVID-19 and normal right, pneumonia called COVID-19
    assert set(m) >= {"f1/normal", "f1/COVID-19", "auroc/normal", "auroc_macro", "f1_macro"}
    boot = labels.metrics(logits[:4].numpy(), targets[:4].numpy(), n_resamples=50)
    lo, hi = boot["accuracy_ci95"]
    assert lo <= boot["accuracy"] <= hi


def test_dataset_label_set_bce_and_auroc_over_names_that_are_not_chexpert():
    names = ["Hernia", "Mass", "Emphysema"]
    opts = ClsOptions(labels="dataset", label_names=names[:2])
    opts.validate()  # Hernia is no CheXpert finding: fine for labels=dataset
    labels = Labels(opts, names)
    assert labels.multilabel and labels.names == ["Hernia", "Mass"]
    metas = [{DATASET_LABELS_FIELD: {"Hernia": 1, "Mass": 0, "Emphysema": 1}},
             {DATASET_LABELS_FIELD: {"Hernia": 0, "Mass": -1, "Emphysema": 0}},
             {DATASET_LABELS_FIELD: {"Hernia": 0, "Mass": 1, "Emphysema": None}}, {}]  # fmt: skip
    t = labels.targets({"meta": metas, "labels": torch.zeros(4, 14)})
    assert t[0].tolist() == [1, 0] and t[2].tolist() == [0, 1] and t[1, 0] == 0
    assert torch.isnan(t[1, 1]) and torch.isnan(t[3]).all()  # uncertain ignored by default, no labels: NaN
    logits = torch.tensor([[2.0, -1.0], [-1.0, 5.0], [0.5, 1.0], [0.0, 0.0]])
    known = ~torch.isnan(t)
    ref = F.binary_cross_entropy_with_logits(logits[known], t[known])
    assert labels.loss(logits, t, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(ref.item())
    m = labels.metrics(logits[:3].numpy(), t[:3].numpy())
    assert m["auroc/Hernia"] == 1.0 and m["auroc_macro"] == pytest.approx(
        np.mean([m["auroc/Hernia"], m["auroc/Mass"]])
    )
    ones = Labels(ClsOptions(labels="dataset", uncertain="ones"), names)
    assert ones.names == names and ones.targets({"meta": metas[1:2]})[0, 1] == 1
    assert math.isnan(dataset_targets(metas, names)[2, 2])


def test_the_chexpert_default_is_unchanged():
    opts = ClsOptions()
    assert (opts.labels, opts.label_names, opts.uncertain, opts.require_positives) == (
        "chexpert",
        [],
        "ignore",
        False,
    )
    labels = Labels(opts)
    assert labels.multilabel and labels.names == list(CHEXPERT_LABELS) and labels.columns == list(range(14))
    rows = torch.tensor([[1.0, 0.0, -1.0] + [math.nan] * 11])
    t = labels.targets({"labels": rows, "meta": [{DATASET_LABELS_FIELD: {"Atelectasis": 0}}]})  # labels read
    assert t[0, 0] == 1 and t[0, 1] == 0 and torch.isnan(t[0, 2]) and torch.isnan(t[0, 3:]).all()
    with pytest.raises(ValueError, match=r"task.cls.label_names: unknown \['Hernia'\]"):
        ClsOptions(label_names=["Hernia"]).validate()


class _Data:
    label_fraction, label_fraction_seed, train_shards, label_fraction_cover = 0.5, 0, "TRAIN", False


class _Recipe:
    data = _Data()


def test_a_fraction_leaving_a_label_without_positives(capsys):
    metas = [
        {"subject_id": str(i), DATASET_LABELS_FIELD: {"Hernia": int(i == 0), "Mass": i % 2}} for i in range(8)
    ]
    warn = Labels(ClsOptions(labels="dataset"), ["Hernia", "Mass"])
    refuse = Labels(ClsOptions(labels="dataset", require_positives=True), ["Hernia", "Mass"])
    from mpma_ds.data.subsets import patient_subset

    seed = next(s for s in range(50) if not patient_subset([str(i) for i in range(8)], 0.5, s)[0])  # drops Hernia
    _Data.label_fraction_seed = seed
    counts = warn.check_subset(_ctx(), metas, _Recipe)
    assert counts["Hernia"] == 0 and "leaves no positive training sample for Hernia" in capsys.readouterr().out
    with pytest.raises(ValueError) as err:
        refuse.check_subset(_ctx(), metas, _Recipe)
    assert str(err.value) == (
        f"data.label_fraction=0.5 (seed {seed}) leaves no positive training sample for label(s) Hernia in TRAIN: "
        "set data.label_fraction_cover=true, raise the fraction, pick another data.label_fraction_seed, or leave "
        "them out of task.cls.label_names"
    )


def _bench(dataset: str, names, rows, task="multilabel"):
    from data_tools.benchmarks import BenchmarkData, BenchRecord

    records = [BenchRecord(k, f"/x/{k}.png", p, s, tuple(float(v) for v in y)) for k, p, s, y in rows]
    return BenchmarkData(dataset, tuple(names), records, task=task)


def test_the_finetune_protocol_picks_each_sets_label_mode():
    from data_tools.benchmarks.covidx import THREE_CLASS
    from data_tools.benchmarks.nih import NIH_LABELS
    from data_tools.benchmarks.padchest import DEFAULT_LABELS
    from data_tools.benchmarks.vindr import VINDR_LABELS
    from mpma_ds.benchmark.finetune import label_mode

    assert label_mode(_bench("rsna-pneumonia", ["Pneumonia"], [])) == ("chexpert", ("Pneumonia",))
    assert label_mode(_bench("siim", ["Pneumothorax"], [])) == ("chexpert", ("Pneumothorax",))
    assert label_mode(_bench("nih-cxr14", NIH_LABELS, [])) == ("dataset", NIH_LABELS)
    assert label_mode(_bench("vindr-cxr", VINDR_LABELS, []))[0] == "dataset"
    assert label_mode(_bench("padchest", DEFAULT_LABELS, []))[0] == "dataset"
    assert label_mode(_bench("covidx", THREE_CLASS, [], task="multiclass")) == ("column", THREE_CLASS)


def test_a_set_without_a_train_split_gets_a_seeded_patient_level_split():
    from mpma_ds.benchmark.finetune import split_records

    rows = [(f"im{i}", f"p{i // 2}", "all", (i % 3 == 0,)) for i in range(60)]  # two images per patient
    data = _bench("padchest", ["nodule"], rows)
    records, info = split_records(data, "test")
    again, info2 = split_records(data, "test")
    assert [r.split for r in records] == [r.split for r in again] and info == info2  # seeded: the same each time
    by_patient: dict[str, set] = {}
    for r in records:
        by_patient.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two parts
    assert info["images"] == {"train": 42, "validate": 6, "test": 12} and info["patients"] == 30
    assert len(set(info["checksums"].values())) == 3 and "seeded 0.7/0.1/0.2 split (seed 0)" in info["note"]
    own = _bench("nih-cxr14", ["Mass"], [("a", "p", "train", (1,)), ("b", "q", "test", (0,))])
    assert split_records(own, "test") == (list(own.records), {})  # a set's own split is kept


def test_the_protocol_refuses_a_fraction_without_positives_before_any_build():
    from mpma_ds.benchmark.finetune import fraction_subsets
    from mpma_ds.benchmark.suite import SuiteEntry
    from mpma_ds.data.subsets import patient_subset

    rows = [(f"im{i}", f"p{i}", "train", (i == 0, i % 2)) for i in range(40)]
    data = _bench("nih-cxr14", ["Hernia", "Mass"], rows)
    train = data.split("train")
    plain = {"cover": False, "uncertain": "ignore"}
    fraction_subsets(
        data, train, SuiteEntry("nih-cxr14", "finetune", fractions=(1.0,)), "dataset", **plain
    )  # fine
    with pytest.raises(ValueError) as err:
        fraction_subsets(
            data, train, SuiteEntry("nih-cxr14", "finetune", fractions=(0.1, 1.0)), "dataset", **plain
        )
    assert str(err.value).startswith(
        "nih-cxr14: label fraction 0.1 (seed 0) keeps "
    ) and "label(s) Hernia; leave label coverage on (data.label_fraction_cover)" in str(err.value)
    # covered (the benchmark's default): the one Hernia patient joins the subset, and the account says so
    entry = SuiteEntry("nih-cxr14", "finetune", fractions=(0.1, 1.0))
    covered = fraction_subsets(data, train, entry, "dataset", cover=True, uncertain="ignore")
    keep, added = covered[0, 0.1]
    assert keep[0] and added == {"labels": ["Hernia"], "patients_added": 1, "samples_added": 1, "uncovered": []}
    plain_keep = patient_subset([r.patient for r in train], 0.1, 0)
    assert not plain_keep[0] and (keep[1:] == plain_keep[1:]).all()  # the plain subset, plus the Hernia patient
    assert covered[0, 1.0][1] is None  # nothing to cover at 100 %
    none = _bench("covidx", COVIDX, [(f"im{i}", f"p{i}", "train", (1, 0, 0)) for i in range(5)], task="multiclass")
    for cover in (False, True):  # no image of a class in the whole split: coverage cannot help
        with pytest.raises(
            ValueError, match=r"covidx: its train split \(5 images\) holds no positive of class\(es\) "
        ):
            fraction_subsets(none, none.split("train"), SuiteEntry("covidx", "finetune", fractions=(0.5, 1.0)),
                             "column", cover=cover, uncertain="ignore")  # fmt: skip
