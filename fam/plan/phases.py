"""One trace per phase of a FAM call, on the meta device, through the sampler's own code.

Phases: text encoding; one native denoising step (optionally capturing the AM layer
inputs, as the "cache" source does); one high-res step (FM, then per CFG chunk the
"recompute" source's native UNet run up to the last AM layer, then the high-res UNet
with the AM processors); the VAE decode (the sampler's ``fam.vae.decode``, tiled or
not, with its fp32 upcast) followed by diffusers' postprocess on the device.

Each trace counts activations and state only: module weights are added per option
set by :mod:`fam.plan.options` (the VAE is registered in its decode trace so that
its fp32 upcast counts as the difference it makes). Traces are cached per argument
set, so option sets that share a phase share its trace.
"""

from __future__ import annotations

import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from . import _sampler
from .models import MetaPipeline, quiet
from .trace import Trace, attention_kernels

META = torch.device("meta")
# a mid-schedule timestep for the traced steps (the UNet's memory and FLOPs do not depend on t)
TRACE_TIMESTEP = 500


@dataclass
class PhaseTrace:
    """``peak``: the most bytes live at once (activations and the phase's state, no
    weights); ``flops``: matmul/conv/attention FLOPs; ``segments``: (peak, flops) of
    named parts; ``cache_bytes``: AM layer inputs one step captures (native step)."""

    name: str
    peak: int
    flops: int
    segments: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    cache_bytes: int = 0
    largest_layer_input: int = 0
    seconds: float = 0.0


