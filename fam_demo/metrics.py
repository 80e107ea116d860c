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
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
