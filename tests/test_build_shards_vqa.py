"""build_shards --format vqa-rad|slake on tiny sets written in exactly the layouts their users download:
one sample per question, bad entries rejected and counted, the q_lang filter, determinism across worker
counts, verify_shards on the result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shards_testdata import build_files, read_shards

from data_tools.build_shards import BuildError, build_shards, main
from data_tools.shard_format import CHEXPERT_LABELS, VQA_FIELDS
from data_tools.verify_shards import verify_shards

IMAGE_SIZE = 48


def _film(path: Path, seed: int, size=(90, 110)) -> None:
    """A small grayscale film, PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = (np.add.outer(np.arange(size[1]), np.arange(size[0])) % 200 + rng.integers(0, 50, size[::-1])).astype(
        np.uint8
    )
    img = Image.fromarray(arr, "L")
    img.save(path) if path.suffix == ".png" else img.convert("RGB").save(path, quality=90)


def _dump(path: Path, entries) -> None:
    path.write_text(json.dumps(entries, indent=1), encoding="utf-8")


def _rad(qid, image, question="Is there a pleural effusion?", answer="yes", answer_type="CLOSED", **extra):
    entry = {"qid": qid, "image_name": image, "image_organ": "CHEST", "answer": answer, "answer_type": answer_type,
             "question_type": "PRES", "question": question, "phrase_type": "freeform"}  # fmt: skip
    entry.update(extra)
    return {k: v for k, v in entry.items() if v is not ...}


@pytest.fixture(scope="module")
def vqa_rad(tmp_path_factory) -> Path:
    """A VQA-RAD folder (M3AE/MEVF layout) without valset.json, with one bad entry of each kind."""
    root = tmp_path_factory.mktemp("vqa_rad")
    _film(root / "images" / "synpic100.jpg", 0)
    _film(root / "images" / "synpic200.png", 1, size=(120, 100))
    (root / "images" / "synpic300.jpg").write_bytes(b"not a picture at all")
    train = [
        _rad(1, "synpic100.jpg"),
        _rad(2, "synpic100.jpg", "Where is the   opacity?", "  Left  Lung ", "OPEN", question_type="POS"),
        _rad("3", "synpic200.png", answer="No", answer_type="closed"),
        _rad(4, "synpic200.png", question=""),  # missing_question
        _rad(5, "synpic200.png", answer=...),  # missing_answer
        _rad(6, ""),  # missing_image_name
        _rad(7, "synpic999.jpg"),  # missing_image
        _rad(8, "synpic100.jpg", answer_type="MAYBE"),  # bad_answer_type
        _rad(9, "synpic300.jpg"),  # not_an_image
        _rad(10, "synpic200.png", "What organ is this?", "chest", "OPEN", question_type="ORGAN"),
    ]
    _dump(root / "trainset.json", train)
    _dump(root / "testset.json", [_rad(11, "synpic200.png"), _rad(12, "synpic100.jpg", answer="yes ")])
    return root


def _slake(qid, img_id, img_name, lang="en", question="Does the picture contain lung?", answer="Yes", **extra):
    entry = {"img_id": img_id, "img_name": img_name, "question": question, "answer": answer, "q_lang": lang,
             "location": "Lung", "modality": "X-Ray", "answer_type": "CLOSED", "base_type": "vqa", "content_type": "Organ",
             "triple": ["vhead", "_", "_"], "qid": qid}  # fmt: skip
    entry.update(extra)
    return entry


@pytest.fixture(scope="module")
def slake(tmp_path_factory) -> Path:
    """A SLAKE folder: imgs/xmlabN/source.jpg, English and Chinese questions in all three splits."""
    root = tmp_path_factory.mktemp("slake")
    for n in (1, 2, 3):
        _film(root / "imgs" / f"xmlab{n}" / "source.jpg", 10 + n)
    _dump(root / "train.json", [
        _slake(0, 1, "xmlab1/source.jpg"),
        _slake(1, 1, "xmlab1/source.jpg", "zh", "图片中包含肺吗?", "是"),
        _slake(2, 2, "xmlab2/source.jpg", question="Which organ is abnormal?", answer="Left Lung",
               answer_type="OPEN", content_type="Abnormality"),
        _slake(3, 2, "../outside.jpg"),  # bad_image_name
    ])  # fmt: skip
    _dump(root / "validation.json", [_slake(4, 3, "xmlab3/source.jpg"), _slake(5, 3, "xmlab3/source.jpg", "zh")])
    _dump(root / "test.json", [_slake(6, 2, "xmlab2/source.jpg", answer="No")])
    return root


