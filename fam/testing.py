"""Tiny SDXL- and SD 1.5-architecture pipelines built in code, with random weights:
for tests and CPU benchmarks, fully offline.

Both keep their model's block layout (SDXL: no attention in the highest-resolution
level, up_blocks.0 is the attention-heavy lowest-resolution up block; SD 1.5:
up_blocks.0 has no attention) with tiny channels.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_level_alphabet():
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def tiny_tokenizer(directory: Optional[str] = None) -> CLIPTokenizer:
    """A character-level CLIP tokenizer from a vocab.json/merges.txt written to ``directory``
    (a new temporary directory by default); model_max_length 77 as in SD/SDXL."""
    directory = directory or tempfile.mkdtemp(prefix="fam_tokenizer_")
    alphabet = _byte_level_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + list(SPECIAL_TOKENS)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: index for index, token in enumerate(tokens)}, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def _text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, *, with_projection: bool, seed: int):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=hidden_size, hidden_act="gelu",
        layer_norm_eps=1e-5, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _vae(block_out_channels: Sequence[int], sample_size: int, seed: int, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        norm_num_groups=min(8, block_out_channels[0]), sample_size=sample_size, **config,
    ).eval()


def tiny_sdxl_pipeline(*, block_out_channels: Sequence[int] = (16, 32, 64),
                       transformer_layers_per_block: Sequence[int] = (1, 1, 2),
                       attention_heads: Sequence[int] = (1, 2, 4), layers_per_block: int = 1,
                       sample_size: int = 8, vae_block_out_channels: Sequence[int] = (8, 16),
                       text_hidden_size: int = 16, scheduler=None, seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL layout (DownBlock2D, CrossAttnDown x2 / CrossAttnUp x2, UpBlock2D; text_time
    conditioning; two text encoders) with tiny channels. ``sample_size`` is the native
    latent side; the VAE factor is 2**(len(vae_block_out_channels) - 1)."""
    tokenizer = tiny_tokenizer()
    text_encoder = _text_encoder(tokenizer, text_hidden_size, with_projection=False, seed=seed + 1)
    text_encoder_2 = _text_encoder(tokenizer, text_hidden_size, with_projection=True, seed=seed + 2)
    addition_time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=tuple(transformer_layers_per_block),
        attention_head_dim=tuple(attention_heads),  # diffusers' SDXL config: these are head counts
        use_linear_projection=True, cross_attention_dim=2 * text_hidden_size,
        addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_hidden_size,
        norm_num_groups=min(8, block_out_channels[0]),
    ).eval()
    vae = _vae(vae_block_out_channels, 32, seed + 3, force_upcast=True)
    scheduler = scheduler or EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(*, block_out_channels: Sequence[int] = (16, 32, 32), sample_size: int = 8,
                     vae_block_out_channels: Sequence[int] = (8, 16), text_hidden_size: int = 16,
                     scheduler=None, seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.5 layout (CrossAttnDown blocks then a DownBlock2D; up_blocks.0 is an
    UpBlock2D without attention) with tiny channels and three levels."""
    tokenizer = tiny_tokenizer()
    text_encoder = _text_encoder(tokenizer, text_hidden_size, with_projection=False, seed=seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=text_hidden_size, norm_num_groups=min(8, block_out_channels[0]),
    ).eval()
    vae = _vae(vae_block_out_channels, 32, seed + 3)
    scheduler = scheduler or DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- other pipeline kinds

PIPELINE_KINDS = ("text2img", "img2img", "inpaint", "controlnet", "controlnet_img2img", "pag")

_CLASSES = {
    "sdxl": {"text2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
             "inpaint": "StableDiffusionXLInpaintPipeline", "controlnet": "StableDiffusionXLControlNetPipeline",
             "controlnet_img2img": "StableDiffusionXLControlNetImg2ImgPipeline", "pag": "StableDiffusionXLPAGPipeline"},
    "sd": {"text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
           "inpaint": "StableDiffusionInpaintPipeline", "controlnet": "StableDiffusionControlNetPipeline",
           "controlnet_img2img": "StableDiffusionControlNetImg2ImgPipeline", "pag": "StableDiffusionPAGPipeline"},
}


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0):
    """A ControlNet initialised from the UNet (``ControlNetModel.from_unet``), with a
    tiny conditioning embedding (downsampling 2 = the tiny VAE factor). Its zero convolutions are
    given small random weights so that the control image changes the result."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            block.weight.normal_(0, 0.05)
    return controlnet


def tiny_pipeline(kind: str = "text2img", arch: str = "sdxl", **kwargs):
    """A tiny pipeline of the given kind (see ``PIPELINE_KINDS``) on the components of
    :func:`tiny_sdxl_pipeline` / :func:`tiny_sd_pipeline` (``arch`` "sdxl" or "sd");
    ControlNet kinds get :func:`tiny_controlnet`, PAG applies to the mid block."""
    import diffusers

    base = tiny_sdxl_pipeline(**kwargs) if arch == "sdxl" else tiny_sd_pipeline(**kwargs)
    if kind == "text2img":
        return base
    components = dict(base.components)
    extra = {}
    if kind.startswith("controlnet"):
        extra["controlnet"] = tiny_controlnet(base.unet)
    if kind == "pag":
        extra["pag_applied_layers"] = ["mid"]
    cls = getattr(diffusers, _CLASSES[arch][kind])
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{name: value for name, value in components.items() if name in accepted}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_image(height: int = 24, width: int = 20, seed: int = 0):
    """A random RGB PIL image (sides deliberately not multiples of the model's size step)."""
    import numpy as np
    import PIL.Image

    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    return PIL.Image.fromarray(pixels)


def tiny_mask(height: int = 24, width: int = 20):
    """A PIL mask: white (repaint) on the right half."""
    import numpy as np
    import PIL.Image

    mask = np.zeros((height, width), dtype="uint8")
    mask[:, width // 2:] = 255
    return PIL.Image.fromarray(mask)


def load_tiny_ip_adapter(pipe, image_embed_dim: int = 8, seed: int = 0) -> int:
    """Give ``pipe`` an IP-Adapter (the basic kind: 4 image tokens) with random
    weights, built in code in the format diffusers' loader reads; no image encoder
    (call with ``ip_adapter_image_embeds``). Returns the image embedding size."""
    generator = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    cross_dim = unet.config.cross_attention_dim
    ip_layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
        for proj in ("to_k_ip", "to_v_ip"):
            ip_layers[f"{key_id}.{proj}.weight"] = torch.randn(hidden, cross_dim, generator=generator) * 0.3
        key_id += 2
    image_proj = {"proj.weight": torch.randn(4 * cross_dim, image_embed_dim, generator=generator) * 0.3,
                  "proj.bias": torch.zeros(4 * cross_dim), "norm.weight": torch.ones(cross_dim),
                  "norm.bias": torch.zeros(cross_dim)}
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_layers}], low_cpu_mem_usage=False)
    return image_embed_dim
