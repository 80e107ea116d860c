"""The FM schedule of the paper (eq. 5, appendix B.1), stated once.

At timestep t of T, rho = t / T; the low-frequency box has size
tau = (H * c * (1 - rho), W * c * (1 - rho)) and the low frequencies of the
reference enter with weight 1 - rho. ``lowpass_blend(z, z_ref, cutoff, gain)`` with
``cutoff, gain = fm_schedule(t, T, H, W, c)`` is the paper's f_t(z_ref, z).
"""

from __future__ import annotations

from typing import Tuple

from ._checks import check_real_in_range


def fm_schedule(t: float, T: float, height: int, width: int, c: float = 0.5) -> Tuple[Tuple[float, float], float]:
    """Return ``((cutoff_h, cutoff_w), gain)`` for timestep ``t`` of ``T`` on an H x W latent."""
    T = float(T)
    if not T > 0:
        raise ValueError(f"T (number of training timesteps) must be > 0, got {T!r}")
    t = check_real_in_range("t", t, 0.0, T)
    c = check_real_in_range("c", c, 0.0, float("inf"))
    for name, n in (("height", height), ("width", width)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    rho = t / T
    return (height * c * (1.0 - rho), width * c * (1.0 - rho)), 1.0 - rho