@pytest.fixture(scope="module")
def rad_build(vqa_rad, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rad_out") / "shards"
    summary = build_shards("vqa-rad", vqa_rad, out, shard_size=3, image_size=IMAGE_SIZE, workers=1, progress=False)
    return out, summary


def test_vqa_rad_one_sample_per_question_with_the_vqa_fields(rad_build):
    out, summary = rad_build
    samples = read_shards(out)
    assert sorted(samples) == sorted(
        ["vqa-rad_train_1", "vqa-rad_train_2", "vqa-rad_train_3", "vqa-rad_train_10", "vqa-rad_test_11",
         "vqa-rad_test_12"]
    )  # fmt: skip
    assert summary["written"] == 6 and summary["splits"] == {"train": 4, "validate": 0, "test": 2}
    for sample in samples.values():
        assert set(sample) == {"jpg", "txt", "json"}
        meta = json.loads(sample["json"])
        assert tuple(meta) == VQA_FIELDS
        assert meta["labels"] == dict.fromkeys(CHEXPERT_LABELS) and meta["view"] is None
        assert meta["subject_id"] == meta["study_id"] == meta["image_id"]
        assert sample["txt"].decode() == meta["question"]
        assert meta["content_type"] is None and meta["q_lang"] == "en"
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            assert img.format == "JPEG" and img.mode == "L" and min(img.size) == IMAGE_SIZE
    where = json.loads(samples["vqa-rad_train_2"]["json"])
    assert where["question"] == "Where is the opacity?" and where["answer"] == "left lung"
    assert where["answer_raw"] == "  Left  Lung " and where["answer_type"] == "OPEN"
    assert where["qid"] == "2" and where["question_type"] == "POS" and where["image_id"] == "synpic100.jpg"
    assert where["split"] == "train" and (where["width"], where["height"]) == (90, 110)
    closed = json.loads(samples["vqa-rad_train_3"]["json"])
    assert (closed["answer"], closed["answer_type"], closed["subject_id"]) == ("no", "CLOSED", "synpic200.png")


def test_vqa_rad_bad_entries_are_rejected_and_counted(rad_build):
    out, summary = rad_build
    expected = {"missing_question": 1, "missing_answer": 1, "missing_image_name": 1, "missing_image": 1,
                "bad_answer_type": 1, "not_an_image": 1}  # fmt: skip
    assert summary["rejects"] == expected and summary["rejected"] == 6 and summary["inputs"] == 12
    rows = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_reason = {r["reason"]: r for r in rows}
    assert (
        by_reason["missing_answer"]["input"] == "trainset.json[4]"
        and "'answer'" in by_reason["missing_answer"]["detail"]
    )
    assert (
        by_reason["missing_image"]["key"] == "vqa-rad_train_7"
        and "synpic999.jpg" in by_reason["missing_image"]["detail"]
    )
    assert "MAYBE" in by_reason["bad_answer_type"]["detail"]
    assert all(r["kind"] == "image" and r["split"] == "train" for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["images"] == 12 and manifest["options"]["vqa_lang"] == "en"
    assert "views" not in manifest["options"] and "min_words" not in manifest["options"]


def test_vqa_rad_without_valset_has_no_validate_split_and_says_so(rad_build):
    out, summary = rad_build
    assert summary["notes"] == ["no valset.json in the input: no validate split (none is made up)"]
    assert not (out / "validate").exists()
    assert json.loads((out / "manifest.json").read_text())["notes"] == summary["notes"]


def test_vqa_shards_verify(rad_build, tmp_path, slake):
    report = verify_shards(rad_build[0], progress=False)
    assert report.ok, report.problems
    assert report.samples == 6 and report.rejects == 6
    out = tmp_path / "slake"
    build_shards("slake", slake, out, shard_size=2, image_size=IMAGE_SIZE, progress=False)
    report = verify_shards(out, progress=False)
    assert report.ok, report.problems


def test_verify_catches_a_vqa_json_without_its_fields(rad_build, tmp_path):
    import shutil

    from data_tools.shard_build.writer import ShardWriter

    out = tmp_path / "copy"
    shutil.copytree(rad_build[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["shards"][0]
    samples = read_shards(out)
    keys = [k for k in samples if k.startswith("vqa-rad_train")][:3]
    writer = ShardWriter(out, "train", 0)
    for i, key in enumerate(keys):
        meta = json.loads(samples[key]["json"])
        if i == 0:
            del meta["answer"]
        elif i == 1:
            meta["answer_type"] = "MAYBE"
        writer.add_sample(key, {**samples[key], "json": json.dumps(meta).encode()})
    new = writer.commit().to_dict()
    info.update(bytes=new["bytes"], sha256=new["sha256"], samples=3)
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(out, progress=False).problems
    assert any("missing field(s) ['answer']" in p for p in problems), problems
    assert any("answer_type 'MAYBE'" in p for p in problems), problems


def test_vqa_build_is_byte_identical_across_workers(vqa_rad, rad_build, tmp_path):
    out2 = tmp_path / "w2"
    build_shards("vqa-rad", vqa_rad, out2, shard_size=3, image_size=IMAGE_SIZE, workers=2, progress=False)
    assert build_files(out2) == build_files(rad_build[0])


def test_slake_english_by_default_all_on_request(slake, tmp_path):
    summary = build_shards("slake", slake, tmp_path / "en", shard_size=4, image_size=IMAGE_SIZE, progress=False)
    samples = read_shards(tmp_path / "en")
    assert sorted(samples) == ["slake_test_6", "slake_train_0", "slake_train_2", "slake_validate_4"]
    assert summary["rejects"] == {"bad_image_name": 1, "lang_filtered": 2} and summary["notes"] == []
    meta = json.loads(samples["slake_train_2"]["json"])
    assert (meta["subject_id"], meta["image_id"], meta["content_type"]) == (
        "2",
        "xmlab2/source.jpg",
        "Abnormality",
    )
    assert meta["answer"] == "left lung" and meta["answer_type"] == "OPEN" and meta["question_type"] is None
    every = build_shards("slake", slake, tmp_path / "all", image_size=IMAGE_SIZE, vqa_lang="all", progress=False)
    assert every["written"] == 6 and every["rejects"] == {"bad_image_name": 1}
    zh = json.loads(read_shards(tmp_path / "all")["slake_train_1"]["json"])
    assert (zh["q_lang"], zh["answer"], zh["question"]) == ("zh", "是", "图片中包含肺吗?")


def test_a_language_filter_that_leaves_nothing_is_one_error_line(slake, tmp_path, capsys):
    root = tmp_path / "zh_only"
    (root / "imgs").mkdir(parents=True)
    for name in ("train.json", "test.json"):
        _dump(root / name, [_slake(1, 1, "xmlab1/source.jpg", "zh")])
    rc = main(["--format", "slake", "--input", str(root), "--output", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--vqa-lang en leaves no question" in err and "q_lang found: zh" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "is not valid JSON"), ('{"qid": 1}', "holds a JSON dict, expected a list")],
)
def test_a_split_file_that_is_not_a_json_list_is_an_error_naming_it(vqa_rad, tmp_path, content, message):
    root = tmp_path / "rad"
    (root / "images").mkdir(parents=True)
    _dump(root / "trainset.json", [])
    (root / "testset.json").write_text(content)
    with pytest.raises(BuildError, match=message) as err:
        build_shards("vqa-rad", root, tmp_path / "o", progress=False)
    assert str(root / "testset.json") in str(err.value)


def test_missing_split_file_or_image_folder_is_an_error(tmp_path):
    (tmp_path / "rad" / "images").mkdir(parents=True)
    _dump(tmp_path / "rad" / "trainset.json", [])
    with pytest.raises(BuildError, match="has no testset.json"):
        build_shards("vqa-rad", tmp_path / "rad", tmp_path / "o", progress=False)
    (tmp_path / "sl").mkdir()
    for name in ("train.json", "test.json"):
        _dump(tmp_path / "sl" / name, [])
    with pytest.raises(BuildError, match="has no imgs/ folder"):
        build_shards("slake", tmp_path / "sl", tmp_path / "o", progress=False)


def test_a_split_whose_entries_all_fail_still_has_a_manifest_entry(tmp_path, capsys):
    root = tmp_path / "rad"
    _film(root / "images" / "a.png", 3)
    _dump(root / "trainset.json", [_rad(1, "a.png")])
    _dump(root / "valset.json", [_rad(2, "gone.png")])
    _dump(root / "testset.json", [_rad(3, "a.png", answer="")])
    args = ["--format", "vqa-rad", "--input", str(root), "--image-size", "32", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 1, "validate": 0, "test": 0}
    assert manifest["rejects"] == {"missing_answer": 1, "missing_image": 1}
    _dump(root / "trainset.json", [_rad(1, "gone.png")])
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "o2")]) == 1  # nothing written at all
    assert "no sample was written" in capsys.readouterr().err
