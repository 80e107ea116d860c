"""FAMPipeline: FAM diffusion high-resolution sampling on top of an existing diffusers
SD 1.5/2.1 or SDXL pipeline (text-to-image, img2img, inpaint, ControlNet, PAG).

One call = two calls of the wrapped pipeline's own ``__call__``: the native pass
(its standard generation at the model's size, recorded by :func:`fam.record_native`)
and the high-res pass at the target size with FAM attached by :func:`fam.modulate`
(start from the diffused upsampled native latent, Frequency Modulation after every
scheduler step, Attention Modulation in the chosen self-attention layers). Every
argument FAM does not own is forwarded to both passes; what must differ per pass
(sizes, SDXL size conditioning, img2img's init image) is adjusted. Nothing of the
wrapped pipeline is changed after the call.
"""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from . import vae as vae_io
from .attach import (
    FAM_TENSOR_INPUTS,
    _check_pipe,
    check_number,
    check_strength,
    modulate,
    record_native,
    start_step,
)
from .attention import resolve_am_layers
from .modes import AM_SOURCES, MODES, UPSAMPLE_MODES, Mode, choose
from .sizes import Scale, Sizes, resolve_sizes

logger = logging.getLogger("fam")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# arguments of the wrapped pipeline that FAM sets itself in each pass
OWNED = ("height", "width", "latents", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "output_type",
         "return_dict", "num_inference_steps", "generator", "prompt")
# img2img / inpaint arguments that only the native pass takes (the high-res pass starts from z~_T)
NATIVE_ONLY = ("strength", "denoising_start", "aesthetic_score", "negative_aesthetic_score")
SIZE_CONDITIONING = ("original_size", "target_size", "crops_coords_top_left", "negative_original_size",
                     "negative_target_size", "negative_crops_coords_top_left")


@dataclass
class FAMPipelineOutput(BaseOutput):
    """``images``: the high-res result; ``native_images``: the native pass (None for
    mode "direct"); ``am_cache_bytes``: size of the native attention cache (source "cache")."""

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor, None]
    native_images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor, None]
    am_cache_bytes: Optional[int] = None
    memory_options: Optional[Dict[str, Any]] = None  # the option set chosen for ``max_memory``


