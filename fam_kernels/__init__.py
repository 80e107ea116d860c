"""fam_kernels: the two FAM diffusion ops, each with a literal reference
(:mod:`fam_kernels.reference`) and fast backends (C++ CPU, Triton, CUDA).

* :func:`lowpass_blend` -- Frequency Modulation: z + gain * LP(z_ref - z).
* :func:`am_attention` -- Attention Modulation without any N x N matrix.
"""

from . import reference
from ._ext import extension_unavailable_reason, has_cuda_kernels
from .am import am_attention
from .dispatch import BackendNotSupportedError
from .lowpass import lowpass_blend
from .schedule import fm_schedule

__version__ = "0.1.0"

__all__ = [
    "lowpass_blend",
    "am_attention",
    "fm_schedule",
    "reference",
    "BackendNotSupportedError",
    "extension_unavailable_reason",
    "has_cuda_kernels",
    "__version__",
]
