"""Image metrics for the quality evaluation (numpy/torch only).

* structure consistency: PSNR and SSIM (Gaussian window, sigma 1.5, 11 taps, valid
  region, mean over RGB) between the high-res image area-downsampled to the native
  size and the native image;
* detail: spectral energy of the high-res image above the native Nyquist band,
  divided by the same energy of a bicubic upscale of the native image (1 = no
  detail beyond interpolation, > 1 = added detail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

if TYPE_CHECKING:
    from .segmentation import Segmentation


def to_float(image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from uint8/float arrays, PIL images or 3xHxW tensors."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].double()


def downsample_area(image, size: Tuple[int, int]) -> np.ndarray:
    """Area (box) average to ``size`` = (H, W); exact block means for integer factors."""
    img = to_float(image)
    out = F.interpolate(_chw(img), size=size, mode="area")
    return out[0].permute(1, 2, 0).numpy().astype(np.float32)


def upsample_bicubic(image, size: Tuple[int, int]) -> np.ndarray:
    img = (to_float(image) * 255 + 0.5).astype(np.uint8)
    up = Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(up).astype(np.float32) / 255.0


def psnr(a, b) -> float:
    a, b = to_float(a).astype(np.float64), to_float(b).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. 2004 SSIM, data range 1, valid-region mean over channels."""
    x, y = _chw(to_float(a)), _chw(to_float(b))
    h, w = x.shape[-2:]
    window = min(window, h, w) | 1
    if window > min(h, w):
        window -= 2
    g = _gaussian(window, sigma)
    kx = g.view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(3, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kx, groups=3), ky, groups=3)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def highband_energy(image, native_size: Tuple[int, int]) -> float:
    """Mean spectral power of the luminance (Hann-windowed) at frequencies above the
    native Nyquist limit along either axis."""
    img = to_float(image).astype(np.float64)
    lum = img @ np.array([0.299, 0.587, 0.114])
    h, w = lum.shape
    lum = lum - lum.mean()
    win = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2(lum * win)) ** 2
    fy = np.abs(np.fft.fftfreq(h))[:, None]
    fx = np.abs(np.fft.fftfreq(w))[None, :]
    band = (fy > 0.5 * native_size[0] / h) | (fx > 0.5 * native_size[1] / w)
    return float(power[band].sum() / (h * w))


def detail_ratio(high, native) -> float:
    """High-band energy of ``high`` relative to a bicubic upscale of ``native``."""
    hi = to_float(high)
    nat = to_float(native)
    ref = upsample_bicubic(nat, hi.shape[:2])
    return highband_energy(hi, nat.shape[:2]) / max(highband_energy(ref, nat.shape[:2]), 1e-12)


def consistency(high, native) -> Tuple[float, float]:
    """(PSNR, SSIM) of the high-res image downsampled to native size vs the native image."""
    nat = to_float(native)
    down = downsample_area(high, nat.shape[:2])
    return psnr(down, nat), ssim(down, nat)


# ------------------------------------------------------------------------ local quality
#
# Local-quality metrics of the main object (the largest component of
# fam_demo.segmentation), each validated on rendered ground truth by
# :func:`validate_local_metrics` (numbers in docs/demo.md):
#
# * colour fidelity: hue distance (degrees) between the object's median colour and the
#   prompt's colour, or the native image's object;
# * boundary deviation: mean distance (native pixels) between the object's outline and
#   the native object's outline upsampled to the same size (centroids aligned, so a
#   shifted object is not counted here; PSNR measures that);
# * speckle: image area (per mille) of saturated specks too small for the object
#   counter (components below segmentation.MIN_AREA), anywhere in the image.


@dataclass
class ObjectAnalysis:
    """One image segmented once, shared by the local metrics."""

    image: np.ndarray  # (H, W, 3) float32
    seg: "Segmentation"

    @property
    def has_object(self) -> bool:
        return self.seg.count > 0

    @property
    def main(self) -> np.ndarray:
        """(H, W) bool: the largest object after the segmentation's closing."""
        return self.seg.labels == 1

    def color(self) -> np.ndarray:
        """Per-channel median colour of the main object's foreground pixels (anti-aliased
        edge pixels are a minority and do not move the median)."""
        pixels = self.image[self.main & self.seg.foreground]
        return np.median(pixels if len(pixels) else self.image[self.main], axis=0)


