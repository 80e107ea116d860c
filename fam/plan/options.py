"""Option sets, their peak memory per phase and their predicted time.

An option set is how a run is executed: CFG batched or sequential, VAE tiling,
the fp16-fix VAE, text encoders kept on the device or offloaded after encoding,
model / sequential CPU offload and the AM native source. Its peak in a phase is
the weights resident in that phase plus the phase's traced activations and state
(:mod:`fam.plan.phases`) plus what the AM cache holds then.

Predicted time = FLOPs / ``tflops`` + bytes moved between host and device by the
option set / ``h2d_gbps`` (defaults: :data:`DEFAULT_TFLOPS`, :data:`DEFAULT_H2D_GBPS`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterable, List, Optional

CFG = ("batched", "sequential")
VAE_TILING = ("auto", "on", "off")
TEXT_ENCODERS = ("kept", "offloaded")
OFFLOAD = ("none", "model", "sequential")
AM_SOURCES = ("recompute", "cache", "cache_cpu")

# Effective fp16 tensor throughput and host-to-device bandwidth the ranking assumes.
# 50 TFLOP/s: what an RTX 3070/4060 Ti-class 8 GB card sustains on SDXL GEMMs/attention
# (about half its dense fp16 tensor peak); the FAM paper's A40 times (6.1 min SDXL+FAM at
# 4x) correspond to ~84 TFLOP/s on our FLOP count. 12 GB/s: PCIe 4.0 x16 from pageable
# host memory. Only the ranking uses them; pass your own with --tflops / --h2d-gbps.
DEFAULT_TFLOPS = 50.0
DEFAULT_H2D_GBPS = 12.0

# Safety margin between the traced peak of allocated bytes and a memory budget:
# a fixed part for what torch's allocator never reports (the CUDA context with lazy
# module loading, ~0.3-0.5 GiB on CUDA 12; cuBLAS workspaces, up to 32 MiB per handle
# and stream; cuDNN convolution workspaces, up to a few hundred MiB for the VAE's
# full-resolution convolutions) and a proportional part for the caching allocator's
# rounding and fragmentation (2 MiB rounding of large blocks, 20 MiB segments).
MARGIN_FIXED_BYTES = 768 * 2 ** 20
MARGIN_FRACTION = 0.05


def required_memory(peak_bytes: int) -> int:
    """The device memory a run with this allocated peak needs (peak plus the safety margin)."""
    return int(peak_bytes * (1 + MARGIN_FRACTION)) + MARGIN_FIXED_BYTES


@dataclass(frozen=True)
class Options:
    """One way to execute a FAM call. ``apply(pipe)`` sets it up on a real pipeline;
    ``call_kwargs()`` are the FAMPipeline.__call__ arguments it implies."""

    cfg: str = "batched"
    vae_tiling: str = "auto"
    vae_fp16_fix: bool = False
    text_encoders: str = "kept"
    offload: str = "none"
    am_source: str = "recompute"

    def label(self, am: bool = True) -> str:
        parts = [f"cfg={self.cfg}", f"vae={self.vae_tiling}{'+fp16fix' if self.vae_fp16_fix else ''}",
                 f"offload={self.offload}"]
        if self.offload == "none":
            parts.append(f"text_encoders={self.text_encoders}")
        if am:
            parts.append(f"am={self.am_source}")
        return " ".join(parts)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    def call_kwargs(self) -> Dict[str, object]:
        """FAMPipeline.__call__ keyword arguments for this option set."""
        kwargs = {"cfg_sequential": self.cfg == "sequential",
                  "vae_tiling": {"auto": None, "on": True, "off": False}[self.vae_tiling],
                  "am_source": "recompute" if self.am_source == "recompute" else "cache"}
        if self.am_source == "cache_cpu":
            kwargs["am_cache_device"] = "cpu"
        return kwargs

    def apply(self, pipe, device="cuda") -> Dict[str, object]:
        """Put a diffusers pipeline (or a FAMPipeline: its ``.pipe``) in this option set's
        placement with diffusers' own switches and return the FAMPipeline call arguments.

        offload "model": ``enable_model_cpu_offload(device=device)``; "sequential":
        ``enable_sequential_cpu_offload(device=device)``; "none": ``.to(device)``. With
        text_encoders "offloaded" the caller encodes the prompt (``pipe.encode_prompt``),
        then calls :func:`offload_text_encoders` and passes the embeddings. The fp16-fix
        VAE must already be loaded (its config has force_upcast false).
        """
        inner = getattr(pipe, "pipe", pipe)
        if self.vae_fp16_fix and getattr(inner.vae.config, "force_upcast", False):
            raise ValueError("vae_fp16_fix: load an fp16-fix VAE (e.g. madebyollin/sdxl-vae-fp16-fix) into the "
                             "pipeline first; this VAE's config forces an fp32 upcast")
        if self.offload == "model":
            inner.enable_model_cpu_offload(device=device)
        elif self.offload == "sequential":
            inner.enable_sequential_cpu_offload(device=device)
        else:
            inner.to(device)
        return self.call_kwargs()


def offload_text_encoders(pipe) -> None:
    """text_encoders "offloaded": after the prompt is encoded, move the text encoders to the CPU."""
    inner = getattr(pipe, "pipe", pipe)
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(inner, name, None)
        if module is not None:
            module.to("cpu")


def all_options(*, am: bool, upcast: bool) -> List[Options]:
    """Every distinct option set (text_encoders only varies without offload; the AM
    source only in modes with AM; the fp16-fix VAE only where the VAE upcasts)."""
    found = []
    for cfg, tiling, fix, offload, source in itertools.product(
            CFG, VAE_TILING, (False, True) if upcast else (False,), OFFLOAD, AM_SOURCES if am else ("recompute",)):
        for text in TEXT_ENCODERS if offload == "none" else ("kept",):
            found.append(Options(cfg, tiling, fix, text, offload, source))
    return found


DEFAULT = Options()


def parse_bytes(text: str) -> int:
    """'8GB' (8e9), '8GiB' (8 * 2**30), '7.5G' (GiB), '8000MB', '512MiB', or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(text), flags=re.IGNORECASE)
    if not match or not match.group(1):
        raise ValueError(f"{text!r} is not a size such as 8GB, 8GiB or 7.5G")
    number, prefix, binary, unit_b = match.groups()
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    if power and (binary or not unit_b):
        base = 1024
    else:
        base = 1000
    value = float(number) * base ** power
    if value <= 0:
        raise ValueError(f"{text!r} must be positive")
    return int(value)


def pareto(rows: Iterable, peak=lambda r: r.peak_bytes, seconds=lambda r: r.seconds) -> List:
    """Rows no other row beats on both peak memory and predicted time, fastest first."""
    ordered = sorted(rows, key=lambda r: (seconds(r), peak(r)))
    front, best_peak = [], None
    for row in ordered:
        if best_peak is None or peak(row) < best_peak:
            front.append(row)
            best_peak = peak(row)
    return front


def with_defaults(**changes) -> Options:
    return replace(DEFAULT, **changes)


def find(options: List[Options], wanted: Optional[Options]) -> Optional[Options]:
    return next((o for o in options if o == wanted), None)
