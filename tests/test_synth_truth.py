"""The synthetic corpus's ground truth: every finding visible at the demo's 128 px where its `truth` box says,
the `truth` key in shard samples (stored-image pixels, the schema of `shard_format.TRUTH_FIELD`), and the
normal / negation rate options."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from shards_testdata import read_shards

from data_tools.build_shards import build_shards
from data_tools.shard_format import CHEXPERT_LABELS, TRUTH_FIELD, check_truth, scale_truth
from data_tools.sources.common import SourceError
from data_tools.sources.images import target_size
from data_tools.sources.mimic import read_truth
from data_tools.synth.corpus import film_truth, generate_corpus, plan_corpus
from data_tools.synth.images import DRAWN_IN_VIEW, render_with_regions
from data_tools.synth.reports import DEFAULT_NEGATION_RATES, PATHOLOGIES
from data_tools.synth_corpus import parse_negation_rates

DEMO_SIZE = 128  # launch/demo.py --image-size: the stored and trained image size
# One finding at a time, with the attributes that make it smallest or faintest in the generator's range.
FINDINGS = {
    "Atelectasis": {"side": "left"},
    "Cardiomegaly": {"severity": "mild"},
    "Consolidation": {"side": "right", "zone": "upper"},
    "Edema": {"severity": "mild"},
    "Enlarged Cardiomediastinum": {},
    "Fracture": {"side": "right", "rib": 6},
    "Lung Lesion": {"side": "right", "zone": "mid", "size_cm": 0.9},
    "Lung Opacity": {"side": "left", "zone": "mid"},
    "Pleural Effusion": {"side": "right", "size": "small"},
    "Pleural Other": {"side": "left", "rib": 5},
    "Pneumonia": {"side": "right", "zone": "lower"},
    "Pneumothorax": {"side": "left", "size": "small"},
    "Support Devices": {"devices": ["ett"], "ett_cm": 4.0},
}


def _stored(jpeg: bytes, width: int, height: int) -> np.ndarray:
    """The film as build_shards stores it at the demo's size (shorter side 128, bicubic), as float gray levels."""
    img = Image.open(io.BytesIO(jpeg))
    return np.asarray(img.resize(target_size(width, height, DEMO_SIZE), Image.Resampling.BICUBIC), np.float64)


@pytest.mark.parametrize("view", ["PA", "LATERAL"])
@pytest.mark.parametrize("state", [1, -1])
def test_every_finding_is_visible_at_128px_inside_its_truth_box(view, state):
    """Same seed with and without the finding: the stored 128 px film changes inside the truth box, by several
    gray levels on average, and (nearly) nowhere else."""
    width, height = 270, 310
    for number, (name, attrs) in enumerate(FINDINGS.items()):
        if name not in DRAWN_IN_VIEW[view] or (state == -1 and name in ("Fracture", "Support Devices")):
            continue  # not drawn in a lateral; never uncertain
        entry = {"state": state, **attrs}
        seed = 7000 + number
        with_it, regions = render_with_regions({name: entry}, view, height, width, seed)
        without, none = render_with_regions({}, view, height, width, seed)
        assert none == {} and set(regions) == {name}
        truth = film_truth({name: entry}, regions)
        assert check_truth(truth, (width, height)) == []
        stored = target_size(width, height, DEMO_SIZE)
        box = scale_truth(truth, (width, height), stored)[name]["box"]
        diff = np.abs(_stored(with_it, width, height) - _stored(without, width, height))  # (h, w)
        inside = np.zeros_like(diff, dtype=bool)
        inside[box[1] : box[3], box[0] : box[2]] = True
        mean_in, mean_out = diff[inside].mean(), diff[~inside].mean()
        peak = np.percentile(diff[inside], 95)
        where = f"{name} ({view}, state {state}): inside {mean_in:.1f}, outside {mean_out:.2f}, p95 {peak:.0f}"
        assert peak >= (12 if state == 1 else 8), where  # the finding's pixels stand out by >= 8-12 gray levels
        assert mean_in >= 10 * mean_out + 1, where  # and they are inside the box
        assert inside.mean() < 0.45, where  # a box, not the whole film


