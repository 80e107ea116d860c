"""fam: the FAM diffusion sampler (Frequency + Attention Modulation, CVPR 2025) on
diffusers. ``FAMPipeline.from_pipe(pipe)`` wraps an SDXL or SD 1.5/2.1 pipeline;
``fam.record_native`` / ``fam.modulate`` attach FAM to a pipe's own calls.

``import fam`` is light: diffusers, torch and ``fam_kernels`` are imported on the
first use of a name below (module ``__getattr__``, as diffusers' own ``__init__``
does), so ``fam --help`` and the mode tables never pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_LAZY = {
    "FAMPipeline": "fam.pipeline",
    "FAMPipelineOutput": "fam.pipeline",
    "__version__": "fam_kernels",
    "modulate": "fam.attach",
    "record_native": "fam.attach",
}

__all__ = ["FAMPipeline", "FAMPipelineOutput", "modulate", "record_native", "__version__"]

if TYPE_CHECKING:
    from fam_kernels import __version__

    from .attach import modulate, record_native
    from .pipeline import FAMPipeline, FAMPipelineOutput


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fam' has no attribute {name!r}")
    importlib.import_module("fam_kernels")  # before torch: OpenMP's wait policy (fam_kernels/_threads.py)
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
