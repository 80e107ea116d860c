"""Checking the planner where it can be checked: a real FAMPipeline call on the CPU,
measured two ways, next to the meta-device prediction for the same option set.

* ``trace``: the call under the same counting mode (:class:`fam.plan.trace.Trace`,
  CPU tensors counted, the pipeline's weights registered first);
* ``profiler``: ``torch.profiler`` with ``profile_memory=True``, the running sum of its
  allocation/free events (what the CPU allocator saw, including allocations made inside
  C++ kernels that no dispatch mode sees).

Both include the weights, as the prediction does. On the CPU there is no offloading:
the comparable option set has offload "none" and text encoders kept.
"""

from __future__ import annotations

from typing import Dict

import torch

from .options import Options
from .planner import plan
from .trace import Trace


def _profiler_peak(prof) -> int:
    """Highest running sum of the profiler's allocation (+) and free (-) events."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def _weights(pipe):
    return [m for m in (pipe.unet, pipe.vae, getattr(pipe, "text_encoder", None),
                        getattr(pipe, "text_encoder_2", None)) if m is not None]


def measure(pipe, *, height: int, width: int, steps: int, options: Options, mode: str = "fam") -> Dict[str, int]:
    """Peak bytes of one real FAMPipeline call on the CPU (prompt "a photo", seed 0, output "pt")."""
    from ..pipeline import FAMPipeline  # the sampler's public call (re-point at merge if renamed)

    fam_pipe = FAMPipeline.from_pipe(pipe)
    kwargs = dict(height=height, width=width, num_inference_steps=steps, mode=mode, output_type="pt",
                  **options.call_kwargs())
    if mode not in ("fam", "am"):
        kwargs.pop("am_source")
        kwargs.pop("am_cache_device", None)

    def call():
        return fam_pipe("a photo", generator=torch.Generator().manual_seed(0), **kwargs)

    call()  # warm-up: lazily built buffers (band bases, CPU kernels) are not what we measure
    weights = sum(p.numel() * p.element_size() for m in _weights(pipe) for p in list(m.parameters())
                  + list(m.buffers()))
    with Trace(count_cpu=True) as trace:
        trace.register(*_weights(pipe))
        out = call()
        del out
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
        del out
    return {"trace": trace.peak, "profiler": weights + _profiler_peak(prof), "weights": weights}


def compare(pipe, *, height: int, width: int, steps: int = 3, options: Options = Options(),
            mode: str = "fam") -> Dict[str, float]:
    """Measured (CPU) and predicted (meta) peaks for one option set, and their ratios."""
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[pipe.unet.dtype]
    predicted = plan(pipe, height, width, steps=steps, dtype=dtype, mode=mode, options=[options])
    measured = measure(pipe, height=height, width=width, steps=steps, options=options, mode=mode)
    peak = predicted.rows[0].peak_bytes
    return {"predicted": peak, **measured, "trace_ratio": measured["trace"] / peak,
            "profiler_ratio": measured["profiler"] / peak}
