"""fam_kernels: the two FAM diffusion ops, each with a literal reference
(:mod:`fam_kernels.reference`) and fast backends (C++ CPU, Triton, CUDA).

* :func:`lowpass_blend` -- Frequency Modulation: z + gain * LP(z_ref - z).
* :func:`am_attention` -- Attention Modulation without any N x N matrix.

One module per op, named as the op: ``fam_kernels/lowpass_blend.py`` and
``fam_kernels/am_attention.py`` (the op, its backends' dispatcher, its
registration). The package attributes ``fam_kernels.lowpass_blend`` and
``fam_kernels.am_attention`` are the functions; reach the modules with
``from fam_kernels.am_attention import DISPATCHER`` (or
``importlib.import_module("fam_kernels.am_attention")``).
"""

# _threads first: it sets OpenMP's wait policy before torch loads the runtime.
from . import _threads, reference  # noqa: F401  (_threads: imported for its effect)
from ._ext import extension_unavailable_reason, has_cuda_kernels
from .am_attention import am_attention
from .dispatch import BackendNotSupportedError
from .lowpass_blend import lowpass_blend
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
