"""A synthetic position-reasoning dataset in the authors' layout, for tests, smoke runs and the tiny model.

Six procedural styles stand for the paper's six modalities (grey-level MRI with a skull, speckled ultrasound,
CT with dark lungs, a chest radiograph with ribs, colour endoscopy with folds and glare, colour dermoscopy with
hairs), each with lesions of a typical look. Three more styles, ``retina_fundus`` (``style="unseen"``),
``histology_slide`` and ``thermal_image``, look like none of them and are meant for fine-tuning on a new visual
domain.

Lesion positions are drawn evenly over the nine labels (four quadrants, near or far from the centre, and the
centre); lung CT also gets two-nodule cases. Every label is then *computed from the written mask* with
:func:`prsmed.data.zones.zone_of_mask`, so the CSV always agrees with the mask whatever the drawing did.

The same seed gives the same bytes: each image has its own generator seeded from (seed, style, index), and the
files carry no timestamps.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from prsmed.data.layout import MODALITIES, ModalityInfo
from prsmed.data.templates import TEST_QUESTIONS, TRAIN_QUESTIONS, make_qa
from prsmed.data.zones import QUADRANTS, zone_label, zone_of_mask

UNSEEN_STYLE = ModalityInfo("retina_fundus", "fundus photograph", "fundus photograph", "lesion", 6)
# Styles none of the six modalities looks like, for fine-tuning on a new visual domain (class id 6: no modality
# label of the authors', so the modality loss ignores them).
UNSEEN_STYLES: dict[str, ModalityInfo] = {
    m.folder: m
    for m in (
        UNSEEN_STYLE,
        ModalityInfo("histology_slide", "histology", "histology slide", "tumour", 6),
        ModalityInfo("thermal_image", "thermal", "thermal image", "lesion", 6),
    )
}
STYLES: dict[str, ModalityInfo] = {**MODALITIES, **UNSEEN_STYLES}
STANDARD = tuple(MODALITIES)
# A stable number per style for seeding, independent of which styles a run asks for.
_STYLE_CODE = {name: i for i, name in enumerate(STYLES)}
# The nine placement targets: each quadrant far from and near the centre, and the centre.
TARGETS = tuple((q, near) for q in QUADRANTS for near in (False, True)) + (("center", True),)
SYNTH_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Drawing helpers (float images in 0..1)


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in 0..1 of shape (h, w) with about ``cells`` features along the longer side."""
    ch = max(2, round(cells * h / max(h, w)))
    cw = max(2, round(cells * w / max(h, w)))
    small = rng.random((ch, cw), dtype=np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BICUBIC), dtype=np.float32)


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipse."""
    yy, xx = _grid(size)
    return np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)


def _soft(t: np.ndarray, edge: float = 0.08) -> np.ndarray:
    return np.clip((1.0 - t) / edge, 0.0, 1.0)


def _lines(size: int, polylines, width: int) -> np.ndarray:
    """Anti-alias-free polylines drawn with PIL, as a 0..1 float layer."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for pts in polylines:
        draw.line(pts, fill=255, width=width)
    return np.asarray(layer, np.float32) / 255.0


