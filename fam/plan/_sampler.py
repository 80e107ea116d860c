"""Every piece of the sampler the planner runs, imported in this one file.

The planner traces the project's own code: the AM processors and their shared state
(``fam.attention``), the native-attention source logic (capture, recompute up to the
last AM layer), the FM and AM ops (``fam_kernels``), the VAE decode (``fam.vae``) and
the sampler's automatic tiling threshold. When the sampler moves these, re-point the
imports below; nothing else in ``fam.plan`` imports the sampler.
"""

from __future__ import annotations

import fam_kernels

from .. import vae as vae_io  # decode(pipe, latents, tiled=...)
from ..attention import (  # noqa: F401  (re-exported for fam.plan.phases)
    AttentionModulation,
    installed_processors,
    recompute_native_inputs,
    resolve_am_layers,
)
from ..modes import MODES  # noqa: F401

decode = vae_io.decode
lowpass_blend = fam_kernels.lowpass_blend
fm_schedule = fam_kernels.fm_schedule


def auto_tiling_min_pixels() -> int:
    """The sampler decodes with VAE tiling above this many pixels per image (``vae_tiling=None``)."""
    from ..pipeline import FAMPipeline

    return int(getattr(FAMPipeline, "auto_tiling_min_pixels", 2 * 1024 * 1024))
