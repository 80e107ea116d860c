"""FAMPipeline: FAM diffusion high-resolution sampling on top of an existing
diffusers StableDiffusionXLPipeline or StableDiffusionPipeline (SD 1.5/2.1).

One call = a native pass (standard generation at the model's size) and a high-res
pass started from the upsampled, re-noised native latent, with Frequency Modulation
(``fam_kernels.lowpass_blend``) before every UNet call and Attention Modulation
(``fam_kernels.am_attention``) in the chosen self-attention layers. The wrapped
pipeline is never modified: the schedulers used are fresh copies, the AM processors
and VAE settings are installed for the call only and restored in ``finally``.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

import fam_kernels

from . import vae as vae_io
from .attention import (
    AttentionModulation,
    NativeAttentionCache,
    installed_processors,
    recompute_native_inputs,
    resolve_am_layers,
)
from .guidance import GuidedUNet, TextConditioning
from .modes import AM_SOURCES, MODES, UPSAMPLE_MODES, Mode, choose, skip_residual_weight
from .sizes import Scale, Sizes, resolve_sizes

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "reference_latents", "modulated_latents")


@dataclass
class FAMPipelineOutput(BaseOutput):
    """``images``: the high-res result; ``native_images``: the native pass (None for
    mode "direct"); ``am_cache_bytes``: size of the native attention cache (source "cache")."""

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor, None]
    native_images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor, None]
    am_cache_bytes: Optional[int] = None


def _fresh_scheduler(template, num_inference_steps: int, device):
    """A copy of the wrapped pipeline's scheduler with its own timesteps and step index."""
    scheduler = template.__class__.from_config(template.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


class _Noiser:
    """x_t = add_noise(x0, noise, t_i) at step i of a schedule. Sigma-based schedulers
    pick the noise level from their begin/step index rather than from t, so a private,
    never-stepped copy is pointed at step i before each call."""

    def __init__(self, template, num_inference_steps: int, device):
        self.scheduler = _fresh_scheduler(template, num_inference_steps, device)

    def at(self, step: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(step)
        t = self.scheduler.timesteps[step].reshape(1).repeat(x0.shape[0])
        return self.scheduler.add_noise(x0, noise, t)


def _step_kwargs(scheduler, generator, eta: float) -> Dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _upsample_latent(latent: torch.Tensor, size, mode: str) -> torch.Tensor:
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(latent.float(), size=tuple(size), mode=mode, **extra).to(latent.dtype)


class FAMPipeline:
    """Wraps a diffusers SD/SDXL pipeline; see ``__call__``."""

    # decode with VAE tiling when the image has more pixels than this (vae_tiling=None)
    auto_tiling_min_pixels = 2 * 1024 * 1024

    def __init__(self, pipe):
        if not isinstance(pipe, (StableDiffusionXLPipeline, StableDiffusionPipeline)):
            raise ValueError(
                f"pipe: FAMPipeline wraps a StableDiffusionXLPipeline or StableDiffusionPipeline, got "
                f"{type(pipe).__name__}"
            )
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("pipe: guidance-distilled UNets (unet.config.time_cond_proj_dim set) are not supported")
        self.pipe = pipe
        self._interrupt = False
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._current_pass: Optional[str] = None

    @classmethod
    def from_pipe(cls, pipe) -> "FAMPipeline":
        """Wrap ``pipe`` (no weights copied; the pipe keeps working as before)."""
        return cls(pipe)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "FAMPipeline":
        return cls(DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs))

    # ---------------------------------------------------------------- diffusers-style surface
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.pipe, StableDiffusionXLPipeline)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def current_pass(self) -> Optional[str]:
        """"native" or "high_res" while a call runs (for callbacks), else None."""
        return self._current_pass

    def enable_model_cpu_offload(self, *args, **kwargs):
        return self.pipe.enable_model_cpu_offload(*args, **kwargs)

    def set_progress_bar_config(self, **kwargs):
        return self.pipe.set_progress_bar_config(**kwargs)

    def to(self, *args, **kwargs) -> "FAMPipeline":
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def default_native_size(self):
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return size, size

    @property
    def unet_downsampling(self) -> int:
        return 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    # ---------------------------------------------------------------- the call
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        *,
        negative_prompt: Union[str, List[str], None] = None,
        prompt_2: Union[str, List[str], None] = None,
        negative_prompt_2: Union[str, List[str], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        image=None,
        scale: Optional[Scale] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        native_height: Optional[int] = None,
        native_width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: Optional[float] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        mode: str = "fam",
        fm_c: float = 0.5,
        am_lambda: float = 0.7,
        am_layers: Union[str, Sequence[str], None] = None,
        am_source: Optional[str] = None,
        am_cache_device: Union[str, torch.device, None] = None,
        upsample: str = "bicubic",
        vae_tiling: Optional[bool] = None,
        cfg_sequential: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        """Generate at the native size, then at ``scale`` x the native size with FAM.

        Sizes: ``scale`` (int or (s_h, s_w), default 2) or target ``height``/``width``;
        ``native_height``/``native_width`` default to the model's sample size (with
        ``image``, to the image's size). ``mode``: "fam", "fm", "am", "skip_residual",
        "direct_native" or "direct". ``am_source``: "recompute" (default), "cache"
        (``am_cache_device="cpu"`` keeps it off the accelerator) or "diffused" (the
        only one with ``image``). ``cfg_sequential`` runs the two guidance halves one
        after the other. ``vae_tiling``: None tiles above ``auto_tiling_min_pixels``.
        Callbacks get ``(self, step, t, tensors)`` in both passes (``self.current_pass``
        tells which) and may return a new "latents"; "reference_latents" (z~_t) and
        "modulated_latents" (the latent after FM/skip residual) are given in the
        high-res pass and None in the native one.

        Returns :class:`FAMPipelineOutput`, or ``(images, native_images)``.
        """
        mode_spec = self._check_mode(mode, upsample, output_type, fm_c, am_lambda, num_inference_steps)
        am_source = self._check_am_source(am_source, image, mode_spec)
        layers = resolve_am_layers(self.pipe.unet, am_layers) if mode_spec.attention_modulation else []
        sizes = self._resolve_sizes(scale, height, width, native_height, native_width, image)
        self._check_callback_inputs(callback_on_step_end_tensor_inputs)
        if image is not None and not mode_spec.native_pass:
            raise ValueError("image: mode 'direct' ignores the native image; choose another mode")
        batch_size = self._check_prompt(prompt, prompt_2, prompt_embeds, negative_prompt_embeds,
                                        pooled_prompt_embeds, negative_pooled_prompt_embeds) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {batch_size}")

        self._guidance_scale = float(guidance_scale if guidance_scale is not None else (5.0 if self.is_sdxl else 7.5))
        self._interrupt = False
        device = self.pipe._execution_device
        run = _Run(self, sizes=sizes, mode=mode_spec, steps=num_inference_steps, generator=generator,
                   eta=eta, device=device, dtype=self.pipe.unet.dtype, batch_size=batch_size,
                   fm_c=fm_c, upsample=upsample, am_source=am_source,
                   callback=callback_on_step_end, callback_inputs=tuple(callback_on_step_end_tensor_inputs))
        try:
            run.text = self._encode_prompt(device, num_images_per_prompt, prompt, prompt_2, negative_prompt,
                                           negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                                           pooled_prompt_embeds, negative_pooled_prompt_embeds)
            native_unet = self._guided_unet(run.text, sizes.native, batch_size, device, cfg_sequential)
            high_res_unet = self._guided_unet(run.text, sizes.target, batch_size, device, cfg_sequential)
            with ExitStack() as stack:
                if mode_spec.attention_modulation:
                    run.am = AttentionModulation(layers, am_lambda, sizes.native_latent, sizes.target_latent)
                    stack.enter_context(installed_processors(self.pipe.unet, layers, run.am))
                    if am_source == "cache":
                        cache_device = torch.device(am_cache_device) if am_cache_device is not None else None
                        run.cache = NativeAttentionCache(run.am, cache_device)

                native_latent = high_res_latent = None
                if image is not None:
                    native_latent = self._encode_image(image, sizes, device)
                elif mode_spec.native_pass:
                    native_latent = run.native_pass(native_unet)
                if not self._interrupt:  # an interrupt during the native pass skips the high-res pass
                    high_res_latent = run.high_res_pass(high_res_unet, native_latent, native_unet)

            images = self._decode(high_res_latent, sizes.target, output_type, vae_tiling, device)
            native_images = self._decode(native_latent, sizes.native, output_type, vae_tiling, device)
        finally:
            self._current_pass = None
            self.pipe.maybe_free_model_hooks()

        if not return_dict:
            return images, native_images
        return FAMPipelineOutput(images=images, native_images=native_images,
                                 am_cache_bytes=None if run.cache is None else run.cache.nbytes)

    # ---------------------------------------------------------------- validation
    @staticmethod
    def _check_mode(mode, upsample, output_type, fm_c, am_lambda, num_inference_steps) -> Mode:
        choose("mode", mode, tuple(MODES))
        choose("upsample", upsample, UPSAMPLE_MODES)
        choose("output_type", output_type, OUTPUT_TYPES)
        if not (isinstance(fm_c, (int, float)) and fm_c >= 0):
            raise ValueError(f"fm_c={fm_c!r} must be a number >= 0")
        if not (isinstance(am_lambda, (int, float)) and 0 <= am_lambda <= 1):
            raise ValueError(f"am_lambda={am_lambda!r} must be in [0, 1]")
        if not (isinstance(num_inference_steps, int) and num_inference_steps >= 1):
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an int >= 1")
        return MODES[mode]

    @staticmethod
    def _check_am_source(am_source, image, mode: Mode) -> str:
        if am_source is not None:
            choose("am_source", am_source, AM_SOURCES)
        if image is None:
            return am_source or "recompute"
        if am_source not in (None, "diffused") and mode.attention_modulation:
            raise ValueError(f"am_source={am_source!r} needs the native denoising trajectory; with image= only "
                             f"'diffused' is available")
        return "diffused"

    def _resolve_sizes(self, scale, height, width, native_height, native_width, image) -> Sizes:
        default_h, default_w = self.default_native_size
        if image is not None:
            default_h, default_w = self.pipe.image_processor.get_default_height_width(image)
        return resolve_sizes(scale=scale, height=height, width=width,
                             native_height=default_h if native_height is None else native_height,
                             native_width=default_w if native_width is None else native_width,
                             vae_scale_factor=self.pipe.vae_scale_factor, unet_downsampling=self.unet_downsampling)

    @staticmethod
    def _check_callback_inputs(names) -> None:
        unknown = [name for name in names if name not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not in {list(CALLBACK_TENSOR_INPUTS)}")

    def _check_prompt(self, prompt, prompt_2, prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) -> int:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("prompt / prompt_embeds: give exactly one of them")
        if not self.is_sdxl and (prompt_2 is not None or pooled is not None or negative_pooled is not None):
            raise ValueError("prompt_2 / pooled_prompt_embeds: only for SDXL pipelines")
        if self.is_sdxl and prompt_embeds is not None and pooled is None:
            raise ValueError("pooled_prompt_embeds: required with prompt_embeds for SDXL")
        if self.is_sdxl and negative_prompt_embeds is not None and negative_pooled is None:
            raise ValueError("negative_pooled_prompt_embeds: required with negative_prompt_embeds for SDXL")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if prompt is None:
            return prompt_embeds.shape[0]
        return 1 if isinstance(prompt, str) else len(prompt)

    # ---------------------------------------------------------------- conditioning
    def _encode_prompt(self, device, num_images_per_prompt, prompt, prompt_2, negative_prompt, negative_prompt_2,
                       prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) -> TextConditioning:
        cfg = self.do_classifier_free_guidance
        if self.is_sdxl:
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=cfg, negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled)
        else:
            embeds, negative = self.pipe.encode_prompt(
                prompt, device, num_images_per_prompt, cfg, negative_prompt=negative_prompt,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
            pooled = negative_pooled = None
        if not cfg:
            negative = negative_pooled = None
        moved = [None if x is None else x.to(device) for x in (embeds, negative, pooled, negative_pooled)]
        return TextConditioning(*moved)

    def _guided_unet(self, text: TextConditioning, size_px, batch_size, device, sequential) -> GuidedUNet:
        time_ids = None
        if self.is_sdxl:
            if self.pipe.text_encoder_2 is None:
                projection_dim = int(text.pooled_prompt_embeds.shape[-1])
            else:
                projection_dim = self.pipe.text_encoder_2.config.projection_dim
            time_ids = self.pipe._get_add_time_ids(tuple(size_px), (0, 0), tuple(size_px),
                                                   dtype=text.prompt_embeds.dtype,
                                                   text_encoder_projection_dim=projection_dim)
            time_ids = time_ids.to(device).repeat(batch_size, 1)
        return GuidedUNet(self.pipe.unet, text, self._guidance_scale, sequential=sequential, time_ids=time_ids)

    # ---------------------------------------------------------------- VAE
    def _encode_image(self, image, sizes: Sizes, device) -> torch.Tensor:
        pixels = self.pipe.image_processor.preprocess(image, height=sizes.native[0], width=sizes.native[1])
        return vae_io.encode(self.pipe, pixels.to(device)).to(self.pipe.unet.dtype)

    def _decode(self, latents, size_px, output_type, vae_tiling, device):
        if latents is None or output_type == "latent":
            return latents
        tiled = vae_tiling if vae_tiling is not None else size_px[0] * size_px[1] > self.auto_tiling_min_pixels
        image = vae_io.decode(self.pipe, latents, tiled=tiled)
        do_denormalize = None
        if getattr(self.pipe, "safety_checker", None) is not None:
            image, has_nsfw = self.pipe.run_safety_checker(image, device, latents.dtype)
            do_denormalize = [not flagged for flagged in has_nsfw]
        if getattr(self.pipe, "watermark", None) is not None:
            image = self.pipe.watermark.apply_watermark(image)
        return self.pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)


class _Run:
    """The state of one FAMPipeline call: the two denoising loops."""

    def __init__(self, owner: FAMPipeline, *, sizes: Sizes, mode: Mode, steps: int, generator, eta: float,
                 device, dtype, batch_size: int, fm_c: float, upsample: str,
                 am_source: str, callback, callback_inputs):
        self.owner, self.pipe = owner, owner.pipe
        self.sizes, self.mode, self.steps = sizes, mode, steps
        self.generator, self.eta, self.device, self.dtype = generator, eta, device, dtype
        self.batch_size = batch_size
        self.text: Optional[TextConditioning] = None
        self.fm_c, self.upsample, self.am_source = fm_c, upsample, am_source
        self.callback, self.callback_inputs = callback, callback_inputs
        self.am: Optional[AttentionModulation] = None
        self.cache: Optional[NativeAttentionCache] = None
        self.native_model_inputs: List[torch.Tensor] = []

    def _noise(self, latent_size) -> torch.Tensor:
        shape = (self.batch_size, self.pipe.unet.config.in_channels, *latent_size)
        return randn_tensor(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def _callback(self, step, t, tensors: Dict[str, Optional[torch.Tensor]]) -> torch.Tensor:
        if self.callback is None:
            return tensors["latents"]
        outputs = self.callback(self.owner, step, t, {name: tensors[name] for name in self.callback_inputs})
        return (outputs or {}).pop("latents", tensors["latents"])

    def native_pass(self, native_unet: GuidedUNet) -> torch.Tensor:
        """Standard generation at the native size; keeps what the AM source needs."""
        scheduler = _fresh_scheduler(self.pipe.scheduler, self.steps, self.device)
        step_kwargs = _step_kwargs(scheduler, self.generator, self.eta)
        latents = self._noise(self.sizes.native_latent) * scheduler.init_noise_sigma
        keep_inputs = self.am is not None and self.am_source == "recompute"
        self.owner._current_pass = "native"
        self.owner._num_timesteps = len(scheduler.timesteps)
        with self.pipe.progress_bar(total=len(scheduler.timesteps)) as progress:
            for i, t in enumerate(scheduler.timesteps):
                if self.owner.interrupt:
                    break
                model_input = scheduler.scale_model_input(latents, t)
                if keep_inputs:
                    self.native_model_inputs.append(model_input)
                before_chunk = None
                if self.cache is not None:
                    def before_chunk(chunk, i=i):
                        self.cache.begin(i, chunk)
                noise_pred = native_unet.predict(model_input, t, before_chunk)
                if self.am is not None:
                    self.am.off()
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                latents = self._callback(i, t, {"latents": latents, "prompt_embeds": self.text.prompt_embeds,
                                                "reference_latents": None, "modulated_latents": None})
                progress.update()
        return latents

    def high_res_pass(self, high_res_unet: GuidedUNet, native_latent: Optional[torch.Tensor],
                      native_unet: GuidedUNet) -> torch.Tensor:
        scheduler = _fresh_scheduler(self.pipe.scheduler, self.steps, self.device)
        step_kwargs = _step_kwargs(scheduler, self.generator, self.eta)
        noiser = _Noiser(self.pipe.scheduler, self.steps, self.device)
        T = scheduler.config.num_train_timesteps
        H, W = self.sizes.target_latent
        mode = self.mode

        if mode.native_pass:
            reference_x0 = _upsample_latent(native_latent, (H, W), self.upsample)
            eps = self._noise((H, W))
            latents = noiser.at(0, reference_x0, eps)
        else:
            latents = self._noise((H, W)) * scheduler.init_noise_sigma
        native_eps = self._noise(self.sizes.native_latent) if self.am is not None and self.am_source == "diffused" \
            else None
        needs_reference = mode.frequency_modulation or mode.skip_residual or (
            mode.native_pass and "reference_latents" in self.callback_inputs)

        self.owner._current_pass = "high_res"
        self.owner._num_timesteps = len(scheduler.timesteps)
        with self.pipe.progress_bar(total=len(scheduler.timesteps)) as progress:
            for i, t in enumerate(scheduler.timesteps):
                if self.owner.interrupt:
                    break
                reference = modulated = None
                if needs_reference:
                    reference = noiser.at(i, reference_x0, eps)
                if mode.frequency_modulation:
                    cutoff, gain = fam_kernels.fm_schedule(float(t), T, H, W, self.fm_c)
                    latents = modulated = fam_kernels.lowpass_blend(latents, reference, cutoff, gain)
                elif mode.skip_residual:
                    c1 = skip_residual_weight(float(t), T)
                    latents = modulated = (1 - c1) * latents + c1 * reference
                model_input = scheduler.scale_model_input(latents, t)
                before_chunk = None
                if self.am is not None:
                    before_chunk = self._native_attention_for_step(i, t, scheduler, noiser, native_unet,
                                                                   native_latent, native_eps)
                noise_pred = high_res_unet.predict(model_input, t, before_chunk)
                if self.am is not None:
                    self.am.off()
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                latents = self._callback(i, t, {"latents": latents, "prompt_embeds": self.text.prompt_embeds,
                                                "reference_latents": reference, "modulated_latents": modulated})
                progress.update()
        return latents

    def _native_attention_for_step(self, i, t, scheduler, noiser, native_unet, native_latent, native_eps):
        """The hook run before each high-res UNet chunk: provide the native AM inputs
        of the same step and CFG chunk, then switch the processors to modulate."""
        am = self.am
        if self.cache is not None:
            def before_chunk(chunk):
                am.modulate_with(self.cache.load(i, chunk))
            return before_chunk
        if self.am_source == "recompute":
            native_input = self.native_model_inputs[i]
        else:
            native_input = scheduler.scale_model_input(noiser.at(i, native_latent, native_eps), t)

        def before_chunk(chunk):
            inputs = recompute_native_inputs(am, lambda: native_unet.run_chunk(native_input, t, chunk))
            am.modulate_with(inputs)
        return before_chunk
