"""The phases of a FAM call traced on the meta device by running the sampler itself.

:meth:`Tracer.call` runs :class:`fam.pipeline.FAMPipeline` on the meta pipeline (the
native pass under ``fam.record_native``, the high-res pass under ``fam.modulate``, both
inside the wrapped diffusers pipeline's own ``__call__``: its CFG-doubled inputs, its
scheduler step, its loop's locals; FAM's UNet forward wrapper with ``cfg_sequential``
chunks and ``concat_outputs``; the AM source and processors; FM in
``callback_on_step_end``; the release of the native data after the last step) for
:data:`TRACE_STEPS` steps with ``output_type="latent"``, and records per pass: the text
encoding's peak, the denoising loop's peak and FLOPs, and the bytes live when the
pass's decode starts. What grows with the number of steps (the AM cache entries, the
recorded native UNet calls) is measured per step and scaled by the planner.

:meth:`Tracer.decode` runs diffusers' own decode: a one-step call of the same pipeline
(the UNet stubbed, the latents given) with ``output_type="pt"`` inside the sampler's
``fam.vae.vae_tiling``, and records the peak above the bytes live when the decode
starts (fp32 upcast, tiles, postprocess).

Traces count activations and state only: module weights are added per option set by
:mod:`fam.plan.options` (the VAE is registered in its decode trace so that its fp32
upcast counts as the difference it makes). Identical UNet calls (same shapes, same AM
phase) are traced once and replayed (same peak above the live bytes, same FLOPs), in
every trace of one :class:`Tracer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from . import _sampler
from .models import MetaPipeline, quiet
from .trace import Trace, attention_kernels

META = torch.device("meta")
# denoising steps each traced call runs: two, so that the second step sees what the first leaves
# (the diffusers loop's locals, FM's latents); later steps repeat the second
TRACE_STEPS = 2


@dataclass
class CallTrace:
    """One traced FAMPipeline call. ``segments``: name -> (peak bytes live, FLOPs) for
    ``text_native``, ``text_high_res``, ``loop_native``, ``loop_high_res``, ``recompute``;
    ``decode_start``: pass -> bytes live when its decode would start; ``state_per_step``:
    native data held per native step until the high-res pass's last step (AM cache
    entries or recorded UNet calls); ``largest_layer_input``: the largest cached tensor."""

    steps: int
    segments: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    decode_start: Dict[str, int] = field(default_factory=dict)
    state_per_step: int = 0
    largest_layer_input: int = 0
    seconds: float = 0.0

    def peak(self, name: str) -> int:
        return self.segments.get(name, (0, 0))[0]

    def flops(self, name: str) -> int:
        return self.segments.get(name, (0, 0))[1]


@dataclass
class DecodeTrace:
    """``peak``: the most bytes above those live when the decode starts; ``output_bytes``: the image returned."""

    peak: int
    flops: int
    output_bytes: int
    seconds: float = 0.0


def _storages(tree) -> Dict[int, int]:
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
            for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


def _tensor_key(tree):
    leaves = tree_flatten(tree)[0]
    return tuple((tuple(x.shape), x.dtype, tuple(x.stride())) if isinstance(x, torch.Tensor) else
                 (x if isinstance(x, (bool, int, float, str, type(None))) else type(x).__name__) for x in leaves)


class Tracer:
    """Traces the phases of one model; results cached by arguments."""

    def __init__(self, meta: MetaPipeline, *, attention: str = "fused", am_layers=None, am_lambda: float = 0.7,
                 fm_c: float = 0.5, guidance_scale: float = 5.0, images: int = 1):
        self.meta, self.pipe = meta, meta.pipe
        self.attention = attention
        self.am_layers = am_layers
        self.layers = _sampler.resolve_am_layers(self.pipe.unet, am_layers)
        self.am_lambda, self.fm_c, self.guidance_scale = am_lambda, fm_c, guidance_scale
        self.dtype = meta.dtype
        self.images = images  # images per call (one prompt, num_images_per_prompt)
        self._cache: Dict[tuple, object] = {}
        self._unet_memo: Dict[tuple, tuple] = {}
        self._fp16_fix_vae = None
        self._text_shapes = None

    # ------------------------------------------------------------------ the sampler's call
    def call(self, native_latent, target_latent, cfg: str, am_source: Optional[str], mode: str,
             steps: int = TRACE_STEPS) -> CallTrace:
        """One FAMPipeline call (``mode``, ``am_source`` "recompute"/"cache"/None) of ``steps`` steps."""
        key = ("call", tuple(native_latent), tuple(target_latent), cfg, am_source, mode, steps)
        if key in self._cache:
            return self._cache[key]
        from .. import sources

        pipe, factor = self.pipe, self.pipe.vae_scale_factor
        fam_pipe = _sampler.FAMPipeline.from_pipe(pipe)
        result = CallTrace(steps=steps)
        by_step: Dict[int, Dict[int, int]] = {}

        def pass_name() -> str:
            return fam_pipe.current_pass or "high_res"

        start = time.perf_counter()
        with quiet(), torch.no_grad(), attention_kernels(self.attention), _schedules_on_cpu(), \
                Trace() as trace, _am_flops_counted(trace):
            encode = pipe.encode_prompt

            def encode_prompt(*args, **kwargs):
                name = "text_" + pass_name()
                trace.begin(name)
                try:
                    return encode(*args, **kwargs)
                finally:
                    trace.end(name)

            def loop_start(module, args, kwargs):
                trace.begin("loop_" + pass_name())

            def step_end(pipe_, step, t, tensors):
                if step == steps - 1:
                    name = pass_name()
                    result.decode_start[name] = trace.current
                    trace.end("loop_" + name)
                return {}

            capture, release = sources.NativeAttentionSource._capture, sources.NativeAttentionSource.release

            def traced_capture(source, call):
                with trace.segment("recompute"):
                    return capture(source, call)

            def measured_release(source):
                # the native data per step, read before the source frees it
                if isinstance(source, sources.CacheSource):
                    for (step, _chunk), entry in source.cache.entries.items():
                        by_step.setdefault(step, {}).update(_storages(entry))
                    sizes = [t.numel() * t.element_size() for e in source.cache.entries.values() for t in e.values()]
                    result.largest_layer_input = max(sizes, default=0)
                elif isinstance(source, sources.RecomputeSource):
                    for step, call in source.calls.items():
                        by_step.setdefault(step, {}).update(_storages(call.kwargs))
                return release(source)

            hook = pipe.unet.register_forward_pre_hook(loop_start, with_kwargs=True)
            pipe.encode_prompt = encode_prompt
            pipe.unet.forward = self._replaying(trace, pipe.unet)
            sources.NativeAttentionSource._capture = traced_capture
            sources.NativeAttentionSource.release = measured_release
            try:
                kwargs = dict(height=target_latent[0] * factor, width=target_latent[1] * factor,
                              native_height=native_latent[0] * factor, native_width=native_latent[1] * factor,
                              num_inference_steps=steps, mode=mode, cfg_sequential=cfg == "sequential",
                              output_type="latent", guidance_scale=self.guidance_scale,
                              num_images_per_prompt=self.images, callback_on_step_end=step_end)
                if _sampler.MODES[mode].attention_modulation:
                    kwargs.update(am_source=am_source, am_layers=self.am_layers, am_lambda=self.am_lambda)
                if mode != "direct":
                    kwargs["fm_c"] = self.fm_c
                out = fam_pipe("a photo", **kwargs)
                del out
            finally:
                sources.NativeAttentionSource._capture = capture
                sources.NativeAttentionSource.release = release
                vars(pipe.unet).pop("forward", None)
                vars(pipe).pop("encode_prompt", None)
                hook.remove()
        result.segments = dict(trace.segments_flops())
        if by_step:
            first, last = min(by_step), max(by_step)
            if last > first:  # bytes the later step holds that the first does not: what each step adds
                result.state_per_step = sum(n for k, n in by_step[last].items() if k not in by_step[first])
            else:
                result.state_per_step = sum(by_step[last].values())
        result.seconds = time.perf_counter() - start
        self._cache[key] = result
        return result

    def _replaying(self, trace: Trace, unet):
        """The UNet's forward, traced once per (input shapes, AM phase) and replayed after."""
        forward, memo = unet.forward, self._unet_memo

        def wrapper(*args, **kwargs):
            state = next((p.state for p in unet.attn_processors.values()
                          if isinstance(p, _sampler.FAMAttnProcessor)), None)
            phase = state.phase if state is not None else "off"
            if phase == "capture":  # records inputs: run it
                return forward(*args, **kwargs)
            k = (phase, _tensor_key((args, kwargs)), _tensor_key(state.native_inputs) if phase == "modulate" else ())
            if k in memo:
                peak_above, flops, rebuild = memo[k]
                trace._bump(trace.current + peak_above)
                trace.flops += flops
                return rebuild()
            outer_peak, start, flops = trace.peak, trace.current, trace.flops
            trace.peak = trace.current
            out = forward(*args, **kwargs)
            memo[k] = (trace.peak - start, trace.flops - flops, _rebuilder(out))
            trace.peak = max(trace.peak, outer_peak)
            return out
        return wrapper

    # ------------------------------------------------------------------ decode
    def text_shapes(self) -> Dict[str, tuple]:
        if self._text_shapes is None:
            with quiet(), torch.no_grad():
                out = self.pipe.encode_prompt(prompt="a photo", device=META, num_images_per_prompt=self.images,
                                              do_classifier_free_guidance=False)
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds")
            self._text_shapes = {name: tuple(t.shape) for name, t in zip(names, out) if t is not None}
        return self._text_shapes

    def fp16_fix_vae(self):
        """The fp16-fix VAE: the same architecture with ``force_upcast`` false (its weights differ)."""
        if self._fp16_fix_vae is None:
            from diffusers import AutoencoderKL

            vae = self.pipe.vae
            with quiet(), torch.device("meta"):
                fixed = AutoencoderKL.from_config({**vae.config, "force_upcast": False})
                self._fp16_fix_vae = fixed.to(vae.dtype).eval()
        return self._fp16_fix_vae

    def needs_upcast(self) -> bool:
        """Whether the pipeline's own decode runs the VAE in fp32: diffusers' SDXL pipeline does
        for an fp16 VAE whose config sets ``force_upcast``; its SD 1.x/2.x pipeline never does."""
        return (self.meta.is_sdxl and self.dtype == torch.float16
                and bool(getattr(self.pipe.vae.config, "force_upcast", False)))

    def decode(self, latent: Tuple[int, int], tiled: bool, fp16_fix: bool = False) -> DecodeTrace:
        """Diffusers' own decode and postprocess ("pt") inside the sampler's ``vae_tiling``:
        a one-step call of the pipeline with the UNet stubbed and the latents given. The
        VAE weights are counted at the start, so an upcast counts as the fp32 copy minus
        the fp16 weights it frees."""
        key = ("decode", tuple(latent), tiled, fp16_fix)
        if key in self._cache:
            return self._cache[key]
        pipe = self.pipe
        original_vae = pipe.vae
        vae = self.fp16_fix_vae() if fp16_fix else original_vae
        shapes = self.text_shapes()
        marks = {}
        start = time.perf_counter()
        with quiet(), torch.no_grad(), attention_kernels(self.attention), _schedules_on_cpu(), \
                Trace() as trace:
            trace.register(vae)
            embeds = {"prompt_embeds": torch.empty(shapes["prompt_embeds"], device=META, dtype=self.dtype)}
            if "pooled_prompt_embeds" in shapes:
                embeds["pooled_prompt_embeds"] = torch.empty(shapes["pooled_prompt_embeds"], device=META,
                                                             dtype=self.dtype)
            latents = torch.empty(self.images, pipe.unet.config.in_channels, *latent, device=META, dtype=self.dtype)

            def step_end(pipe_, step, t, tensors):
                marks["start"] = trace.current
                trace.begin("decode")
                return {}

            # tiles of one shape are decoded identically: trace the first, replay the others
            # (diffusers' tile blending, a Python loop over rows, is replayed the same way)
            vae.decoder.forward = trace.replayed(vae.decoder.forward, _shape_key)
            for name in ("blend_v", "blend_h"):
                if hasattr(vae, name):
                    setattr(vae, name, trace.replayed(getattr(vae, name), _shape_key_all, returns_arg=1))
            pipe.unet.forward = lambda sample, *args, **kwargs: (torch.zeros_like(sample),)
            if vae is not original_vae:
                pipe.register_modules(vae=vae)
            try:
                with _sampler.vae_tiling(vae, tiled):
                    out = pipe(**embeds, latents=latents, height=latent[0] * pipe.vae_scale_factor,
                               width=latent[1] * pipe.vae_scale_factor, num_inference_steps=1, guidance_scale=1.0,
                               output_type="pt", callback_on_step_end=step_end)
                trace.end("decode")
                output_bytes = sum(_storages(out.images).values())
                del out
            finally:
                if vae is not original_vae:
                    pipe.register_modules(vae=original_vae)
                vars(pipe.unet).pop("forward", None)
                vars(vae.decoder).pop("forward", None)
                for name in ("blend_v", "blend_h"):
                    vars(vae).pop(name, None)
        flops = trace.segments_flops()["decode"][1]
        result = DecodeTrace(peak=trace.segments["decode"] - marks["start"], flops=flops, output_bytes=output_bytes,
                             seconds=time.perf_counter() - start)
        self._cache[key] = result
        return result


