"""The user's films: files, folders and globs of JPG / PNG / DICOM -> display-ready 8-bit grayscale images.

Decoding is `build_shards`'s own (`data_tools.sources.images.encode_image`): DICOM through
`data_tools.sources.dicom.read_dicom` (MONOCHROME1 inverted, rescale slope / intercept, VOI LUT or window,
more than 8 bits scaled to 8; CT, MR, multi-frame and other non-chest or non-projection images refused with the
reason), JPEG / PNG through Pillow, the same size and aspect limits, and the same 8-bit baseline JPEG at the
same shorter side (512 px by default) as a shard holds. The model thus sees a user's film exactly as it saw a
film of its training shards; a file that cannot be read is an `ImageRejected` with the build's reason code
(``corrupt_image``, ``not_an_image``, ``modality_filtered`` ...), reported and skipped by the caller.
"""

from __future__ import annotations

import glob
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data_tools.sources.dicom import CHEST_BODY_PARTS, PROJECTION_MODALITIES
from data_tools.sources.images import ImageOptions, encode_image

DISPLAY_SIZE = 512
"""Shorter side of the decoded film (pixels): the shard's default `--image-size`, so a film reaches the model
through the same resize chain as the training films did."""

_SLUG = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass
class Film:
    """One decoded input film."""

    path: Path
    key: str
    """A file-system-safe id, unique per input path (the stem and a short hash of the full path)."""
    image: Image.Image
    """8-bit grayscale ("L"), shorter side `DISPLAY_SIZE` (or the original's when smaller), aspect kept."""
    width: int
    """Original width in pixels."""
    height: int
    """Original height in pixels."""
    view: str | None = None
    """DICOM ``ViewPosition`` when the file has one."""


def film_key(path: str | Path) -> str:
    """``<stem>-<8 hex>``: readable, and distinct for two ``image.dcm`` in different folders."""
    path = Path(path)
    digest = hashlib.sha1(str(path.resolve()).encode("utf-8")).hexdigest()[:8]
    stem = _SLUG.sub("_", path.stem).strip("_")[:48] or "film"
    return f"{stem}-{digest}"


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (searched recursively for image suffixes) and globs -> ``(files, problems)``.

    Every file is taken whatever its suffix (DICOM files often have none), hidden files (``.name``) of a folder
    excepted: a file that is no film is then reported with its reason, never dropped silently. Each path
    appears once, in the order given (folders sorted). ``problems``: ``(input, why)`` for an input that matched
    nothing.
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            files.append(path)

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_file():
            add(path)
        elif path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(p.relative_to(path))]
            if not found:
                problems.append((text, "the folder holds no file"))
            for p in found:
                add(p)
        elif glob.has_magic(text):
            found = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
            if not found:
                problems.append((text, "the pattern matches no file"))
            for p in found:
                add(p)
        else:
            problems.append((text, "no such file or folder"))
    return files, problems


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


@dataclass(frozen=True)
class DecodeRules:
    """What `load_film` accepts: `build_shards`' defaults (``--min-size``, ``--max-aspect``, ``--modalities``,
    ``--body-parts``)."""

    min_size: int = 64
    max_aspect: float = 3.0
    modalities: tuple[str, ...] | None = PROJECTION_MODALITIES
    """Accepted DICOM `Modality` values (None: any)."""
    body_parts: tuple[str, ...] | None = CHEST_BODY_PARTS
    """A present DICOM `BodyPartExamined` must contain one of these (None: no check)."""


def load_film(path: str | Path, rules: DecodeRules = DecodeRules(), *, display_size: int = DISPLAY_SIZE) -> Film:
    """Decode one film by `build_shards`'s rules (see the module docstring).

    Raises:
        ImageRejected: the build's reason code and detail (a CT slice: ``modality_filtered``; a truncated
            JPEG: ``corrupt_image``; a text file: ``not_an_image``).
    """
    path = Path(path)
    opts = ImageOptions(display_size, 90, rules.min_size, rules.max_aspect, rules.modalities, rules.body_parts)
    encoded = encode_image(path, opts)
    with Image.open(io.BytesIO(encoded.jpeg)) as img:
        image = img.convert("L")
    return Film(path, film_key(path), image, encoded.width, encoded.height, encoded.view)
