"""The sampling modes (the paper's Fig. 3 ablations) and the choices they accept.

Every mode but ``direct`` first generates at the native size, upsamples the native
latent to z~0 and starts the high-res pass from z~_T = add_noise(z~0, eps, T). What
happens before each high-res UNet call is then the mode's guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    native_pass: bool  # generate at the native size and start the high-res pass from it
    frequency_modulation: bool
    attention_modulation: bool
    skip_residual: bool


MODES = {
    "fam": Mode("fam", True, True, True, False),
    "fm": Mode("fm", True, True, False, False),
    "am": Mode("am", True, False, True, False),
    "skip_residual": Mode("skip_residual", True, False, False, True),
    "direct_native": Mode("direct_native", True, False, False, False),
    "direct": Mode("direct", False, False, False, False),
}

AM_SOURCES = ("recompute", "cache", "diffused")
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


def choose(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def skip_residual_weight(t: float, num_train_timesteps: int) -> float:
    """DemoFusion's skip-residual weight c1 = (0.5 (1 + cos(pi (T - t) / T)))^3: 1 at t = T, 0 at t = 0."""
    T = float(num_train_timesteps)
    return (0.5 * (1.0 + math.cos(math.pi * (T - float(t)) / T))) ** 3
