"""fam_demo: the embedded demo, kept out of the library ``fam``. A tiny SDXL-family
text-to-image model trained here from scratch on procedural "one saturated shape on
a dull textured background" images (``fam_demo/model/``), its prompt grammar and
dataset, the ``fam demo`` / ``fam eval`` commands, the quality evaluation and the
training script.

    >>> import torch, fam, fam_demo
    >>> fp = fam.FAMPipeline.from_pipe(fam_demo.load_pipeline())
    >>> out = fp(prompt=fam_demo.caption("star", "red", "striped grey"), scale=4, mode="fam",
    ...          num_inference_steps=20, generator=torch.Generator().manual_seed(0))

The names below are imported on first use, so ``fam demo --help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["SHAPES", "COLORS", "BACKGROUNDS", "PATTERNS", "TONES", "caption", "render", "sample_scene",
           "MODEL_DIR", "NATIVE_SIZE", "load_pipeline"]
# public name -> the module that defines it
_LAZY = {name: "fam_demo.model" if name in ("MODEL_DIR", "NATIVE_SIZE", "load_pipeline") else "fam_demo.dataset"
         for name in __all__}

if TYPE_CHECKING:
    from .dataset import BACKGROUNDS, COLORS, PATTERNS, SHAPES, TONES, caption, render, sample_scene
    from .model import MODEL_DIR, NATIVE_SIZE, load_pipeline


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fam_demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
