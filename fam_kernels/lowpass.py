"""Temporary: the FM helper replaces this module with the real op (validation,
dispatcher, torch/cpu/triton/cuda backends, torch.library registration)."""
from .reference import lowpass_blend_reference
from .schedule import fm_schedule  # noqa: F401


def lowpass_blend(z, z_ref, cutoff, gain, *, backend=None):
    if isinstance(cutoff, (int, float)):
        cutoff = (cutoff, cutoff)
    return lowpass_blend_reference(z, z_ref, cutoff, gain)
