"""One source image (JPEG, PNG, DICOM) -> the shard's 8-bit grayscale baseline JPEG (SPEC §4.2).

This is the per-image work of `build_shards`, run inside the worker processes so that only the
encoded bytes travel back to the process that writes the tar files.

Speed: for JPEG sources Pillow's `draft()` asks libjpeg to decode straight at 1/2, 1/4 or 1/8 scale
(DCT scaling) when the target is at most half the stored size, which makes decoding a 2,500 px
MIMIC-CXR-JPG image several times cheaper; the remaining resize is bicubic. The bytes are a pure
function of the input file and the options, so builds are deterministic.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_tools.sources.common import ImageRejected
from data_tools.sources.dicom import CHEST_BODY_PARTS, PROJECTION_MODALITIES, DicomPolicy, read_dicom

DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class ImageOptions:
    """How source images become shard images (all part of the build's identity)."""

    image_size: int = 512
    """Shorter side of the stored JPEG, in pixels (aspect kept)."""
    jpeg_quality: int = 90
    """Pillow JPEG quality of the stored image."""
    min_size: int = 64
    """Reject images whose shorter original side is below this (pixels)."""
    max_aspect: float = 3.0
    """Reject images whose long/short side ratio is above this."""
    modalities: tuple[str, ...] | None = PROJECTION_MODALITIES
    """DICOM only: accepted `Modality` values (`None`: any); see `data_tools.sources.dicom`."""
    body_parts: tuple[str, ...] | None = CHEST_BODY_PARTS
    """DICOM only: a present `BodyPartExamined` must contain one of these (`None`: no check)."""


@dataclass
class EncodedImage:
    jpeg: bytes
    width: int
    """Original width, before resizing."""
    height: int
    """Original height, before resizing."""
    view: str | None = None
    """The view stored in the file itself (DICOM `ViewPosition`), if any."""


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """`(w, h)` with the shorter side equal to `short_side` and the aspect ratio kept."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _check_geometry(width: int, height: int, opts: ImageOptions) -> None:
    if min(width, height) < opts.min_size:
        raise ImageRejected(
            "image_too_small", f"{width}x{height} px, shorter side below --min-size {opts.min_size}"
        )
    if max(width, height) / max(1, min(width, height)) > opts.max_aspect:
        raise ImageRejected("bad_aspect", f"{width}x{height} px, aspect above --max-aspect {opts.max_aspect}")


def _to_gray(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit "L"; high-bit-depth data is windowed over its 0.5-99.5 % range."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        lo, hi = np.percentile(arr, (0.5, 99.5))
        hi = hi if hi > lo else lo + 1.0
        return Image.fromarray(np.rint(np.clip((arr - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img
    return img.convert("L")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def encode_image(path: str | Path, opts: ImageOptions) -> EncodedImage:
    """Decode `path`, check its size and aspect, resize and encode it as the shard JPEG.

    Raises:
        ImageRejected: `missing_image`, `empty_file`, `not_an_image`, `corrupt_image`,
        `image_too_small`, `bad_aspect`, or a DICOM reason from `data_tools.sources.dicom.read_dicom`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageRejected("missing_image", f"{path} does not exist") from None
    if size == 0:
        raise ImageRejected("empty_file", f"{path.name} is 0 bytes")

    view = None
    if _is_dicom(path):
        pixels, info = read_dicom(path, DicomPolicy(opts.modalities, opts.body_parts))
        width, height, view = info["width"], info["height"], info["view"]
        _check_geometry(width, height, opts)
        img = Image.fromarray(pixels, "L")
    else:
        try:
            img = Image.open(path)
            width, height = img.size
            _check_geometry(width, height, opts)
            if img.format == "JPEG":
                # libjpeg DCT scaling: decodes at the smallest 1/k scale still >= the target size.
                img.draft("L", target_size(width, height, opts.image_size))
            img.load()
            img = _to_gray(img)
        except ImageRejected:
            raise
        except UnidentifiedImageError:
            raise ImageRejected("not_an_image", f"{path.name} is not an image Pillow can read") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageRejected("corrupt_image", f"{path.name} did not decode: {exc}") from None

    tw, th = target_size(width, height, opts.image_size)
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.jpeg_quality, optimize=False, progressive=False)
    return EncodedImage(jpeg=buf.getvalue(), width=width, height=height, view=view)
