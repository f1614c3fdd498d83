"""build_shards on the synthetic MIMIC-CXR-JPG corpus: round trip (webdataset and DALI), faults,
determinism across worker counts, splits, filters, the manifest source and bad invocations."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shards_testdata import IMAGE_SIZE, SHARD_SIZE, build_files, faults, read_shards, reference_build, synth_corpus

from data_tools.build_shards import BuildError, build_shards, main
from data_tools.shard_format import CHEXPERT_LABELS, parse_index
from data_tools.sources.common import hash_split
from data_tools.sources.report_text import extract_report_text

REPO = Path(__file__).resolve().parents[1]
# What each synth_corpus fault must become in rejects.jsonl.
FAULT_REASONS = {
    "truncated_jpeg": "corrupt_image",
    "empty_file": "empty_file",
    "not_an_image": "not_an_image",
    "empty_report": "empty_report",
    "report_without_images": "report_without_images",
    "image_without_report": "missing_report",
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return synth_corpus(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def ref(tmp_path_factory) -> tuple[Path, dict]:
    return reference_build(str(tmp_path_factory.getbasetemp()))


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(gzip.decompress(path.read_bytes()).decode())))


def _expected_samples(corpus: Path) -> dict[str, dict]:
    """What the shards must hold, computed from the corpus files and CSVs (fault inputs excluded)."""
    bad = {Path(f["path"]).stem for f in faults(corpus) if f["kind"] != "report_without_images"}
    bad |= {d for f in faults(corpus) if f["kind"] == "empty_report" for d in f["dicom_ids"]}
    split = {r["dicom_id"]: r["split"] for r in _csv_rows(corpus / "mimic-cxr-2.0.0-split.csv.gz")}
    meta = {r["dicom_id"]: r for r in _csv_rows(corpus / "mimic-cxr-2.0.0-metadata.csv.gz")}
    chex = {(r["subject_id"], r["study_id"]): r for r in _csv_rows(corpus / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    expected = {}
    for image in sorted((corpus / "files").rglob("*.jpg")):
        dicom_id, study, subject = image.stem, image.parent.name[1:], image.parent.parent.name[1:]
        if dicom_id in bad:
            continue
        row = chex[(subject, study)]
        expected[f"p{subject}_s{study}_{dicom_id}"] = {
            "text": extract_report_text(image.parent.with_suffix(".txt").read_text()),
            "labels": {n: None if row[n] == "" else int(float(row[n])) for n in CHEXPERT_LABELS},
            "split": split[dicom_id],
            "view": meta[dicom_id]["ViewPosition"],
            "size": (int(meta[dicom_id]["Columns"]), int(meta[dicom_id]["Rows"])),
        }
    return expected


def test_round_trip_with_webdataset(corpus, ref):
    import webdataset as wds

    out, summary = ref
    expected = _expected_samples(corpus)
    urls = [str(p) for p in sorted(out.glob("*/shard-*.tar"))]
    seen = Counter()
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        key = sample["__key__"]
        seen[key] += 1
        want = expected[key]
        meta = sample["json"]
        assert sample["txt"] == want["text"] and want["text"]
        assert "INDICATION" not in sample["txt"] and "FINAL REPORT" not in sample["txt"]
        assert meta["labels"] == want["labels"] and list(meta["labels"]) == list(CHEXPERT_LABELS)
        assert (meta["split"], meta["view"], meta["source"]) == (want["split"], want["view"], "mimic-cxr")
        assert (meta["width"], meta["height"]) == want["size"]
        img = sample["jpg"]
        w, h = want["size"]
        assert min(img.size) == IMAGE_SIZE and abs(img.size[1] / img.size[0] - h / w) < 0.02
        assert sample["__url__"].split("/")[-2] == meta["split"]
    assert set(seen) == set(expected) and set(seen.values()) == {1}
    assert summary["written"] == len(expected) and summary["splits"] == dict(
        Counter(e["split"] for e in expected.values())
    )
    assert all(summary["splits"][s] > 0 for s in ("train", "validate", "test"))


def test_round_trip_with_dali_using_the_idx_files(ref):
    from nvidia.dali import fn, pipeline_def, types

    out, _ = ref
    tars = [str(p) for p in sorted(out.glob("*/shard-*.tar"))]
    idxs = [t[:-4] + ".idx" for t in tars]
    by_key = read_shards(out)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpg, txt, meta = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "txt", "json"], missing_component_behavior="error",
            random_shuffle=False, name="reader",
        )  # fmt: skip
        return fn.decoders.image(jpg, device="cpu", output_type=types.GRAY), txt, meta

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    assert n == len(by_key)
    seen = Counter()
    while sum(seen.values()) < n:
        images, texts, metas = p.run()
        for i in range(len(images)):
            if sum(seen.values()) == n:
                break
            meta = json.loads(bytes(np.array(metas[i])))
            key = f"p{meta['subject_id']}_s{meta['study_id']}_{meta['image_id']}"
            seen[key] += 1
            assert bytes(np.array(texts[i])).decode() == by_key[key]["txt"].decode()
            h, w, c = np.array(images[i]).shape
            assert c == 1 and (w, h) == Image.open(io.BytesIO(by_key[key]["jpg"])).size
    assert set(seen) == set(by_key) and set(seen.values()) == {1}


def test_idx_files_are_byte_identical_to_dalis_wds2idx(ref, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    if shutil.which("tar") is None:
        pytest.skip("wds2idx needs GNU tar")
    out, _ = ref
    samples = {s["name"]: s["samples"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    for tar in sorted(out.glob("*/shard-*.tar")):
        theirs = tmp_path / (tar.stem + ".idx")
        with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        ours = tar.with_suffix(".idx").read_text()
        assert ours == theirs.read_text()
        assert len(parse_index(ours)) == samples[tar.relative_to(out).as_posix()]


def test_every_fault_lands_in_rejects_with_its_reason(corpus, ref):
    out, summary = ref
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_input = {r["input"]: r for r in rejects}
    by_image_id = {r["key"].rsplit("_", 1)[-1]: r for r in rejects if r["key"]}
    for fault in faults(corpus):
        # An empty report rejects the images of its study; every other fault is the file itself.
        row = by_image_id[fault["dicom_ids"][0]] if fault["kind"] == "empty_report" else by_input[fault["path"]]
        assert row["reason"] == FAULT_REASONS[fault["kind"]], fault
        assert row["kind"] == ("report" if fault["kind"] == "report_without_images" else "image")
    images_on_disk = [p for p in (corpus / "files").rglob("*") if p.suffix == ".jpg"]
    image_rejects = [r for r in rejects if r["kind"] == "image"]
    assert summary["written"] + summary["rejected"] == len(images_on_disk) == summary["inputs"]
    assert summary["rejected"] == len(image_rejects) == 5  # the empty report's study has one image
    # Nothing is in two places: rejected inputs are not in the shards.
    assert not {r["key"] for r in image_rejects} & set(read_shards(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"] == dict(Counter(r["reason"] for r in rejects))
    assert manifest["counts"] == summary["splits"] and manifest["written"] == summary["written"]
    assert [s["samples"] for s in manifest["shards"]] and all(
        0 < s["samples"] <= SHARD_SIZE for s in manifest["shards"]
    )


def test_default_views_reject_laterals(corpus, tmp_path):
    summary = build_shards("mimic-cxr", corpus, tmp_path / "pa", image_size=64, progress=False)
    views = Counter(r["ViewPosition"] for r in _csv_rows(corpus / "mimic-cxr-2.0.0-metadata.csv.gz"))
    rejects = [json.loads(line) for line in (tmp_path / "pa" / "rejects.jsonl").read_text().splitlines()]
    filtered = [r for r in rejects if r["reason"] == "view_filtered"]
    # The truncated fault file is a LATERAL film: the view filter (metadata) rejects it before decoding.
    assert len(filtered) == views["LATERAL"] and all("LATERAL" in r["detail"] for r in filtered)
    assert summary["written"] + summary["rejected"] == summary["inputs"]
    for sample in read_shards(tmp_path / "pa").values():
        assert json.loads(sample["json"])["view"] in ("PA", "AP")


def test_one_and_two_workers_give_identical_builds(corpus, ref, tmp_path):
    out, _ = ref
    summary = build_shards(
        "mimic-cxr", corpus, tmp_path / "w2", shard_size=SHARD_SIZE, image_size=IMAGE_SIZE, workers=2, views=None,
        progress=False,
    )  # fmt: skip
    assert summary["status"] == "built"
    assert build_files(tmp_path / "w2") == build_files(out)


def test_rerun_of_a_finished_build_changes_nothing(corpus, ref):
    out, _ = ref
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    summary = build_shards(
        "mimic-cxr",
        corpus,
        out,
        shard_size=SHARD_SIZE,
        image_size=IMAGE_SIZE,
        workers=1,
        views=None,
        progress=False,
    )
    assert summary["status"] == "already_complete" and summary["written"] > 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_hash_split_keeps_each_patient_in_one_split(corpus, tmp_path):
    no_split = tmp_path / "corpus"
    shutil.copytree(corpus, no_split, symlinks=True)
    (no_split / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    build_shards("mimic-cxr", no_split, tmp_path / "out", image_size=64, views=None, val_fraction=0.3,
                 test_fraction=0.3, progress=False)  # fmt: skip
    splits_of: dict[str, set] = {}
    for sample in read_shards(tmp_path / "out").values():
        meta = json.loads(sample["json"])
        splits_of.setdefault(meta["subject_id"], set()).add(meta["split"])
        assert meta["split"] == hash_split(meta["subject_id"], 0.3, 0.3)
    assert all(len(s) == 1 for s in splits_of.values()) and len(splits_of) >= 3
    assert len({next(iter(s)) for s in splits_of.values()}) >= 2
    shares = Counter(hash_split(str(i), 0.05, 0.05) for i in range(20000))
    assert abs(shares["test"] / 20000 - 0.05) < 0.01 and abs(shares["validate"] / 20000 - 0.05) < 0.01


def test_manifest_source_csv_and_jsonl(corpus, tmp_path):
    images = sorted(p for p in (corpus / "files").rglob("*.jpg") if p.stat().st_size > 10_000)[:4]
    rows = [
        {"image": str(images[0]), "caption": "Chest film with a  right  pleural effusion.", "split": "val"},
        {"image": str(images[1]), "caption": "Normal chest radiograph.", "labels": json.dumps({"No Finding": 1})},
        {"image": "missing/nowhere.png", "caption": "An image that is not there."},
        {"image": str(images[2]), "caption": "Too short"},
        {"image": str(images[3]), "caption": "FINDINGS: Lungs clear.\n\nIMPRESSION: Nothing acute today.",
         "Cardiomegaly": "-1.0"},
    ]  # fmt: skip
    csv_path = tmp_path / "m.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "split", "labels", "Cardiomegaly"])
        writer.writeheader()
        writer.writerows(rows)
    jsonl_path = tmp_path / "m.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for src in (csv_path, jsonl_path):
        out = tmp_path / f"out-{src.suffix[1:]}"
        summary = build_shards("manifest", src, out, image_size=64, views=None, progress=False)
        assert (summary["written"], summary["rejected"]) == (3, 2)
        assert summary["rejects"] == {"missing_image": 1, "report_too_short": 1}
        samples = {json.loads(s["json"])["image_id"]: s for s in read_shards(out).values()}
        first = samples[images[0].stem]
        assert first["txt"] == b"Chest film with a right pleural effusion."
        assert json.loads(first["json"])["split"] == "validate"
        assert json.loads(samples[images[1].stem]["json"])["labels"]["No Finding"] == 1
        last = json.loads(samples[images[3].stem]["json"])
        assert samples[images[3].stem]["txt"] == b"Lungs clear. Nothing acute today."
        assert last["labels"]["Cardiomegaly"] == -1 and last["labels"]["Edema"] is None
        results.append(read_shards(out))
    assert results[0] == results[1]


def test_bad_invocations_fail_with_one_clear_line(corpus, ref, tmp_path, capsys):
    out, _ = ref
    cases = [
        (["--format", "mimic-cxr", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")], "does not exist"),
        (["--format", "dicom-zip", "--input", str(corpus), "--output", str(tmp_path / "o2")], "unknown --format"),
        (["--format", "iu-xray", "--input", str(corpus), "--output", str(tmp_path / "o3")], "no report XML"),
        (["--format", "mimic-cxr", "--input", str(corpus), "--output", str(out), "--views", "all",
          "--shard-size", str(SHARD_SIZE), "--image-size", "128"], "image_size: 96 there vs 128 now"),
        (["--format", "mimic-cxr", "--input", str(corpus), "--output", str(corpus)], "lies inside --input"),
    ]  # fmt: skip
    before = build_files(out)
    for argv, message in cases:
        assert main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and err.startswith("build_shards: error:"), err
    assert build_files(out) == before  # the finished build was not touched
    with pytest.raises(BuildError, match="--shard-size"):
        build_shards("mimic-cxr", corpus, tmp_path / "o4", shard_size=0)
    # The real CLI: exit status and stderr of a separate process.
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools.build_shards", "--format", "manifest", "--input", str(tmp_path / "x.csv"),
         "--output", str(tmp_path / "o5")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert not (tmp_path / "o5").exists()


def test_image_size_and_aspect_filters_and_sections_option(tmp_path):
    shapes = {"ok": (120, 100), "small": (40, 50), "wide": (400, 100), "rgb16": (90, 80)}
    rows = []
    for name, (w, h) in shapes.items():
        if name == "rgb16":  # a 16-bit grayscale PNG: windowed down to 8 bits, not clipped
            ramp = np.tile(np.linspace(0, 60000, w), (h, 1)).astype(np.uint16)
            Image.fromarray(ramp).save(tmp_path / f"{name}.png")
        else:
            Image.new("RGB", (w, h), (200, 100, 50)).save(tmp_path / f"{name}.png")
        rows.append(
            {"image": f"{name}.png", "text": "FINDINGS: Clear lungs today.\nIMPRESSION: Normal chest film."}
        )
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = build_shards(
        "manifest", manifest, tmp_path / "out", image_size=32, min_size=64, max_aspect=3.0,
        sections=["impression"], progress=False,
    )  # fmt: skip
    assert summary["rejects"] == {"bad_aspect": 1, "image_too_small": 1} and summary["written"] == 2
    samples = {json.loads(s["json"])["image_id"]: s for s in read_shards(tmp_path / "out").values()}
    assert samples["ok"]["txt"] == b"Normal chest film."
    ok = Image.open(io.BytesIO(samples["ok"]["jpg"]))
    assert ok.mode == "L" and ok.size == (38, 32) and abs(np.asarray(ok).mean() - 124) < 3  # RGB -> luminance
    ramp = np.asarray(Image.open(io.BytesIO(samples["rgb16"]["jpg"])), dtype=float)
    assert ramp[:, :3].mean() < 20 and ramp[:, -3:].mean() > 235  # full 8-bit range used
    with pytest.raises(BuildError, match="unknown --sections"):
        build_shards("manifest", manifest, tmp_path / "o2", sections=["findngs"], progress=False)
