"""fam: the FAM diffusion sampler (Frequency + Attention Modulation, CVPR 2025) on
diffusers. ``FAMPipeline.from_pipe(pipe)`` wraps an SDXL or SD 1.5/2.1 pipeline."""

import fam_kernels

from .pipeline import FAMPipeline, FAMPipelineOutput

__version__ = fam_kernels.__version__

__all__ = ["FAMPipeline", "FAMPipelineOutput", "__version__"]
