"""Every piece of the sampler the planner runs, imported in this one file.

The planner traces the project's own call: :class:`fam.pipeline.FAMPipeline` on the
meta pipeline (its native pass under ``fam.record_native``, its high-res pass under
``fam.modulate``: ``HighResRun``'s UNet forward wrapper with ``cfg_sequential``
chunking and ``concat_outputs``, the AM sources of ``fam.sources``, the processors of
``fam.attention``, FM through ``fam_kernels`` in ``callback_on_step_end``, the release of
the native data after the last step), inside the wrapped diffusers pipeline's own
``__call__``; the decode is diffusers' own, inside ``fam.vae.vae_tiling``. When the
sampler moves these, re-point the imports below; nothing else in ``fam.plan`` imports
the sampler.
"""

from __future__ import annotations

from ..attention import FAMAttnProcessor, resolve_am_layers  # noqa: F401  (re-exported for fam.plan.phases)
from ..modes import MODES  # noqa: F401
from ..pipeline import FAMPipeline  # noqa: F401
from ..sources import NativeAttentionSource  # noqa: F401
from ..vae import vae_tiling  # noqa: F401


def auto_tiling_min_pixels() -> int:
    """The sampler decodes with VAE tiling above this many pixels per image (``vae_tiling=None``)."""
    return int(getattr(FAMPipeline, "auto_tiling_min_pixels", 2 * 1024 * 1024))
