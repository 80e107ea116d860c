"""The low-pass band of ``lowpass_blend``, stated once for every backend.

On an axis of length n the op keeps the centred frequencies k (fftshift centre
n // 2, so k in [-(n // 2), n - n // 2 - 1]) with ``2 * |k| < cutoff``. That set is
symmetric under k -> -k (mod n): for even n the lone k = -n/2 is the Nyquist bin,
its own conjugate. So the band is described by one count, ``kept``: the rfft bins
0 .. kept - 1, i.e. the full-FFT bins b with ``min(b, n - b) < kept``. The
projection onto it is real and has an orthonormal real basis (n x rank):

    cos columns  k = 0 .. kept-1   c_k(j) = cos(2 pi k j / n) * sqrt(2/n)  (sqrt(1/n) for k = 0 and 2k = n)
    sin columns  k = 1 .. kept-1   s_k(j) = sin(2 pi k j / n) * sqrt(2/n)  (none for 2k = n)

and LP(D) = B_h B_h^T D B_w B_w^T per plane. Since c_k(n - j) = c_k(j) and
s_k(n - j) = -s_k(j), a line x can be *folded* into its even part
e_j = x_j + x_{n-j} (j = 0 .. n//2, unpaired j taken once) and odd part
o_j = x_j - x_{n-j} (j = 1 .. (n-1)//2): B^T x = [C^T e ; S^T o] with C, S the
first rows of the cos and sin columns, halving every GEMM (csrc/include/fam/lowpass_math.h).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def kept_bins(n: int, cutoff: float) -> int:
    """Number of rfft bins (0, 1, ...) of an n-point axis inside the band ``2|k| < cutoff``:
    the integers 0 <= k <= n // 2 with k < cutoff / 2. Any cutoff > 0 keeps k = 0, also a
    subnormal one whose half underflows to 0."""
    cutoff = float(cutoff)
    if cutoff <= 0:
        return 0
    return n // 2 + 1 if cutoff >= n + 2 else min(n // 2 + 1, max(1, math.ceil(cutoff / 2)))  # inf: the full band


def band_rank(n: int, kept: int) -> int:
    """Dimension of the band: kept cosines plus the sines that do not vanish."""
    if kept == 0:
        return 0
    nyquist = n % 2 == 0 and kept == n // 2 + 1
    return kept + (kept - 1) - (1 if nyquist else 0)


@dataclass(frozen=True)
class BandBasis:
    """Orthonormal real basis of one axis' band, float32, on one device.

    ``full`` is (n, rank) = [cos | sin] columns; ``cos_folded`` (n//2 + 1, n_cos) and
    ``sin_folded`` ((n-1)//2, n_sin) are the rows that act on the folded line.
    """

    n: int
    kept: int
    full: torch.Tensor
    cos_folded: torch.Tensor
    sin_folded: torch.Tensor

    @property
    def rank(self) -> int:
        return self.full.shape[1]


def _basis_float64(n: int, kept: int):
    j = torch.arange(n, dtype=torch.float64)
    ks = torch.arange(kept, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(j, ks) / n
    cos_scale = torch.full((kept,), math.sqrt(2.0 / n), dtype=torch.float64)
    cos_scale[0] = math.sqrt(1.0 / n)
    sin_ks = [k for k in range(1, kept) if 2 * k != n]
    if n % 2 == 0 and kept == n // 2 + 1:
        cos_scale[n // 2] = math.sqrt(1.0 / n)
    cos = torch.cos(angle) * cos_scale
    sin = torch.sin(angle[:, sin_ks]) * math.sqrt(2.0 / n)
    return cos, sin


@functools.lru_cache(maxsize=32)
def band_basis(n: int, kept: int, device: torch.device) -> BandBasis:
    """The band's basis, built in float64, stored in float32; cached per (n, kept, device)."""
    cos, sin = _basis_float64(n, kept)
    to = functools.partial(torch.Tensor.to, dtype=torch.float32, device=device)
    return BandBasis(
        n=n,
        kept=kept,
        full=to(torch.cat([cos, sin], dim=1)).contiguous(),
        cos_folded=to(cos[: n // 2 + 1]).contiguous(),
        sin_folded=to(sin[1 : (n - 1) // 2 + 1]).contiguous(),
    )


@functools.lru_cache(maxsize=32)
def fft_band_mask(n: int, kept: int, device: torch.device) -> torch.Tensor:
    """(n, 1) float32: 1 on the full-FFT bins b of the band (min(b, n - b) < kept), else 0."""
    b = torch.arange(n)
    return (torch.minimum(b, n - b) < kept).to(device=device, dtype=torch.float32)[:, None]


# Measured on the 2-core CPU, one thread, at 128^2 .. 512^2 (forms rows of
# benchmarks/bench_lowpass_blend.py): the low-rank form beats the spectral one while
# its GEMM work per element, rank_w * (1 + rank_h / H), stays below this share of W.
# The cpu backend's folded GEMMs do half the work, hence its higher limit.
LOWRANK_WORK_LIMIT = {"torch": 0.08, "cpu": 0.11}


def prefer_lowrank(height: int, width: int, rank_h: int, rank_w: int, backend: str) -> bool:
    """True when ``backend``'s low-rank GEMM form is cheaper than its spectral (FFT) form."""
    return rank_w * (1.0 + rank_h / height) <= LOWRANK_WORK_LIMIT[backend] * width