def test_truth_follows_what_is_drawn_and_no_finding_excludes_devices():
    drawn = {"Support Devices": {"state": 1, "devices": ["ett"]}, "Pneumothorax": {"state": -1, "side": "left"}}
    boxes = {"Support Devices": [[50, 0, 60, 40], [10, 30, 20, 90]], "Pneumothorax": [[100, 10, 130, 60]]}
    truth = film_truth(drawn, boxes)
    assert list(truth) == list(CHEXPERT_LABELS) and check_truth(truth) == []
    assert truth["Support Devices"] == {"present": True, "side": None, "box": [10, 0, 60, 90]}  # the union
    assert truth["Pneumothorax"] == {"present": True, "side": "left", "box": [100, 10, 130, 60]}
    assert truth["No Finding"] == {"present": False, "side": None, "box": None}
    assert truth["Edema"] == {"present": False, "side": None, "box": None}
    only_devices = film_truth({"Support Devices": drawn["Support Devices"]}, boxes)
    assert only_devices["No Finding"]["present"] is True  # devices are not a pathology (CheXpert)


def test_scale_truth_keeps_every_covered_pixel():
    truth = film_truth({"Lung Lesion": {"state": 1, "side": "right"}}, {"Lung Lesion": [[101, 33, 150, 61]]})
    scaled = scale_truth(truth, (300, 400), (96, 128))  # 0.32 x in both directions
    assert scaled["Lung Lesion"]["box"] == [32, 10, 48, 20]  # floor(32.32), floor(10.56), ceil(48.0), ceil(19.52)
    edge = scale_truth(
        film_truth({"Fracture": {"state": 1}}, {"Fracture": [[299, 399, 300, 400]]}), (300, 400), (3, 4)
    )
    assert edge["Fracture"]["box"] == [2, 3, 3, 4]  # at least one pixel, inside the image
    assert truth["Lung Lesion"]["box"] == [101, 33, 150, 61]  # the input is not changed


def test_check_truth_names_each_problem():
    good = film_truth({"Edema": {"state": 1}}, {"Edema": [[1, 2, 30, 40]]})
    assert check_truth(good, (64, 64)) == []
    bad = json.loads(json.dumps(good))
    bad["Edema"]["box"] = [30, 2, 1, 40]
    bad["Fracture"]["present"] = "yes"
    bad["Atelectasis"]["side"] = "up"
    problems = check_truth(bad)
    assert [p.split("]")[0] for p in problems] == ["truth['Atelectasis'", "truth['Edema'", "truth['Fracture'"]
    assert check_truth(good, (20, 64)) == ["truth['Edema'].box [1, 2, 30, 40] reaches outside the 20x64 image"]
    wrong_normal = json.loads(json.dumps(good))
    wrong_normal["No Finding"]["present"] = True
    assert "No Finding" in check_truth(wrong_normal)[0]
    assert check_truth({"Edema": good["Edema"]})[0].startswith("truth must list the 14 CheXpert labels")


@pytest.fixture(scope="module")
def truth_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("truth")
    corpus, shards = root / "corpus", root / "shards"
    generate_corpus(corpus, 24, 3, min_size=200, max_size=260)
    build_shards("mimic-cxr", corpus, shards, image_size=96, progress=False, workers=1)
    return corpus, shards


