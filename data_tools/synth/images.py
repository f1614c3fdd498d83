"""Render synthetic chest radiographs in which the CheXpert findings of a study are visible.

The drawing is a cartoon of a real film, built from a few soft masks (PIL polygons and lines,
Gaussian-blurred) composed in an "attenuation" space where 0 is air (black) and 1 is metal (white):
body soft tissue, two air-filled lungs with branching vessel markings, mediastinum, spine, heart,
clavicles and ribs, then the findings, then the devices. Each finding is drawn where its report says
it is, so a model can learn which image regions go with which report phrases:

- Cardiomegaly: a wider heart shadow (cardiothoracic ratio ~0.45 -> 0.55-0.65).
- Enlarged Cardiomediastinum: a widened upper mediastinum.
- Pleural Effusion: fluid density filling the lung base with a meniscus that rises laterally.
- Pneumothorax: a black rim along the lateral/apical chest wall without vessel markings, edged by a
  thin bright visceral pleural line.
- Lung Lesion: a round opacity (nodule < 3 cm, mass >= 3 cm) in the named lobe.
- Consolidation / Lung Opacity: dense / faint patchy blobs in the named zone.
- Edema: bilateral perihilar haze.
- Atelectasis: a thin band-like opacity above the hemidiaphragm.
- Fracture: a rib broken into two displaced fragments (gap and step) with a bright callus, denser than the
  other ribs.
- Pneumonia: a lobar airspace opacity filling the named zone of one lung (sharp at the fissure, mottled)
  with dark branching air bronchograms.
- Pleural Other: apical pleural thickening (a bright cap).
- Support Devices: bright lines and tubes (ET tube, enteric tube, central lines, pacemaker).

Every finding is drawn large and dense enough to be seen at the 128 px the demo trains at (tests/
test_synth_truth.py checks each one). Uncertain findings (label -1) are drawn at reduced strength. Rendering works at a small working
resolution and is resized to the requested size, then exposure, rotation and noise are applied, so
default-size corpora build quickly while the benchmark can ask for 2500 px films.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Longest side of the canvas the anatomy is drawn on (at most) before resizing to the requested size.
WORK_SIZE = 320

#: The findings each view draws when their state is 1 (full strength) or -1 (reduced strength, still visible at
#: 128 px). "No Finding" is the absence of the others; a lateral film has no side and shows no pneumothorax,
#: fracture, apical cap or mediastinal widening.
DRAWN_IN_VIEW: dict[str, frozenset[str]] = {
    "PA": frozenset({
        "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
        "Lung Lesion", "Lung Opacity", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
        "Support Devices",
    }),
    "LATERAL": frozenset({
        "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Lesion", "Lung Opacity", "Pleural Effusion",
        "Pneumonia", "Support Devices",
    }),
}  # fmt: skip
DRAWN_IN_VIEW["AP"] = DRAWN_IN_VIEW["PA"]

Findings = dict[str, dict[str, Any]]

_AIR, _SOFT, _FLUID, _BONE, _METAL = 0.03, 0.55, 0.58, 0.80, 0.97
_ZONE_Y = {"upper": 0.27, "mid": 0.42, "lower": 0.58}


def _strength(findings: Findings, name: str) -> float:
    """1.0 for a positive finding, 0.5 for an uncertain one, 0.0 when absent or negated."""
    entry = findings.get(name)
    if not entry:
        return 0.0
    return {1: 1.0, -1: 0.5}.get(entry.get("state"), 0.0)


class _Canvas:
    """Normalised-coordinate drawing helpers over a (h, w) float canvas.

    With `record=True` the canvas also keeps where each finding was drawn (`note`): boxes
    `(x0, y0, x1, y1)` in canvas pixels, by CheXpert name. Recording reads the masks only, never
    draws, so the pixels are the same either way.
    """

    def __init__(self, h: int, w: int, record: bool = False):
        self.h, self.w = h, w
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.yy /= h
        self.xx /= w
        self.regions: dict[str, list[tuple[float, float, float, float]]] | None = {} if record else None

    def note(self, name: str, mask: np.ndarray) -> np.ndarray:
        """Record the box of `mask` where it reaches half its peak as a region of `name`; returns `mask`."""
        if self.regions is not None and mask.size:
            peak = float(mask.max())
            if peak > 0:
                ys, xs = np.nonzero(mask >= 0.5 * peak)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                self.regions.setdefault(name, []).append(box)
        return mask

    def note_box(self, name: str, x0: float, y0: float, x1: float, y1: float) -> None:
        """Record a box given in normalised coordinates as a region of `name`."""
        if self.regions is not None:
            box = (x0 * self.w, y0 * self.h, x1 * self.w, y1 * self.h)
            self.regions.setdefault(name, []).append(box)

    def px(self, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * self.w, y * self.h) for x, y in pts]

    def _finish(self, img: Image.Image, blur: float) -> np.ndarray:
        if blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur * self.h))
        return np.asarray(img, dtype=np.float32) / 255.0

    def polygon(self, pts: list[tuple[float, float]], blur: float = 0.006) -> np.ndarray:
        img = Image.new("L", (self.w, self.h), 0)
        ImageDraw.Draw(img).polygon(self.px(pts), fill=255)
        return self._finish(img, blur)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, blur: float = 0.006) -> np.ndarray:
        img = Image.new("L", (self.w, self.h), 0)
        ImageDraw.Draw(img).ellipse(
            [(cx - rx) * self.w, (cy - ry) * self.h, (cx + rx) * self.w, (cy + ry) * self.h], fill=255
        )
        return self._finish(img, blur)

    def lines(self, polylines: list[list[tuple[float, float]]], width: float, blur: float = 0.003) -> np.ndarray:
        img = Image.new("L", (self.w, self.h), 0)
        draw = ImageDraw.Draw(img)
        wpx = max(1, round(width * self.h))
        for line in polylines:
            draw.line(self.px(line), fill=255, width=wpx, joint="curve")
        return self._finish(img, blur)


def _blend(img: np.ndarray, mask: np.ndarray, value: float, alpha: float = 1.0) -> np.ndarray:
    m = mask * alpha
    return img * (1.0 - m) + value * m


def _side_sign(side: str) -> float:
    """Image x direction of the patient's side: radiographs show the patient's right on the image left."""
    return -1.0 if side == "right" else 1.0


def _sides(side: str) -> list[str]:
    return ["right", "left"] if side == "bilateral" else [side]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    low = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _vessels(
    c: _Canvas, rng: np.random.Generator, hila: list[tuple[float, float, float]], n: int = 14
) -> np.ndarray:
    """Branching vessel markings radiating from each hilum (x, y, outward direction sign)."""
    polys: list[list[tuple[float, float]]] = []
    for hx, hy, sgn in hila:
        for _ in range(n):
            ang = rng.uniform(-1.25, 1.35)  # 0 = lateral, negative = upward
            length = rng.uniform(0.12, 0.30)
            x, y, pts = hx, hy, [(hx, hy)]
            for _step in range(6):
                ang += rng.normal(0, 0.25)
                x += sgn * math.cos(ang) * length / 6
                y += math.sin(ang) * length / 6 * 1.2
                pts.append((x, y))
            polys.append(pts)
    return c.lines(polys, width=0.006, blur=0.004)


def _lung_points(xm: float, sgn: float, dome: float, scale: float) -> list[tuple[float, float]]:
    """A lung outline (patient side given by sgn) in normalised image coordinates."""
    outline_u = [
        (0.12, 0.11), (0.19, 0.10), (0.26, 0.14), (0.32, 0.22), (0.36, 0.33), (0.39, 0.46),
        (0.405, 0.58), (0.41, dome - 0.02), (0.415, dome + 0.05), (0.36, dome), (0.27, dome - 0.035),
        (0.17, dome - 0.03), (0.09, dome + 0.005), (0.065, 0.52), (0.06, 0.32), (0.075, 0.16),
    ]  # fmt: skip
    return [(xm + sgn * u * scale, y) for u, y in outline_u]


def _lateral_wall(xm: float, sgn: float, dome: float, scale: float, ymax: float, inset: float):
    """The apical/lateral chest wall from the apex down to ``ymax``, moved ``inset`` inwards."""
    wall = [(0.10, 0.12), (0.19, 0.10), (0.26, 0.14), (0.32, 0.22), (0.36, 0.33), (0.39, 0.46), (0.405, 0.58),
            (0.41, dome - 0.02)]  # fmt: skip
    pts = []
    for u, y in wall:
        if y > ymax:
            break
        pts.append((xm + sgn * (u - inset) * scale, y + inset * 0.8))
    return pts


def _frontal(
    c: _Canvas, f: Findings, rng: np.random.Generator, frng: np.random.Generator, view: str
) -> np.ndarray:
    """A PA or AP film; ``rng`` draws the anatomy, ``frng`` the placement of findings."""
    xm = 0.5 + rng.uniform(-0.015, 0.015)
    scale = rng.uniform(0.93, 1.04)
    inspir = rng.uniform(-0.03, 0.03) - (0.03 if view == "AP" else 0.0)
    domes = {"right": 0.70 + inspir, "left": 0.73 + inspir}

    body_u = [(0.07, 0.0), (0.30, 0.035), (0.47, 0.08), (0.49, 0.30), (0.48, 0.70), (0.46, 1.0)]
    body_pts = [(xm - u, y) for u, y in body_u] + [(xm + u, y) for u, y in reversed(body_u)]
    img = _blend(np.full((c.h, c.w), _AIR, np.float32), c.polygon(body_pts, 0.01), _SOFT)

    lungs = {s: c.polygon(_lung_points(xm, _side_sign(s), domes[s], scale), 0.008) for s in ("right", "left")}
    lung = np.clip(lungs["right"] + lungs["left"], 0, 1)
    img = _blend(img, lung, 0.17)
    # Gastric bubble below the left hemidiaphragm.
    img = _blend(img, c.ellipse(xm + 0.2 * scale, domes["left"] + 0.06, 0.05, 0.025, 0.01), 0.25, 0.7)

    # Pneumothorax rims: air without vessel markings along the chest wall.
    ptx_rim = np.zeros_like(img)
    ptx_edge_lines = []
    s_ptx = _strength(f, "Pneumothorax")
    if s_ptx:
        e = f["Pneumothorax"]
        for side in _sides(e.get("side", "right")):
            sgn = _side_sign(side)
            # at least ~5 px of black rim at a 128 px film even for a small (or uncertain) one
            width = {"small": 0.05, "moderate": 0.08, "large": 0.12}[e.get("size", "small")] * (0.7 + 0.3 * s_ptx)
            ymax = {"small": 0.40, "moderate": 0.56, "large": domes[side]}[e.get("size", "small")]
            outer = _lateral_wall(xm, sgn, domes[side], scale, ymax, 0.0)
            inner = _lateral_wall(xm, sgn, domes[side], scale, ymax, width)
            rim = c.note("Pneumothorax", c.polygon(outer + inner[::-1], 0.004) * lungs[side])
            ptx_rim = np.maximum(ptx_rim, rim)
            ptx_edge_lines.append(inner)

    hila = [(xm - 0.12 * scale, 0.42, -1.0), (xm + 0.13 * scale, 0.44, 1.0)]
    vessels = _vessels(c, rng, hila)
    texture = _smooth_noise(rng, c.h, c.w, 24)
    img += lung * (1 - ptx_rim) * (0.17 * vessels + 0.08 * (texture - 0.5))
    img = _blend(img, ptx_rim, _AIR, 0.95)
    if ptx_edge_lines:
        img += (0.2 + 0.15 * s_ptx) * c.lines(ptx_edge_lines, 0.007, 0.002)

    img = _draw_frontal_findings(c, f, frng, img, xm, scale, domes, lungs, lung)

    # Mediastinum, aortic knob, trachea and spine.
    ec = 1.0 + 1.0 * _strength(f, "Enlarged Cardiomediastinum")  # 2x the upper mediastinum's width
    med = [(xm - 0.055 * ec, 0.0), (xm + 0.055 * ec, 0.0), (xm + 0.06 * ec, 0.26), (xm + 0.10 * ec, 0.30),
           (xm + 0.085 * ec, 0.36), (xm + 0.07, 0.5), (xm - 0.07, 0.5), (xm - 0.065 * ec, 0.30)]  # fmt: skip
    med_mask = c.polygon(med, 0.008)
    if ec > 1.0:
        c.note("Enlarged Cardiomediastinum", med_mask)
    img = _blend(img, med_mask, 0.63)
    img = _blend(img, c.lines([[(xm, 0.0), (xm + 0.005, 0.30)]], 0.028, 0.006), 0.35, 0.7)
    img = _blend(img, c.lines([[(xm, 0.0), (xm, 1.0)]], 0.065, 0.006), 0.70, 0.5)

    # Heart: left border at u_l, right border at u_r; cardiomegaly widens it mostly to the patient's left.
    cm = _strength(f, "Cardiomegaly")
    sev = {"mild": 1.28, "moderate": 1.42, "severe": 1.58}[f.get("Cardiomegaly", {}).get("severity", "mild")]
    factor = (1.0 + (sev - 1.0) * cm) * (1.08 if view == "AP" else 1.0) * rng.uniform(0.96, 1.04)
    u_l, u_r = 0.22 * factor * scale, 0.12 * factor * scale
    cy = domes["right"] - 0.09
    heart = c.ellipse(xm + (u_l - u_r) / 2, cy, (u_l + u_r) / 2, 0.13, 0.008)
    if cm:
        c.note("Cardiomegaly", heart)
    img = _blend(img, heart, 0.63)

    # Bones: clavicles and posterior ribs. A fractured rib is drawn as two displaced fragments (a lucent gap
    # and a step of ~4 px at a 128 px film) with a bright callus at the fracture, denser than the other ribs:
    # a 1-2 px step vanishes in the 128 px films the demo trains on.
    fx = _strength(f, "Fracture")
    fx_side = f.get("Fracture", {}).get("side", "right")
    fx_rib = f.get("Fracture", {}).get("rib", 6) - 1
    ribs, broken = [], []
    for side in ("right", "left"):
        sgn = _side_sign(side)
        ribs.append([(xm + sgn * 0.04, 0.17), (xm + sgn * 0.17 * scale, 0.13), (xm + sgn * 0.32 * scale, 0.095)])
        for k in range(9):
            y0 = 0.13 + k * 0.062 * scale
            ts = np.linspace(0.0, 1.0, 14)
            pts = [
                (xm + sgn * (0.045 + t * 0.39) * scale, y0 - 0.03 * math.sin(math.pi * t * 0.9) + 0.11 * t**2)
                for t in ts
            ]
            if fx and side == fx_side and k == fx_rib:
                gap = 8
                step = 0.03 + 0.01 * fx
                inner = pts[:gap]
                outer = [(x + sgn * 0.015, y + step) for x, y in pts[gap + 1 :]]
                broken += [inner, outer]
                (x0, y0e), (x1, y1e) = inner[-1], outer[0]
                callus = c.ellipse((x0 + x1) / 2, (y0e + y1e) / 2, 0.03 * c.h / c.w, 0.028, 0.006)
                img = _blend(img, callus, _BONE, 0.35 * fx)
                xs, ys = [x for x, _ in pts[gap - 2 : gap + 4]], [y for _, y in pts[gap - 2 : gap + 4]]
                c.note_box("Fracture", min(xs) - 0.02, min(ys) - 0.03, max(xs) + 0.035, max(ys) + 0.03 + step)
            else:
                ribs.append(pts)
    # Ribs show through the lungs, faintly through the heart and mediastinum.
    thorax = np.clip(lung * 1.5 + 0.25, 0, 1) * (c.yy < max(domes.values()) + 0.03) * (1 - 0.7 * heart)
    img += 0.08 * c.lines(ribs, 0.014, 0.004) * thorax
    if broken:
        img += (0.12 + 0.12 * fx) * c.lines(broken, 0.018, 0.003) * np.clip(thorax * 2, 0, 1)

    return _draw_devices(c, f, img, xm, scale, frontal=True)


def _zone_point(xm: float, scale: float, side: str, zone: str, rng: np.random.Generator) -> tuple[float, float]:
    u = {"upper": 0.22, "mid": 0.27, "lower": 0.27}[zone] + rng.uniform(-0.03, 0.03)
    return xm + _side_sign(side) * u * scale, _ZONE_Y[zone] + rng.uniform(-0.03, 0.03)


def _lobar(c: _Canvas, rng: np.random.Generator, xm: float, scale: float, side: str, zone: str, dome: float):
    """A lobar airspace opacity (pneumonia): the whole zone of one lung, sharp at the fissure above, mottled,
    with branching air bronchograms. Returns ``(mask, bronchi)`` before clipping to the lung."""
    sgn = _side_sign(side)
    top, bottom = {"upper": (0.08, 0.36), "mid": (0.36, 0.54), "lower": (0.50, dome + 0.06)}[zone]
    band = np.clip((c.yy - top) / 0.015, 0, 1) * np.clip((bottom - c.yy) / 0.04, 0, 1)
    lateral = sgn * (c.xx - xm) / scale
    band = band * np.clip((lateral - 0.06) / 0.03, 0, 1)  # from just beside the mediastinum outwards
    mottle = 0.75 + 0.25 * _smooth_noise(rng, c.h, c.w, 18)
    hy = 0.5 * (top + bottom)
    hx = xm + sgn * 0.1 * scale
    polys = []
    for _ in range(5):
        ang, x, y, pts = rng.uniform(-0.6, 0.6), hx, hy, [(hx, hy)]
        for _step in range(5):
            ang += rng.normal(0, 0.25)
            x += sgn * math.cos(ang) * 0.045
            y += math.sin(ang) * 0.04
            pts.append((x, y))
        polys.append(pts)
    return np.clip(band * mottle * 1.15, 0, 1), c.lines(polys, 0.008, 0.003)


def _patches(c: _Canvas, rng: np.random.Generator, cx: float, cy: float, n: int, r: float) -> np.ndarray:
    mask = np.zeros((c.h, c.w), np.float32)
    for _ in range(n):
        x, y = cx + rng.normal(0, r * 0.8), cy + rng.normal(0, r * 0.6)
        rr = r * rng.uniform(0.5, 1.0)
        mask = np.maximum(mask, c.ellipse(x, y, rr, rr * rng.uniform(0.6, 1.0), 0.02))
    return np.clip(mask * 1.3, 0, 1)


def _draw_frontal_findings(c, f, rng, img, xm, scale, domes, lungs, lung) -> np.ndarray:
    s = _strength(f, "Pleural Effusion")
    if s:
        e = f["Pleural Effusion"]
        for side in _sides(e.get("side", "right")):
            sgn = _side_sign(side)
            depth = {"small": 0.10, "moderate": 0.18, "large": 0.30}[e.get("size", "small")]
            level = domes[side] + 0.04 - depth
            lateral = np.clip(sgn * (c.xx - xm) / (0.41 * scale), 0, 1.2)  # 0 at midline, 1 at the chest wall
            meniscus = level - 0.08 * lateral**2
            fluid = np.clip((c.yy - meniscus) / 0.03, 0, 1) * (sgn * (c.xx - xm) > 0.02)
            mask = c.note("Pleural Effusion", fluid * np.clip(lungs[side] * 1.4, 0, 1))
            img = _blend(img, mask, _FLUID, 0.95 * (0.4 + 0.6 * s))
    s = _strength(f, "Edema")
    if s:
        sev = {"mild": 0.6, "moderate": 0.72, "severe": 0.85}[f["Edema"].get("severity", "mild")] * (0.5 + 0.5 * s)
        haze = np.zeros_like(img)
        for hx in (xm - 0.13 * scale, xm + 0.14 * scale):
            haze += np.exp(-(((c.xx - hx) / 0.13) ** 2 + ((c.yy - 0.45) / 0.16) ** 2))
        img = _blend(img, c.note("Edema", np.clip(haze, 0, 1) * lung), 0.5, sev)
    for name, dense, n, r in (("Consolidation", 0.6, 7, 0.05), ("Lung Opacity", 0.5, 5, 0.04)):
        s = _strength(f, name)
        if s:
            e = f[name]
            for side in _sides(e.get("side", "right")):
                x, y = _zone_point(xm, scale, side, e.get("zone", "lower"), rng)
                patch = _patches(c, rng, x, y, n, r) * lungs[side]
                img = _blend(img, c.note(name, patch), dense, 0.9 * (0.6 + 0.4 * s))
    s = _strength(f, "Pneumonia")
    if s:
        e = f["Pneumonia"]
        side = e.get("side", "right")
        mask, bronchi = _lobar(c, rng, xm, scale, side, e.get("zone", "lower"), domes[side])
        mask = c.note("Pneumonia", mask * lungs[side])
        img = _blend(img, mask, 0.58, 0.85 * (0.6 + 0.4 * s))
        img = _blend(img, bronchi * mask, 0.2, 0.7)  # air bronchograms inside the airspace opacity
    s = _strength(f, "Lung Lesion")
    if s:
        e = f["Lung Lesion"]
        x, y = _zone_point(xm, scale, e.get("side", "right"), e.get("zone", "upper"), rng)
        r = 0.008 + 0.016 * float(e.get("size_cm", 2.0))
        img = _blend(img, c.note("Lung Lesion", c.ellipse(x, y, r * c.h / c.w, r, 0.006)), 0.64, 0.95 * s)
    s = _strength(f, "Atelectasis")
    if s:
        for side in _sides(f["Atelectasis"].get("side", "right")):
            sgn = _side_sign(side)
            y = domes[side] - 0.07
            band = c.lines(
                [[(xm + sgn * 0.12 * scale, y + 0.02), (xm + sgn * 0.33 * scale, y - 0.015)]], 0.03, 0.006
            )
            img = _blend(img, c.note("Atelectasis", band * lungs[side]), 0.6, 0.9 * s)
    s = _strength(f, "Pleural Other")
    if s:
        for side in _sides(f["Pleural Other"].get("side", "right")):
            sgn = _side_sign(side)
            cap = _lateral_wall(xm, sgn, domes[side], scale, 0.30, 0.0)
            img = _blend(img, c.note("Pleural Other", c.lines([cap], 0.03, 0.006)), 0.62, 0.9 * s)
    return img


def _draw_devices(c: _Canvas, f: Findings, img: np.ndarray, xm: float, scale: float, frontal: bool) -> np.ndarray:
    s = _strength(f, "Support Devices")
    if not s:
        return img
    devices = f["Support Devices"].get("devices", ["ett"])
    tubes: list[list[tuple[float, float]]] = []
    wires: list[list[tuple[float, float]]] = []
    if frontal:
        paths = {
            "ett": [(xm, 0.0), (xm + 0.003, 0.21)],
            "ngt": [(xm + 0.012, 0.0), (xm + 0.015, 0.5), (xm + 0.03, 0.72), (xm + 0.14, 0.83), (xm + 0.2, 0.8)],
            "ij_line": [(xm - 0.11, 0.02), (xm - 0.075, 0.15), (xm - 0.04, 0.28), (xm - 0.03, 0.36)],
            "picc": [(xm + 0.49, 0.27), (xm + 0.3, 0.13), (xm + 0.1, 0.17), (xm - 0.02, 0.29), (xm - 0.03, 0.36)],
            "pacemaker": [(xm + 0.27, 0.17), (xm + 0.06, 0.28), (xm - 0.02, 0.45), (xm + 0.08, 0.6)],
        }
        box = (xm + 0.27, 0.17)
    else:
        paths = {
            "ett": [(0.46, 0.0), (0.48, 0.22)],
            "ngt": [(0.55, 0.0), (0.57, 0.5), (0.55, 0.8)],
            "ij_line": [(0.5, 0.02), (0.45, 0.2), (0.42, 0.34)],
            "picc": [(0.55, 0.05), (0.47, 0.2), (0.42, 0.34)],
            "pacemaker": [(0.18, 0.16), (0.3, 0.3), (0.34, 0.5)],
        }
        box = (0.18, 0.16)
    for dev in devices:
        (tubes if dev in ("ett", "ngt") else wires).append(paths[dev])
    if tubes:
        img = np.maximum(img, _METAL * s * c.note("Support Devices", c.lines(tubes, 0.012, 0.002)))
    if wires:
        img = np.maximum(img, _METAL * s * c.note("Support Devices", c.lines(wires, 0.006, 0.001)))
    if "pacemaker" in devices:
        mask = c.note("Support Devices", c.ellipse(box[0], box[1], 0.045 * c.h / c.w, 0.03, 0.002))
        img = np.maximum(img, _METAL * s * mask)
    return img


def _lateral(c: _Canvas, f: Findings, rng: np.random.Generator, frng: np.random.Generator) -> np.ndarray:
    """A left lateral view: patient facing the image left, spine on the right."""
    img = np.full((c.h, c.w), _AIR, np.float32)
    body = [(0.16, 0.0), (0.84, 0.0), (0.92, 0.3), (0.93, 1.0), (0.1, 1.0), (0.08, 0.45), (0.12, 0.15)]
    img = _blend(img, c.polygon(body, 0.01), _SOFT)
    dome = 0.72 + rng.uniform(-0.03, 0.03)
    lung_pts = [(0.3, 0.1), (0.55, 0.08), (0.72, 0.16), (0.8, 0.35), (0.83, dome + 0.06), (0.65, dome - 0.02),
                (0.45, dome - 0.04), (0.24, dome - 0.06), (0.17, 0.45), (0.2, 0.22)]  # fmt: skip
    lung = c.polygon(lung_pts, 0.012)
    img = _blend(img, lung, 0.2)
    texture = _smooth_noise(rng, c.h, c.w, 20)
    vessels = _vessels(c, rng, [(0.5, 0.42, 1.0), (0.5, 0.42, -1.0)], n=8)
    img += lung * (0.12 * vessels + 0.06 * (texture - 0.5))

    s = _strength(f, "Pleural Effusion")
    if s:
        depth = {"small": 0.08, "moderate": 0.17, "large": 0.28}[f["Pleural Effusion"].get("size", "small")]
        depth *= 0.5 + 0.5 * s
        meniscus = dome + 0.06 - depth - 0.1 * np.clip((c.xx - 0.45) / 0.4, 0, 1) ** 2
        mask = c.note("Pleural Effusion", np.clip((c.yy - meniscus) / 0.03, 0, 1) * np.clip(lung * 1.4, 0, 1))
        img = _blend(img, mask, _FLUID, 0.95)
    s = _strength(f, "Edema")
    if s:
        haze = np.exp(-(((c.xx - 0.5) / 0.18) ** 2 + ((c.yy - 0.42) / 0.18) ** 2))
        img = _blend(img, c.note("Edema", haze * lung), 0.5, 0.55 * s)
    lat_x = {"upper": 0.52, "mid": 0.33, "lower": 0.66}
    for name, dense, n, r in (("Consolidation", 0.6, 7, 0.05), ("Lung Opacity", 0.45, 4, 0.035)):
        s = _strength(f, name)
        if s:
            zone = f[name].get("zone", "lower")
            patch = _patches(c, frng, lat_x[zone], _ZONE_Y[zone] + 0.04, n, r)
            img = _blend(img, c.note(name, patch * lung), dense, 0.8 * s)
    s = _strength(f, "Pneumonia")
    if s:
        zone = f["Pneumonia"].get("zone", "lower")
        patch = _patches(c, frng, lat_x[zone], _ZONE_Y[zone] + 0.04, 9, 0.07)
        img = _blend(img, c.note("Pneumonia", patch * lung), 0.58, 0.8 * (0.6 + 0.4 * s))
    s = _strength(f, "Lung Lesion")
    if s:
        zone = f["Lung Lesion"].get("zone", "upper")
        r = 0.008 + 0.016 * float(f["Lung Lesion"].get("size_cm", 2.0))
        lesion = c.ellipse(lat_x[zone], _ZONE_Y[zone], r * c.h / c.w, r, 0.006)
        img = _blend(img, c.note("Lung Lesion", lesion), 0.64, 0.9 * s)
    s = _strength(f, "Atelectasis")
    if s:
        band = c.lines([[(0.3, dome - 0.1), (0.6, dome - 0.06)]], 0.02, 0.006)
        img = _blend(img, c.note("Atelectasis", band * lung), 0.6, 0.85 * s)

    # Heart anteriorly (image left), trachea, sternum, spine with vertebral bodies.
    cm = _strength(f, "Cardiomegaly")
    sev = {"mild": 1.2, "moderate": 1.3, "severe": 1.42}[f.get("Cardiomegaly", {}).get("severity", "mild")]
    factor = 1.0 + (sev - 1.0) * cm
    heart = c.ellipse(0.33 + 0.03 * factor, dome - 0.13, 0.15 * factor, 0.14, 0.01)
    if cm:
        c.note("Cardiomegaly", heart)
    img = _blend(img, heart, 0.66)
    img = _blend(img, c.lines([[(0.5, 0.0), (0.53, 0.33)]], 0.035, 0.006), 0.3, 0.6)
    img += 0.15 * c.lines([[(0.14, 0.14), (0.13, 0.5)]], 0.018, 0.003)
    vertebrae = np.zeros_like(img)
    for k in range(12):
        y = 0.04 + k * 0.08
        vertebrae = np.maximum(
            vertebrae, c.polygon([(0.8, y), (0.9, y), (0.9, y + 0.065), (0.8, y + 0.065)], 0.004)
        )
    img = _blend(img, vertebrae, _BONE, 0.8)
    return _draw_devices(c, f, img, 0.5, 1.0, frontal=False)


def _detector_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean noise of standard deviation ``sigma``: the sum of two uniform bytes (triangular).

    Several times cheaper than Gaussian draws, which matters for 2500 px benchmark films.
    """
    n = int(np.prod(shape))
    noise = np.frombuffer(rng.bytes(n), dtype=np.uint8).astype(np.float32).reshape(shape)
    noise += np.frombuffer(rng.bytes(n), dtype=np.uint8).reshape(shape)
    noise -= 255.0
    noise *= sigma / (255.0 * math.sqrt(2.0 / 12.0))
    return noise