def _parameters(pipe) -> Dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def image_size(image) -> Tuple[int, int]:
    """(height, width) of what diffusers accepts as an image: PIL, numpy (H, W, C) /
    (B, H, W, C), torch (C, H, W) / (B, C, H, W), or a list of them."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image: an empty list")
        image = image[0]
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim in (3, 4):
        return tuple(image.shape[-3:-1]) if image.shape[-1] in (1, 3, 4) else tuple(image.shape[-2:])
    if torch.is_tensor(image) and image.ndim in (3, 4):
        return tuple(image.shape[-2:])
    raise ValueError(f"image: expected a PIL image, a numpy array, a tensor or a list of them, got "
                     f"{type(image).__name__}")


def resize_images(processor, image, size):
    """``image`` (or each of a list) resized to (height, width), in the form and value range it came in."""
    if isinstance(image, (list, tuple)):
        return [resize_images(processor, item, size) for item in image]
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return processor.resize(image[None], size[0], size[1])[0]
    if torch.is_tensor(image) and image.ndim == 3:
        return processor.resize(image[None], size[0], size[1])[0]
    return processor.resize(image, size[0], size[1])


SUPPORTED = tuple(f"StableDiffusion{xl}{kind}Pipeline" for xl in ("", "XL") for kind in
                  ("", "Img2Img", "Inpaint", "ControlNet", "ControlNetImg2Img", "PAG"))


def _check_supported(pipe) -> None:
    import diffusers

    classes = tuple(getattr(diffusers, name) for name in SUPPORTED)
    if not isinstance(pipe, classes):
        raise ValueError(f"pipe: FAMPipeline wraps {', '.join(SUPPORTED)} (or what AutoPipeline returns for them), "
                         f"got {type(pipe).__name__}; for another pipeline with callback_on_step_end, try the hook "
                         "API (fam.record_native / fam.modulate)")


class FAMPipeline:
    """Wraps a diffusers SD/SDXL pipeline; see ``__call__``."""

    # decode with VAE tiling when the image has more pixels than this (vae_tiling=None)
    auto_tiling_min_pixels = 2 * 1024 * 1024
    # refuse a call whose high-res latents (times this many live copies) exceed the free memory
    latent_copies = 8

    def __init__(self, pipe):
        _check_pipe(pipe)
        _check_supported(pipe)
        self.pipe = pipe
        self._current_pass: Optional[str] = None
        params = _parameters(pipe)
        self.has_image = "image" in params
        self.is_img2img = "strength" in params and "mask_image" not in params
        self.is_inpaint = "mask_image" in params
        self.has_controlnet = getattr(pipe, "controlnet", None) is not None

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
    def components(self) -> Dict[str, Any]:
        return self.pipe.components

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    @property
    def is_sdxl(self) -> bool:
        return "text_encoder_2" in self.pipe.components

    @property
    def interrupt(self) -> bool:
        return bool(getattr(self.pipe, "_interrupt", False))

    @property
    def current_pass(self) -> Optional[str]:
        """"native" or "high_res" while a call runs, else None."""
        return self._current_pass

    def enable_vae_tiling(self):
        self.pipe.vae.enable_tiling()

    def disable_vae_tiling(self):
        self.pipe.vae.disable_tiling()

    def enable_model_cpu_offload(self, *args, **kwargs):
        return self.pipe.enable_model_cpu_offload(*args, **kwargs)

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        return self.pipe.enable_sequential_cpu_offload(*args, **kwargs)

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
        image=None,
        scale: Optional[Scale] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        native_height: Optional[int] = None,
        native_width: Optional[int] = None,
        num_inference_steps: int = 50,
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
        high_res_strength: float = 1.0,
        high_res_steps: Optional[int] = None,
        max_memory=None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Optional[Sequence[str]] = None,
        **kwargs,
    ):
        """Generate at the native size, then at ``scale`` x the native size with FAM.

        Sizes: ``scale`` (int or (s_h, s_w), default 2) or target ``height``/``width``;
        ``native_height``/``native_width`` default to the model's sample size (with an
        init or start ``image``, to the image's size rounded to a valid size).
        ``mode``: "fam", "fm", "am", "skip_residual", "direct_native" or "direct".
        ``am_source``: "recompute" (default), "cache" (``am_cache_device="cpu"`` keeps it
        off the accelerator) or "diffused" (the only one without a native trajectory of
        the same schedule: img2img, inpaint, a start ``image``). ``cfg_sequential`` runs
        the two guidance halves one after the other. ``vae_tiling``: None tiles above
        ``auto_tiling_min_pixels``.

        Shortened high-res pass (defaults: the paper): ``high_res_strength`` s in (0, 1]
        starts the high-res pass where its schedule has int(N s) of its N steps left, from
        z~ at that step (diffusers' img2img ``strength`` rule); ``high_res_steps`` is N for
        the high-res schedule (default ``num_inference_steps``; the native pass keeps
        ``num_inference_steps``). With different schedules AM uses, for each high-res
        step, the native step with the nearest timestep ("diffused": z~ at the step itself).

        ``image`` means what the wrapped pipeline means by it (img2img/inpaint init
        picture, ControlNet control image); on a text-to-image pipeline it is FAM's
        start picture (used instead of the native pass). Every other keyword is the
        wrapped pipeline's own and goes to both passes; SDXL ``original_size`` /
        ``target_size`` / crops given for the native pass are scaled for the high-res one.

        Callbacks get ``(pipe, step, t, tensors)`` in both passes (``pipe.fam_pass`` tells
        which; in the high-res pass "latents" are already modulated for the next step)
        and may return new tensors; "reference_latents" / "modulated_latents" may be
        requested besides the pipe's own tensor inputs.

        ``max_memory`` (bytes, or a string such as "8GiB" / "8GB"): plan this call's peak GPU
        memory (:mod:`fam.plan`, a meta-device trace of these very modules) and run it with
        the fastest option set whose predicted peak plus the safety margin fits: CFG batched
        or sequential, VAE tiling, AM source recompute / cache / cache on the CPU, and on CUDA
        model or sequential CPU offload (applied to the pipe with diffusers' own switches).
        It chooses ``cfg_sequential``, ``vae_tiling``, ``am_source`` and ``am_cache_device``
        itself (passing them too is refused); the choice is logged and returned as
        ``.memory_options``; a budget nothing fits raises ValueError with the smallest peak.

        Returns :class:`FAMPipelineOutput`, or ``(images, native_images)``.
        """
        choose("mode", mode, tuple(MODES))
        mode_spec = MODES[mode]
        memory_options = None
        if max_memory is not None:
            memory_options, chosen = self._options_for_budget(
                max_memory, mode_spec, self._resolve_sizes(scale, height, width, native_height, native_width, image),
                num_inference_steps, kwargs.get("num_images_per_prompt") or 1,
                given={"cfg_sequential": cfg_sequential, "vae_tiling": vae_tiling, "am_source": am_source,
                       "am_cache_device": am_cache_device})
            cfg_sequential, vae_tiling = chosen["cfg_sequential"], chosen["vae_tiling"]
            am_source, am_cache_device = chosen.get("am_source"), chosen.get("am_cache_device")
        plan = self._plan(prompt=prompt, image=image, scale=scale, height=height, width=width,
                          native_height=native_height, native_width=native_width,
                          num_inference_steps=num_inference_steps, generator=generator, mode=mode_spec, fm_c=fm_c,
                          am_lambda=am_lambda, am_layers=am_layers, am_source=am_source,
                          am_cache_device=am_cache_device, upsample=upsample, vae_tiling=vae_tiling,
                          cfg_sequential=cfg_sequential, output_type=output_type,
                          high_res_strength=high_res_strength, high_res_steps=high_res_steps,
                          callback_inputs=callback_on_step_end_tensor_inputs, callback=callback_on_step_end,
                          kwargs=kwargs)
        try:
            native_images = native_latent = cache_bytes = None
            native, defer_decode = None, False
            if plan["start_image"] is not None:
                native_latent = self._encode_start_image(plan)
                native_images = self._start_image_output(plan, native_latent, output_type)
            elif mode_spec.native_pass:
                # the AM cache must outlive the native pass: its image is decoded after the
                # high-res pass has released the cache, not by the pipe with the cache held
                # (unless the pipe decodes with more than the VAE, e.g. a safety checker)
                defer_decode = (mode_spec.attention_modulation and plan["am_source"] == "cache"
                                and output_type != "latent" and getattr(self.pipe, "safety_checker", None) is None)
                native_kwargs = {**plan["native_kwargs"], "output_type": "latent"} if defer_decode \
                    else plan["native_kwargs"]
                self._current_pass = "native"
                with ExitStack() as stack:
                    stack.enter_context(vae_io.vae_tiling(self.pipe.vae, plan["tiling"][0]))
                    stack.enter_context(_progress_label(self.pipe, "native", plan["sizes"].native))
                    native = stack.enter_context(record_native(
                        self.pipe, am_source=plan["am_source"] if mode_spec.attention_modulation else None,
                        am_layers=am_layers, am_cache_device=am_cache_device, cfg_sequential=cfg_sequential))
                    native_out = self.pipe(**native_kwargs, return_dict=True)
                native_images = native_out.images
                native_latent = native.latents
                if native.source is not None:
                    cache_bytes = native.source.nbytes
                if self.interrupt or native_latent is None:  # interrupted: no high-res pass
                    if defer_decode:
                        native.source.release()
                        native_images = self._start_image_output(plan, native_out.images, output_type)
                    return self._output(None, native_images, cache_bytes, return_dict, memory_options)

            self._current_pass = "high_res"
            high_res_pipe = plan["high_res_pipe"]
            with ExitStack() as stack:
                stack.enter_context(vae_io.vae_tiling(self.pipe.vae, plan["tiling"][1]))
                stack.enter_context(_progress_label(high_res_pipe, "high-res", plan["sizes"].target))
                if mode_spec.native_pass:
                    stack.enter_context(modulate(
                        high_res_pipe, native if native is not None and high_res_pipe is self.pipe
                        and plan["am_source"] != "diffused" else native_latent,
                        scale=plan["sizes"].scale, mode=mode_spec.name, fm_c=fm_c, am_lambda=am_lambda,
                        am_layers=am_layers if native is None or plan["am_source"] == "diffused" else None,
                        upsample=upsample, cfg_sequential=cfg_sequential,
                        high_res_strength=high_res_strength))
                images = high_res_pipe(**plan["high_res_kwargs"], return_dict=True).images
            if native is not None and defer_decode:
                native_images = self._start_image_output(plan, native_out.images, output_type)
        finally:
            self._current_pass = None
        return self._output(images, native_images, cache_bytes, return_dict, memory_options)

    @staticmethod
    def _output(images, native_images, cache_bytes, return_dict, memory_options=None):
        if not return_dict:
            return images, native_images
        return FAMPipelineOutput(images=images, native_images=native_images, am_cache_bytes=cache_bytes,
                                 memory_options=memory_options)

    def _options_for_budget(self, max_memory, mode: Mode, sizes: Sizes, steps: int, images: int, given):
        """``max_memory``: the fastest option set of :func:`fam.plan.plan` that fits, applied
        to the pipe (placement) and returned with this call's arguments."""
        from .plan import plan
        from .plan.options import all_options, parse_bytes

        if isinstance(max_memory, bool) or not isinstance(max_memory, (int, str)):
            raise ValueError(f"max_memory={max_memory!r}: bytes (int) or a size such as '8GiB' or '8GB'")
        try:
            budget = parse_bytes(max_memory) if isinstance(max_memory, str) else max_memory
        except ValueError as error:
            raise ValueError(f"max_memory: {error}") from None
        if budget <= 0:
            raise ValueError(f"max_memory={max_memory!r} must be > 0")
        passed = [name for name, value in given.items() if value not in (None, False)]
        if passed:
            raise ValueError(f"max_memory chooses {', '.join(given)} itself; do not pass {', '.join(passed)} with it")
        on_cuda = self.device.type == "cuda"
        upcast = bool(getattr(self.pipe.vae.config, "force_upcast", False))
        # the wrapper encodes the prompt inside the pipe's call and loads no other VAE: those
        # option sets stay with fam.plan's users; offloading means something only on CUDA
        candidates = [o for o in all_options(am=mode.attention_modulation, upcast=upcast)
                      if o.text_encoders == "kept" and not o.vae_fp16_fix and (on_cuda or o.offload == "none")]
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
        result = plan(self.pipe, sizes.target[0], sizes.target[1], native_height=sizes.native[0],
                      native_width=sizes.native[1], mode=mode.name, steps=steps, dtype=dtype, images=images,
                      max_memory=budget, options=candidates)
        if result.chosen is None:
            smallest = min((row for row in result.rows if row.options in candidates), key=lambda r: r.required_bytes)
            raise ValueError(f"max_memory={max_memory!r}: nothing fits; the smallest predicted need is "
                             f"{smallest.required_bytes / 2 ** 30:.2f} GiB ({smallest.options.label()})")
        options = result.chosen.options
        chosen = options.apply(self.pipe, device=self.device) if on_cuda else options.call_kwargs()
        if not mode.attention_modulation:
            chosen.pop("am_source", None)
            chosen.pop("am_cache_device", None)
        logger.info("max_memory=%s: %s (predicted peak %.2f GiB, %.2f GiB with the margin)", max_memory,
                    options.label(), result.chosen.peak_bytes / 2 ** 30, result.chosen.required_bytes / 2 ** 30)
        return options.as_dict(), chosen

    # ---------------------------------------------------------------- planning + validation
    def _plan(self, *, prompt, image, scale, height, width, native_height, native_width, num_inference_steps,
              generator, mode: Mode, fm_c, am_lambda, am_layers, am_source, am_cache_device, upsample, vae_tiling,
              cfg_sequential, output_type, callback_inputs, callback, kwargs, high_res_strength=1.0,
              high_res_steps=None) -> Dict[str, Any]:
        """Validate every argument and build both passes' keyword arguments, before any work."""
        pipe, params = self.pipe, _parameters(self.pipe)
        choose("upsample", upsample, UPSAMPLE_MODES)
        choose("output_type", output_type, OUTPUT_TYPES)
        check_number("fm_c", fm_c, low=0.0)
        check_number("am_lambda", am_lambda, low=0.0, high=1.0)
        check_number("num_inference_steps", num_inference_steps, low=1, integer=True)
        check_strength(high_res_strength)
        if high_res_steps is not None:
            check_number("high_res_steps", high_res_steps, low=1, integer=True)
        start_step(high_res_steps or num_inference_steps, high_res_strength)
        custom = [name for name in ("timesteps", "sigmas") if kwargs.get(name) is not None]
        if high_res_steps is not None and custom:
            raise ValueError(f"high_res_steps: not with {custom[0]} (the custom schedule sets both passes' steps)")
        if high_res_strength != 1.0 and not mode.native_pass:
            raise ValueError("high_res_strength: mode 'direct' has no native latent to start the high-res pass from")
        if vae_tiling is not None and not isinstance(vae_tiling, bool):
            raise ValueError(f"vae_tiling={vae_tiling!r} must be None, True or False")
        if not isinstance(cfg_sequential, bool):
            raise ValueError(f"cfg_sequential={cfg_sequential!r} must be True or False")
        if "guidance_scale" in kwargs:
            check_number("guidance_scale", kwargs["guidance_scale"])
        images_per_prompt = kwargs.get("num_images_per_prompt", 1)
        check_number("num_images_per_prompt", images_per_prompt, low=1, integer=True)
        unknown = sorted(name for name in kwargs if name not in params or name in OWNED)
        if unknown:
            owned = [name for name in unknown if name in OWNED]
            raise ValueError(f"{', '.join(unknown)}: " + ("set by FAM per pass" if owned else
                             f"not an argument of {type(pipe).__name__}"))
        batch = self._check_prompt(prompt, kwargs) * images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {batch}")

        # what `image` is
        start_image = None
        if image is not None:
            if self.has_image:
                kwargs = {**kwargs, "image": image}
            else:
                if not mode.native_pass:
                    raise ValueError("image: mode 'direct' ignores the native image; choose another mode")
                start_image = image
        init_image = kwargs.get("image") if (self.is_img2img or self.is_inpaint) else None
        if (self.is_img2img or self.is_inpaint) and init_image is None:
            raise ValueError(f"image: {type(pipe).__name__} needs an init image")
        if self.has_controlnet and kwargs.get("control_image" if "control_image" in params else "image") is None:
            raise ValueError("image / control_image: a ControlNet pipeline needs a control image")

        # AM source and layers
        needs_diffused = start_image is not None or self.is_img2img or self.is_inpaint
        if am_source is not None:
            choose("am_source", am_source, AM_SOURCES)
        if mode.attention_modulation:
            if needs_diffused and am_source not in (None, "diffused"):
                raise ValueError(f"am_source={am_source!r} needs the native denoising trajectory of the same "
                                 "schedule; with an init/start image only 'diffused' is available")
            am_source = "diffused" if needs_diffused else (am_source or "recompute")
            if am_source == "diffused" and self.has_controlnet:
                raise ValueError("am_source='diffused' with a ControlNet (img2img ControlNet pipelines need it): the "
                                 "native ControlNet residuals of the diffused latents are not available; use "
                                 "mode='fm' or a text-to-image ControlNet pipeline with am_source 'recompute'/'cache'")
            resolve_am_layers(pipe.unet, am_layers)
        else:
            if am_layers is not None:
                raise ValueError(f"am_layers: mode {mode.name!r} has no Attention Modulation")
            if am_source is not None:
                raise ValueError(f"am_source: mode {mode.name!r} has no Attention Modulation")
        if am_cache_device is not None:
            if am_source != "cache":
                raise ValueError(f"am_cache_device: only with am_source='cache' (got am_source={am_source!r})")
            _check_device("am_cache_device", am_cache_device)
        if cfg_sequential and hasattr(pipe, "pag_scale"):
            raise ValueError("cfg_sequential: not with PAG pipelines (their attention processors need the whole batch)")

        # sizes
        sizes = self._resolve_sizes(scale, height, width, native_height, native_width,
                                    start_image if start_image is not None else init_image)
        self._check_memory(sizes, batch, mode)
        tiling = tuple(vae_tiling if vae_tiling is not None else px[0] * px[1] > self.auto_tiling_min_pixels
                       for px in (sizes.native, sizes.target))

        # callbacks
        accepted = list(getattr(pipe, "_callback_tensor_inputs", ["latents"])) + list(FAM_TENSOR_INPUTS)
        requested = list(getattr(callback, "tensor_inputs", None) or callback_inputs or ["latents"])
        bad = [name for name in requested if name not in accepted]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} not in {accepted}")
        if callback is not None and not callable(callback):
            raise ValueError("callback_on_step_end: must be callable")

        common = {"prompt": prompt, "num_inference_steps": num_inference_steps, "generator": generator,
                  "output_type": output_type, "callback_on_step_end": callback,
                  "callback_on_step_end_tensor_inputs": callback_inputs, **kwargs}
        native_kwargs = self._native_kwargs(common, sizes, init_image)
        high_res_pipe, high_res_kwargs = self._high_res_kwargs(
            {**common, "num_inference_steps": high_res_steps or num_inference_steps}, sizes, mode)
        return {"sizes": sizes, "native_kwargs": native_kwargs, "high_res_pipe": high_res_pipe,
                "high_res_kwargs": high_res_kwargs, "am_source": am_source, "tiling": tiling,
                "start_image": start_image, "batch": batch, "images_per_prompt": images_per_prompt,
                "generator": generator}

    def _check_prompt(self, prompt, kwargs) -> int:
        embeds = kwargs.get("prompt_embeds")
        if (prompt is None) == (embeds is None):
            raise ValueError("prompt / prompt_embeds: give exactly one of them")
        if self.is_sdxl and embeds is not None and kwargs.get("pooled_prompt_embeds") is None:
            raise ValueError("pooled_prompt_embeds: required with prompt_embeds for SDXL")
        if self.is_sdxl and kwargs.get("negative_prompt_embeds") is not None and \
                kwargs.get("negative_pooled_prompt_embeds") is None:
            raise ValueError("negative_pooled_prompt_embeds: required with negative_prompt_embeds for SDXL")
        if prompt is None:
            return embeds.shape[0]
        if isinstance(prompt, str):
            return 1
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.80}")
        return len(prompt)

    def _resolve_sizes(self, scale, height, width, native_height, native_width, image) -> Sizes:
        default_h, default_w = self.default_native_size
        step = self.pipe.vae_scale_factor * self.unet_downsampling
        if image is not None:
            h, w = image_size(image)
            default_h, default_w = (max(step, int(round(side / step)) * step) for side in (h, w))
        return resolve_sizes(scale=scale, height=height, width=width,
                             native_height=default_h if native_height is None else native_height,
                             native_width=default_w if native_width is None else native_width,
                             vae_scale_factor=self.pipe.vae_scale_factor, unet_downsampling=self.unet_downsampling)

    def _check_memory(self, sizes: Sizes, batch: int, mode: Mode) -> None:
        channels = self.pipe.unet.config.in_channels
        element = torch.finfo(self.pipe.unet.dtype).bits // 8
        H, W = sizes.target_latent
        needed = self.latent_copies * batch * channels * H * W * max(element, 4)
        device = self.pipe._execution_device
        free = _free_memory(device)
        if free is not None and needed > free:
            raise ValueError(f"height/width: the {sizes.target[0]}x{sizes.target[1]} target needs about "
                             f"{needed / 2**30:.1f} GiB for its latents alone ({self.latent_copies} copies of "
                             f"{batch}x{channels}x{H}x{W}), more than the {free / 2**30:.1f} GiB free on {device}")

    # ---------------------------------------------------------------- per-pass arguments
    def _scaled_size_conditioning(self, common, factors) -> Dict[str, Any]:
        changes = {}
        for name in SIZE_CONDITIONING:
            value = common.get(name)
            if value is not None:
                changes[name] = (int(value[0] * factors[0]), int(value[1] * factors[1]))
        return changes

    def _native_kwargs(self, common, sizes: Sizes, init_image) -> Dict[str, Any]:
        params = _parameters(self.pipe)
        native = {name: value for name, value in common.items() if value is not None or name == "prompt"}
        if "height" in params:
            native["height"], native["width"] = sizes.native
        elif init_image is not None:  # img2img without height/width: the init image at the native size
            native["image"] = resize_images(self.pipe.image_processor, init_image, sizes.native)
        return native

    def _high_res_kwargs(self, common, sizes: Sizes, mode: Mode):
        pipe = self.pipe
        high_res_pipe = pipe
        if self.is_img2img:
            from diffusers import AutoPipelineForText2Image

            high_res_pipe = AutoPipelineForText2Image.from_pipe(pipe)
            high_res_pipe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        params = _parameters(high_res_pipe)
        out = {name: value for name, value in common.items() if value is not None or name == "prompt"}
        if self.is_img2img:
            out.pop("image", None)
            if "control_image" in out:
                out["image"] = out.pop("control_image")
        if self.is_inpaint:
            out["strength"] = 1.0
        for name in NATIVE_ONLY:
            if name in out and name not in params:
                out.pop(name)
        out.update(self._scaled_size_conditioning(common, sizes.scale))
        if not mode.native_pass:
            out["height"], out["width"] = sizes.target
        missing = sorted(name for name in out if name not in params)
        if missing:
            raise ValueError(f"{', '.join(missing)}: cannot be honoured in the high-res pass "
                             f"({type(high_res_pipe).__name__})")
        return high_res_pipe, out

    # ---------------------------------------------------------------- start image (text-to-image pipes)
    def _encode_start_image(self, plan) -> torch.Tensor:
        sizes, device = plan["sizes"], self.pipe._execution_device
        pixels = self.pipe.image_processor.preprocess(plan["start_image"], height=sizes.native[0],
                                                      width=sizes.native[1])
        latents = vae_io.encode(self.pipe, pixels.to(device)).to(self.pipe.unet.dtype)
        batch = plan["batch"]
        if latents.shape[0] == 1 and batch > 1:
            latents = latents.repeat(batch, 1, 1, 1)
        elif latents.shape[0] * plan["images_per_prompt"] == batch:
            latents = latents.repeat_interleave(plan["images_per_prompt"], dim=0)
        if latents.shape[0] != batch:
            raise ValueError(f"image: {latents.shape[0]} start images for a batch of {batch}")
        return latents

    def _start_image_output(self, plan, latents, output_type):
        if output_type == "latent":
            return latents
        image = vae_io.decode(self.pipe, latents, tiled=plan["tiling"][0])
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


@contextmanager
def _progress_label(pipe, name: str, size) -> Iterator[None]:
    """Label the pass's progress bar "native HxW" / "high-res HxW" unless the user set a ``desc``."""
    previous = pipe.__dict__.get("_progress_bar_config")
    config = dict(previous or {})
    config.setdefault("desc", f"{name} {size[0]}x{size[1]}")
    pipe._progress_bar_config = config
    try:
        yield
    finally:
        if previous is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = previous


def _check_device(name: str, device) -> None:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name}={device!r} is not a device ({error})") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{name}={str(device)!r}: no such CUDA device here "
                         f"({torch.cuda.device_count()} visible)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={str(device)!r}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}={str(device)!r}: only cpu, cuda and mps devices are supported")


def _free_memory(device) -> Optional[int]:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