def analyze(image) -> ObjectAnalysis:
    from .segmentation import segment

    img = to_float(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    return ObjectAnalysis(img, segment(img))


def _analysis(x) -> ObjectAnalysis:
    return x if isinstance(x, ObjectAnalysis) else analyze(x)


def hue(rgb) -> float:
    """HSV hue in degrees [0, 360) of one RGB colour in [0, 1]; nan for a grey."""
    r, g, b = (float(v) for v in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    c = mx - mn
    if c < 1e-6:
        return math.nan
    if mx == r:
        h = ((g - b) / c) % 6
    elif mx == g:
        h = (b - r) / c + 2
    else:
        h = (r - g) / c + 4
    return 60.0 * h


def hue_distance(a: float, b: float) -> float:
    """Circular distance of two hues in degrees, 0..180 (nan if either is nan)."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def hue_error(image, color: str) -> float:
    """Hue distance (degrees) between the main object's colour and the named prompt
    colour (fam_demo.COLORS); nan when there is no object."""
    from .dataset import COLOR_RGB

    if color not in COLOR_RGB:
        raise ValueError(f"unknown color {color!r}; choose from {list(COLOR_RGB)}")
    a = _analysis(image)
    return hue_distance(hue(a.color()), hue(COLOR_RGB[color])) if a.has_object else math.nan


def hue_error_to(image, reference) -> float:
    """Hue distance (degrees) between the main objects of two images (e.g. high-res vs
    native); nan when either has no object."""
    a, r = _analysis(image), _analysis(reference)
    return hue_distance(hue(a.color()), hue(r.color())) if a.has_object and r.has_object else math.nan


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a mask by whole pixels, filling with False."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def outline_length(mask: np.ndarray) -> float:
    """Length of a mask's outline in pixels: the number of 4-neighbour pixel edges that
    cross it, times pi/4 (the mean over orientations of |dx| + |dy| is 4/pi x length)."""
    m = np.pad(mask.astype(np.int8), 1)
    edges = np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum()
    return float(edges) * math.pi / 4


def boundary_deviation(high, native) -> float:
    """Mean distance, in native pixels, between the main object's outline in ``high``
    and in ``native`` upsampled to the same size: area of the symmetric difference of
    the two masks (after aligning their centroids to the nearest pixel), in native
    pixel units, divided by the native outline's length. nan when either image has no
    object. A clean rendering of the same scene at a larger size scores <= 0.25 (the
    native mask's own pixel grid; validate_local_metrics); jagged or duplicated edges
    score higher."""
    a, n = _analysis(high), _analysis(native)
    if not (a.has_object and n.has_object):
        return math.nan
    (H, W), (h, w) = a.main.shape, n.main.shape
    t = torch.from_numpy(n.main.astype(np.float32))[None, None]
    up = F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5
    hi = a.main
    cy, cx = (np.mean(np.nonzero(hi), axis=1) - np.mean(np.nonzero(up), axis=1)).round().astype(int)
    up = _shift(up, int(cy), int(cx))
    pixel_area = (H / h) * (W / w)  # high-res pixels per native pixel
    return float(np.logical_xor(hi, up).sum() / pixel_area / max(outline_length(n.main), 1.0))


def speckle(image) -> Tuple[float, int]:
    """(area per mille of the image, number) of saturated specks: foreground components
    (after the segmentation's closing) too small for the object counter. A clean
    rendering scores (0, 0). A speck at least segmentation.MIN_AREA large is an object
    to the counter, not a speck."""
    a = _analysis(image)
    from .segmentation import connected_components

    specks = a.seg.mask & (a.seg.labels == 0)
    _, n = connected_components(specks)
    return 1000.0 * float((specks & a.seg.foreground).sum()) / specks.size, n


@dataclass
class LocalQuality:
    hue_error_prompt: float  # degrees; nan without object or without a prompt colour
    hue_error_native: float  # degrees; nan without object in either image
    boundary: float  # native pixels; nan without object in either image
    speckle: float  # per mille of the image area
    specks: int


def local_quality(high, native, color: str | None = None) -> LocalQuality:
    """All local metrics of ``high`` (against ``native`` and, when given, the prompt's
    ``color``), segmenting each image once."""
    a, n = analyze(high), analyze(native)
    area, count = speckle(a)
    return LocalQuality(hue_error(a, color) if color is not None else math.nan, hue_error_to(a, n),
                        boundary_deviation(a, n), area, count)


# ------------------------------------------------------- validation on rendered ground truth

# Output sizes for a 64 px native; 2x4 is rendered square and area-averaged to 128 x 256,
# which is the native picture stretched, as FAM's upsampled latent is.
VALIDATION_SIZES = {"1x1": (64, 64), "2x2": (128, 128), "3x3": (192, 192), "4x4": (256, 256), "2x4": (128, 256)}
# Corruption strengths: hue rotation in degrees; jagged-edge amplitude and echo count /
# flecks count in native pixels / items.
CORRUPTIONS = {"hue": (0, 10, 20, 40, 80), "jagged": (0, 0.5, 1, 2), "echo": (0, 1, 2, 3), "flecks": (0, 2, 4, 8)}


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation by a (2r+1)^2 square, as two separable 1-D max filters."""
    if r <= 0:
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.max_pool2d(t, (2 * r + 1, 1), stride=1, padding=(r, 0))
    return F.max_pool2d(t, (1, 2 * r + 1), stride=1, padding=(0, r))[0, 0].numpy() > 0.5


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    return ~_dilate(~mask, r)


def rotate_hue(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate colours about the grey axis (keeps grey level and chroma), clipped to [0, 1]."""
    k = np.full(3, 1 / math.sqrt(3))
    th = math.radians(degrees)
    v = np.asarray(rgb, dtype=np.float64)
    out = v * math.cos(th) + np.cross(k, v) * math.sin(th) + np.outer(v @ k, k).reshape(v.shape) * (1 - math.cos(th))
    return np.clip(out, 0, 1)


class GroundTruth:
    """``scene`` drawn without anti-aliasing at 4 x max(H, W) px, with and without its
    objects, so that constructed flaws can be composited and then area-averaged to
    ``size`` = (H, W) (anti-aliased like the dataset's renders)."""

    def __init__(self, scene, size: Tuple[int, int], native: int = 64):
        import copy

        from .dataset import render

        h, w = size
        self.size, self.R = (h, w), 4 * max(h, w)
        if self.R % h or self.R % w:
            raise ValueError(f"size {size}: both sides must divide 4 x the larger one")
        self.full = render(scene, self.R, supersample=1).astype(np.float64) / 255
        bare = copy.copy(scene)
        bare.objects = []
        self.bg = render(bare, self.R, supersample=1).astype(np.float64) / 255
        self.obj = np.abs(self.full - self.bg).max(axis=-1) > 1.5 / 255
        self.color = np.median(self.full[self.obj], axis=0)
        self.px = self.R / native  # super-resolution pixels per native pixel

    def corrupt(self, kind: str, strength: float, seed: int = 0) -> np.ndarray:
        """The scene at ``size`` with one constructed flaw:

        * ``hue``: the object's colours rotated by ``strength`` degrees about the grey axis;
        * ``jagged``: the outline alternately grown and shrunk by ``strength`` native
          pixels in 16 angular sectors around the object's centre;
        * ``echo``: ``strength`` concentric copies of the outline, 1 native pixel wide
          with 1 native pixel gaps, outside the object (duplicated edges);
        * ``flecks``: ``strength`` squares of 1 native pixel in object colours, placed at
          random (``seed``) at least 3 native pixels away from the object and each other.
        """
        from .dataset import COLOR_RGB

        if kind not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {kind!r}; choose from {list(CORRUPTIONS)}")
        if strength < 0:
            raise ValueError(f"strength {strength} must be >= 0")
        full, bg, obj, R = self.full, self.bg, self.obj, self.R
        r = int(round(self.px))
        img = full.copy()
        if kind == "hue":
            img[obj] = rotate_hue(full[obj], strength)
        elif kind == "jagged":
            ys, xs = np.nonzero(obj)
            yy, xx = np.mgrid[0:R, 0:R]
            sector = np.floor((np.arctan2(yy - ys.mean(), xx - xs.mean()) + math.pi) / (2 * math.pi) * 16)
            a = int(round(strength * self.px))
            jag = np.where(sector.astype(int) % 2 == 0, _dilate(obj, a), _erode(obj, a))
            img = np.where(jag[..., None], np.where(obj[..., None], full, self.color), bg)
        elif kind == "echo":
            for i in range(1, int(strength) + 1):
                img[_dilate(obj, 2 * i * r) & ~_dilate(obj, (2 * i - 1) * r)] = self.color
        elif kind == "flecks":
            rng = np.random.default_rng(seed)
            free = ~_dilate(obj, 3 * r)
            colors = list(COLOR_RGB.values())
            for _ in range(int(strength)):
                for _ in range(10_000):
                    y, x = (int(v) for v in rng.integers(r, R - 2 * r, size=2))
                    if free[y:y + r, x:x + r].all():
                        break
                else:
                    raise RuntimeError("no room for another fleck")
                img[y:y + r, x:x + r] = colors[rng.integers(len(colors))]
                free[max(0, y - 3 * r):y + 4 * r, max(0, x - 3 * r):x + 4 * r] = False
        return downsample_area(img.astype(np.float32), self.size)


def validation_scenes(n: int = 8, seed: int = 4321):
    """``n`` scenes cycling through every shape, colour, pattern and tone."""
    from .dataset import COLORS, PATTERNS, SHAPES, TONES, scenes_for

    shapes = [SHAPES[i % len(SHAPES)] for i in range(n)]
    colors = [COLORS[(3 * i + 1) % len(COLORS)] for i in range(n)]
    backgrounds = [f"{PATTERNS[i % len(PATTERNS)]} {TONES[i % len(TONES)]}" for i in range(n)]
    return scenes_for(shapes, colors, backgrounds, seed)


def validate_local_metrics(n_scenes: int = 8, sizes=("2x2", "3x3", "4x4", "2x4"), native: int = 64,
                           corruptions=None, seed: int = 4321) -> dict:
    """Every local metric on clean renders and on each constructed corruption.

    Returns ``{(kind, strength): {metric: [values over scenes x sizes]}}`` with kind
    ``"clean"`` (the dataset renderer at that size, strength 0) and the keys of
    :data:`CORRUPTIONS`; metrics ``hue_prompt``, ``hue_native``, ``boundary``,
    ``speckle``. The native image is the scene rendered at ``native`` px."""
    from .dataset import render

    corruptions = CORRUPTIONS if corruptions is None else corruptions
    results: dict = {}

    def add(key, q: LocalQuality):
        d = results.setdefault(key, {"hue_prompt": [], "hue_native": [], "boundary": [], "speckle": []})
        d["hue_prompt"].append(q.hue_error_prompt)
        d["hue_native"].append(q.hue_error_native)
        d["boundary"].append(q.boundary)
        d["speckle"].append(q.speckle)

    for i, scene in enumerate(validation_scenes(n_scenes, seed)):
        color = scene.objects[0].color
        nat = render(scene, native)
        for name in sizes:
            h, w = VALIDATION_SIZES[name]
            f = native // 64
            hw = (h * f, w * f)
            clean = render(scene, max(hw))
            if hw[0] != hw[1]:
                clean = downsample_area(clean, hw)
            add(("clean", 0), local_quality(clean, nat, color))
            truth = GroundTruth(scene, hw, native)
            for kind, strengths in corruptions.items():
                for s in strengths:
                    add((kind, s), local_quality(truth.corrupt(kind, s, seed=i), nat, color))
    return results


def summarize_validation(results: dict) -> str:
    """Markdown table: mean and max of every metric per (kind, strength)."""
    metrics = ["hue_prompt", "hue_native", "boundary", "speckle"]
    lines = ["| case | strength | n | " + " | ".join(f"{m} mean (max)" for m in metrics) + " |",
             "|" + "---|" * (3 + len(metrics))]
    for (kind, s), d in results.items():
        cells = []
        for m in metrics:
            v = np.asarray(d[m], dtype=float)
            cells.append(f"{np.nanmean(v):.2f} ({np.nanmax(v):.2f})" + (f" [{int(np.isnan(v).sum())} nan]"
                                                                        if np.isnan(v).any() else ""))
        lines.append(f"| {kind} | {s} | {len(d[metrics[0]])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