def _rebuilder(out):
    """A function returning an object like ``out`` with new empty tensors of the same layout."""
    def empty_like(t):
        return lambda: torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)

    if isinstance(out, torch.Tensor):
        return empty_like(out)
    if isinstance(out, tuple):
        parts = [empty_like(t) if isinstance(t, torch.Tensor) else (lambda v=t: v) for t in out]
        return lambda: tuple(p() for p in parts)
    sample = empty_like(out.sample)
    cls = type(out)
    return lambda: cls(sample=sample())


class _am_flops_counted:
    """On meta, ``fam_kernels.am_attention`` runs its allocation model (plain aten calls,
    no matmul): its FLOPs (the fused kernels' arithmetic) are added here, per call."""

    def __init__(self, trace: Trace):
        self.trace = trace

    def __enter__(self):
        import importlib

        from .trace import _am_attention_flops

        module = importlib.import_module("fam_kernels.am_attention")

        self.module, self.original = module, module._meta_model
        trace, original = self.trace, self.original

        def counted(q, k, v, q_lr, k_lr, grid):
            flops = _am_attention_flops(q, k, v, q_lr, k_lr)
            trace.flops += flops
            trace.flops_by_op["fam_kernels.am_attention"] = trace.flops_by_op.get("fam_kernels.am_attention", 0) + flops
            return original(q, k, v, q_lr, k_lr, grid)
        module._meta_model = counted
        return self

    def __exit__(self, *exc):
        self.module._meta_model = self.original
        return False


class _schedules_on_cpu:
    """Scheduler tables on the CPU while the model runs on meta: FAM reads timesteps as
    numbers (``float(t)``), which meta tensors cannot give. The tables are a few KB."""

    def __enter__(self):
        import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as sd
        import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl as sdxl

        self.modules = [(m, m.retrieve_timesteps) for m in (sd, sdxl)]
        for module, original in self.modules:
            def on_cpu(scheduler, num_inference_steps=None, device=None, *args, _original=original, **kwargs):
                return _original(scheduler, num_inference_steps, "cpu", *args, **kwargs)
            module.retrieve_timesteps = on_cpu
        return self

    def __exit__(self, *exc):
        for module, original in self.modules:
            module.retrieve_timesteps = original
        return False


def _shape_key(sample, *args, **kwargs):
    return tuple(sample.shape), sample.dtype, tuple(sample.stride()), tuple(a is None for a in args)


def _shape_key_all(*args):
    return tuple((tuple(a.shape), a.dtype, tuple(a.stride())) if isinstance(a, torch.Tensor) else a for a in args)
