"""Chest X-ray image transforms on the host (PIL + torchvision), used by the ``wds`` backend.

Train: random resized crop with a mild scale range, optional small rotation, brightness/contrast jitter
and (off by default: left and right matter in reports) horizontal flip. Eval: resize the shorter side to
``image_size / eval_crop_fraction`` and centre-crop. The DALI backend builds the same numeric pipeline
from DALI operators (`dali_backend.py`); the two agree within a stated tolerance (tests/test_loader.py).

Random parameters come from a per-sample numpy generator, so augmentation never touches the global
torch RNG and is the same whatever worker draws the sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from mpma_ds.data.config import DataConfig


def eval_resize_size(cfg: DataConfig) -> int:
    """Shorter side before the centre crop in the eval transform."""
    return int(round(cfg.image_size / cfg.eval_crop_fraction))


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop (torchvision's algorithm: 10 tries, then centre)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fall back to a centre crop with the aspect clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class AugParams:
    """One sample's random augmentation: crop box in source pixels, rotation, jitter factors, flip."""

    top: int
    left: int
    height: int
    width: int
    angle: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    flip: bool = False


def draw_aug_params(cfg: DataConfig, width: int, height: int, rng: np.random.Generator) -> AugParams:
    """Draw a sample's augmentation; both backends use these so their train pipelines match too."""
    top, left, h, w = random_crop_box(width, height, cfg.crop_scale, cfg.crop_ratio, rng)
    angle = float(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees)) if cfg.rotation_degrees > 0 else 0.0
    bright = float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)) if cfg.brightness > 0 else 1.0
    contrast = float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)) if cfg.contrast > 0 else 1.0
    flip = bool(rng.random() < 0.5) if cfg.hflip else False
    return AugParams(top, left, h, w, angle, bright, contrast, flip)


def eval_geometry(cfg: DataConfig, width: int, height: int) -> tuple[int, int, int, int]:
    """Eval transform geometry: ``(resized_h, resized_w, crop_top, crop_left)`` (torchvision's rounding)."""
    short = eval_resize_size(cfg)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_h, new_w = short, int(short * width / height)
    size = cfg.image_size
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


class XrayTransform:
    """PIL grayscale image → normalised float tensor (C, S, S)."""

    def __init__(self, cfg: DataConfig, train: bool) -> None:
        self.cfg = cfg
        self.augment = train and cfg.augment
        mean, std = cfg.channel_stats()
        self.mean = torch.tensor(mean).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)  # (C, 1, 1)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        params = None
        if self.augment:
            if rng is None:
                raise ValueError("the train transform needs a random generator")
            params = draw_aug_params(self.cfg, image.width, image.height, rng)
        return self.apply(image, params)

    def apply(self, image: Image.Image, params: AugParams | None) -> torch.Tensor:
        """Transform with given augmentation ``params`` (``None`` = the eval transform)."""
        cfg = self.cfg
        size = cfg.image_size
        if image.mode != "L":
            image = image.convert("L")
        if params is not None:
            image = TF.resized_crop(
                image,
                params.top,
                params.left,
                params.height,
                params.width,
                [size, size],
                interpolation=TF.InterpolationMode.BILINEAR,
                antialias=True,
            )
            if params.angle:
                image = TF.rotate(image, params.angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0)
            if params.brightness != 1.0:
                image = TF.adjust_brightness(image, params.brightness)
            if params.contrast != 1.0:
                image = TF.adjust_contrast(image, params.contrast)
            if params.flip:
                image = TF.hflip(image)
        else:
            new_h, new_w, top, left = eval_geometry(cfg, image.width, image.height)
            image = image.resize((new_w, new_h), Image.BILINEAR)
            image = image.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (S, S)
        tensor = pixels.to(torch.float32).div_(255.0).unsqueeze(0)  # (1, S, S)
        if cfg.in_chans == 3:
            tensor = tensor.expand(3, -1, -1)  # (3, S, S)
        return (tensor - self.mean) / self.std  # (C, S, S)
