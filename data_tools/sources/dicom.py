"""DICOM chest radiographs -> correctly displayed 8-bit grayscale pixels (SPEC §4.1).

pydicom decodes the pixel data (uncompressed, RLE natively; JPEG / JPEG 2000 through pylibjpeg and
pylibjpeg-openjpeg when installed). Then, in the order of the DICOM grayscale pipeline:

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

from pathlib import Path

import numpy as np

from data_tools.sources.common import ImageRejected


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


def read_dicom(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a DICOM image as display-ready 8-bit grayscale.

    Returns:
        `(pixels, info)`: pixels `(H, W)` uint8 (air dark, bone bright); info holds
        `view` (the `ViewPosition` tag or None), `width`, `height` (original), `transfer_syntax`.

    Raises:
        ImageRejected: reason `empty_file`, `dicom_no_codec` (compressed, no codec installed),
        `corrupt_dicom` (unreadable header or pixel data) or `not_an_image` (no pixel data).
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
                "handler" in msg.lower()
                or "plugin" in msg.lower()
                or "decoder" in msg.lower()
                or "install" in msg.lower()
            )
        ):
            raise ImageRejected(
                "dicom_no_codec",
                f"no installed codec decodes transfer syntax '{syntax_name}' "
                "(install pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg or pyjpegls)",
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
