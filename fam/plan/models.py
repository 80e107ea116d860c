"""The real modules of a diffusers pipeline, built from its config files on the meta
device: no weights are read or allocated, every shape is the real model's.

``model`` is a shipped name (``sdxl``, ``sd15``, ``sd21``: the public configs of SDXL
base 1.0, SD 1.5 and SD 2.1 in ``fam/configs``) or the path of any diffusers pipeline
folder (only its ``model_index.json`` and ``*/config.json`` are read).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import torch

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SHIPPED = ("sdxl", "sd15", "sd21")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class ModelConfigError(ValueError):
    """The model folder lacks a config the planner needs (message names the file)."""


def model_folder(model: str) -> str:
    if model in SHIPPED:
        return os.path.join(CONFIG_ROOT, model)
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ModelConfigError(f"{model!r} is neither one of {', '.join(SHIPPED)} nor a diffusers pipeline folder "
                               f"(no model_index.json)")
    return model


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ModelConfigError(f"cannot read {path} ({error})") from None


@dataclass
class MetaPipeline:
    """A diffusers pipeline object whose modules live on the meta device."""

    name: str
    pipe: object  # StableDiffusionXLPipeline or StableDiffusionPipeline
    dtype: torch.dtype
    components: Dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        from diffusers import StableDiffusionXLPipeline

        return isinstance(self.pipe, StableDiffusionXLPipeline)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, at their current dtypes (shared tensors once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _text_encoder(folder: str, name: str, cls_name: str, dtype):
    import transformers

    config_path = os.path.join(folder, name, "config.json")
    config = transformers.CLIPTextConfig.from_dict(_read_json(config_path))
    cls = getattr(transformers, cls_name, None)
    if cls is None or cls_name not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise ModelConfigError(f"{config_path}: text encoder class {cls_name!r} is not supported (CLIP text only)")
    with torch.device("meta"):
        module = cls(config)
    return module.to(dtype).eval()


@contextmanager
def quiet() -> Iterator[None]:
    """diffusers warns on every ``.to(dtype)`` of a model built from a config, and its decode
    on ``upcast_vae`` (a FutureWarning); mute them meanwhile."""
    import warnings

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    levels = [m.get_verbosity() for m in (diffusers_logging, transformers_logging)]
    for m in (diffusers_logging, transformers_logging):
        m.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for m, level in zip((diffusers_logging, transformers_logging), levels):
            m.set_verbosity(level)


def _tokenizer(encoders):
    """fam.testing's offline tokenizer padding to the text encoders' sequence length (token ids only feed shapes)."""
    from ..testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    lengths = [m.config.max_position_embeddings for m in encoders.values()]
    if lengths:
        tokenizer.model_max_length = min(lengths)
    return tokenizer


def load_meta_pipeline(model: str, dtype: torch.dtype = torch.float16) -> MetaPipeline:
    with quiet():
        return _load_meta_pipeline(model, dtype)


def _load_meta_pipeline(model: str, dtype: torch.dtype) -> MetaPipeline:
    """The pipeline of ``model`` with UNet, VAE and text encoders built on meta in ``dtype``;
    tokenizers are fam.testing's offline character tokenizer (token ids only feed shapes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import schedulers as diffusers_schedulers

    folder = model_folder(model)
    index = _read_json(os.path.join(folder, "model_index.json"))
    pipeline_class = index.get("_class_name")
    if pipeline_class not in ("StableDiffusionXLPipeline", "StableDiffusionPipeline"):
        raise ModelConfigError(f"{folder}/model_index.json: pipeline {pipeline_class!r} is not supported "
                               f"(StableDiffusionXLPipeline or StableDiffusionPipeline)")
    for component in ("unet", "vae"):
        if not os.path.isfile(os.path.join(folder, component, "config.json")):
            raise ModelConfigError(f"{folder}: {component}/config.json is missing")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(folder, "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(folder, "vae")))
    unet, vae = unet.to(dtype).eval(), vae.to(dtype).eval()
    scheduler_entry = index.get("scheduler") or ["diffusers", "EulerDiscreteScheduler"]
    scheduler_cls = getattr(diffusers_schedulers, scheduler_entry[1])
    scheduler = scheduler_cls.from_config(scheduler_cls.load_config(os.path.join(folder, "scheduler")))
    encoders = {}
    for name in TEXT_ENCODERS:
        entry = index.get(name)
        if entry and entry[1]:
            encoders[name] = _text_encoder(folder, name, entry[1], dtype)
    pipe = _assemble(pipeline_class == "StableDiffusionXLPipeline", unet, vae, encoders, scheduler)
    return MetaPipeline(name=model, pipe=pipe, dtype=dtype, components={"unet": unet, "vae": vae, **encoders})


def _assemble(sdxl: bool, unet, vae, encoders: Dict[str, torch.nn.Module], scheduler):
    """The diffusers pipeline around meta modules (no watermarker, no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tokenizer = _tokenizer(encoders)
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders.get("text_encoder"),
                                         text_encoder_2=encoders.get("text_encoder_2"), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders.get("text_encoder"), tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def describe(meta: MetaPipeline) -> Dict[str, Dict[str, int]]:
    return {name: {"parameters": parameter_count(m), "bytes": weight_bytes(m)} for name, m in meta.components.items()}


def default_native_size(meta: MetaPipeline) -> Optional[int]:
    return meta.pipe.unet.config.sample_size * meta.pipe.vae_scale_factor


def meta_from_pipeline(pipe, dtype: Optional[torch.dtype] = None) -> MetaPipeline:
    """A meta copy of a loaded diffusers pipeline (or FAMPipeline): the same configs,
    no weights. ``dtype`` defaults to the pipeline UNet's."""
    with quiet():
        return _meta_from_pipeline(pipe, dtype)


def _meta_from_pipeline(pipe, dtype: Optional[torch.dtype]) -> MetaPipeline:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    inner = getattr(pipe, "pipe", pipe)
    dtype = dtype or inner.unet.dtype
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(inner.unet.config)
        vae = AutoencoderKL.from_config(inner.vae.config)
        encoders = {name: type(getattr(inner, name))(getattr(inner, name).config)
                    for name in TEXT_ENCODERS if getattr(inner, name, None) is not None}
    unet, vae = unet.to(dtype).eval(), vae.to(dtype).eval()
    encoders = {name: module.to(dtype).eval() for name, module in encoders.items()}
    scheduler = inner.scheduler.__class__.from_config(inner.scheduler.config)
    meta = _assemble(isinstance(inner, StableDiffusionXLPipeline), unet, vae, encoders, scheduler)
    return MetaPipeline(name=type(inner).__name__, pipe=meta, dtype=dtype, components={"unet": unet, "vae": vae,
                                                                                       **encoders})


def largest_leaf_bytes(module: torch.nn.Module) -> int:
    """Weights of the largest leaf module: what sequential CPU offload holds on the device at once."""
    return max((weight_bytes(m) for m in module.modules() if not list(m.children())), default=0)
