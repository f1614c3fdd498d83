"""A new user's mistakes with the data tools (issue 26): each class ends in one clear line, a reject with a
reason, or a note with counts — never a build that silently lost labels, leaked patients or stored a file from
outside the input.

Each case runs the real CLI ``main()`` in-process (no traceback, at most one ``error:`` line) and checks what the
build wrote. Every test here failed on the code before issue 26.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import build_shards as build_cli
from data_tools import train_tokenizer as tok_cli
from data_tools import verify_shards as verify_cli
from data_tools.shard_format import CHEXPERT_LABELS

REPORT = "FINAL REPORT\n\nFINDINGS: Heart size is normal. Lungs are clear.\n\nIMPRESSION: No acute process.\n"


def _film(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8), "L").save(path)
    return path


def _mimic(root: Path, n: int = 3, reports: dict[int, bytes] | None = None) -> Path:
    """``n`` studies of one patient each (p1000000i / s5000000i), one PNG film ``img<i>`` per study."""
    for i in range(n):
        study = root / "files" / "p10" / f"p{10000001 + i}" / f"s{50000001 + i}"
        study.mkdir(parents=True)
        _film(study / f"img{i}.png", i)
        (study.parent / f"s{50000001 + i}.txt").write_bytes((reports or {}).get(i, REPORT.encode()))
    return root


def _chexpert(root: Path, ids: list[tuple[str, str]]) -> None:
    rows = [f"{s},{t},1.0" + "," * (len(CHEXPERT_LABELS) - 1) for s, t in ids]
    text = "subject_id,study_id," + ",".join(CHEXPERT_LABELS) + "\n" + "\n".join(rows) + "\n"
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(text)


def _build(capsys, corpus: Path, out: Path, *extra: str, fmt: str = "mimic-cxr") -> tuple[int, str, str]:
    rc = build_cli.main(["--format", fmt, "--input", str(corpus), "--output", str(out), "--no-progress", *extra])
    stdout, err = capsys.readouterr()
    assert "Traceback" not in err + stdout
    assert sum("error:" in line for line in err.splitlines()) <= 1, err
    return rc, stdout, err


def _metas(out: Path) -> dict[str, dict]:
    found = {}
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    found[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    return found


def _texts(out: Path) -> dict[str, str]:
    found = {}
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".txt"):
                    found[m.name[:-4]] = tar.extractfile(m).read().decode()
    return found


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- labels, splits


def test_chexpert_table_resaved_by_pandas_still_labels_every_study(tmp_path, capsys):
    corpus = _mimic(tmp_path / "c")
    _chexpert(corpus, [(f"{10000001 + i}.0", f"{50000001 + i}.0") for i in range(3)])  # pandas' floats
    rc, _, _ = _build(capsys, corpus, tmp_path / "o")
    assert rc == 0
    metas = _metas(tmp_path / "o")
    assert len(metas) == 3
    assert [m["labels"]["Atelectasis"] for m in metas.values()] == [1, 1, 1]


def test_a_label_table_matching_no_study_is_an_error_and_a_partial_one_a_note(tmp_path, capsys):
    corpus = _mimic(tmp_path / "c")
    _chexpert(corpus, [("19999999", "59999999")])  # another corpus's table
    rc, _, err = _build(capsys, corpus, tmp_path / "o")
    assert rc == 2
    assert "mimic-cxr-2.0.0-chexpert.csv: matches none of the 3 studies" in err
    assert not (tmp_path / "o" / "manifest.json").exists()

    _chexpert(corpus, [("10000001", "50000001"), ("10000002", "50000002")])
    rc, stdout, _ = _build(capsys, corpus, tmp_path / "o2")
    assert rc == 0
    assert "mimic-cxr-2.0.0-chexpert.csv covers 2 of the 3 studies" in stdout
    notes = json.loads((tmp_path / "o2" / "manifest.json").read_text())["notes"]
    assert any("covers 2 of the 3 studies" in n for n in notes)


def _split_table(root: Path, rows: list[tuple[str, str, str]]) -> None:
    text = "dicom_id,study_id,subject_id,split\n" + "".join(f"{d},{t},{s},{sp}\n" for d, t, s, sp in rows)
    (root / "mimic-cxr-2.0.0-split.csv").write_text(text)


def test_split_names_are_mapped_or_refused_with_the_list(tmp_path, capsys):
    corpus = _mimic(tmp_path / "c")
    _split_table(corpus, [("img0", "50000001", "10000001", "training"), ("img1", "50000002", "10000002", "valid"),
                          ("img2", "50000003", "10000003", "tset")])  # fmt: skip
    rc, _, err = _build(capsys, corpus, tmp_path / "o")
    assert rc == 2
    assert "'tset' is not one of train, validate, test" in err and "validation" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("tset"))

    _split_table(corpus, [("img0", "50000001", "10000001", "training"), ("img1", "50000002", "10000002", "valid"),
                          ("img2", "50000003", "10000003", "Validation")])  # fmt: skip
    rc, _, _ = _build(capsys, corpus, tmp_path / "o2")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "o2").iterdir() if p.is_dir()) == ["train", "validate"]


def test_a_patient_in_two_splits_is_refused_unless_allowed(tmp_path, capsys):
    corpus = tmp_path / "c"
    for i, study in enumerate(("s50000001", "s50000002")):  # one patient, two studies
        folder = corpus / "files" / "p10" / "p10000001" / study
        folder.mkdir(parents=True)
        _film(folder / f"img{i}.png", i)
        (folder.parent / f"{study}.txt").write_text(REPORT)
    _split_table(corpus, [("img0", "50000001", "10000001", "train"), ("img1", "50000002", "10000001", "test")])
    rc, _, err = _build(capsys, corpus, tmp_path / "o")
    assert rc == 2
    assert "1 patient(s) appear in more than one split" in err and "10000001 in test, train" in err
    assert "--allow-shared-patients" in err

    rc, stdout, _ = _build(capsys, corpus, tmp_path / "o2", "--allow-shared-patients")
    assert rc == 0 and "kept as asked" in stdout
    assert sorted(m["split"] for m in _metas(tmp_path / "o2").values()) == ["test", "train"]


def test_manifest_split_typo_and_patient_leak_are_refused(tmp_path, capsys):
    for i in range(2):
        _film(tmp_path / f"{i}.png", i)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text,split,patient_id\n0.png,heart size normal lungs clear,tset,7\n")
    rc, _, err = _build(capsys, manifest, tmp_path / "o", fmt="manifest")
    assert rc == 2 and "'tset' is not one of train, validate, test" in err
    manifest.write_text(
        "image,text,split,patient_id\n0.png,heart size normal lungs clear,train,7\n"
        "1.png,heart size normal lungs clear,test,7.0\n"
    )
    rc, _, err = _build(capsys, manifest, tmp_path / "o2", fmt="manifest")
    assert rc == 2 and "1 patient(s) appear in more than one split of m.csv (e.g. 7 in test, train)" in err


# ------------------------------------------------------------------------------------------- duplicates, conflicts


def test_conflicting_metadata_rows_and_a_second_image_of_one_dicom_id_are_rejected_with_reasons(tmp_path, capsys):
    corpus = _mimic(tmp_path / "c")
    (corpus / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,ViewPosition\nimg0,PA\nimg1,PA\nimg1,LATERAL\nimg2,AP\nimg2,AP\n"
    )
    study0 = corpus / "files" / "p10" / "p10000001" / "s50000001"
    _film(study0 / "img0.jpg", 9)  # a second file of dicom_id img0 in the same study
    rc, stdout, _ = _build(capsys, corpus, tmp_path / "o", "--views", "all")
    assert rc == 0
    rejects = {r["input"].rsplit("/", 1)[-1]: r for r in _rejects(tmp_path / "o")}
    assert rejects["img1.png"]["reason"] == "conflicting_metadata"
    assert "lines 3 and 4 give dicom_id img1 two views (PA, LATERAL)" in rejects["img1.png"]["detail"]
    assert rejects["img0.png"]["reason"] == "duplicate_image"  # sorted: img0.jpg first, and kept
    assert "img0.jpg is kept" in rejects["img0.png"]["detail"]
    assert "conflicting_metadata: 1" in stdout and "duplicate_image: 1" in stdout
    assert sorted(m["image_id"] for m in _metas(tmp_path / "o").values()) == ["img0", "img2"]


# ------------------------------------------------------------------------------------------- reports that are not


def test_reports_that_are_not_reports_are_rejected_and_utf16_without_bom_is_read(tmp_path, capsys):
    utf16 = REPORT.replace("normal", "enlarged").encode("utf-16-le")  # no BOM
    reports = {
        0: b"FINDINGS: ___ ___ ___ . ___\n\nIMPRESSION: ___ - ___\n",
        1: bytes(range(256)) * 8,  # binary
        2: utf16,
        3: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + b"IHDR",
    }
    corpus = _mimic(tmp_path / "c", 4, reports)
    rc, stdout, _ = _build(capsys, corpus, tmp_path / "o")
    assert rc == 0
    by_image = {r["input"].rsplit("/", 1)[-1]: r["reason"] for r in _rejects(tmp_path / "o")}
    assert by_image == {"img0.png": "empty_report", "img1.png": "report_not_text", "img3.png": "report_not_text"}
    texts = list(_texts(tmp_path / "o").values())
    assert texts == ["Heart size is enlarged. Lungs are clear. No acute process."]
    assert "decoded as utf-16-le" in stdout


# ------------------------------------------------------------------------------------------- outside the input


def test_symlinks_leading_outside_the_input_are_rejected_unless_followed(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "services.txt").write_text("FINDINGS: ftp 21/tcp ssh 22/tcp telnet 23/tcp smtp 25/tcp\n")
    _film(outside / "film.png", 5)
    corpus = _mimic(tmp_path / "c")
    study0 = corpus / "files" / "p10" / "p10000001"
    (study0 / "s50000001.txt").unlink()
    (study0 / "s50000001.txt").symlink_to(outside / "services.txt")
    image1 = corpus / "files" / "p10" / "p10000002" / "s50000002" / "img1.png"
    image1.unlink()
    image1.symlink_to(outside / "film.png")
    inside = corpus / "files" / "p10" / "p10000003" / "s50000003" / "img9.png"
    inside.symlink_to(corpus / "files" / "p10" / "p10000003" / "s50000003" / "img2.png")  # inside: fine
    rc, stdout, _ = _build(capsys, corpus, tmp_path / "o")
    assert rc == 0
    assert "2 input(s) are symbolic links leading outside --input" in stdout and "--follow-outside-links" in stdout
    reasons = {r["input"].rsplit("/", 1)[-1]: r["reason"] for r in _rejects(tmp_path / "o")}
    assert reasons == {"img0.png": "symlink_outside_input", "img1.png": "symlink_outside_input"}
    assert not any("tcp" in t for t in _texts(tmp_path / "o").values())
    assert sorted(m["image_id"] for m in _metas(tmp_path / "o").values()) == ["img2", "img9"]

    rc, _, _ = _build(capsys, corpus, tmp_path / "o2", "--follow-outside-links")
    assert rc == 0 and len(_metas(tmp_path / "o2")) == 4

    manifest_dir = tmp_path / "m"
    manifest_dir.mkdir()
    (manifest_dir / "a.png").symlink_to(outside / "film.png")
    _film(manifest_dir / "b.png", 1)
    (manifest_dir / "m.csv").write_text(
        "image,text\na.png,heart size normal lungs clear\nb.png,lungs are clear now\n"
    )
    rc, _, _ = _build(capsys, manifest_dir / "m.csv", tmp_path / "o3", fmt="manifest")
    assert rc == 0
    assert [r["reason"] for r in _rejects(tmp_path / "o3")] == ["symlink_outside_input"]


def test_iu_xray_links_outside_and_two_files_of_one_image_id(tmp_path, capsys):
    root = tmp_path / "iu"
    xmls = root / "ecgen-radiology"
    xmls.mkdir(parents=True)
    for n in (1, 2):
        (tmp_path / f"{n}.xml").write_text(
            f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{n}"/>'
            '<AbstractText Label="FINDINGS">Heart size is normal. Lungs are clear.</AbstractText>'
            f'<parentImage id="CXR{n}_IM-1"/></eCitation>'
        )
    (xmls / "1.xml").symlink_to(tmp_path / "1.xml")  # a report from outside the input
    (xmls / "2.xml").write_text((tmp_path / "2.xml").read_text())
    (root / "images").mkdir()
    _film(root / "images" / "CXR2_IM-1.png", 1)
    _film(root / "images" / "CXR2_IM-1.jpg", 2)
    rc, stdout, _ = _build(capsys, root, tmp_path / "o", fmt="iu-xray")
    assert rc == 0
    assert [(r["input"], r["reason"]) for r in _rejects(tmp_path / "o")] == [
        ("ecgen-radiology/1.xml", "symlink_outside_input")
    ]
    assert "1 image id(s) have more than one file" in stdout and "CXR2_IM-1.jpg (not CXR2_IM-1.png)" in stdout


def test_output_inside_the_input_is_refused(tmp_path, capsys):
    corpus = _mimic(tmp_path / "c")
    rc, _, err = _build(capsys, corpus, corpus / "shards")
    assert rc == 2 and "lies inside --input" in err
    assert not (corpus / "shards").exists()


# ------------------------------------------------------------------------------------------- misleading lines


@pytest.mark.parametrize("fmt", ["mimic-cxr", "manifest"])
def test_a_csv_gz_that_is_not_gzip_names_the_input_file(tmp_path, capsys, fmt):
    corpus = _mimic(tmp_path / "c")
    if fmt == "mimic-cxr":
        bad = corpus / "mimic-cxr-2.0.0-metadata.csv.gz"
        bad.write_text("dicom_id,ViewPosition\nimg0,PA\n")
        target = corpus
    else:
        bad = tmp_path / "m.csv.gz"
        bad.write_text("image,text\nx.png,heart size normal\n")
        target = bad
    rc, _, err = _build(capsys, target, tmp_path / "o", fmt=fmt)
    assert rc == 2
    assert f"{bad}: not a readable gzip file" in err
    assert "cannot write" not in err and "--output" not in err


def test_an_unreadable_input_file_is_named_as_input_not_output(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.symlink_to("/proc/self/mem")  # opens, then every read at offset 0 fails (EIO), even for root
    rc, _, err = _build(capsys, manifest, tmp_path / "o", fmt="manifest")
    assert rc == 2
    assert "error: cannot read input /proc/" in err and "/mem: Input/output error" in err
    assert "--output" not in err


# ------------------------------------------------------------------------------------------- verify_shards


@pytest.fixture
def built(tmp_path, capsys) -> Path:
    corpus = _mimic(tmp_path / "c")
    rc, _, _ = _build(capsys, corpus, tmp_path / "o")
    assert rc == 0
    return tmp_path / "o"


def _verify(capsys, target: Path) -> tuple[int, str]:
    rc = verify_cli.main([str(target), "--no-progress"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out + err


def test_verify_flags_a_member_named_with_dotdot(built, capsys):
    tar_path = next(built.glob("*/*.tar"))
    data = b"payload"
    with tarfile.open(tar_path, "a") as tar:  # appended after the samples: the manifest's hash differs too
        info = tarfile.TarInfo("../x")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    rc, out = _verify(capsys, built)
    assert rc == 1
    assert "member '../x' is not a plain <key>.<ext> name" in out


def test_verify_names_a_fifo_shard_a_file_and_a_missing_folder(built, tmp_path, capsys):
    tar_path = next(built.glob("*/*.tar"))
    tar_path.unlink()
    os.mkfifo(tar_path)
    rc, out = _verify(capsys, built)
    assert rc == 1 and f"{tar_path.relative_to(built)}: a FIFO, not a shard file" in out

    rc, out = _verify(capsys, built / "manifest.json")
    assert rc == 2 and "is a file, not a folder" in out
    rc, out = _verify(capsys, tmp_path / "nowhere")
    assert rc == 2 and "does not exist" in out
    rc, out = _verify(capsys, built / "train")
    assert rc == 2 and f"split folder of the build {built}" in out


# ------------------------------------------------------------------------------------------- shard kinds


def _vqa_build(tmp_path: Path, capsys) -> Path:
    root = tmp_path / "rad"
    (root / "images").mkdir(parents=True)
    _film(root / "images" / "a.png", 1)
    entry = {"qid": 1, "image_name": "a.png", "question": "Is there a pleural effusion?", "answer": "yes",
             "answer_type": "CLOSED", "question_type": "PRES"}  # fmt: skip
    (root / "trainset.json").write_text(json.dumps([entry]))
    (root / "testset.json").write_text(json.dumps([{**entry, "qid": 2}]))
    rc, _, _ = _build(capsys, root, tmp_path / "vqa_shards", fmt="vqa-rad")
    assert rc == 0
    return tmp_path / "vqa_shards"


def test_manifest_says_what_the_build_holds_and_the_tokenizer_refuses_vqa_shards(tmp_path, built, capsys):
    assert json.loads((built / "manifest.json").read_text())["kind"] == "report"
    vqa = _vqa_build(tmp_path, capsys)
    assert json.loads((vqa / "manifest.json").read_text())["kind"] == "vqa"
    rc = tok_cli.main(["--shards", str(vqa), "--out", str(tmp_path / "tok"), "--vocab-size", "200"])
    _, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err
    assert "holds image-question-answer samples" in err and "--format mimic-cxr" in err
    assert not (tmp_path / "tok").exists()
