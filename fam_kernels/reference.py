"""Slow, literal references of the two ops: the paper's equations written out, the
oracles every backend is tested against. Not for production use.

Both compute in ``precision`` (float32 by default, as a user would run them; tests
pass float64) and return the input dtype.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

# --------------------------------------------------------------------------- FM


def _centred_box(h: int, w: int, tau_h: float, tau_w: float, device) -> torch.Tensor:
    """True where |y - y_c| < tau_h / 2 and |x - x_c| < tau_w / 2 on the fftshift-ed
    spectrum (centre y_c = h // 2, x_c = w // 2), appendix B.1."""
    y = torch.arange(h, device=device, dtype=torch.float64) - h // 2
    x = torch.arange(w, device=device, dtype=torch.float64) - w // 2
    return (2 * y.abs() < tau_h)[:, None] & (2 * x.abs() < tau_w)[None, :]


def _spectral_mix(z: torch.Tensor, z_tilde: torch.Tensor, K: torch.Tensor, precision) -> torch.Tensor:
    """IDFT2( K * DFT2(z) + (1 - K) * DFT2(z_tilde) ), K given on the shifted spectrum (eq. 4)."""
    dims = (-2, -1)
    Z = torch.fft.fftshift(torch.fft.fft2(z.to(precision)), dim=dims)
    Zt = torch.fft.fftshift(torch.fft.fft2(z_tilde.to(precision)), dim=dims)
    mixed = K * Z + (1 - K) * Zt
    return torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=dims)).real.to(z.dtype)


def fm_modulate(z: torch.Tensor, z_tilde: torch.Tensor, t: float, T: float, c: float = 0.5,
                precision: torch.dtype = torch.float32) -> torch.Tensor:
    """Paper eq. 4 with K(t) of appendix B.1: f_t(z_tilde, z) on the last two axes."""
    h, w = z.shape[-2:]
    rho = t / T
    tau_h, tau_w = h * c * (1 - rho), w * c * (1 - rho)
    K = torch.where(_centred_box(h, w, tau_h, tau_w, z.device), rho, 1.0).to(precision)
    return _spectral_mix(z, z_tilde, K, precision)


def lowpass_blend_reference(z: torch.Tensor, z_ref: torch.Tensor, cutoff: Sequence[float], gain: float,
                            precision: torch.dtype = torch.float32) -> torch.Tensor:
    """z + gain * LP(z_ref - z), LP keeping |k_y| < cutoff[0]/2, |k_x| < cutoff[1]/2, via eq. 4
    with K = 1 - gain inside the box and 1 outside."""
    h, w = z.shape[-2:]
    K = torch.where(_centred_box(h, w, float(cutoff[0]), float(cutoff[1]), z.device), 1.0 - gain, 1.0)
    return _spectral_mix(z, z_ref, K.to(precision), precision)


# --------------------------------------------------------------------------- AM

DEFAULT_MAX_BYTES = 4 << 30


def nearest_token_index(hr_size: Tuple[int, int], lr_size: Tuple[int, int], device=None) -> torch.Tensor:
    """For each high-res token of a row-major (H, W) grid, the native token of the
    (h, w) grid it falls in under nearest upsampling: (i // s_h) * w + (j // s_w)."""
    (H, W), (h, w) = hr_size, lr_size
    rows = torch.arange(H, device=device) // (H // h)
    cols = torch.arange(W, device=device) // (W // w)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def am_attention_materialized(q, k, v, q_lr, k_lr, *, lam: float, hr_size, lr_size, scale=None,
                              precision: torch.dtype = torch.float32,
                              max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Paper eq. 6-7 literally: out = (lam * U(M^n) + (1 - lam) * M^m) V, with
    M = softmax(Q K^T * scale) and U the nearest upsampling of both token axes,
    divided by s_h * s_w so that every row still sums to 1.

    Builds several N x N maps; refuses (ValueError with the bytes needed) when they
    would exceed ``max_bytes``.
    """
    B, heads, N, d = q.shape
    (H, W), (h, w) = tuple(hr_size), tuple(lr_size)
    itemsize = torch.empty((), dtype=precision).element_size()
    needed = 3 * B * heads * N * N * itemsize  # M^m, U(M^n), their blend
    if needed > max_bytes:
        raise ValueError(
            f"am_attention_materialized would need {needed:,} bytes for its N x N maps "
            f"(N={N}, B={B}, heads={heads}) > max_bytes={max_bytes:,}; use fam_kernels.am_attention"
        )
    scale = d ** -0.5 if scale is None else scale
    qf, kf, vf, qn, kn = (x.to(precision) for x in (q, k, v, q_lr, k_lr))
    M_hr = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)
    M_lr = torch.softmax(qn @ kn.transpose(-1, -2) * scale, dim=-1)
    idx = nearest_token_index((H, W), (h, w), device=q.device)
    s = (H // h) * (W // w)
    M_lr_up = M_lr[..., idx, :][..., :, idx] / s
    blended = lam * M_lr_up + (1 - lam) * M_hr
    return (blended @ vf).to(q.dtype)
