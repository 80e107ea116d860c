"""The embedded demo: a tiny SDXL-family text-to-image model trained here from
scratch on procedural "one saturated shape on a dull textured background" images,
plus the ``fam demo`` / ``fam eval`` commands and the quality evaluation.

    >>> import fam, fam.demo
    >>> fp = fam.FAMPipeline.from_pipe(fam.demo.load_pipeline())
    >>> out = fp(prompt=fam.demo.caption("star", "red", "striped grey"), scale=4, mode="fam",
    ...          num_inference_steps=20, generator=torch.Generator().manual_seed(0))
"""

from .dataset import BACKGROUNDS, COLORS, PATTERNS, SHAPES, TONES, caption, render, sample_scene
from .model import MODEL_DIR, NATIVE_SIZE, load_pipeline

__all__ = ["SHAPES", "COLORS", "BACKGROUNDS", "PATTERNS", "TONES", "caption", "render", "sample_scene",
           "MODEL_DIR", "NATIVE_SIZE", "load_pipeline"]
