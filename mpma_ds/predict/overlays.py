"""Heat-map overlays of phrase maps on the film, in the film's own aspect, and the viewer's thumbnails.

The map (`Predictor.phrase_maps`, one value per pixel of the decoded film) is stretched over its own range
(min -> blue, max -> red, matplotlib's ``jet``) and blended onto the film at 45 %; a white cross marks the
maximum (the point the pointing game scores). A caption strip above the film names the phrase and the map's
range, so a PNG read on its own says what it shows.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ALPHA = 0.45
THUMB_SIZE = 256
"""Shorter side of the viewer's thumbnails (pixels)."""
_SLUG = re.compile(r"[^A-Za-z0-9]+")


def phrase_slug(phrase: str) -> str:
    """``left_pleural_effusion``: a phrase as a file-name part."""
    return _SLUG.sub("_", phrase.lower()).strip("_")[:60] or "phrase"


def map_peak(grid: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` pixel of the map's maximum (the first one on a tie)."""
    y, x = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return int(x), int(y)


def render_overlay(image: Image.Image, grid: np.ndarray, *, caption: str = "") -> Image.Image:
    """The film (grayscale, any size) with ``grid`` ((H, W), the film's size) as a heat overlay and its maximum
    marked; with a caption strip on top when ``caption`` is given. Returns an RGB image."""
    from matplotlib import colormaps

    if grid.shape != (image.height, image.width):
        raise ValueError(f"map {grid.shape} does not match the film's {image.height}x{image.width} pixels")
    lo, hi = float(grid.min()), float(grid.max())
    norm = (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)
    heat = colormaps["jet"](norm)[..., :3]  # (H, W, 3) in [0, 1]
    film = np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0  # (H, W, 1)
    blended = (1 - ALPHA) * film + ALPHA * heat  # (H, W, 3)
    out = Image.fromarray(np.rint(blended * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    x, y = map_peak(grid)
    arm = max(4, min(image.size) // 40)
    for dx, dy in ((arm, arm), (arm, -arm)):
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=(255, 255, 255), width=max(2, arm // 3))
    if not caption:
        return out
    font = ImageFont.load_default()
    strip = 18
    framed = Image.new("RGB", (out.width, out.height + strip), (20, 20, 20))
    framed.paste(out, (0, strip))
    ImageDraw.Draw(framed).text((4, 3), caption, fill=(235, 235, 235), font=font)
    return framed


def save_overlay(path: str | Path, image: Image.Image, grid: np.ndarray, *, caption: str = "") -> Path:
    """`render_overlay` written as a PNG at ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(image, grid, caption=caption).save(path, format="PNG", compress_level=1)  # zlib 6: 5x slower
    return path


def save_thumbnail(path: str | Path, image: Image.Image, size: int = THUMB_SIZE) -> Path:
    """A JPEG of the film with its shorter side ``size`` (or smaller when the film is), aspect kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = image.size
    scale = min(1.0, size / min(w, h))
    thumb = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    thumb.convert("L").save(path, format="JPEG", quality=85)
    return path