def render_radiograph(
    findings: Findings, view: str, height: int, width: int, seed: int, *, quality: int = 92
) -> bytes:
    """Render one film of a study as a grayscale baseline JPEG.

    Args:
        findings: CheXpert name -> {"state": 1 | 0 | -1 | None, ...attributes (side, size, zone, ...)}.
        view: "PA", "AP" or "LATERAL".
        height, width: the size of the JPEG in pixels.
        seed: seeds every random choice; the same arguments give the same bytes.
        quality: JPEG quality.
    """
    return _render(findings, view, height, width, seed, quality, record=False)[0]


def render_with_regions(
    findings: Findings, view: str, height: int, width: int, seed: int, *, quality: int = 92
) -> tuple[bytes, dict[str, list[list[int]]]]:
    """`render_radiograph`'s bytes (identical) and where each drawn finding is in them.

    Returns:
        `(jpeg, regions)`: regions maps a CheXpert name to boxes `[x0, y0, x1, y1]` in the film's pixels
        (x right, y down, x1/y1 exclusive), one per drawn part (each side of a bilateral finding, each
        device group), after the film's rotation and resize. Only findings drawn in this view appear
        (`DRAWN_IN_VIEW`).
    """
    return _render(findings, view, height, width, seed, quality, record=True)


def _film_box(box, angle: float, work: tuple[int, int], film: tuple[int, int]) -> list[int]:
    """A canvas-pixel box -> the film-pixel box around it after `PIL.Image.rotate(angle)` and the resize."""
    (wh, ww), (height, width) = work, film
    cx, cy = ww / 2.0, wh / 2.0
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x0, y0, x1, y1 = box
    xs, ys = [], []
    for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
        # PIL turns the picture counter-clockwise on screen (y down) by `angle` degrees about the centre.
        xs.append(cx + cos * (x - cx) + sin * (y - cy))
        ys.append(cy - sin * (x - cx) + cos * (y - cy))
    sx, sy = width / ww, height / wh
    return [
        max(0, math.floor(min(xs) * sx)),
        max(0, math.floor(min(ys) * sy)),
        min(width, math.ceil(max(xs) * sx)),
        min(height, math.ceil(max(ys) * sy)),
    ]


