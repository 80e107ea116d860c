"""The FM schedule of the paper (eq. 5, appendix B.1), stated once.

At timestep t of T, rho = t / T; the low-frequency box has size
tau = (H * c * (1 - rho), W * c * (1 - rho)) and the low frequencies of the
reference enter with weight 1 - rho. ``lowpass_blend(z, z_ref, cutoff, gain)`` with
``cutoff, gain = fm_schedule(t, T, H, W, c)`` is the paper's f_t(z_ref, z).
"""

from __future__ import annotations

import math
from typing import Tuple

from ._checks import check_finite_in_range, check_real_in_range, is_real_number


def fm_schedule(t: float, T: float, height: int, width: int, c: float = 0.5) -> Tuple[Tuple[float, float], float]:
    """Return ``((cutoff_h, cutoff_w), gain)`` for timestep ``t`` of ``T`` on an H x W latent.

    ``T`` and ``c`` must be finite (inf would make rho = t / T or c * (1 - rho)
    meaningless, NaN at t = T); the op itself accepts cutoff = inf as the full band.
    """
    if not is_real_number(T):
        raise TypeError(f"T (number of training timesteps) must be a real number > 0, got {T!r}")
    T = float(T)
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"T (number of training timesteps) must be finite and > 0, got {T!r}")
    t = check_real_in_range("t", t, 0.0, T)
    c = check_finite_in_range("c", c, 0.0)
    for name, n in (("height", height), ("width", width)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    rho = t / T
    return (height * c * (1.0 - rho), width * c * (1.0 - rho)), 1.0 - rho
