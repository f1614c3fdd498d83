"""DICOM chest radiographs -> correctly displayed 8-bit grayscale pixels (SPEC §4.1).

What is accepted (checked on the header, before any pixel is decoded): by default only projection
radiographs — `Modality` CR, DX or DR (or, without a `Modality` tag, a CR / DX SOP class); a
`BodyPartExamined` tag, where present, must name the chest; one frame, one grayscale sample per pixel.
CT, MR, ultrasound, nuclear medicine, segmentations, secondary captures (screenshots, test patterns)
and limb films are rejected with the reason (`modality_filtered`, `modality_unknown`,
`body_part_filtered`, `multi_frame`, `not_grayscale`). `DicomPolicy` (the build's `--modalities` /
`--body-parts`) widens this.

pydicom decodes the pixel data (uncompressed, RLE natively; JPEG baseline / extended / lossless through
pylibjpeg-libjpeg — JPEG Lossless is the usual CR/DX export —, JPEG 2000 through pylibjpeg-openjpeg, JPEG-LS
through pyjpegls, where installed). Then, in the order of the DICOM grayscale pipeline:

1. Modality LUT: `RescaleSlope` / `RescaleIntercept` (or a Modality LUT Sequence).
2. VOI: a VOI LUT Sequence when present, else `WindowCenter` / `WindowWidth` (DICOM's linear
   formula, PS3.3 C.11.2.1.2), else a robust min/max window (0.5 / 99.5 percentiles) over the data.
3. Presentation: `MONOCHROME1` (and `PresentationLUTShape == "INVERSE"`) is inverted so that air is
   dark and bone is bright, as for `MONOCHROME2`.
4. Rounded to 8 bits.

A compressed transfer syntax without an installed codec, or an unreadable file, raises
`ImageRejected` with a reason code for `rejects.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.sources.common import ImageRejected

PROJECTION_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR")
"""DICOM `Modality` values of projection radiographs (DR is a common vendor spelling of DX)."""
CHEST_BODY_PARTS: tuple[str, ...] = ("CHEST", "THORAX", "LUNG")
"""A `BodyPartExamined` value that contains one of these names the chest (`CHEST`, `PORT CHEST`, ...)."""
# SOP classes that are projection radiographs, for files without a Modality tag.
_RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Processing
}


@dataclass(frozen=True)
class DicomPolicy:
    """Which DICOM images a build accepts (both part of the build's identity)."""

    modalities: tuple[str, ...] | None = PROJECTION_MODALITIES
    """Accepted `Modality` values; `None` accepts any modality (and colour images, as luminance)."""
    body_parts: tuple[str, ...] | None = CHEST_BODY_PARTS
    """Names one of which a present `BodyPartExamined` must contain; `None` skips the check."""


def check_dicom_header(ds, policy: DicomPolicy) -> None:
    """Refuse what is not a single-frame chest projection radiograph under `policy`.

    Raises:
        ImageRejected: `modality_filtered`, `modality_unknown`, `body_part_filtered`, `multi_frame` or
        `not_grayscale`, the detail naming the tag and its value.
    """
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", None) or str(sop or "no SOP class")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if policy.modalities is not None:
        wanted = ",".join(policy.modalities)
        if not modality:
            modality = _RADIOGRAPH_SOP_CLASSES.get(str(sop or ""), "")
            if not modality:
                raise ImageRejected(
                    "modality_unknown",
                    f"no Modality tag and SOP class '{sop_name}' is not a radiograph's; "
                    "--modalities all accepts it",
                )
        if modality not in policy.modalities:
            raise ImageRejected(
                "modality_filtered",
                f"Modality {modality} ({sop_name}) is not in --modalities {wanted}",
            )
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if policy.body_parts is not None and body_part and not any(p in body_part for p in policy.body_parts):
        raise ImageRejected(
            "body_part_filtered",
            f"BodyPartExamined {body_part} is not one of --body-parts {','.join(policy.body_parts)}",
        )
    frames = ds.get("NumberOfFrames")
    try:
        frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise ImageRejected("multi_frame", f"{frames} frames ({sop_name}); a radiograph is one frame")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if policy.modalities is not None and samples != 1:
        photometric = ds.get("PhotometricInterpretation", "?")
        raise ImageRejected(
            "not_grayscale", f"{samples} samples per pixel ({photometric}); a radiograph is grayscale"
        )


def _voi_window(arr: np.ndarray, ds) -> np.ndarray:  # (H, W) float64 -> (H, W) in [0, 1]
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        # Looked up here rather than with pydicom's apply_voi_lut, whose index array takes the LUT's
        # output dtype (uint8 for 8-bit LUTs) and wraps inputs above 255.
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 65536
        data = item.LUTData
        lut = np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data)
        lut = lut[:entries].astype(np.float64)
        idx = np.clip(np.rint(arr) - first, 0, len(lut) - 1).astype(np.int64)
        return np.clip(lut[idx] / float(2**bits - 1), 0.0, 1.0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        # Multi-valued windows: the first one is the default presentation.
        c = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        w = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        if w >= 1.0:
            return np.clip((arr - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    lo, hi = np.percentile(arr, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def read_dicom(path: str | Path, policy: DicomPolicy | None = DicomPolicy()) -> tuple[np.ndarray, dict]:
    """Read a DICOM image as display-ready 8-bit grayscale.

    Args:
        path: the DICOM file.
        policy: what is accepted (`check_dicom_header`); `None` decodes any image (first frame only).

    Returns:
        `(pixels, info)`: pixels `(H, W)` uint8 (air dark, bone bright); info holds
        `view` (the `ViewPosition` tag or None), `width`, `height` (original), `transfer_syntax`.

    Raises:
        ImageRejected: reason `empty_file`, `dicom_no_codec` (compressed, no codec installed),
        `corrupt_dicom` (unreadable header or pixel data), `not_an_image` (no pixel data), or a
        `check_dicom_header` reason.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageRejected("empty_file", f"{path.name} is 0 bytes")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageRejected("corrupt_dicom", f"pydicom cannot read the file: {exc}") from None
    if "PixelData" not in ds:
        raise ImageRejected("not_an_image", "DICOM file has no PixelData")
    if policy is not None:
        check_dicom_header(ds, policy)
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    syntax_name = getattr(syntax, "name", str(syntax))
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if (
            syntax is not None
            and getattr(syntax, "is_compressed", False)
            and (
                isinstance(exc, (NotImplementedError, ImportError))
                or any(
                    word in msg.lower() for word in ("handler", "plugin", "decoder", "install", "not supported")
                )
            )
        ):
            raise ImageRejected(
                "dicom_no_codec",
                f"no installed codec decodes transfer syntax '{syntax_name}' "
                "(pylibjpeg-libjpeg decodes JPEG, pylibjpeg-openjpeg JPEG 2000, pyjpegls JPEG-LS)",
            ) from None
        raise ImageRejected("corrupt_dicom", f"pixel data of '{syntax_name}' did not decode: {msg}") from None
    except Exception as exc:  # a damaged pixel stream raises codec-specific errors
        raise ImageRejected("corrupt_dicom", f"pixel data of '{syntax_name}' did not decode: {exc}") from None

    if arr.ndim == 4 or (arr.ndim == 3 and int(ds.get("NumberOfFrames", 1) or 1) > 1):
        arr = arr[0]  # multi-frame: the first frame
    if arr.ndim == 3:  # colour (H, W, 3) -> luminance
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    else:
        arr = apply_modality_lut(arr, ds).astype(np.float64)
    out = _voi_window(arr, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        out = 1.0 - out
    pixels = np.rint(out * 255.0).astype(np.uint8)  # (H, W)
    view = ds.get("ViewPosition")
    info = {
        "view": (str(view).strip().upper() or None) if view is not None else None,
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "transfer_syntax": syntax_name,
    }
    return pixels, info
