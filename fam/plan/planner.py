"""``plan(...)``: peak device memory and FLOPs of a FAM call for every option set, and
``choose_options(...)``: the fastest option set within a memory budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import _sampler
from .models import MetaPipeline, largest_leaf_bytes, load_meta_pipeline, meta_from_pipeline, weight_bytes
from .options import (
    DEFAULT,
    DEFAULT_H2D_GBPS,
    DEFAULT_TFLOPS,
    MARGIN_FIXED_BYTES,
    MARGIN_FRACTION,
    Options,
    all_options,
    pareto,
    parse_bytes,
    required_memory,
)
from .phases import TRACE_STEPS, Tracer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PHASES = ("text", "native", "high_res", "decode", "decode_native")


class NothingFits(ValueError):
    """No option set fits the memory budget; ``smallest`` is the lowest achievable plan row."""

    def __init__(self, message: str, smallest: "Row"):
        super().__init__(message)
        self.smallest = smallest


@dataclass
class Row:
    """One option set evaluated: peak allocated bytes (and per phase), FLOPs, bytes
    moved between host and device, predicted seconds. ``peak_bytes_unreleased``: the
    peak if the AM cache were still held during the VAE decode (the sampler before the fix)."""

    options: Options
    peak_bytes: int
    phases: Dict[str, int]
    flops: int
    transfer_bytes: int
    seconds: float
    peak_bytes_unreleased: int = 0

    @property
    def required_bytes(self) -> int:
        return required_memory(self.peak_bytes)

    def as_dict(self) -> Dict[str, object]:
        return {"options": self.options.as_dict(), "label": self.options.label(), "peak_bytes": self.peak_bytes,
                "required_bytes": self.required_bytes, "phases": dict(self.phases), "flops": self.flops,
                "transfer_bytes": self.transfer_bytes, "predicted_seconds": round(self.seconds, 3),
                "peak_bytes_without_cache_release": self.peak_bytes_unreleased}


@dataclass
class Plan:
    model: str
    mode: str
    native: Tuple[int, int]
    target: Tuple[int, int]
    steps: int
    dtype: str
    attention: str
    weights: Dict[str, int]
    phase_flops: Dict[str, Tuple[int, int]]  # phase -> (FLOPs per call, calls) for the default option set
    direct_flops: int
    rows: List[Row]
    default: Row
    am_cache_bytes: int
    max_memory: Optional[int] = None
    chosen: Optional[Row] = None
    trace_seconds: float = 0.0
    assumptions: Dict[str, object] = field(default_factory=dict)
    allow_vae_fp16_fix: bool = False  # choosing/smallest may use the fp16-fix VAE (other weights)

    @property
    def reported(self) -> Row:
        return self.chosen or self.default

    @property
    def choosable(self) -> List[Row]:
        """Rows a budget may choose from: those needing the fp16-fix VAE only when allowed
        (it is a different VAE to download; its images differ slightly)."""
        return [r for r in self.rows if self.allow_vae_fp16_fix or not r.options.vae_fp16_fix]

    @property
    def smallest(self) -> Row:
        return min(self.choosable, key=lambda r: (r.peak_bytes, r.seconds))

    def flop_ratio(self, row: Optional[Row] = None) -> float:
        return (row or self.reported).flops / self.direct_flops

    def as_dict(self) -> Dict[str, object]:
        row = self.reported
        return {
            "model": self.model, "mode": self.mode, "native": list(self.native), "target": list(self.target),
            "steps": self.steps, "dtype": self.dtype, "attention": self.attention,
            "peak_bytes": row.peak_bytes, "required_bytes": row.required_bytes, "options": row.options.as_dict(),
            "phases": dict(row.phases), "flops": row.flops, "predicted_seconds": round(row.seconds, 3),
            "flops_direct": self.direct_flops, "flop_ratio_fam_direct": round(self.flop_ratio(row), 4),
            "phase_flops": {name: {"per_call": f, "calls": c} for name, (f, c) in self.phase_flops.items()},
            "weights": dict(self.weights), "am_cache_bytes": self.am_cache_bytes,
            "max_memory": self.max_memory, "fits": None if self.max_memory is None else self.chosen is not None,
            "smallest": self.smallest.as_dict(), "default": self.default.as_dict(),
            "alternatives": [r.as_dict() for r in self.rows if r is not row],
            "peak_bytes_without_cache_release": row.peak_bytes_unreleased,
            "assumptions": dict(self.assumptions), "trace_seconds": round(self.trace_seconds, 1),
        }


# ------------------------------------------------------------------------------ evaluation


class _Evaluator:
    def __init__(self, tracer: Tracer, meta: MetaPipeline, *, native_latent, target_latent, native_px, target_px,
                 steps: int, mode, tflops: float, h2d_gbps: float):
        self.tracer, self.meta = tracer, meta
        self.native_latent, self.target_latent = native_latent, target_latent
        self.native_px, self.target_px = native_px, target_px
        self.steps, self.mode = steps, mode
        self.tflops, self.h2d = tflops, h2d_gbps
        comps = meta.components
        self.w = {name: weight_bytes(m) for name, m in comps.items()}
        self.leaf = {name: largest_leaf_bytes(m) for name, m in comps.items()}
        self.text_names = [n for n in ("text_encoder", "text_encoder_2") if n in comps]
        self.threshold = _sampler.auto_tiling_min_pixels()

    def _weights(self, phase: str, o: Options) -> int:
        w, te = self.w, sum(self.w[n] for n in self.text_names)
        component = {"text": None, "native": "unet", "high_res": "unet", "decode": "vae", "decode_native": "vae"}[phase]
        if o.offload == "sequential":
            names = self.text_names if component is None else [component]
            return max(self.leaf[n] for n in names)
        if o.offload == "model":
            return max(w[n] for n in self.text_names) if component is None else w[component]
        if phase == "text" or o.text_encoders == "kept":
            return te + w["unet"] + w["vae"]
        return w["unet"] + w["vae"]

    def _tiled(self, o: Options, px) -> bool:
        if o.vae_tiling == "auto":
            return px[0] * px[1] > self.threshold
        return o.vae_tiling == "on"

    def _source(self, o: Options) -> Optional[str]:
        if not self.mode.attention_modulation:
            return None
        return "recompute" if o.am_source == "recompute" else "cache"

    def call(self, o: Options):
        return self.tracer.call(self.native_latent, self.target_latent, o.cfg, self._source(o), self.mode.name,
                                steps=min(self.steps, TRACE_STEPS))

    def evaluate(self, o: Options) -> Row:
        """A set's activations per phase from the traced call (:meth:`Tracer.call`): the
        text encodings (the high-res pass's with the native data held), the native and
        high-res loops, and each decode = bytes live when it starts + its own peak
        (:meth:`Tracer.decode`). The native data per step (AM cache entries, recorded UNet
        calls) is scaled from the traced steps to ``steps``; with the cache on the CPU it
        is taken off the device and one layer input (copied back per AM layer) put on."""
        steps, mode = self.steps, self.mode
        call = self.call(o)
        traced = call.steps
        cache_cpu = mode.attention_modulation and o.am_source == "cache_cpu"
        if cache_cpu:
            held = call.largest_layer_input - traced * call.state_per_step
        else:
            held = (steps - traced) * call.state_per_step
        cache_total = steps * call.state_per_step if self._source(o) == "cache" and not cache_cpu else 0
        act, flops = {}, {}
        native_image = 0
        # with the AM cache, FAMPipeline decodes the native image after the high-res pass
        # has released the cache (fam/pipeline.py, defer_decode)
        deferred = mode.attention_modulation and self._source(o) == "cache"
        if mode.native_pass:
            native_decode = self.tracer.decode(self.native_latent, self._tiled(o, self.native_px), o.vae_fp16_fix)
            native_image = 0 if deferred else native_decode.output_bytes  # returned with the result
        act["text"] = max(call.peak("text_native"), call.peak("text_high_res") + held + native_image)
        flops["text"] = call.flops("text_native") + call.flops("text_high_res")
        if mode.native_pass:
            act["native"] = call.peak("loop_native") + held
            flops["native"] = steps * call.flops("loop_native") // traced
        act["high_res"] = call.peak("loop_high_res") + held + native_image
        flops["high_res"] = steps * call.flops("loop_high_res") // traced
        unreleased = {}
        target_decode = self.tracer.decode(self.target_latent, self._tiled(o, self.target_px), o.vae_fp16_fix)
        act["decode"] = call.decode_start["high_res"] + native_image + target_decode.peak
        flops["decode"] = target_decode.flops
        unreleased["decode"] = act["decode"] + cache_total
        if mode.native_pass and deferred:
            act["decode_native"] = call.decode_start["high_res"] + target_decode.output_bytes + native_decode.peak
            flops["decode_native"] = native_decode.flops
            unreleased["decode_native"] = call.decode_start["native"] + held + native_decode.peak  # decoded by the pipe
        elif mode.native_pass:
            act["decode_native"] = call.decode_start["native"] + held + native_decode.peak
            flops["decode_native"] = native_decode.flops
            unreleased["decode_native"] = act["decode_native"]
        phases = {name: self._weights(name, o) + a for name, a in act.items()}
        phases_unreleased = {**phases, **{n: self._weights(n, o) + a for n, a in unreleased.items()}}
        chunks = 2 if o.cfg == "sequential" else 1
        transfer = self._offload_transfer(o, chunks, mode.attention_modulation)
        if cache_cpu:
            transfer += 2 * steps * call.state_per_step  # device -> host while capturing, back in the high-res pass
        total_flops = sum(flops.values())
        seconds = total_flops / (self.tflops * 1e12) + transfer / (self.h2d * 1e9)
        return Row(o, max(phases.values()), phases, total_flops, transfer, seconds,
                   peak_bytes_unreleased=max(phases_unreleased.values()))

    def _offload_transfer(self, o: Options, chunks: int, am: bool) -> int:
        w, te = self.w, sum(self.w[n] for n in self.text_names)
        if o.offload == "none":
            return te if o.text_encoders == "offloaded" else 0
        if o.offload == "model":
            return 2 * (te + w["unet"] + w["vae"])  # each component on and off the device once per call
        unet_calls = self.steps * chunks * ((1 if self.mode.native_pass else 0) + 1)
        if am and o.am_source == "recompute":
            unet_calls += self.steps * chunks  # the native run up to the last AM layer (counted as a full UNet)
        return te + unet_calls * w["unet"] + 2 * w["vae"]


# ------------------------------------------------------------------------------ entry points


def _check_args(mode: str, steps, dtype: str, attention: str):
    from ..modes import MODES

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if attention not in ("fused", "math"):
        raise ValueError(f"attention={attention!r} is not 'fused' or 'math'")
    return MODES[mode]


def plan(model="sdxl", height: Optional[int] = None, width: Optional[int] = None, *,
         native_height: Optional[int] = None, native_width: Optional[int] = None, mode: str = "fam",
         steps: int = 50, dtype: str = "fp16", attention: str = "fused", max_memory=None,
         tflops: float = DEFAULT_TFLOPS, h2d_gbps: float = DEFAULT_H2D_GBPS, am_layers=None,
         images: int = 1, allow_vae_fp16_fix: bool = False, options: Optional[List[Options]] = None,
         tracer: Optional[Tracer] = None) -> Plan:
    """Plan a FAM call of ``model`` (``sdxl``/``sd15``/``sd21``, a diffusers folder, a
    loaded pipeline or a :class:`MetaPipeline`) at ``height`` x ``width`` (default 2x the
    native size). ``max_memory`` (bytes or '8GB'): choose the fastest option set whose
    peak plus the safety margin fits (with ``plan.chosen`` None if none does). Option sets
    with the fp16-fix VAE are evaluated but chosen only with ``allow_vae_fp16_fix``."""
    import time

    from ..sizes import resolve_sizes

    mode_spec = _check_args(mode, steps, dtype, attention)
    if not (isinstance(images, int) and not isinstance(images, bool) and images >= 1):
        raise ValueError(f"images={images!r} must be an int >= 1")
    budget = None if max_memory is None else (parse_bytes(max_memory) if isinstance(max_memory, str)
                                              else int(max_memory))
    start = time.perf_counter()
    if tracer is not None:
        meta = tracer.meta
    elif isinstance(model, MetaPipeline):
        meta = model
    elif isinstance(model, str):
        meta = load_meta_pipeline(model, DTYPES[dtype])
    else:
        meta = meta_from_pipeline(model, DTYPES[dtype])
    pipe = meta.pipe
    default_side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    sizes = resolve_sizes(scale=None if (height or width) else 2, height=height, width=width,
                          native_height=native_height or default_side, native_width=native_width or default_side,
                          vae_scale_factor=pipe.vae_scale_factor,
                          unet_downsampling=2 ** (len(pipe.unet.config.block_out_channels) - 1))
    tracer = tracer or Tracer(meta, attention=attention, am_layers=am_layers, images=images,
                              guidance_scale=5.0 if meta.is_sdxl else 7.5)
    evaluator = _Evaluator(tracer, meta, native_latent=sizes.native_latent, target_latent=sizes.target_latent,
                           native_px=sizes.native, target_px=sizes.target, steps=steps, mode=mode_spec,
                           tflops=tflops, h2d_gbps=h2d_gbps)
    candidates = options or all_options(am=mode_spec.attention_modulation, upcast=tracer.needs_upcast())
    rows = [evaluator.evaluate(o) for o in candidates]
    default = next((r for r in rows if r.options == DEFAULT), rows[0])

    # FLOPs of direct inference at the target size: the sampler's mode "direct" (one pass, no FM/AM)
    traced = min(steps, TRACE_STEPS)
    direct = tracer.call(sizes.native_latent, sizes.target_latent, "batched", None, "direct", steps=traced)
    target_decode = tracer.decode(sizes.target_latent, evaluator._tiled(DEFAULT, sizes.target))
    direct_flops = (direct.flops("text_high_res") + steps * direct.flops("loop_high_res") // traced
                    + target_decode.flops)
    call = evaluator.call(DEFAULT)
    phase_flops = {"text": (call.flops("text_native") + call.flops("text_high_res"), 1)}
    if mode_spec.native_pass:
        phase_flops["native_step"] = (call.flops("loop_native") // traced, steps)
    phase_flops["high_res_step"] = (call.flops("loop_high_res") // traced, steps)
    if "recompute" in call.segments:
        phase_flops["am_native_recompute"] = (call.flops("recompute") // traced, steps)
    phase_flops["decode"] = (target_decode.flops, 1)
    if mode_spec.native_pass:
        phase_flops["decode_native"] = (tracer.decode(sizes.native_latent,
                                                      evaluator._tiled(DEFAULT, sizes.native)).flops, 1)
    am_cache = 0
    if mode_spec.attention_modulation:
        am_cache = steps * evaluator.call(Options(am_source="cache")).state_per_step

    result = Plan(model=meta.name, mode=mode, native=sizes.native, target=sizes.target, steps=steps, dtype=dtype,
                  attention=attention, weights={n: weight_bytes(m) for n, m in meta.components.items()},
                  phase_flops=phase_flops, direct_flops=direct_flops, rows=rows, default=default,
                  am_cache_bytes=am_cache, max_memory=budget, allow_vae_fp16_fix=allow_vae_fp16_fix,
                  assumptions={"tflops": tflops, "h2d_gbps": h2d_gbps, "margin_fixed_bytes": MARGIN_FIXED_BYTES,
                               "margin_fraction": MARGIN_FRACTION, "prompts": 1,
                               "images_per_prompt": tracer.images})
    if budget is not None:
        fitting = [r for r in result.choosable if r.required_bytes <= budget]
        result.chosen = min(fitting, key=lambda r: (r.seconds, r.peak_bytes)) if fitting else None
    result.trace_seconds = time.perf_counter() - start
    return result


def choose_options(pipe_or_model, height: Optional[int] = None, width: Optional[int] = None, *, max_memory,
                   **kwargs) -> Options:
    """The fastest option set whose predicted peak plus the safety margin fits ``max_memory``
    (bytes or '8GB'); raises :class:`NothingFits` (with the smallest achievable peak) otherwise.
    Apply it with ``Options.apply(pipe)`` and pass ``Options.call_kwargs()`` to the call."""
    result = plan(pipe_or_model, height, width, max_memory=max_memory, **kwargs)
    if result.chosen is None:
        smallest = result.smallest
        raise NothingFits(f"max_memory={max_memory}: nothing fits; the smallest achievable peak is "
                          f"{smallest.peak_bytes / 2 ** 30:.2f} GiB allocated, {smallest.required_bytes / 2 ** 30:.2f} "
                          f"GiB with the safety margin ({smallest.options.label()})", smallest)
    return result.chosen.options


def pareto_rows(result: Plan) -> List[Row]:
    return pareto(result.rows)
