"""Native and target sizes of a FAM call, validated before any work: the native
latent must be a multiple of the UNet's downsampling, the target an integer multiple
of the native size on each axis."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

Scale = Union[int, Sequence[int]]


@dataclass(frozen=True)
class Sizes:
    native: Tuple[int, int]  # pixels (height, width)
    target: Tuple[int, int]
    vae_scale_factor: int

    @property
    def scale(self) -> Tuple[int, int]:
        return self.target[0] // self.native[0], self.target[1] // self.native[1]

    @property
    def native_latent(self) -> Tuple[int, int]:
        return self.native[0] // self.vae_scale_factor, self.native[1] // self.vae_scale_factor

    @property
    def target_latent(self) -> Tuple[int, int]:
        return self.target[0] // self.vae_scale_factor, self.target[1] // self.vae_scale_factor


def _nearest_multiples(value: int, step: int, minimum: int) -> str:
    low, high = max(value // step * step, minimum), (value // step + 1) * step
    return f"{low} or {high}" if low < value else f"{high}"


def _parse_scale(scale: Scale) -> Tuple[int, int]:
    factors = (scale, scale) if not isinstance(scale, (tuple, list)) else tuple(scale)
    if len(factors) != 2:
        raise ValueError(f"scale={scale!r}: give one factor or (s_h, s_w)")
    parsed = []
    for factor in factors:
        is_integral = isinstance(factor, numbers.Real) and not isinstance(factor, bool) and float(factor).is_integer()
        if not is_integral:
            raise ValueError(f"scale={scale!r}: factors must be integers (FAM upsamples the latent by whole factors)")
        if factor < 1:
            raise ValueError(f"scale={scale!r}: factors must be >= 1 (the target cannot be smaller than the native)")
        parsed.append(int(factor))
    return parsed[0], parsed[1]


def resolve_sizes(*, scale: Optional[Scale], height: Optional[int], width: Optional[int],
                  native_height: int, native_width: int, vae_scale_factor: int, unet_downsampling: int,
                  default_scale: int = 2) -> Sizes:
    step = vae_scale_factor * unet_downsampling
    for name, value in (("native_height", native_height), ("native_width", native_width)):
        if not isinstance(value, int) or value < step or value % step:
            nearest = _nearest_multiples(int(value), step, step) if isinstance(value, numbers.Real) else str(step)
            raise ValueError(
                f"{name}={value!r} must be a positive multiple of {step} for this model (VAE factor "
                f"{vae_scale_factor} x UNet downsampling {unet_downsampling}); nearest valid: {nearest}"
            )
    factors = _parse_scale(scale) if scale is not None else None
    target = []
    for axis, (name, value, native) in enumerate((("height", height, native_height), ("width", width, native_width))):
        if value is None:
            target.append(native * (factors[axis] if factors else default_scale))
            continue
        if not isinstance(value, int) or value < native or value % native:
            nearest = _nearest_multiples(int(value), native, native) if isinstance(value, numbers.Real) else native
            raise ValueError(
                f"{name}={value!r} must be an integer multiple (>= 1) of the native {name} {native}; "
                f"nearest valid: {nearest}"
            )
        if factors and value != native * factors[axis]:
            raise ValueError(f"{name}={value} disagrees with scale={scale!r} (native {name} {native}); "
                             "give one of them")
        target.append(value)
    return Sizes((native_height, native_width), (target[0], target[1]), vae_scale_factor)