@dataclass
class _Lesion:
    cx: float
    cy: float
    r: float
    aspect: float
    angle: float
    harmonics: list[tuple[int, float, float]]

    def extent(self) -> float:
        return self.r * max(self.aspect, 1 / self.aspect) * (1 + sum(a for _, a, _ in self.harmonics))

    def window_field(self, size: int, margin: float) -> tuple[tuple[slice, slice], np.ndarray]:
        """The window around the lesion (``margin`` px beyond its outline) and, inside it, the normalised radius
        of the irregular outline (< 1 inside the lesion)."""
        ext = self.extent() + margin + 2
        x0, x1 = max(0, int(self.cx - ext)), min(size, int(self.cx + ext) + 2)
        y0, y1 = max(0, int(self.cy - ext)), min(size, int(self.cy + ext) + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx - self.cx, yy - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / (self.r * self.aspect)
        v = (-dx * s + dy * c) / (self.r / self.aspect)
        theta = np.arctan2(v, u)
        radius = np.ones_like(theta)
        for k, a, phi in self.harmonics:
            radius += a * np.cos(k * theta + phi)
        return (slice(y0, y1), slice(x0, x1)), np.hypot(u, v) / radius


def _place(rng: np.random.Generator, size: int, target: tuple[str, bool], r_range: tuple[float, float],
           irregular: float, aspect_range=(0.75, 1.35)) -> _Lesion:
    """A lesion whose bounding box should land on ``target``; a few tries, then the last one is kept (the label is
    computed from the mask anyway)."""
    zone, near = target
    c = size / 2.0
    lesion = None
    for _ in range(8):
        r = float(rng.uniform(*r_range)) * size
        harmonics = [(k, float(rng.uniform(0, irregular / k)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 5)]
        aspect = float(rng.uniform(*aspect_range))
        lesion = _Lesion(c, c, r, aspect, float(rng.uniform(0, math.pi)), harmonics)
        if zone == "center":
            jitter = 0.4 * r
            lesion.cx, lesion.cy = c + rng.uniform(-jitter, jitter), c + rng.uniform(-jitter, jitter)
            return lesion
        sx = -1.0 if "left" in zone else 1.0
        sy = -1.0 if "top" in zone else 1.0
        ang = float(rng.uniform(math.radians(20), math.radians(70)))
        dist = float(rng.uniform(0.09, 0.17) if near else rng.uniform(0.24, 0.42)) * size
        dx, dy = abs(math.cos(ang)) * dist, abs(math.sin(ang)) * dist
        if near:
            # The box must stay clear of the centre along at least one axis.
            limit = max(dx, dy) / 1.25
            if lesion.extent() > limit:
                lesion.r *= limit / lesion.extent()
        ext = lesion.extent()
        lesion.cx = float(np.clip(c + sx * dx, ext + 1, size - ext - 2))
        lesion.cy = float(np.clip(c + sy * dy, ext + 1, size - ext - 2))
        if max(abs(lesion.cx - c), abs(lesion.cy - c)) > ext + 1:
            return lesion
    return lesion


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _tint(intensity: np.ndarray, colour) -> np.ndarray:
    return intensity[..., None] * np.asarray(colour, np.float32)


# ---------------------------------------------------------------------------------------------------------------
# The seven styles. A background is drawn on the whole image; a lesion is painted inside its window only
# (``paint(rng, window_pixels, t, size)`` with ``t`` < 1 inside the lesion), which keeps 600 images in seconds.


@dataclass(frozen=True)
class _Style:
    background: Callable[[np.random.Generator, int], np.ndarray]
    paint: Callable[[np.random.Generator, np.ndarray, np.ndarray, int], np.ndarray]
    r_range: tuple[float, float]
    irregular: float
    ext: str  # image file extension
    post: Callable[[np.random.Generator, np.ndarray, int], np.ndarray] | None = None  # drawn over the lesions


def _brain_bg(rng, s):
    c = s / 2 + rng.uniform(-0.02, 0.02, 2) * s
    head = _ellipse(s, c[0], c[1], 0.43 * s, 0.47 * s)
    tissue = 0.42 + 0.12 * _smooth(rng, s, s, 6) + 0.06 * np.sin(_smooth(rng, s, s, 10) * 18.0)
    img = np.where(head < 0.93, tissue, np.where(head < 1.0, 0.88, 0.0))  # brain, skull, air
    for side in (-1, 1):  # lateral ventricles
        v = _ellipse(s, c[0] + side * 0.05 * s, c[1] - 0.02 * s, 0.03 * s, 0.09 * s)
        img = np.where(v < 1, 0.12, img)
    return img + 0.02 * rng.standard_normal((s, s), dtype=np.float32)


def _brain_paint(rng, img, t, s):
    a = _soft(t)
    lesion = 0.9 - (0.35 * _soft(t / 0.5) if rng.random() < 0.5 else 0.0)  # some have a necrotic core
    halo = _soft(t / 1.5, 0.3) * 0.12  # oedema brightens the tissue around, outside the mask
    return np.where(t < 1, lesion * a + img * (1 - a), img + halo)


def _breast_bg(rng, s):
    yy, _ = _grid(s)
    bands = 0.32 + 0.12 * np.sin(yy / s * rng.uniform(10, 18) + 3 * _smooth(rng, s, s, 5))
    img = (bands + 0.12 * _smooth(rng, s, s, 8)) * (1.0 - 0.45 * yy / s)  # depth attenuation
    img = np.where(yy < 0.06 * s, 0.75, img)  # skin line
    img = img * rng.rayleigh(0.8, (s, s)).astype(np.float32)  # speckle
    margin = int(rng.uniform(0.0, 0.05) * s)
    if margin:
        img[:, :margin] = 0
        img[:, s - margin:] = 0
    return img


def _breast_paint(rng, img, t, s):
    a = _soft(t, 0.15)
    out = img * (1 - a) + a * 0.1 * rng.rayleigh(0.8, img.shape).astype(np.float32)
    # posterior acoustic enhancement: a brighter band below the mass (outside the mask)
    inside = t < 1
    shift = max(1, int(0.06 * s))
    below = np.zeros_like(inside)
    below[shift:] = inside[:-shift]
    return np.where(below & ~inside, out * 1.35, out)


def _lung_ct_bg(rng, s):
    c = s / 2
    body = _ellipse(s, c, c + 0.02 * s, 0.46 * s, 0.36 * s)
    img = np.where(body < 0.9, 0.55 + 0.05 * _smooth(rng, s, s, 8), np.where(body < 1, 0.4, 0.02))
    lung_noise = 0.08 + 0.05 * _smooth(rng, s, s, 12)
    lungs = np.zeros((s, s), dtype=bool)
    for side in (-1, 1):
        lungs |= _ellipse(s, c + side * 0.2 * s, c - 0.01 * s, 0.16 * s * rng.uniform(0.9, 1.05),
                          0.26 * s * rng.uniform(0.9, 1.05)) < 1
    img = np.where(lungs, lung_noise, img)
    spine = _ellipse(s, c, c + 0.27 * s, 0.05 * s, 0.05 * s)
    img = np.where(spine < 1, 0.95, img).astype(np.float32)
    img[int(0.92 * s):int(0.93 * s), :] = 0.5  # table
    # vessels: small bright dots, kept where they fall on a lung
    layer = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(layer)
    rad = max(1.0, s / 200)
    for x, y in rng.uniform(0.08, 0.92, (25, 2)) * s:
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=255)
    dots = (np.asarray(layer) > 0) & lungs
    img[dots] = 0.5
    return img + 0.015 * rng.standard_normal((s, s), dtype=np.float32)


def _lung_ct_paint(rng, img, t, s):
    a = _soft(t, 0.25)
    return img * (1 - a) + a * rng.uniform(0.7, 0.85)


def _xray_bg(rng, s):
    yy, xx = _grid(s)
    c = s / 2
    img = 0.25 + 0.5 * np.exp(-(((xx - c) / (0.42 * s)) ** 2) * 2)  # body
    for side in (-1, 1):
        lung = _ellipse(s, c + side * 0.19 * s, 0.5 * s, 0.15 * s, 0.3 * s)
        img = np.where(lung < 1, img * (0.45 + 0.35 * lung), img)
    img = img + 0.06 * np.sin((yy + 0.6 * (xx - c) ** 2 / s) / s * rng.uniform(55, 70))  # ribs
    img = img + 0.35 * np.exp(-(((xx - c) / (0.06 * s)) ** 2))  # mediastinum and spine
    return (img + 0.06 * _smooth(rng, s, s, 6)).astype(np.float32)


def _xray_paint(rng, img, t, s):
    haze = np.clip(1.2 - t, 0, 1) ** 0.7
    return img + rng.uniform(0.25, 0.4) * haze


def _fov(s, rng, radius=0.52):
    c = s / 2 + rng.uniform(-0.01, 0.01, 2) * s
    return _ellipse(s, c[0], c[1], radius * s, radius * s)


def _polyp_bg(rng, s):
    base = np.array([0.78, 0.36, 0.3], np.float32) * rng.uniform(0.9, 1.05, 3).astype(np.float32)
    fov = _fov(s, rng)
    folds = np.sin(_smooth(rng, s, s, 4) * 25.0) * 0.5 + 0.5
    light = (0.75 + 0.35 * _smooth(rng, s, s, 5)) * (0.8 + 0.2 * folds) * np.clip(1.25 - 0.7 * fov, 0, 1)
    light = np.where(fov < 1, light, 0.0)  # the round field of view of the endoscope
    img = _tint(light, base)
    img[(_smooth(rng, s, s, 14) > 0.93) & (fov < 0.95)] = 0.97  # glare
    return img


def _polyp_paint(rng, img, t, s):
    a = _soft(t, 0.12)
    h, w = t.shape
    shade = np.clip(1.3 - 0.6 * t, 0.6, 1.3) * (0.9 + 0.2 * _smooth(rng, h, w, max(2, 24 * max(h, w) // s)))
    colour = np.array([0.92, 0.58, 0.45], np.float32) * rng.uniform(0.9, 1.05)
    return img * (1 - a)[..., None] + _tint(a * shade, colour)


def _skin_bg(rng, s):
    tone = np.array([0.86, 0.66, 0.56], np.float32) * rng.uniform(0.85, 1.05, 3).astype(np.float32)
    light = (0.9 + 0.15 * _smooth(rng, s, s, 7)) * np.clip(1.4 - 0.6 * _fov(s, rng, 0.6), 0, 1)
    return _tint(light, tone)


def _skin_paint(rng, img, t, s):
    a = _soft(t, 0.1)
    h, w = t.shape
    network = 0.8 + 0.3 * (np.sin(_smooth(rng, h, w, max(2, 30 * max(h, w) // s)) * 20.0) > 0)
    dark = 1.0 - 0.45 * _soft(t / 0.6, 0.3)
    colour = np.array([0.45, 0.28, 0.18], np.float32) * rng.uniform(0.8, 1.1)
    return img * (1 - a)[..., None] + _tint(a * network * dark, colour)


def _skin_hairs(rng, img, s):
    lines = []
    for _ in range(int(rng.integers(0, 6))):
        x0, y0 = rng.uniform(0, s, 2)
        ang = rng.uniform(0, math.pi)
        length = rng.uniform(0.3, 0.8) * s
        lines.append([(x0 + math.cos(ang) * length * k / 8 + 3 * math.sin(k), y0 + math.sin(ang) * length * k / 8)
                      for k in range(9)])
    if not lines:
        return img
    return img * (1 - 0.8 * _lines(s, lines, max(1, s // 200)))[..., None]


def _fundus_bg(rng, s):
    fov = _fov(s, rng, 0.47)
    c = s / 2
    macula = _ellipse(s, c, c, 0.07 * s, 0.07 * s)
    side = 1 if rng.random() < 0.5 else -1
    dx, dy = c + side * 0.3 * s, c + rng.uniform(-0.05, 0.05) * s
    vessels = []
    for k in range(6):  # fanning out of the optic disc, towards the other side
        ang = (k - 2.5) * 0.45 + (math.pi if side > 0 else 0.0)
        vessels.append([(dx + math.cos(ang + 0.25 * math.sin(j * 0.7 + k)) * j / 11 * 0.75 * s,
                         dy + math.sin(ang + 0.25 * math.sin(j * 0.7 + k)) * j / 11 * 0.75 * s) for j in range(12)])
    light = (1.05 - 0.45 * np.clip(fov, 0, 1) ** 2) * (0.92 + 0.12 * _smooth(rng, s, s, 6))
    light = light * (1 - 0.3 * _soft(macula, 0.8)) * (1 - 0.45 * _lines(s, vessels, max(1, s // 110)))
    img = _tint(np.where(fov < 1, light, 0.0), (0.82, 0.38, 0.16))
    disc = _ellipse(s, dx, dy, 0.07 * s, 0.08 * s) < 1
    img[disc] = (0.98, 0.88, 0.6)
    return img


def _fundus_paint(rng, img, t, s):
    a = _soft(t, 0.15)
    h, w = t.shape
    colour = (0.98, 0.92, 0.45) if rng.random() < 0.5 else (0.45, 0.05, 0.04)  # exudate or haemorrhage
    tex = 0.9 + 0.15 * _smooth(rng, h, w, max(2, 20 * max(h, w) // s))
    return img * (1 - a)[..., None] + _tint(a * tex, colour)


def _histology_bg(rng, s):
    stain = 0.55 + 0.35 * _smooth(rng, s, s, 9)  # eosin: pink stroma, uneven
    img = _tint(stain, (0.95, 0.62, 0.78)) + _tint(1 - stain, (0.98, 0.9, 0.95))
    holes = _smooth(rng, s, s, 5) > 0.78  # fat and lumens: white gaps
    img[holes] = (0.97, 0.95, 0.97)
    layer = Image.new("L", (s, s), 0)  # scattered haematoxylin-stained nuclei
    draw = ImageDraw.Draw(layer)
    rad = max(1.0, s / 160)
    for x, y in rng.uniform(0, s, (int(0.004 * s * s / 4), 2)):
        draw.ellipse((x - rad, y - rad * 0.7, x + rad, y + rad * 0.7), fill=255)
    nuclei = np.asarray(layer, np.float32)[..., None] / 255.0
    return img * (1 - nuclei) + nuclei * np.array([0.42, 0.22, 0.55], np.float32)


def _histology_paint(rng, img, t, s):
    a = _soft(t, 0.2)
    h, w = t.shape
    crowd = (_smooth(rng, h, w, max(2, 40 * max(h, w) // s)) > 0.45).astype(np.float32)  # packed nuclei
    colour = np.array([0.36, 0.16, 0.5], np.float32) * rng.uniform(0.85, 1.1)
    tumour = _tint(0.75 + 0.3 * crowd, colour)
    return img * (1 - a)[..., None] + tumour * a[..., None]


def _jet(v: np.ndarray) -> np.ndarray:
    """A blue-green-yellow-red pseudo-colour scale for a 0..1 temperature map."""
    v = np.clip(v, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1).astype(np.float32)


def _thermal_bg(rng, s):
    c = s / 2 + rng.uniform(-0.03, 0.03, 2) * s
    body = _ellipse(s, c[0], c[1], 0.4 * s, 0.46 * s)
    temp = np.where(body < 1, 0.42 + 0.12 * _smooth(rng, s, s, 4) - 0.1 * np.clip(body, 0, 1) ** 2, 0.08)
    return _jet(temp + 0.01 * rng.standard_normal((s, s), dtype=np.float32))


def _thermal_paint(rng, img, t, s):
    heat = np.clip(1.0 - t, 0, 1) ** 0.5  # hottest in the middle of the lesion
    hot = _jet(0.72 + 0.25 * heat)
    a = _soft(t, 0.12)
    halo = _soft(t / 1.6, 0.4) * (t >= 1)  # warm margin outside the mask
    warm = _jet(np.full(t.shape, 0.62, np.float32))
    out = img * (1 - halo)[..., None] + warm * halo[..., None]
    return out * (1 - a)[..., None] + hot * a[..., None]


_STYLE_DEFS: dict[str, _Style] = {
    "brain_tumors_ct_scan": _Style(_brain_bg, _brain_paint, (0.05, 0.12), 0.35, ".png"),
    "breast_tumors_ct_scan": _Style(_breast_bg, _breast_paint, (0.06, 0.13), 0.25, ".png"),
    "lung_CT": _Style(_lung_ct_bg, _lung_ct_paint, (0.025, 0.06), 0.15, ".png"),
    "lung_Xray": _Style(_xray_bg, _xray_paint, (0.05, 0.11), 0.3, ".png"),
    "polyp_endoscopy": _Style(_polyp_bg, _polyp_paint, (0.06, 0.14), 0.2, ".jpg"),
    "skin_rgbimage": _Style(_skin_bg, _skin_paint, (0.08, 0.17), 0.45, ".jpg", _skin_hairs),
    "retina_fundus": _Style(_fundus_bg, _fundus_paint, (0.025, 0.07), 0.3, ".png"),
    "histology_slide": _Style(_histology_bg, _histology_paint, (0.05, 0.12), 0.4, ".jpg"),
    "thermal_image": _Style(_thermal_bg, _thermal_paint, (0.04, 0.1), 0.25, ".png"),
}


# ---------------------------------------------------------------------------------------------------------------
# One sample, and the whole dataset


def render_sample(style: str, seed: int, index: int, size: int = 256, *, two_lesions: bool | None = None,
                  two_lesion_fraction: float = 0.3, no_lesion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image (H, W) or (H, W, 3), bool mask) for one sample; deterministic in (style, seed, index).
    ``no_lesion`` draws the background alone, with an empty mask."""
    if style not in _STYLE_DEFS:
        raise ValueError(f"unknown style {style!r}: expected one of {', '.join(_STYLE_DEFS)}")
    rng = np.random.default_rng([seed, _STYLE_CODE[style], index])
    st = _STYLE_DEFS[style]
    img = st.background(rng, size).astype(np.float32)
    if no_lesion:
        if st.post is not None:
            img = st.post(rng, img, size)
        return _to_u8(img), np.zeros((size, size), dtype=bool)
    if two_lesions is None:
        two_lesions = style == "lung_CT" and rng.random() < two_lesion_fraction
    first = TARGETS[(index + int(rng.integers(0, len(TARGETS)))) % len(TARGETS)]
    lesions = [_place(rng, size, first, st.r_range, st.irregular)]
    if two_lesions:
        others = [t for t in TARGETS if t[0] != first[0] and t[0] != "center"]
        for _ in range(10):
            cand = _place(rng, size, others[int(rng.integers(0, len(others)))], st.r_range, st.irregular)
            gap = math.hypot(cand.cx - lesions[0].cx, cand.cy - lesions[0].cy)
            if gap > cand.extent() + lesions[0].extent() + 4:
                lesions.append(cand)
                break
    mask = np.zeros((size, size), dtype=bool)
    for lesion in lesions:
        # the margin leaves room for what a style paints around a lesion (oedema, acoustic enhancement, haze)
        window, t = lesion.window_field(size, 0.6 * lesion.extent() + 0.08 * size)
        mask[window] |= t < 1
        img[window] = st.paint(rng, img[window], t, size)
    if st.post is not None:
        img = st.post(rng, img, size)
    return _to_u8(img), mask


@dataclass
class SynthSummary:
    root: str
    seed: int
    size: int
    styles: list[str]
    images: int = 0
    rows: int = 0
    by_modality: dict[str, int] = field(default_factory=dict)
    by_split: dict[str, int] = field(default_factory=dict)
    by_zone: dict[str, int] = field(default_factory=dict)
    two_lesion_images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    total = sum(fractions)
    n_val = int(round(n * fractions[1] / total))
    n_test = int(round(n * fractions[2] / total))
    if n >= 3:  # a split asked for gets at least one image; one given no share stays empty
        n_val = max(1, n_val) if fractions[1] > 0 else n_val
        n_test = max(1, n_test) if fractions[2] > 0 else n_test
    return n - n_val - n_test, n_val, n_test


def _encode(arr: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
    if ext == ".jpg":
        img.save(buf, format="JPEG", quality=92)
    else:
        # noisy medical-like images barely compress; fast RLE zlib keeps writing cheap (and deterministic)
        img.save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def synthesize(out_dir, n: int = 600, seed: int = 0, size: int = 256, modalities: Sequence[str] | None = None, *,
               style: str = "standard", questions_per_image: int = 1, split_fractions=(0.8, 0.1, 0.1),
               two_lesion_fraction: float = 0.3, no_lesion_fraction: float = 0.0,
               phrasing: str = "standard") -> SynthSummary:
    """Write ``n`` images (shared evenly among the styles) in the authors' layout under ``out_dir``.

    ``style="standard"`` draws the six modalities, ``style="unseen"`` the seventh (``retina_fundus``), and any
    unseen style's name (:data:`UNSEEN_STYLES`) that one; ``modalities`` picks styles by folder name instead. Each
    image gets ``questions_per_image`` rows with different questions; ``test`` rows use the 5 held-out questions,
    ``train``/``val`` rows the 50 others. ``no_lesion_fraction`` of the images show no lesion: an empty mask and
    an answer that says so. ``phrasing`` words the answers another way (:data:`prsmed.data.templates.PHRASINGS`).
    """
    if modalities is None:
        if style in UNSEEN_STYLES:
            modalities = (style,)
        elif style not in ("standard", "unseen"):
            raise ValueError(f"unknown style {style!r}: expected 'standard' (the six modalities), 'unseen' or one "
                             f"of {', '.join(UNSEEN_STYLES)}")
        else:
            modalities = STANDARD if style == "standard" else (UNSEEN_STYLE.folder,)
    if not 0.0 <= no_lesion_fraction < 1.0:
        raise ValueError(f"no_lesion_fraction must be in [0, 1), found {no_lesion_fraction}")
    unknown = [m for m in modalities if m not in _STYLE_DEFS]
    if unknown:
        raise ValueError(f"unknown modality style(s) {unknown}: expected some of {', '.join(_STYLE_DEFS)}")
    if n < 1 or size < 32:
        raise ValueError(f"need n >= 1 and size >= 32, found n={n}, size={size}")
    if not 1 <= questions_per_image <= len(TEST_QUESTIONS):
        raise ValueError(f"questions_per_image must be 1..{len(TEST_QUESTIONS)}, found {questions_per_image}")
    root = Path(out_dir)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    summary = SynthSummary(str(root), seed, size, list(modalities))
    per = [n // len(modalities) + (1 if i < n % len(modalities) else 0) for i in range(len(modalities))]
    for modality, count in zip(modalities, per):
        info = STYLES[modality]
        st = _STYLE_DEFS[modality]
        order = np.random.default_rng([seed, _STYLE_CODE[modality], 10**9]).permutation(count)
        n_train, n_val, _ = _split_counts(count, split_fractions)
        split_of = {}
        for rank, idx in enumerate(order):
            split_of[int(idx)] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
        rows = []
        # Which images show no lesion: drawn from their own stream, so the others stay as they were without any.
        empty_rng = np.random.default_rng([seed, _STYLE_CODE[modality], 10**9 + 1])
        empty = empty_rng.random(count) < no_lesion_fraction
        for i in range(count):
            split = split_of[i]
            image, mask = render_sample(modality, seed, i, size, two_lesion_fraction=two_lesion_fraction,
                                        no_lesion=bool(empty[i]))
            zinfo = zone_of_mask(mask)
            if zinfo.zone == "none" and not empty[i]:  # a placement never yields an empty mask, but be safe
                continue
            isic = modality == "skin_rgbimage"
            stem = f"ISIC_{i:07d}" if isic else f"{i:05d}"
            img_rel = f"{modality}/{split}_images/{stem}{st.ext}"
            mask_rel = f"{modality}/{split}_masks/{stem}{'_Segmentation' if isic else ''}.png"
            mask_png = _encode(mask.astype(np.uint8) * 255, ".png")
            for rel, payload in ((img_rel, _encode(image, st.ext)), (mask_rel, mask_png)):
                path = root / "data" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(payload)
            qrng = random.Random(f"{seed}:{modality}:{i}")
            pool = TEST_QUESTIONS if split == "test" else TRAIN_QUESTIONS
            lesions = zinfo.lesions
            for template in qrng.sample(pool, questions_per_image):
                qa = make_qa(lesions, modality=info.display, target=info.target, split=split, rng=qrng,
                             question=template, phrasing=phrasing)
                rows.append((mask_rel, Path(img_rel).name, split, qa.question, qa.answer, qa.position))
            summary.images += 1
            summary.by_split[split] = summary.by_split.get(split, 0) + 1
            label = zone_label(zinfo)
            summary.by_zone[label] = summary.by_zone.get(label, 0) + 1
            summary.two_lesion_images += len(lesions) == 2
        with open(root / "annotations" / f"{modality}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image_path", "image_name", "split", "question", "answer", "position"])
            writer.writerows(rows)
        summary.rows += len(rows)
        summary.by_modality[modality] = len(rows)
    info = {"generator": "prsmed.data.synth", "version": SYNTH_VERSION, **summary.to_dict()}
    if no_lesion_fraction or phrasing != "standard":  # recorded only when used, so older files read the same
        info.update(no_lesion_fraction=no_lesion_fraction, phrasing=phrasing)
    info.pop("root")
    (root / "synth.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary

