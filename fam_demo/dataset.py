"""Procedural "one saturated shape on a dull textured background" dataset.

Everything is seeded and resolution independent: a :class:`Scene` holds object
and background parameters in relative units, and :func:`render` draws it at any
pixel size with numpy, anti-aliased by supersampling. Captions follow one fixed
grammar::

    "a {color} {shape} on a {pattern} {tone} background"

e.g. ``"a red star on a striped grey background"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

SHAPES: List[str] = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon"]

# Saturated object colours (linear 0..1 RGB); every one has HSV saturation >= 0.85.
COLOR_RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.92),
    "yellow": (0.95, 0.85, 0.08),
    "orange": (0.96, 0.50, 0.05),
    "purple": (0.55, 0.12, 0.82),
    "cyan": (0.05, 0.80, 0.88),
    "magenta": (0.90, 0.08, 0.72),
}
COLORS: List[str] = list(COLOR_RGB)

# Low-saturation background tones (HSV saturation <= 0.25).
TONE_RGB = {
    "grey": (0.60, 0.60, 0.60),
    "beige": (0.74, 0.68, 0.57),
    "slate": (0.50, 0.55, 0.63),
}
PATTERNS: List[str] = ["striped", "checkered", "gradient", "noisy", "dotted", "plain"]
TONES: List[str] = list(TONE_RGB)
BACKGROUNDS: List[str] = [f"{p} {t}" for p in PATTERNS for t in TONES]


def caption(shape: str, color: str, background: str) -> str:
    """The caption of one scene, e.g. ``caption("star", "red", "striped grey")``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    if color not in COLOR_RGB:
        raise ValueError(f"unknown color {color!r}; choose from {COLORS}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose from {BACKGROUNDS}")
    return f"a {color} {shape} on a {background} background"


def parse_caption(text: str) -> Tuple[str, str, str]:
    """(shape, color, background) of a caption of the grammar; ValueError otherwise."""
    words = text.split()
    if len(words) == 8 and words[0] == "a" and words[3:5] == ["on", "a"] and words[7] == "background":
        shape, color, background = words[2], words[1], f"{words[5]} {words[6]}"
        if shape in SHAPES and color in COLOR_RGB and background in BACKGROUNDS \
                and caption(shape, color, background) == text:
            return shape, color, background
    raise ValueError(f"{text!r} is not a caption of the grammar 'a {{color}} {{shape}} on a {{background}} background'")


def vocabulary_words() -> List[str]:
    """Every word the grammar can produce (the tokenizer's vocabulary)."""
    words = ["a", "on", "background"] + SHAPES + COLORS + PATTERNS + TONES
    return sorted(set(words))


@dataclass
class ShapeObject:
    shape: str
    color: str
    cx: float  # centre, fraction of the width
    cy: float  # centre, fraction of the height
    radius: float  # circumradius, fraction of min(height, width)
    angle: float  # rotation, radians
    rgb: Tuple[float, float, float]


@dataclass
class Background:
    pattern: str
    tone: str
    rgb: Tuple[float, float, float]
    angle: float
    period: float  # fraction of min(height, width)
    amplitude: float
    phase: float
    noise: np.ndarray = field(repr=False)  # (8, 8) values in [-1, 1] for "noisy"

    @property
    def name(self) -> str:
        return f"{self.pattern} {self.tone}"


@dataclass
class Scene:
    objects: List[ShapeObject]
    background: Background

    @property
    def caption(self) -> str:
        obj = self.objects[0]
        return caption(obj.shape, obj.color, self.background.name)


# ----------------------------------------------------------------------------- sampling

def sample_background(rng: np.random.Generator, pattern: str | None = None, tone: str | None = None) -> Background:
    pattern = pattern or PATTERNS[rng.integers(len(PATTERNS))]
    tone = tone or TONES[rng.integers(len(TONES))]
    base = np.asarray(TONE_RGB[tone]) + rng.uniform(-0.04, 0.04)  # brightness jitter, keeps the hue
    return Background(
        pattern=pattern,
        tone=tone,
        rgb=tuple(float(v) for v in np.clip(base, 0, 1)),
        angle=float(rng.uniform(0, math.pi)),
        period=float(rng.uniform(0.09, 0.18)),
        amplitude=float(rng.uniform(0.05, 0.09)),
        phase=float(rng.uniform(0, 1)),
        noise=rng.uniform(-1, 1, size=(8, 8)),
    )


def sample_object(rng: np.random.Generator, shape: str | None = None, color: str | None = None,
                  radius_range: Tuple[float, float] = (0.2, 0.34)) -> ShapeObject:
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or COLORS[rng.integers(len(COLORS))]
    radius = float(rng.uniform(*radius_range))
    margin = radius + 0.03
    rgb = np.clip(np.asarray(COLOR_RGB[color]) + rng.uniform(-0.04, 0.04, size=3), 0, 1)
    return ShapeObject(
        shape=shape,
        color=color,
        cx=float(rng.uniform(margin, 1 - margin)),
        cy=float(rng.uniform(margin, 1 - margin)),
        radius=radius,
        angle=float(rng.uniform(0, 2 * math.pi)),
        rgb=tuple(float(v) for v in rgb),
    )


def sample_scene(rng: np.random.Generator, n_objects: int = 1, **fixed) -> Scene:
    """One scene. ``n_objects > 1`` places smaller, non-touching objects (used to
    validate the segmentation on ground truth with known counts)."""
    background = sample_background(rng, fixed.get("pattern"), fixed.get("tone"))
    if n_objects == 1:
        return Scene([sample_object(rng, fixed.get("shape"), fixed.get("color"))], background)
    objects: List[ShapeObject] = []
    radius_range = (0.12, 0.18) if n_objects <= 3 else (0.08, 0.12)
    for _ in range(10_000):
        cand = sample_object(rng, radius_range=radius_range)
        # Keep a gap of 0.08 between circumcircles so objects never touch.
        if all(math.hypot(cand.cx - o.cx, cand.cy - o.cy) > cand.radius + o.radius + 0.08 for o in objects):
            objects.append(cand)
            if len(objects) == n_objects:
                return Scene(objects, background)
    raise RuntimeError(f"could not place {n_objects} objects")


# ---------------------------------------------------------------------------- rendering

def _polygon_inside(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Regular n-gon with circumradius 1 centred at 0, one vertex on +x."""
    apothem = math.cos(math.pi / n)
    inside = np.ones(x.shape, dtype=bool)
    for k in range(n):
        phi = (2 * k + 1) * math.pi / n
        inside &= x * math.cos(phi) + y * math.sin(phi) < apothem
    return inside


def _star_inside(x: np.ndarray, y: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    rho = np.hypot(x, y)
    sector = 2 * math.pi / points
    a = np.mod(np.arctan2(y, x), sector)
    a = np.where(a > sector / 2, sector - a, a)  # fold onto [0, sector/2]
    px, py = rho * np.cos(a), rho * np.sin(a)
    # Edge from the outer vertex (1, 0) to the inner vertex at angle sector/2.
    qx, qy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    cross = (qx - 1.0) * py - qy * (px - 1.0)
    return cross > 0  # origin side of the edge


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean inside test in the object's frame (circumradius 1)."""
    if shape == "circle":
        return x * x + y * y < 1.0
    if shape == "ring":
        d2 = x * x + y * y
        return (d2 < 1.0) & (d2 > 0.55 ** 2)
    if shape == "square":
        return _polygon_inside(x, y, 4)
    if shape == "triangle":
        return _polygon_inside(x, y + 0.15, 3)  # shift so the centroid-ish sits at 0
    if shape == "hexagon":
        return _polygon_inside(x, y, 6)
    if shape == "diamond":
        return np.abs(x) / 0.65 + np.abs(y) < 1.0
    if shape == "cross":
        arm, length = 0.32, 0.95
        return ((np.abs(x) < arm) & (np.abs(y) < length)) | ((np.abs(y) < arm) & (np.abs(x) < length))
    if shape == "star":
        return _star_inside(x, y)
    raise ValueError(f"unknown shape {shape!r}")


def _background(bg: Background, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Background luminance offset in [-amp, amp]; u, v in units of min(H, W)."""
    c, s = math.cos(bg.angle), math.sin(bg.angle)
    t = u * c + v * s
    amp = bg.amplitude
    if bg.pattern == "striped":
        return amp * np.where(np.mod(t / bg.period + bg.phase, 1.0) < 0.5, 1.0, -1.0)
    if bg.pattern == "checkered":
        w = -u * s + v * c
        parity = (np.floor(t / bg.period + bg.phase) + np.floor(w / bg.period + bg.phase)) % 2
        return amp * (2 * parity - 1)
    if bg.pattern == "gradient":
        return 1.8 * amp * (2 * np.clip(t / 1.4 + 0.5, 0, 1) - 1)
    if bg.pattern == "dotted":
        w = -u * s + v * c
        fu = np.mod(t / bg.period + bg.phase, 1.0) - 0.5
        fw = np.mod(w / bg.period + bg.phase, 1.0) - 0.5
        return np.where(fu * fu + fw * fw < 0.2 ** 2, -1.5 * amp, 0.3 * amp)
    if bg.pattern == "noisy":
        g = bg.noise.shape[0]
        gx = np.clip(u, 0, None) * (g - 1)
        gy = np.clip(v, 0, None) * (g - 1)
        x0 = np.clip(np.floor(gx).astype(int), 0, g - 2)
        y0 = np.clip(np.floor(gy).astype(int), 0, g - 2)
        fx, fy = np.clip(gx - x0, 0, 1), np.clip(gy - y0, 0, 1)
        n = bg.noise
        val = (n[y0, x0] * (1 - fx) * (1 - fy) + n[y0, x0 + 1] * fx * (1 - fy)
               + n[y0 + 1, x0] * (1 - fx) * fy + n[y0 + 1, x0 + 1] * fx * fy)
        return 1.5 * amp * val
    if bg.pattern == "plain":
        return np.zeros_like(u)
    raise ValueError(f"unknown pattern {bg.pattern!r}")


def render(scene: Scene, size: int | Tuple[int, int] = 64, supersample: int = 4) -> np.ndarray:
    """Draw ``scene`` as a (H, W, 3) uint8 array. ``size`` is an int or (H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    ss = max(1, int(supersample))
    unit = min(h, w)
    ys = (np.arange(h * ss, dtype=np.float64) + 0.5) / ss  # pixel coordinates
    xs = (np.arange(w * ss, dtype=np.float64) + 0.5) / ss
    X, Y = np.meshgrid(xs, ys)
    u, v = X / unit, Y / unit
    img = np.empty((h * ss, w * ss, 3), dtype=np.float64)
    img[:] = scene.background.rgb
    img += _background(scene.background, u, v)[..., None]
    for obj in scene.objects:
        dx = (X - obj.cx * w) / (obj.radius * unit)
        dy = (Y - obj.cy * h) / (obj.radius * unit)
        c, s = math.cos(obj.angle), math.sin(obj.angle)
        lx, ly = dx * c + dy * s, -dx * s + dy * c
        inside = shape_mask(obj.shape, lx, ly)
        # Gentle shading across the object keeps it saturated but not flat.
        shade = 1.0 - 0.08 * np.clip(ly, -1, 1)
        col = np.clip(np.asarray(obj.rgb)[None, None, :] * shade[..., None], 0, 1)
        img = np.where(inside[..., None], col, img)
    img = np.clip(img, 0, 1)
    if ss > 1:
        img = img.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))
    return (img * 255 + 0.5).astype(np.uint8)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of item ``index`` of the dataset with ``seed`` (independent of its length)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def generate_dataset(n: int, size: int = 64, seed: int = 0, start: int = 0) -> Tuple[np.ndarray, List[str]]:
    """Items ``start .. start+n-1`` of the seeded dataset: (n, size, size, 3) uint8 and captions."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: List[str] = []
    for i in range(n):
        scene = sample_scene(scene_rng(seed, start + i))
        images[i] = render(scene, size)
        captions.append(scene.caption)
    return images, captions


def all_captions() -> List[str]:
    return [caption(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS]


def scenes_for(shapes: Sequence[str], colors: Sequence[str], backgrounds: Sequence[str], seed: int) -> List[Scene]:
    """Deterministic scenes with the given attributes (paired element-wise)."""
    out = []
    for i, (s, c, b) in enumerate(zip(shapes, colors, backgrounds)):
        pattern, tone = b.split(" ")
        out.append(sample_scene(scene_rng(seed, i), shape=s, color=c, pattern=pattern, tone=tone))
    return out
