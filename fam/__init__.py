"""fam: the FAM diffusion sampler (Frequency + Attention Modulation, CVPR 2025) on
diffusers. ``FAMPipeline.from_pipe(pipe)`` wraps an SDXL or SD 1.5/2.1 pipeline;
``fam.record_native`` / ``fam.modulate`` attach FAM to a pipe's own calls."""

import fam_kernels

from .pipeline import FAMPipeline, FAMPipelineOutput

__version__ = fam_kernels.__version__

_LAZY = {"modulate": "attach", "record_native": "attach"}

__all__ = ["FAMPipeline", "FAMPipelineOutput", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
