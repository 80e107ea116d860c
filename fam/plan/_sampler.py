"""Every piece of the sampler the planner runs, imported in this one file.

The planner traces the project's own code: the AM processors and their shared state
(``fam.attention``), the native-attention source logic (capture, recompute up to the
last AM layer), the FM and AM ops (``fam_kernels``), the VAE decode (``fam.vae``) and
the sampler's automatic tiling threshold. When the sampler moves these, re-point the
imports below; nothing else in ``fam.plan`` imports the sampler.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

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


# ----------------------------------------------------------------------------------------------
# ADAPTER (remove at merge, when fam_kernels.am_attention runs on meta tensors): today the
# automatic backend selection refuses the meta device. Inside this block the AM backend is
# forced to "torch" through its environment variable; on meta the registered op
# torch.ops.fam_kernels.am_attention then runs its register_fake implementation, which
# allocates the output (B, heads, N, d) only. The trace counts that output and the op's
# FLOPs (fam.plan.trace); the CUDA default backend's small transients (the pooled V and
# the fp32 native term, each (B, heads, N / (s_h s_w), d)) are not counted until then.
# ----------------------------------------------------------------------------------------------
AM_BACKEND_ENV = "FAM_KERNELS_AM_BACKEND"


@contextmanager
def am_attention_on_meta() -> Iterator[None]:
    previous = os.environ.get(AM_BACKEND_ENV)
    os.environ[AM_BACKEND_ENV] = "torch"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(AM_BACKEND_ENV, None)
        else:
            os.environ[AM_BACKEND_ENV] = previous
