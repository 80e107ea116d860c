"""The shortened high-res pass (``high_res_strength``, ``high_res_steps``): its start
step and step count follow diffusers' img2img ``strength`` rule, the defaults
reproduce the paper's full pass bit for bit, AM maps high-res steps to the nearest
native step, bad values are refused before any work."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
)

from fam import FAMPipeline
from fam.sources import nearest_native_steps
from fam.testing import tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SCHEDULERS = [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler]


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "latent")
    return FAMPipeline.from_pipe(pipe)("a red cube", generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS)
@pytest.mark.parametrize("steps, strength", [(4, 1.0), (4, 0.5), (5, 0.7), (6, 0.3), (3, 0.34)])
def test_start_and_step_count_follow_diffusers_img2img(sdxl, monkeypatch, scheduler_cls, steps, strength):
    original = sdxl.scheduler
    sdxl.scheduler = scheduler_cls.from_config(original.config)
    try:
        seen, indexes = [], []
        real = sdxl.unet.forward

        def forward(sample, timestep, *args, **kwargs):
            if getattr(type(sdxl), "fam_pass", None) == "high_res":
                seen.append(float(timestep))
                indexes.append(getattr(sdxl.scheduler, "step_index", None))
            return real(sample, timestep, *args, **kwargs)

        monkeypatch.setattr(sdxl.unet, "forward", forward)
        out = run(sdxl, mode="fm", num_inference_steps=2, high_res_steps=steps, high_res_strength=strength)
        img2img = StableDiffusionXLImg2ImgPipeline(**sdxl.components)
        img2img.scheduler.set_timesteps(steps)
        expected, count = img2img.get_timesteps(steps, strength, "cpu")
        assert seen == [float(t) for t in expected] and len(seen) == count
        if indexes[0] is not None:  # schedulers that keep a step index: the noise level of that step
            start = (steps - count) * img2img.scheduler.order
            assert indexes == list(range(start, start + count))
        assert torch.isfinite(out.images).all()
    finally:
        sdxl.scheduler = original


@pytest.mark.parametrize("am_source", ["recompute", "cache", "diffused"])
def test_defaults_reproduce_the_full_pass_bit_for_bit(sdxl, am_source):
    default = run(sdxl, am_source=am_source)
    explicit = run(sdxl, am_source=am_source, high_res_strength=1.0, high_res_steps=4)
    assert torch.equal(default.images, explicit.images)
    shorter = run(sdxl, am_source=am_source, high_res_strength=0.5)
    assert not torch.allclose(shorter.images, default.images, atol=1e-4)
    assert torch.equal(shorter.native_images, default.native_images)  # the native pass keeps its schedule


def test_nearest_native_step_rule():
    native = {0: 999.0, 1: 749.0, 2: 499.0, 3: 249.0}
    assert nearest_native_steps(native, [999, 749, 499, 249]) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert nearest_native_steps(native, [999, 499]) == {0: 0, 1: 2}
    # 874 is as near to 999 as to 749: the earlier (noisier) native step
    assert nearest_native_steps(native, [874, 624, 1]) == {0: 0, 1: 1, 2: 3}


def test_recompute_and_cache_agree_with_fewer_high_res_steps(sdxl):
    recompute = run(sdxl, num_inference_steps=4, high_res_steps=2, am_source="recompute")
    cache = run(sdxl, num_inference_steps=4, high_res_steps=2, am_source="cache")
    assert torch.equal(recompute.images, cache.images)
    both = run(sdxl, num_inference_steps=4, high_res_steps=3, high_res_strength=0.7, am_source="recompute")
    assert torch.isfinite(both.images).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"high_res_strength": 0}, r"high_res_strength=0 must be a number in \(0, 1\]"),
    ({"high_res_strength": 1.5}, r"high_res_strength=1.5 must be a number in \[0, 1\]"),
    ({"high_res_strength": True}, r"high_res_strength=True must be a number"),
    ({"high_res_strength": float("nan")}, r"high_res_strength=nan must be a number"),
    ({"high_res_strength": "0.5"}, r"high_res_strength='0.5' must be a number"),
    ({"high_res_steps": 0}, r"high_res_steps=0 must be an int >= 1"),
    ({"high_res_steps": True}, r"high_res_steps=True must be an int >= 1"),
    ({"high_res_steps": 2.5}, r"high_res_steps=2.5 must be an int >= 1"),
    ({"high_res_strength": 0.1, "high_res_steps": 5}, r"high_res_strength=0.1 leaves no step of 5"),
    ({"high_res_strength": 0.5, "mode": "direct"}, r"high_res_strength: mode 'direct' has no native latent"),
    ({"high_res_steps": 2, "timesteps": [999, 500]}, r"high_res_steps: not with timesteps"),
])
def test_bad_values_are_refused_before_any_work(kwargs, message):
    pipe = tiny_sdxl_pipeline()

    def no_denoising(*args, **kwargs):
        raise AssertionError("the UNet ran before the arguments were validated")

    pipe.unet.forward = no_denoising
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)