def test_shard_samples_carry_the_truth_in_stored_pixels(truth_build):
    corpus, shards = truth_build
    rows = {}
    for line in (corpus / "synth_truth.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["dicom_id"]] = row
    samples = read_shards(shards)
    assert len(samples) >= 20
    present_seen = set()
    for key, members in samples.items():
        meta = json.loads(members["json"])
        assert list(meta)[-3:] == [TRUTH_FIELD, "width", "height"]  # the size fields stay last
        size = Image.open(io.BytesIO(members["jpg"])).size
        assert check_truth(meta[TRUTH_FIELD], size) == [], key
        row = rows[meta["image_id"]]
        assert meta[TRUTH_FIELD] == scale_truth(row["truth"], (row["width"], row["height"]), size)
        for name, entry in meta[TRUTH_FIELD].items():
            # a frontal film draws every finding its report states (1) or hedges (-1), and nothing else
            label = meta["labels"][name]
            if name != "No Finding":
                assert entry["present"] == (label in (1, -1)), (key, name, label)
            if entry["present"]:
                present_seen.add(name)
                assert (entry["box"] is None) == (name == "No Finding")
    assert len(present_seen) >= 6


def test_a_corpus_without_truth_builds_samples_without_it(truth_build, tmp_path):
    corpus, _ = truth_build
    real = tmp_path / "real"
    shutil.copytree(corpus, real)
    (real / "synth_truth.jsonl").unlink()
    build_shards("mimic-cxr", real, tmp_path / "shards", image_size=64, progress=False, workers=1)
    metas = [json.loads(m["json"]) for m in read_shards(tmp_path / "shards").values()]
    assert metas and not any(TRUTH_FIELD in m for m in metas)


def test_a_broken_truth_file_is_one_clear_error(tmp_path):
    path = tmp_path / "synth_truth.jsonl"
    path.write_text('{"dicom_id": "a", "truth": {}}\n')
    with pytest.raises(SourceError, match=r"synth_truth.jsonl:1: truth must list the 14 CheXpert labels"):
        read_truth(path)
    path.write_text("not json\n")
    with pytest.raises(SourceError, match=r"synth_truth.jsonl:1: not a ground-truth line"):
        read_truth(path)


def _plan(**kwargs):
    return plan_corpus(300, 5, min_size=64, max_size=64, lateral_fraction=0.5, with_faults=False, **kwargs)


def test_normal_rate_and_negation_rates_are_options():
    def share_normal(plans):
        return np.mean(
            [all(p.findings.get(n, {}).get("state") not in (1, -1) for n in PATHOLOGIES) for p in plans]
        )

    all_normal = _plan(normal_rate=1.0)
    assert share_normal(all_normal) == 1.0
    assert all(p.findings["No Finding"] == {"state": 1} for p in all_normal)
    # default 0.3, plus the ~16 % of the other studies that draw no pathology by chance
    assert 0.3 < share_normal(_plan()) < 0.5
    assert share_normal(_plan(normal_rate=0.0)) < 0.25

    never = _plan(negation_rates={n: 0.0 for n in DEFAULT_NEGATION_RATES})
    assert not any(e["state"] == 0 for p in never for e in p.findings.values())
    always = _plan(normal_rate=1.0, negation_rates={"Pneumothorax": 1.0})
    assert all(p.findings["Pneumothorax"] == {"state": 0} for p in always)
    with pytest.raises(ValueError, match="negation rate for 'Pneumothorax' must be in"):
        _plan(negation_rates={"Pneumothorax": 1.5})
    with pytest.raises(ValueError, match="not one of"):
        _plan(negation_rates={"Pneumothrax": 0.5})
    with pytest.raises(ValueError, match="normal_rate must be in"):
        _plan(normal_rate=-0.1)


def test_negation_rates_flag_parses_one_number_or_pairs():
    assert parse_negation_rates(None) is None
    assert parse_negation_rates("0.5") == {n: 0.5 for n in DEFAULT_NEGATION_RATES}
    assert parse_negation_rates("Pneumothorax=0.9, Fracture=0.2") == {"Pneumothorax": 0.9, "Fracture": 0.2}
    with pytest.raises(ValueError, match="give one number or Name=P pairs"):
        parse_negation_rates("Pneumothorax:0.9")