class Tracer:
    """Traces the phases of one model; results cached by arguments."""

    def __init__(self, meta: MetaPipeline, *, attention: str = "fused", am_layers=None, am_lambda: float = 0.7,
                 fm_c: float = 0.5, guidance_scale: float = 5.0, images: int = 1):
        self.meta, self.pipe = meta, meta.pipe
        self.attention = attention
        self.layers = _sampler.resolve_am_layers(self.pipe.unet, am_layers)
        self.am_lambda, self.fm_c, self.guidance_scale = am_lambda, fm_c, guidance_scale
        self.dtype = meta.dtype
        self.images = images  # images per call (one prompt, num_images_per_prompt)
        self._cache: Dict[tuple, PhaseTrace] = {}
        self._fp16_fix_vae = None
        self._text_shapes = None

    # ------------------------------------------------------------------ helpers
    def _run(self, key: tuple, body) -> PhaseTrace:
        if key not in self._cache:
            start = time.perf_counter()
            with quiet(), torch.no_grad(), attention_kernels(self.attention), \
                    Trace() as trace:
                extra = body(trace) or {}
            self._cache[key] = PhaseTrace(name=key[0], peak=trace.peak - extra.pop("base", 0), flops=trace.flops,
                                          segments=dict(trace.segments_flops()), seconds=time.perf_counter() - start,
                                          **extra)
        return self._cache[key]

    def _empty(self, *shape, dtype=None) -> torch.Tensor:
        return torch.empty(*shape, device=META, dtype=dtype or self.dtype)

    def _conditioning(self, copies: int):
        """Text conditioning for a UNet call on ``copies`` samples, shaped as the text phase returns it."""
        shapes = self.text_shapes()
        rows = copies * self.images
        embeds = self._empty(rows, *shapes["prompt_embeds"][1:])
        if not self.meta.is_sdxl:
            return embeds, None
        pooled = self._empty(rows, *shapes["pooled_prompt_embeds"][1:])
        return embeds, {"text_embeds": pooled, "time_ids": self._empty(rows, 6)}

    def _unet(self, latents: torch.Tensor, copies: int) -> torch.Tensor:
        """The UNet call of a diffusers pipeline step (CFG batched: ``copies`` = 2)."""
        embeds, added = self._conditioning(copies)
        sample = torch.cat([latents] * copies) if copies > 1 else latents
        return self.pipe.unet(sample, TRACE_TIMESTEP, encoder_hidden_states=embeds, added_cond_kwargs=added,
                              return_dict=False)[0]

    @staticmethod
    def _chunks(cfg: str):
        return {"none": [1], "batched": [2], "sequential": [1, 1]}[cfg]

    def _guided(self, outputs):
        if len(outputs) == 1 and outputs[0].shape[0] == self.images:
            return outputs[0]
        uncond, cond = outputs if len(outputs) == 2 else outputs[0].chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _am_state(self, native_latent, target_latent):
        return _sampler.AttentionModulation(self.layers, self.am_lambda, native_latent, target_latent)

    # ------------------------------------------------------------------ phases
    def text_shapes(self) -> Dict[str, tuple]:
        if self._text_shapes is None:
            self.text("batched")
        return self._text_shapes

    def text(self, cfg: str) -> PhaseTrace:
        """``pipe.encode_prompt`` (diffusers' own), one prompt, default negative prompt."""
        def body(trace):
            with torch.no_grad():
                out = self.pipe.encode_prompt(prompt="a photo", device=META, num_images_per_prompt=self.images,
                                              do_classifier_free_guidance=cfg != "none")
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds")
            self._text_shapes = {name: tuple(t.shape) for name, t in zip(names, out) if t is not None}
        return self._run(("text", cfg), body)

    def native_step(self, latent: Tuple[int, int], cfg: str, capture: bool) -> PhaseTrace:
        """One native denoising step; with ``capture`` the AM layer inputs are recorded
        and kept (the "cache" source), their bytes in ``cache_bytes``."""
        def body(trace):
            latents = self._empty(self.images, self.pipe.unet.config.in_channels, *latent)
            model_input = latents * 1.0  # scheduler.scale_model_input
            am = self._am_state(latent, latent)
            entries, outputs = [], []
            with _sampler.installed_processors(self.pipe.unet, self.layers, am) if capture else nullcontext():
                for copies in self._chunks(cfg):
                    if capture:
                        entries.append(am.begin_capture(stop=False))
                    outputs.append(self._unet(model_input, copies))
                    am.off()  # rebinds the state's dict; the entry keeps the captured tensors
            noise = self._guided(outputs)
            latents = latents - 0.5 * noise  # scheduler.step
            sizes = [t.numel() * t.element_size() for e in entries for t in e.values()]
            return {"cache_bytes": sum(sizes), "largest_layer_input": max(sizes, default=0)}
        return self._run(("native_step", latent, cfg, capture), body)

    def high_res_step(self, native_latent, target_latent, cfg: str, *, fm: bool, am: bool, steps: int) -> PhaseTrace:
        """One high-res step: FM on the latents, then per CFG chunk the native UNet run
        up to the last AM layer (segment "native", the recompute source) and the
        high-res UNet with the AM processors (segment "high_res"). The pass's state
        (latents, reference x0 and noise, the recompute source's per-step native inputs)
        is allocated first and counted."""
        def body(trace):
            channels = self.pipe.unet.config.in_channels
            n = self.images
            latents = self._empty(n, channels, *target_latent)
            reference_x0, eps = self._empty(n, channels, *target_latent), self._empty(n, channels, *target_latent)
            native_inputs = [self._empty(n, channels, *native_latent) for _ in range(steps)] if am else []
            if fm:
                with trace.segment("fm"):
                    reference = reference_x0 * 0.5 + eps * 0.5  # scheduler.add_noise
                    cutoff, gain = _sampler.fm_schedule(float(TRACE_TIMESTEP), 1000, *target_latent, self.fm_c)
                    latents = _sampler.lowpass_blend(latents, reference, cutoff, gain)
                    del reference
            model_input = latents * 1.0
            state = self._am_state(native_latent, target_latent)
            outputs = []
            with _sampler.installed_processors(self.pipe.unet, self.layers, state) if am else nullcontext():
                for copies in self._chunks(cfg):
                    if am:
                        with trace.segment("native"):
                            inputs = _sampler.recompute_native_inputs(
                                state, lambda: self._unet(native_inputs[0], copies))
                        state.modulate_with(inputs)
                        del inputs
                    with trace.segment("high_res"):
                        outputs.append(self._unet(model_input, copies))
                    state.off()
            noise = self._guided(outputs)
            latents = latents - 0.5 * noise
        return self._run(("high_res_step", native_latent, target_latent, cfg, fm, am, steps), body)

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
        return self.dtype == torch.float16 and bool(getattr(self.pipe.vae.config, "force_upcast", False))

    def decode(self, latent: Tuple[int, int], tiled: bool, fp16_fix: bool = False) -> PhaseTrace:
        """``fam.vae.decode`` (fp32 upcast where the config forces it) and diffusers'
        ``image_processor.postprocess`` (its on-device part). The VAE weights are counted
        at the start, so an upcast counts as the fp32 copy minus the fp16 weights it frees."""
        vae = self.fp16_fix_vae() if fp16_fix else self.pipe.vae

        def body(trace):
            base = trace.register(vae)
            latents = self._empty(self.images, self.pipe.unet.config.out_channels, *latent)
            # tiles of one shape are decoded identically: trace the first, replay the others
            # (diffusers' tile blending, a Python loop over rows, is replayed the same way)
            vae.decoder.forward = trace.replayed(vae.decoder.forward, _shape_key)
            for name in ("blend_v", "blend_h"):
                if hasattr(vae, name):
                    setattr(vae, name, trace.replayed(getattr(vae, name), _shape_key_all, returns_arg=1))
            try:
                image = _sampler.decode(types.SimpleNamespace(vae=vae), latents, tiled=tiled)
            finally:
                for name in ("forward",):
                    vars(vae.decoder).pop(name, None)
                for name in ("blend_v", "blend_h"):
                    vars(vae).pop(name, None)
            image = self.pipe.image_processor.postprocess(image, output_type="pt")
            return {"base": base}
        return self._run(("decode", latent, tiled, fp16_fix), body)


def _shape_key(sample, *args, **kwargs):
    return tuple(sample.shape), sample.dtype, tuple(sample.stride()), tuple(a is None for a in args)


def _shape_key_all(*args):
    return tuple((tuple(a.shape), a.dtype, tuple(a.stride())) if isinstance(a, torch.Tensor) else a for a in args)
