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
    ({"am_lambda": 1.5}, r"am_lambda=1.5 must be a number in \[0, 1\]"),
    ({"am_lambda": True}, r"am_lambda=True must be a number in \[0, 1\]"),
    ({"fm_c": True}, r"fm_c=True must be a number >= 0"),
    ({"fm_c": float("nan")}, r"fm_c=nan must be a number >= 0"),
    ({"num_inference_steps": 0}, r"num_inference_steps=0 must be an int >= 1"),
    ({"num_inference_steps": True}, r"num_inference_steps=True must be an int >= 1"),
    ({"num_inference_steps": 2.0}, r"num_inference_steps=2.0 must be an int >= 1"),
    ({"guidance_scale": float("nan")}, r"guidance_scale=nan must be a number"),
    ({"guidance_scale": "5"}, r"guidance_scale='5' must be a number"),
    ({"num_images_per_prompt": 0}, r"num_images_per_prompt=0 must be an int >= 1"),
    ({"num_images_per_prompt": -2}, r"num_images_per_prompt=-2 must be an int >= 1"),
    ({"am_cache_device": "cpu"}, r"am_cache_device: only with am_source='cache' \(got am_source='recompute'\)"),
    ({"am_source": "cache", "am_cache_device": "gpu9"}, r"am_cache_device='gpu9' is not a device"),
    ({"am_source": "cache", "am_cache_device": "cuda:7"}, r"am_cache_device='cuda:7': no such CUDA device here"),
    ({"mode": "fm", "am_layers": ["up_blocks.0"]}, r"am_layers: mode 'fm' has no Attention Modulation"),
    ({"mode": "skip_residual", "am_source": "cache"}, r"am_source: mode 'skip_residual' has no Attention"),
    ({"scale": 40000}, r"height/width: the 640000x640000 target needs about .* GiB for its latents alone"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, r"latents: set by FAM per pass"),
    ({"strength": 0.5}, r"strength: not an argument of StableDiffusionXLPipeline"),
    ({"vae_tiling": "yes"}, r"vae_tiling='yes' must be None, True or False"),
    ({"callback_on_step_end": 3}, r"callback_on_step_end: must be callable"),
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
    with pytest.raises(ValueError, match=r"prompt must be a str or a non-empty list of str, got \[\]"):
        fam([])
    with pytest.raises(ValueError, match=r"prompt must be a str or a non-empty list of str"):
        fam(["a", 3])


def test_unsupported_pipelines():
    class NotAPipeline:
        unet = None

    with pytest.raises(ValueError, match="pipe: FAM needs a pipeline with a UNet2DConditionModel, got NotAPipeline"):
        FAMPipeline.from_pipe(NotAPipeline())
    from diffusers import StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLInstructPix2PixPipeline

    from fam.testing import tiny_controlnet

    base = tiny_sdxl_pipeline()
    untested = StableDiffusionXLControlNetInpaintPipeline(**base.components, controlnet=tiny_controlnet(base.unet))
    with pytest.raises(ValueError, match="pipe: FAMPipeline wraps StableDiffusionPipeline, .* got "
                                         "StableDiffusionXLControlNetInpaintPipeline; .* try the hook API"):
        FAMPipeline.from_pipe(untested)
    pix2pix = StableDiffusionXLInstructPix2PixPipeline(**{k: v for k, v in base.components.items()
                                                          if k not in ("image_encoder", "feature_extractor")})
    with pytest.raises(ValueError, match="pipe: StableDiffusionXLInstructPix2PixPipeline.__call__ has no "
                                         "callback_on_step_end"):
        FAMPipeline.from_pipe(pix2pix)
    distilled = tiny_sdxl_pipeline()
    distilled.unet.register_to_config(time_cond_proj_dim=8)
    with pytest.raises(ValueError, match="guidance-distilled UNets"):
        FAMPipeline.from_pipe(distilled)
    with pytest.raises(ValueError, match="prompt_2: not an argument of StableDiffusionPipeline"):
        FAMPipeline.from_pipe(tiny_sd_pipeline())("x", prompt_2="y")


@pytest.mark.parametrize("fail_in", ["native", "high_res"])
def test_callback_returning_latents_of_the_wrong_shape(fail_in):
    fam = FAMPipeline.from_pipe(tiny_sdxl_pipeline())

    def bad(pipe, step, t, tensors):
        if pipe.fam_pass == fail_in:
            return {"latents": tensors["latents"][..., :-1]}
        return {}

    expected = "(1, 4, 8, 7)" if fail_in == "native" else "(1, 4, 16, 15)"
    with pytest.raises(ValueError, match=rf"callback_on_step_end returned latents of shape \{expected[:-1]}\) in the "
                                         rf"{fail_in} pass at step 0"):
        fam("a red cube", num_inference_steps=2, callback_on_step_end=bad, output_type="latent")
