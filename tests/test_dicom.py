"""DICOM input: the real pydicom-data chest radiograph, compressed syntaxes, rescale and VOI handling."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

from data_tools.build_shards import build_shards
from data_tools.sources.common import ImageRejected
from data_tools.sources.dicom import read_dicom

UNCR = get_testdata_file("RG1_UNCR.dcm")  # real PA chest CR, MONOCHROME1, 15 bits stored, window 15000/30000
J2KR = get_testdata_file("RG1_J2KR.dcm")  # the same image, JPEG 2000 lossless
JPEG_LL = get_testdata_file("JPEG-LL.dcm")  # JPEG Lossless SV1 (the usual CR/DX export), NM whole body
HAS_J2K = importlib.util.find_spec("openjpeg") is not None
HAS_JLS = importlib.util.find_spec("jpeg_ls") is not None
HAS_LIBJPEG = importlib.util.find_spec("libjpeg") is not None
REPORT = "FINAL REPORT\n\nFINDINGS: Heart size is normal. Lungs are clear.\n\nIMPRESSION: No acute process.\n"


def _mimic_tree(root: Path, images: dict[str, str]) -> Path:
    """A MIMIC-style tree with one study per image; the DICOM files are copied in (a link leading outside the
    input tree is refused by build_shards)."""
    for n, (dicom_id, source) in enumerate(sorted(images.items())):
        subject, study = 10000001 + n, 50000001 + n
        study_dir = root / "files" / "p10" / f"p{subject}" / f"s{study}"
        study_dir.mkdir(parents=True)
        shutil.copyfile(source, study_dir / f"{dicom_id}.dcm")
        (study_dir.parent / f"s{study}.txt").write_text(REPORT)
    return root


def _no_codec_copy(path: Path) -> Path:
    """RG1 with an MPEG-2 transfer syntax: compressed, and no installed codec decodes it."""
    ds = pydicom.dcmread(UNCR)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(96)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def dicom_build(tmp_path_factory):
    base = tmp_path_factory.mktemp("dicom")
    images = {"uncr": UNCR, "j2kr": J2KR, "mpeg": str(_no_codec_copy(base / "mpeg.dcm"))}
    if HAS_JLS:  # the same film, JPEG-LS lossless
        ds = pydicom.dcmread(UNCR)
        ds.compress(JPEGLSLossless)
        ds.save_as(base / "jls.dcm")
        images["jls"] = str(base / "jls.dcm")
    corpus = _mimic_tree(base / "corpus", images)
    out = base / "shards"
    summary = build_shards("mimic-cxr", corpus, out, image_size=128, shard_size=10, progress=False)
    samples = {}
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key.rsplit("_", 1)[-1], {})[ext] = tar.extractfile(m).read()
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return summary, samples, rejects


def test_real_monochrome1_radiograph_is_displayed_correctly(dicom_build):
    _, samples, _ = dicom_build
    sample = samples["uncr"]
    img = Image.open(io.BytesIO(sample["jpg"]))
    assert img.format == "JPEG" and img.mode == "L" and min(img.size) == 128
    px = np.asarray(img, dtype=np.float64)  # (H, W)
    h, w = px.shape
    centre = px[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()  # mediastinum and spine: bright
    top_corners = [px[: h // 10, : w // 10].mean(), px[: h // 10, -w // 10 :].mean()]  # air: dark
    assert centre > 150 and all(c < 110 for c in top_corners), (centre, top_corners)
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"]) == (1841, 1955)
    assert meta["view"] == "PA"  # from the DICOM header: this tree has no metadata CSV


def test_pixels_follow_the_dicom_window_and_inversion():
    pixels, info = read_dicom(UNCR)
    raw = pydicom.dcmread(UNCR).pixel_array.astype(np.float64)
    # Linear VOI window (PS3.3 C.11.2.1.2), centre 15000 width 30000, then MONOCHROME1 inverted.
    expected = 1.0 - np.clip((raw - 14999.5) / 29999.0 + 0.5, 0.0, 1.0)
    assert np.array_equal(pixels, np.rint(expected * 255).astype(np.uint8))
    assert info["transfer_syntax"] == "Explicit VR Little Endian"


@pytest.mark.skipif(not HAS_J2K, reason="pylibjpeg-openjpeg is not installed")
def test_jpeg2000_gives_the_same_pixels_and_shard_bytes(dicom_build):
    _, samples, _ = dicom_build
    uncr, _ = read_dicom(UNCR)
    j2k, info = read_dicom(J2KR)
    assert "JPEG 2000" in info["transfer_syntax"]
    assert np.array_equal(uncr, j2k)
    assert samples["j2kr"]["jpg"] == samples["uncr"]["jpg"]


@pytest.mark.skipif(not HAS_JLS, reason="pyjpegls is not installed")
def test_jpeg_ls_gives_the_same_shard_bytes(dicom_build):
    _, samples, _ = dicom_build
    assert samples["jls"]["jpg"] == samples["uncr"]["jpg"]


def test_compressed_syntax_without_codec_is_rejected_with_reason(dicom_build):
    summary, samples, rejects = dicom_build
    assert "mpeg" not in samples
    (row,) = [r for r in rejects if r["input"].endswith("mpeg.dcm")]
    assert row["reason"] == "dicom_no_codec" and "MPEG2" in row["detail"]
    assert summary["written"] == 2 + HAS_JLS and summary["rejected"] == 1
    assert summary["rejects"] == {"dicom_no_codec": 1}


@pytest.mark.skipif(not HAS_LIBJPEG, reason="pylibjpeg-libjpeg is not installed")
def test_jpeg_lossless_radiograph_decodes(tmp_path):
    # pydicom-data's JPEG Lossless file is a nuclear-medicine capture: the same pixel stream with CR chest
    # tags stands for a CR exported as JPEG Lossless, the usual CR/DX export.
    ds = pydicom.dcmread(JPEG_LL)
    ds.Modality, ds.BodyPartExamined, ds.SOPClassUID = "CR", "CHEST", ComputedRadiographyImageStorage
    ds.save_as(tmp_path / "cr_jpeg_ll.dcm")
    raw = pydicom.dcmread(JPEG_LL).pixel_array  # (1024, 256) int16, decoded by libjpeg
    pixels, info = read_dicom(tmp_path / "cr_jpeg_ll.dcm")
    assert "JPEG Lossless" in info["transfer_syntax"] and pixels.shape == raw.shape == (1024, 256)
    assert np.corrcoef(pixels.ravel(), raw.ravel().astype(np.float64))[0, 1] > 0.9  # the window is monotone
    corpus = _mimic_tree(tmp_path / "corpus", {"jll": str(tmp_path / "cr_jpeg_ll.dcm")})
    summary = build_shards("mimic-cxr", corpus, tmp_path / "out", image_size=64, max_aspect=5, progress=False)
    assert summary["written"] == 1 and summary["rejects"] == {}


def _write_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rescale_slope_intercept_then_window(tmp_path):
    stored = np.array([[0, 250, 500], [750, 1000, 4095]], dtype=np.uint16)  # (2, 3)
    path = _write_dicom(
        tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=1001
    )
    pixels, _ = read_dicom(path)
    hu = stored.astype(np.float64) * 2 - 1000  # -1000, -500, 0, 500, 1000, 7190
    expected = np.rint(np.clip((hu + 0.5) / 1000.0 + 0.5, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(pixels, expected)
    assert pixels[0, 0] == 0 and pixels[0, 2] == 128 and pixels[1, 1] == 255


def test_voi_lut_sequence_and_no_window_fallback(tmp_path):
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 8])  # LUT Descriptor: 4096 entries, first input 0, 8-bit output
    lut.add_new(0x00283006, "US", [min(255, v // 8) for v in range(4096)])  # LUT Data, saturates at 2040
    stored = np.array([[0, 800, 1600], [2040, 3000, 4095]], dtype=np.uint16)
    pixels, _ = read_dicom(_write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[lut]))
    assert pixels.tolist() == [[0, 100, 200], [255, 255, 255]]
    # No window at all: a robust min/max window over the data, MONOCHROME2 kept (dark stays dark).
    ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (4, 1))  # (4, 100)
    plain, _ = read_dicom(_write_dicom(tmp_path / "plain.dcm", ramp))
    assert plain[0, 0] == 0 and plain[0, -1] == 255 and np.all(np.diff(plain[0].astype(int)) >= 0)


def test_unreadable_dicoms_raise_reasons(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    whole = _write_dicom(tmp_path / "whole.dcm", np.full((64, 64), 100, dtype=np.uint16)).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(whole[: len(whole) - 3000])  # pixel data cut short
    no_pixels = tmp_path / "no_pixels.dcm"
    ds = pydicom.dcmread(tmp_path / "whole.dcm")
    del ds.PixelData
    ds.save_as(no_pixels)
    cases = ((empty, "empty_file"), (truncated, "corrupt_dicom"), (no_pixels, "not_an_image"))
    for path, reason in cases:
        with pytest.raises(ImageRejected) as err:
            read_dicom(path)
        assert err.value.reason == reason


def test_view_from_the_dicom_header_is_filtered(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (100, 1))  # (100, 100)
    lateral = _write_dicom(tmp_path / "lat.dcm", ramp, ViewPosition="LL")
    frontal = _write_dicom(tmp_path / "ap.dcm", ramp, ViewPosition="AP")
    corpus = _mimic_tree(tmp_path / "corpus", {"lat": str(lateral), "ap": str(frontal)})
    summary = build_shards("mimic-cxr", corpus, tmp_path / "out", image_size=64, progress=False)
    assert summary["written"] == 1 and summary["rejects"] == {"view_filtered": 1}
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert row["input"].endswith("lat.dcm") and "LL (DICOM header)" in row["detail"]


def test_whole_pydicom_data_folder_writes_only_chest_films(tmp_path):
    """Every file of pydicom-data, each as one MIMIC study: only the chest CR films go into shards.

    The folder holds CT, MR, ultrasound, nuclear medicine, segmentations, secondary captures (colour
    screenshots, LUT test patterns), multi-frame sets, a limb CR (`RG3_*`, BodyPartExamined EXTREMITY)
    and four encodings of one PA chest CR (`RG1_*`).
    """
    folder = Path(UNCR).parent
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".dcm")
    assert len(files) >= 60
    corpus = _mimic_tree(tmp_path / "corpus", {p.stem.replace("-", "_").replace(".", "_"): str(p) for p in files})
    out = tmp_path / "out"
    summary = build_shards("mimic-cxr", corpus, out, image_size=64, progress=False)
    written = set()
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            written |= {m.name.split(".", 1)[0].split("_", 2)[-1] for m in tar}
    expected = {"RG1_UNCR", "RG1_UNCI"} | ({"RG1_J2KR", "RG1_J2KI"} if HAS_J2K else set())
    assert written == expected
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    rejected = {Path(r["input"]).name for r in rejects}
    assert len(rejects) == len(rejected) == len(files) - len(expected) == summary["rejected"]
    assert rejected == {f"{p.stem.replace('-', '_').replace('.', '_')}.dcm" for p in files} - {
        f"{name}.dcm" for name in expected
    }
    assert all(r["reason"] and r["detail"] for r in rejects)
    by_name = {Path(r["input"]).stem: r for r in rejects}
    assert by_name["RG3_UNCR"]["reason"] == "body_part_filtered" and "EXTREMITY" in by_name["RG3_UNCR"]["detail"]
    assert by_name["693_UNCR"]["reason"] == "modality_filtered" and "Modality CT" in by_name["693_UNCR"]["detail"]
    assert by_name["liver"]["reason"] == "modality_filtered" and "SEG" in by_name["liver"]["detail"]
    assert by_name["vlut_04"]["reason"] == "modality_filtered"  # a LUT test pattern (OT)
    assert {"modality_filtered", "body_part_filtered"} <= set(summary["rejects"])
    # Widened: any modality, any body part; multi-frame sets are still refused.
    wide = build_shards(
        "mimic-cxr", corpus, tmp_path / "wide", image_size=64, modalities=None, body_parts=None, progress=False
    )
    assert wide["written"] > summary["written"] and "multi_frame" in wide["rejects"]
