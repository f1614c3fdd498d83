"""data_tools.synth_vqa: a VQA-RAD-layout set whose answers are what each synthetic film draws."""

from __future__ import annotations

import csv
import gzip
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus
from data_tools.synth.vqa import ANSWER_NAMES, PRESENCE_QUESTIONS, generate_vqa
from data_tools.synth_vqa import main
from data_tools.verify_shards import verify_shards

STUDIES = 120
SPLIT_FILES = {"train": "trainset.json", "validate": "valset.json", "test": "testset.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa_corpus") / "corpus"
    generate_corpus(out, STUDIES, 5, min_size=96, max_size=128, with_faults=True)
    return out


@pytest.fixture(scope="module")
def vqa(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vqa") / "set"
    return out, generate_vqa(corpus, out, seed=1)


def _entries(out: Path) -> dict[str, list[dict]]:
    return {split: json.loads((out / name).read_text()) for split, name in SPLIT_FILES.items()}


def _truth(corpus: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (corpus / "synth_truth.jsonl").read_text().splitlines()]
    return {f"{r['dicom_id']}.jpg": r for r in rows}


def test_layout_is_vqa_rad_and_builds_into_verified_shards(vqa, tmp_path):
    out, summary = vqa
    entries = _entries(out)
    everything = [e for rows in entries.values() for e in rows]
    assert len(everything) == summary["questions"] > 2 * STUDIES
    assert {e["image_name"] for e in everything} == {p.name for p in (out / "images").iterdir()}
    for e in everything:
        assert {"qid", "image_name", "question", "answer", "answer_type", "question_type"} <= set(e)
        assert e["answer_type"] in ("CLOSED", "OPEN") and e["answer"] == e["answer"].strip().lower()
    assert len({e["qid"] for e in everything}) == len(everything)
    built = build_shards("vqa-rad", out, tmp_path / "shards", image_size=48, shard_size=200, progress=False)
    assert built["written"] == summary["questions"] and built["rejects"] == {} and built["notes"] == []
    assert built["splits"] == {split: len(rows) for split, rows in entries.items()}
    assert verify_shards(tmp_path / "shards", progress=False).ok


def test_answers_are_what_the_film_draws(vqa, corpus):
    out, _ = vqa
    truth = _truth(corpus)
    with gzip.open(corpus / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt", newline="") as f:
        chexpert = {r["study_id"]: r for r in csv.DictReader(f)}
    seen = Counter()
    for e in (e for rows in _entries(out).values() for e in rows):
        film = truth[e["image_name"]]
        drawn, name = film["drawn"], e["finding"]
        assert film["view"] in ("PA", "AP") and film["fault"] is None
        assert (e["subject_id"], e["study_id"]) == (film["subject_id"], film["study_id"])
        label = chexpert[film["study_id"]][name]
        if e["question_type"] == "PRES":
            assert e["question"] == PRESENCE_QUESTIONS[name]
            assert (e["answer"] == "yes") == (drawn.get(name, {}).get("state") == 1)
            assert label == ("1.0" if e["answer"] == "yes" else label) and label in ("1.0", "0.0", "")
        elif e["question_type"] == "DEVICE":
            assert (e["answer"] == "yes") == (label == "1.0") == ("Support Devices" in drawn)
        elif e["question_type"] == "POS" and e["answer_type"] == "CLOSED":
            asked = re.fullmatch(r"Is the .+ on the (left|right) side\?", e["question"]).group(1)
            side = drawn[name]["side"]
            assert drawn[name]["state"] == 1 and (e["answer"] == "yes") == (asked == side)
            # the patient's left is on the image's right: the drawn box says which half it is in
            (x0, _, x1, _), *_ = film["boxes"][name]
            assert ((x0 + x1) / 2 > film["width"] / 2) == (side == "left")
        elif e["question_type"] == "POS":
            side = drawn[name]["side"]
            assert e["answer"] == ("both lungs" if side == "bilateral" else f"{side} lung")
        else:
            assert e["question_type"] == "ABN"
            if e["answer"] == "no finding":
                assert label == "1.0" and name == "No Finding" and not set(drawn) - {"Support Devices"}
            else:
                assert set(drawn) - {"Support Devices"} == {name} and label == "1.0"
                assert e["answer"] == ANSWER_NAMES.get(name, e["answer"])
        seen[e["question_type"], e["answer_type"], e["answer"]] += 1
    assert seen["PRES", "CLOSED", "yes"] and seen["POS", "CLOSED", "yes"] and seen["ABN", "OPEN", "no finding"]


def test_yes_no_balanced_per_question_and_per_type(vqa):
    out, summary = vqa
    per_text: dict[str, Counter] = defaultdict(Counter)
    for e in (e for rows in _entries(out).values() for e in rows if e["answer_type"] == "CLOSED"):
        per_text[e["question"]][e["answer"]] += 1
    assert all(abs(c["yes"] - c["no"]) <= 1 for c in per_text.values()), per_text
    closed = {k: t for k, t in summary["types"].items() if k.endswith("/CLOSED")}
    assert set(closed) == {"PRES/CLOSED", "POS/CLOSED", "DEVICE/CLOSED"}
    for name, t in closed.items():
        assert 0.4 <= t["yes"] <= 0.6, (name, t)  # per text at most one apart: 0.5 +- texts / questions
    abn = summary["types"]["ABN/OPEN"]["answers"]
    assert abn["no finding"] <= sum(abn.values()) - abn["no finding"] + 1


def test_splits_follow_the_corpus_split_file_patient_level(vqa, corpus):
    out, summary = vqa
    with gzip.open(corpus / "mimic-cxr-2.0.0-split.csv.gz", "rt", newline="") as f:
        official = {f"{r['dicom_id']}.jpg": r["split"] for r in csv.DictReader(f)}
    patients = defaultdict(set)
    for split, rows in _entries(out).items():
        assert rows, split
        for e in rows:
            assert official[e["image_name"]] == split
            patients[e["subject_id"]].add(split)
    assert all(len(s) == 1 for s in patients.values())
    assert summary["splits"]["validate"]["questions"] == len(_entries(out)["validate"])


def test_deterministic_per_arguments(vqa, corpus, tmp_path):
    out, _ = vqa
    again = tmp_path / "again"
    generate_vqa(corpus, again, seed=1)
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "synth_vqa.json"):
        assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path
    other = tmp_path / "other"
    generate_vqa(corpus, other, seed=2, image_size=64, questions_per_image=2)
    assert (other / "trainset.json").read_bytes() != (out / "trainset.json").read_bytes()
    counts = Counter(e["image_name"] for rows in _entries(other).values() for e in rows)
    assert max(counts.values()) <= 2
    from PIL import Image

    with Image.open(next((other / "images").iterdir())) as img:
        assert min(img.size) == 64 and img.mode == "L"


def test_cli_help_and_errors(tmp_path, capsys, corpus):
    assert (
        subprocess.run([sys.executable, "-m", "data_tools.synth_vqa", "--help"], capture_output=True).returncode
        == 0
    )
    (tmp_path / "not_a_corpus").mkdir()
    assert main(["--corpus", str(tmp_path / "not_a_corpus"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no synth_truth.jsonl" in err and "older synth_corpus" not in err
    # a corpus folder that does not exist: said so, not "regenerate older corpora"
    assert main(["--corpus", str(tmp_path / "MISSING"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MISSING does not exist" in err[0] and "regenerate" not in err[0], err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "busy" / "keep.txt").exists()
