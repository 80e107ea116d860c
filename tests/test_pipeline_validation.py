"""Every bad argument is rejected with a ValueError naming it, before any denoising."""

import pytest
import torch

from fam import FAMPipeline
from fam.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def fam():
    pipe = FAMPipeline.from_pipe(tiny_sdxl_pipeline())

    def no_denoising(*args, **kwargs):
        raise AssertionError("the UNet ran before the arguments were validated")

    pipe.unet.forward = no_denoising
    return pipe


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "fast"}, r"mode='fast' is not one of 'fam', 'fm', 'am'"),
    ({"am_source": "disk"}, r"am_source='disk' is not one of 'recompute', 'cache', 'diffused'"),
    ({"upsample": "lanczos"}, r"upsample='lanczos'"),
    ({"output_type": "jpeg"}, r"output_type='jpeg' is not one of 'pil', 'np', 'pt', 'latent'"),
    ({"am_layers": ["up_blocks.9"]}, r"am_layers: 'up_blocks.9' names no self-attention layer"),
    ({"am_layers": ["up_blocks.0.attentions.0.transformer_blocks.0.attn2"]}, r"am_layers: .* is a cross-attention"),
    ({"am_layers": []}, r"am_layers is empty"),
    ({"scale": 0}, r"scale=0: factors must be >= 1"),
    ({"scale": (2, 0.5)}, r"scale=\(2, 0.5\): factors must be integers"),
    ({"scale": 1.5}, r"scale=1.5: factors must be integers"),
    ({"scale": (2, 2, 2)}, r"scale=\(2, 2, 2\): give one factor or \(s_h, s_w\)"),
    ({"height": 40}, r"height=40 must be an integer multiple .* native height 16; nearest valid: 32 or 48"),
    ({"width": 8}, r"width=8 must be an integer multiple .* native width 16; nearest valid: 16"),
    ({"height": 48, "scale": 2}, r"height=48 disagrees with scale=2"),
    # native latent must be a multiple of the UNet's downsampling (4) x VAE factor (2) = 8 px
    ({"native_height": 20}, r"native_height=20 must be a positive multiple of 8 .*; nearest valid: 16 or 24"),
    ({"native_width": 4}, r"native_width=4 must be a positive multiple of 8 .*; nearest valid: 8"),
    ({"fm_c": -1}, r"fm_c=-1"),
    ({"am_lambda": 1.5}, r"am_lambda=1.5 must be in \[0, 1\]"),
    ({"num_inference_steps": 0}, r"num_inference_steps=0"),
    ({"callback_on_step_end_tensor_inputs": ["noise"]}, r"callback_on_step_end_tensor_inputs: \['noise'\]"),
    ({"generator": [torch.Generator(), torch.Generator()]}, r"generator: a list of 2 generators for a batch of 1"),
    ({"mode": "direct", "image": torch.zeros(1, 3, 16, 16)}, r"image: mode 'direct'"),
])
def test_bad_arguments(fam, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fam("a red cube", **kwargs)


def test_prompt_arguments(fam):
    with pytest.raises(ValueError, match="prompt / prompt_embeds: give exactly one"):
        fam()
    with pytest.raises(ValueError, match="pooled_prompt_embeds: required"):
        fam(prompt_embeds=torch.zeros(1, 77, 32))


def test_unsupported_pipelines():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    sdxl = tiny_sdxl_pipeline()
    img2img = StableDiffusionXLImg2ImgPipeline(**sdxl.components)
    with pytest.raises(ValueError, match="pipe: FAMPipeline wraps a StableDiffusionXLPipeline or "
                                         "StableDiffusionPipeline, got StableDiffusionXLImg2ImgPipeline"):
        FAMPipeline.from_pipe(img2img)
    with pytest.raises(ValueError, match="prompt_2 / pooled_prompt_embeds: only for SDXL"):
        FAMPipeline.from_pipe(tiny_sd_pipeline())("x", prompt_2="y")