def _render(findings: Findings, view: str, height: int, width: int, seed: int, quality: int, record: bool):
    # Separate streams: a finding added or removed leaves anatomy and exposure of the same seed unchanged.
    rng, frng, erng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    scale = min(1.0, WORK_SIZE / max(height, width))  # small films are drawn at their own size
    wh, ww = max(32, round(height * scale)), max(32, round(width * scale))
    c = _Canvas(wh, ww, record=record)
    img = _lateral(c, findings, rng, frng) if view == "LATERAL" else _frontal(c, findings, rng, frng, view)

    # Exposure, positioning and detector noise.
    gamma = erng.uniform(0.8, 1.25)
    contrast = erng.uniform(0.85, 1.1)
    offset = erng.uniform(-0.04, 0.04)
    img = np.clip(np.clip(img, 0, 1) ** gamma * contrast + offset, 0, 1)
    pil = Image.fromarray(img.astype(np.float32))
    angle = erng.uniform(-4, 4)
    pil = pil.rotate(angle, resample=Image.BILINEAR, fillcolor=float(img[0, 0]))
    pil = pil.resize((width, height), Image.BICUBIC)
    arr = np.array(pil, dtype=np.float32)  # a writable copy: the arithmetic below is in place
    arr *= 255.0
    arr += _detector_noise(erng, arr.shape, sigma=erng.uniform(0.008, 0.025) * 255.0)
    arr += 0.5
    np.clip(arr, 0, 255, out=arr)
    out = Image.fromarray(arr.astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    regions = {}
    if record:
        for name, boxes in sorted(c.regions.items()):
            regions[name] = [_film_box(b, angle, (wh, ww), (height, width)) for b in boxes]
    return buf.getvalue(), regions
