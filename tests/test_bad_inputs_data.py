"""Bad input to the data tools: one clear line, a non-zero exit, nothing written wrong (SPEC §9, issue 11).

Each case runs the real CLI `main()` in-process and checks its exit status, that stderr holds exactly one
`error:` line and no traceback, and what the build wrote (or did not).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import build_shards as build_cli
from data_tools import verify_shards as verify_cli
from data_tools.sources.report_text import NotText, decode_report

REPORT = "FINAL REPORT\n\nFINDINGS: Heart size is normal. Lungs are clear.\n\nIMPRESSION: No acute process.\n"


def _film(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8), "L").save(path)
    return path


def _mimic(root: Path, reports: dict[str, bytes]) -> Path:
    """A MIMIC-style tree: one study (one PNG film) per report, reports as raw bytes."""
    for n, (name, raw) in enumerate(sorted(reports.items())):
        study = root / "files" / "p10" / f"p{10000001 + n}" / f"s{50000001 + n}"
        study.mkdir(parents=True)
        _film(study / f"{name}.png", n)
        (study.parent / f"s{50000001 + n}.txt").write_bytes(raw)
    return root


def _run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


def _one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture
def corpus(tmp_path) -> Path:
    return _mimic(tmp_path / "corpus", {f"img{i}": REPORT.encode() for i in range(3)})


# ------------------------------------------------------------------------------- builds with no sample


def test_build_that_writes_no_sample_exits_1_and_verify_fails(tmp_path, capsys):
    manifest = tmp_path / "captions.csv"
    manifest.write_text(
        "image,text\n" + "".join(f"missing/{i}.png,Heart size normal lungs clear\n" for i in range(4))
    )
    rc, out, err = _run(
        build_cli.main, ["--format", "manifest", "--input", str(manifest), "--output", str(tmp_path / "o")], capsys
    )
    assert rc == 1 and out.startswith("empty:")
    _one_error_line(err, "no sample was written", "missing_image 4", "rejects.jsonl")
    assert (
        len((tmp_path / "o" / "rejects.jsonl").read_text().splitlines()) == 4
    )  # nothing lost: every reject listed
    rc, out, _ = _run(verify_cli.main, [str(tmp_path / "o")], capsys)
    assert rc == 1 and "the build holds no sample" in out


def test_iu_xray_without_images_exits_1(tmp_path, capsys):
    xml = tmp_path / "iu" / "ecgen-radiology" / "1.xml"
    xml.parent.mkdir(parents=True)
    (tmp_path / "iu" / "images").mkdir()
    xml.write_text(
        '<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR1"/>'
        '<AbstractText Label="FINDINGS">Heart size is normal. Lungs are clear.</AbstractText>'
        '<parentImage id="CXR1_1_IM-0001-3001"/><parentImage id="CXR1_1_IM-0001-4001"/></eCitation>'
    )
    rc, _, err = _run(
        build_cli.main,
        ["--format", "iu-xray", "--input", str(tmp_path / "iu"), "--output", str(tmp_path / "o")],
        capsys,
    )
    assert rc == 1
    _one_error_line(err, "no sample was written", "missing_image 2")


def test_unknown_view_is_refused_up_front(corpus, tmp_path, capsys):
    rc, out, err = _run(
        build_cli.main,
        ["--format", "mimic-cxr", "--input", str(corpus), "--output", str(tmp_path / "o"), "--views", "XYZ"],
        capsys,
    )
    assert rc == 2 and out == ""
    _one_error_line(err, "unknown --views XYZ", "PA")
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("quality", ["0", "101", "-5"])
def test_jpeg_quality_is_range_checked(corpus, tmp_path, capsys, quality):
    rc, _, err = _run(
        build_cli.main,
        [
            "--format",
            "mimic-cxr",
            "--input",
            str(corpus),
            "--output",
            str(tmp_path / "o"),
            "--jpeg-quality",
            quality,
        ],
        capsys,
    )
    assert rc == 2
    _one_error_line(err, f"--jpeg-quality {quality} is outside 1..100")


def test_output_under_a_file_or_unwritable(corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc, _, err = _run(
        build_cli.main,
        ["--format", "mimic-cxr", "--input", str(corpus), "--output", str(tmp_path / "afile" / "shards")],
        capsys,
    )
    assert rc == 2
    _one_error_line(err, "afile", "is a file, not a folder")
    # /proc refuses every new folder, even to root (a chmod'ed folder would not stop root).
    rc, _, err = _run(
        build_cli.main, ["--format", "mimic-cxr", "--input", str(corpus), "--output", "/proc/mpma-shards"], capsys
    )
    assert rc in (1, 2)
    _one_error_line(err, "/proc/mpma-shards")


# ------------------------------------------------------------------------------------------ manifests


def test_latin1_csv_manifest_is_one_line(tmp_path, capsys):
    _film(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("image,text\na.png,Cœur de taille normale, poumons clairs\n".encode("cp1252"))
    rc, _, err = _run(
        build_cli.main, ["--format", "manifest", "--input", str(manifest), "--output", str(tmp_path / "o")], capsys
    )
    assert rc == 2
    _one_error_line(err, "m.csv", "not UTF-8", "line 2", "iconv")


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("m.json", '[{"image": "a.png", "text": "Heart size normal lungs clear"},', "not valid JSON"),
        ("m.json", '{"image": "a.png"}', "expected a JSON list of objects"),
        (
            "m.jsonl",
            '{"image": "a.png", "text": "Heart size normal lungs clear"}\n{"image": ',
            "line 2 is not valid JSON",
        ),
        ("m.csv", 'image,text\na.png,"Heart size normal lungs clear\n', "not valid CSV"),
        ("m.csv", "image,text\na.png,Heart size normal,lungs clear\n", "row 1 has more cells"),
    ],
)
def test_malformed_manifest_is_one_line(tmp_path, capsys, name, content, needle):
    _film(tmp_path / "a.png")
    (tmp_path / name).write_text(content)
    rc, _, err = _run(
        build_cli.main,
        ["--format", "manifest", "--input", str(tmp_path / name), "--output", str(tmp_path / "o")],
        capsys,
    )
    assert rc == 2
    _one_error_line(err, name, needle)


def test_duplicate_manifest_rows_and_ids_are_rejected(tmp_path, capsys):
    for name in ("a", "b", "c"):
        _film(tmp_path / f"{name}.png")
    rows = [
        {"image": "a.png", "text": "Heart size normal, lungs clear.", "image_id": "A"},
        {"image": "a.png", "text": "Heart size normal, lungs clear.", "image_id": "A"},  # the same row again
        {"image": "./a.png", "text": "Another text for the same image file."},  # same file, other spelling
        {"image": "b.png", "text": "Heart size normal, lungs clear.", "image_id": "A"},  # id already used
        {"image": "c.png", "text": "Heart size normal, lungs clear.", "image_id": "C"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, _ = _run(
        build_cli.main,
        [
            "--format",
            "manifest",
            "--input",
            str(manifest),
            "--output",
            str(tmp_path / "o"),
            "--image-size",
            "32",
            "--min-size",
            "32",
        ],
        capsys,
    )
    assert rc == 0 and "duplicate: 3" in out
    rejects = [json.loads(line) for line in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["detail"].split(":")[0]) for r in rejects] == [
        ("duplicate", f"row {n}") for n in (2, 3, 4)
    ]
    assert "already used by row 1" in rejects[0]["detail"] and "image_id A" in rejects[2]["detail"]
    assert sorted(json.loads(s["json"])["image_id"] for s in _samples(tmp_path / "o").values()) == ["A", "C"]


# --------------------------------------------------------------------------------- report encodings


def test_decode_report_never_yields_replacement_characters():
    text = "Cœur normal. Épanchement pleural gauche — léger.\n"
    assert decode_report(text.encode("utf-8")) == (text, None)
    assert decode_report(text.encode("cp1252")) == (text, "cp1252")
    assert decode_report(b"\xef\xbb\xbf" + text.encode("utf-8")) == (text, None)  # BOM dropped
    assert decode_report(text.encode("utf-16")) == (text, "utf-16")
    latin1 = "Épanchement \x81 léger".encode("latin-1")  # 0x81 is undefined in cp1252
    assert decode_report(latin1) == ("Épanchement \x81 léger", "latin-1")
    for raw in (text.encode("cp1252"), latin1, bytes(range(128, 256))):
        assert "\ufffd" not in decode_report(raw)[0]
    with pytest.raises(NotText):  # control bytes and NULs: not a report at all (issue 26)
        decode_report(bytes(range(256)))


def test_non_utf8_mimic_reports_are_decoded_with_a_note(tmp_path, capsys):
    report = (
        "FINDINGS: Cœur de taille normale. Épanchement pleural léger à gauche.\n\nIMPRESSION: Pas d’urgence.\n"
    )
    corpus = _mimic(
        tmp_path / "corpus",
        {
            "utf8": report.encode("utf-8"),
            "win": report.encode("cp1252"),
            "latin": report.replace("œ", "oe").replace("’", "'").encode("latin-1"),
        },
    )
    rc, out, _ = _run(
        build_cli.main,
        [
            "--format",
            "mimic-cxr",
            "--input",
            str(corpus),
            "--output",
            str(tmp_path / "o"),
            "--image-size",
            "32",
            "--min-size",
            "32",
        ],
        capsys,
    )
    assert rc == 0 and "written   3 images" in out
    assert "2 report(s) were not UTF-8 and were decoded as cp1252" in out
    texts = sorted(s["txt"].decode("utf-8") for s in _samples(tmp_path / "o").values())
    assert all("\ufffd" not in t for t in texts)
    assert texts[-1] == "Cœur de taille normale. Épanchement pleural léger à gauche. Pas d’urgence."
    assert "Épanchement pleural léger" in texts[0]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert any("decoded as cp1252" in note for note in manifest["notes"])


def test_cp1252_iu_xml_is_decoded_with_a_note(tmp_path, capsys):
    root = tmp_path / "iu"
    (root / "ecgen-radiology").mkdir(parents=True)
    (root / "images").mkdir()
    _film(root / "images" / "CXR1_1_IM-0001-3001.png")
    xml = (
        '<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR1"/>'
        '<AbstractText Label="FINDINGS">Cœur normal, épanchement léger.</AbstractText>'
        '<parentImage id="CXR1_1_IM-0001-3001"/></eCitation>'
    )
    (root / "ecgen-radiology" / "1.xml").write_bytes(xml.encode("cp1252"))  # declared utf-8, saved as cp1252
    rc, out, _ = _run(
        build_cli.main,
        [
            "--format",
            "iu-xray",
            "--input",
            str(root),
            "--output",
            str(tmp_path / "o"),
            "--image-size",
            "32",
            "--min-size",
            "32",
        ],
        capsys,
    )
    assert rc == 0 and "decoded as cp1252" in out
    (sample,) = _samples(tmp_path / "o").values()
    assert sample["txt"].decode("utf-8") == "Cœur normal, épanchement léger."


# ------------------------------------------------------------------------------------------ tokenizer


def test_train_tokenizer_refuses_an_existing_folder_unless_overwrite(tmp_path, tmp_path_factory, capsys):
    from loader_testdata import shard_root

    from data_tools import train_tokenizer as tok_cli

    shards = str(shard_root(str(tmp_path_factory.getbasetemp())))
    out = tmp_path / "tok"
    argv = ["--shards", shards, "--out", str(out), "--vocab-size", "400", "--min-frequency", "1"]
    assert tok_cli.main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = tok_cli.main(argv)
    _, err = capsys.readouterr()
    assert rc == 2
    _one_error_line(err, str(out), "already holds a tokenizer", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    rc = tok_cli.main([*argv[:2], "--out", str(tmp_path / "notes"), *argv[4:]])
    _, err = capsys.readouterr()
    assert rc == 2 and (tmp_path / "notes" / "a.txt").read_text() == "mine"
    _one_error_line(err, "already holds files")
    rc = tok_cli.main([*argv[:2], "--out", str(tmp_path / "notes" / "a.txt" / "tok"), *argv[4:]])
    _, err = capsys.readouterr()
    assert rc == 2
    _one_error_line(err, "which is a file")
    assert tok_cli.main([*argv, "--overwrite"]) == 0
    assert (out / "tokenizer.json").is_file()
