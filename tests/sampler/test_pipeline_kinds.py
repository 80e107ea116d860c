"""FAMPipeline on every supported diffusers pipeline kind (tiny SDXL and SD 1.5
layouts, random weights, offline): text-to-image, img2img, inpaint, ControlNet
(text-to-image and img2img), PAG, AutoPipeline results; LoRA scale, guidance_rescale,
clip_skip, original_size, SDXLCFGCutoffCallback."""

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, StableDiffusionXLImg2ImgPipeline
from diffusers.callbacks import SDXLCFGCutoffCallback

from fam import FAMPipeline
from fam.attention import FAMAttnProcessor
from fam.testing import PIPELINE_KINDS, tiny_image, tiny_mask, tiny_pipeline

STEPS = 2
pytestmark = pytest.mark.usefixtures("one_torch_thread")

_CACHE = {}


def pipeline(kind, arch):
    if (kind, arch) not in _CACHE:
        _CACHE[(kind, arch)] = tiny_pipeline(kind, arch)
    return _CACHE[(kind, arch)]


def kind_arguments(kind):
    image, mask = tiny_image(), tiny_mask()
    return {
        "text2img": {},
        "img2img": {"image": image, "strength": 0.6},
        "inpaint": {"image": image, "mask_image": mask, "strength": 0.9},
        "controlnet": {"image": image},
        "controlnet_img2img": {"image": image, "control_image": tiny_image(seed=1), "strength": 0.7, "mode": "fm"},
        "pag": {"pag_scale": 2.0},
    }[kind]


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return FAMPipeline.from_pipe(pipe)("a red cube", generator=torch.Generator().manual_seed(seed), **kwargs)


def pipe_state(pipe):
    return (type(pipe), {name: id(p) for name, p in pipe.unet.attn_processors.items()},
            "forward" in vars(pipe.unet), "prepare_latents" in vars(pipe))


@pytest.mark.parametrize("scale", [2, (2, 4)], ids=["2x", "2x4"])
@pytest.mark.parametrize("kind", PIPELINE_KINDS)
@pytest.mark.parametrize("arch", ["sdxl", "sd"])
def test_every_kind_runs_at_2x_and_2x4(arch, kind, scale):
    pipe = pipeline(kind, arch)
    before = pipe_state(pipe)
    kwargs = kind_arguments(kind)
    out = run(pipe, scale=scale, **kwargs)
    factors = (scale, scale) if isinstance(scale, int) else scale
    # an init image of 24x20 px gives a native 24x16 (sides rounded to multiples of 8); otherwise 16x16
    native = (12, 8) if kind in ("img2img", "inpaint", "controlnet_img2img") else (8, 8)
    assert out.native_images.shape == (1, 4, *native)
    assert out.images.shape == (1, 4, native[0] * factors[0], native[1] * factors[1])
    assert torch.isfinite(out.images).all()
    plain = run(pipe, scale=scale, **{**kwargs, "mode": "direct_native"})
    assert torch.equal(plain.native_images, out.native_images)
    assert not torch.allclose(plain.images, out.images, atol=1e-4)  # the modulation acts
    assert pipe_state(pipe) == before
    assert not any(isinstance(p, FAMAttnProcessor) for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("arch", ["sdxl", "sd"])
def test_img2img_native_pass_is_the_pipes_own_img2img_at_the_native_size(arch):
    pipe = pipeline("img2img", arch)
    out = run(pipe, image=tiny_image(), strength=0.6, output_type="np")
    resized = pipe.image_processor.resize(tiny_image(), 24, 16)  # diffusers' own resize (lanczos)
    own = pipe("a red cube", image=resized, strength=0.6, num_inference_steps=STEPS, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(out.native_images, own, atol=1e-6)
    assert out.images.shape == (1, 48, 32, 3)


@pytest.mark.parametrize("arch", ["sdxl", "sd"])
def test_inpaint_native_pass_is_the_pipes_own_inpaint(arch):
    pipe = pipeline("inpaint", arch)
    out = run(pipe, image=tiny_image(), mask_image=tiny_mask(), strength=0.9)
    own = pipe("a red cube", image=tiny_image(), mask_image=tiny_mask(), strength=0.9, height=24, width=16,
               num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(out.native_images, own)


@pytest.mark.parametrize("arch", ["sdxl", "sd"])
def test_controlnet_recompute_uses_the_native_control_residuals(arch):
    """Recompute replays the native UNet calls (with the native ControlNet residuals):
    bit-identical to the AM cache recorded during the native pass."""
    pipe = pipeline("controlnet", arch)
    recompute = run(pipe, image=tiny_image(), am_source="recompute")
    cache = run(pipe, image=tiny_image(), am_source="cache")
    assert torch.equal(recompute.images, cache.images)
    other = run(pipe, image=tiny_image(seed=5), am_source="recompute")
    assert not torch.allclose(other.native_images, recompute.native_images, atol=1e-5)  # the control acts
    with pytest.raises(ValueError, match="am_source='diffused' with a ControlNet"):
        run(pipe, image=tiny_image(), am_source="diffused")


def test_controlnet_img2img_refuses_attention_modulation():
    pipe = pipeline("controlnet_img2img", "sdxl")
    with pytest.raises(ValueError, match="am_source='diffused' with a ControlNet"):
        run(pipe, image=tiny_image(), control_image=tiny_image(), mode="fam")


def test_img2img_refuses_recompute_and_cache():
    pipe = pipeline("img2img", "sdxl")
    with pytest.raises(ValueError, match="am_source='cache' needs the native denoising trajectory"):
        run(pipe, image=tiny_image(), am_source="cache")


def test_pag_recompute_equals_cache_and_refuses_cfg_sequential():
    pipe = pipeline("pag", "sdxl")
    assert torch.equal(run(pipe, pag_scale=2.0).images, run(pipe, pag_scale=2.0, am_source="cache").images)
    with pytest.raises(ValueError, match="cfg_sequential: not with PAG"):
        run(pipe, pag_scale=2.0, cfg_sequential=True)


def test_autopipeline_results_are_wrapped_like_their_classes():
    base = tiny_pipeline("text2img", "sdxl")
    auto = AutoPipelineForImage2Image.from_pipe(base)
    auto.set_progress_bar_config(disable=True)
    assert isinstance(auto, StableDiffusionXLImg2ImgPipeline)
    explicit = StableDiffusionXLImg2ImgPipeline(**base.components)
    explicit.set_progress_bar_config(disable=True)
    kwargs = {"image": tiny_image(), "strength": 0.5}
    assert torch.equal(run(auto, **kwargs).images, run(explicit, **kwargs).images)
    t2i = AutoPipelineForText2Image.from_pipe(auto)
    t2i.set_progress_bar_config(disable=True)
    assert torch.equal(run(t2i).images, run(base).images)


# ----------------------------------------------------------------------------- arguments


def test_guidance_rescale_and_clip_skip_are_forwarded():
    pipe = pipeline("text2img", "sdxl")
    plain = run(pipe)
    for kwargs in ({"guidance_rescale": 0.7}, {"clip_skip": 1}):
        changed = run(pipe, **kwargs)
        assert not torch.allclose(changed.images, plain.images, atol=1e-5), kwargs
        assert not torch.allclose(changed.native_images, plain.native_images, atol=1e-5), kwargs


def test_original_size_is_scaled_for_the_high_res_pass(monkeypatch):
    pipe = tiny_pipeline("text2img", "sdxl")
    seen = []
    real = pipe.unet.forward

    def forward(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"][0].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", forward)
    run(pipe, mode="fm", scale=(2, 4), original_size=(20, 24), crops_coords_top_left=(1, 2))
    assert seen == [[20, 24, 1, 2, 16, 16]] * STEPS + [[40, 96, 2, 8, 32, 64]] * STEPS


def test_sdxl_cfg_cutoff_callback_acts_in_both_passes(monkeypatch):
    pipe = tiny_pipeline("text2img", "sdxl")
    batches = []
    real = pipe.unet.forward

    def forward(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return real(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", forward)
    callback = SDXLCFGCutoffCallback(cutoff_step_ratio=0.5)
    out = run(pipe, mode="fm", num_inference_steps=4, callback_on_step_end=callback)
    assert batches == [2, 2, 2, 1] * 2 and torch.isfinite(out.images).all()


def test_lora_scale_through_cross_attention_kwargs():
    from peft import LoraConfig

    pipe = tiny_pipeline("text2img", "sdxl")
    without = run(pipe, am_source="recompute")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    full = run(pipe, cross_attention_kwargs={"scale": 1.0})
    half = run(pipe, cross_attention_kwargs={"scale": 0.5})
    off = run(pipe, cross_attention_kwargs={"scale": 0.0})
    torch.testing.assert_close(off.images, without.images, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full.images, half.images, atol=1e-4)
    assert not torch.allclose(half.images, without.images, atol=1e-4)
    again = run(pipe, cross_attention_kwargs={"scale": 0.5})  # the early-stopped native runs left no scale behind
    assert torch.equal(again.images, half.images)


@pytest.mark.parametrize("arch", ["sdxl", "sd"])
@pytest.mark.parametrize("scale", [2, (2, 4)], ids=["2x", "2x4"])
def test_ip_adapter_image_embeds(arch, scale):
    from fam.testing import load_tiny_ip_adapter

    pipe = tiny_pipeline("text2img", arch)
    without = run(pipe, scale=scale)
    dim = load_tiny_ip_adapter(pipe)
    embeds = [torch.randn(2, 1, dim, generator=torch.Generator().manual_seed(1))]  # [negative, positive]
    recompute = run(pipe, scale=scale, ip_adapter_image_embeds=embeds)
    cache = run(pipe, scale=scale, ip_adapter_image_embeds=embeds, am_source="cache")
    assert torch.equal(recompute.images, cache.images)  # the replayed native calls carry the image embeds
    assert not torch.allclose(recompute.native_images, without.native_images, atol=1e-4)
    assert not torch.allclose(recompute.images, without.images, atol=1e-4)
    diffused = run(pipe, scale=scale, ip_adapter_image_embeds=embeds, am_source="diffused")
    assert torch.isfinite(diffused.images).all()


@pytest.mark.parametrize("kind", ["img2img", "controlnet", "inpaint"])
def test_model_cpu_offload_with_every_kind(kind):
    """The img2img high-res pass runs on a text-to-image sibling built by from_pipe: the
    offload hooks on the shared components must still drive it."""
    kwargs = {key: value for key, value in kind_arguments(kind).items() if key != "mode"}
    reference = run(tiny_pipeline(kind, "sdxl"), **kwargs)
    pipe = tiny_pipeline(kind, "sdxl")
    pipe.enable_model_cpu_offload(device="cpu")
    out = run(pipe, **kwargs)
    assert torch.equal(out.images, reference.images) and torch.equal(out.native_images, reference.native_images)
