"""FAMPipeline end to end on tiny SDXL- and SD 1.5-architecture pipelines (random
weights, offline, 2-3 steps)."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from fam import FAMPipeline, FAMPipelineOutput
from fam.attention import FAMAttnProcessor
from fam.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from fam_kernels.reference import fm_modulate

STEPS = 2
SDXL_AM_LAYERS = [f"up_blocks.0.attentions.{a}.transformer_blocks.{b}.attn1" for a in range(2) for b in range(2)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return FAMPipeline.from_pipe(pipe)("a red cube", generator=torch.Generator().manual_seed(seed), **kwargs)


def processor_ids(pipe):
    return {name: id(proc) for name, proc in pipe.unet.attn_processors.items()}


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("scale, native, expected", [
    (2, None, (32, 32)), (3, None, (48, 48)), ((2, 4), None, (32, 64)), (2, (16, 24), (32, 48)),
])
def test_output_sizes(sdxl, scale, native, expected):
    native_kwargs = {} if native is None else {"native_height": native[0], "native_width": native[1]}
    out = run(sdxl, scale=scale, output_type="np", **native_kwargs)
    assert isinstance(out, FAMPipelineOutput)
    assert out.images.shape == (1, *expected, 3)
    assert out.native_images.shape == (1, *(native or (16, 16)), 3)


def test_target_height_width_and_return_tuple(sdxl):
    images, native_images = run(sdxl, height=32, width=64, output_type="pt", return_dict=False)
    assert images.shape == (1, 3, 32, 64) and native_images.shape == (1, 3, 16, 16)


def test_sd15_architecture_sizes_and_default_layers(sd):
    seen = []

    def inspect_processors(pipe, step, t, tensors):
        if pipe.fam_pass == "high_res":
            seen.append(sorted(n for n, p in pipe.unet.attn_processors.items() if isinstance(p, FAMAttnProcessor)))
        return {}

    out = run(sd, scale=(2, 3), output_type="np", callback_on_step_end=inspect_processors)
    assert out.images.shape == (1, 32, 48, 3) and out.native_images.shape == (1, 16, 16, 3)
    expected = sorted(n for n in sd.unet.attn_processors if n.startswith("up_blocks.1.") and ".attn1." in n)
    assert expected and seen == [expected] * STEPS


# ----------------------------------------------------------------------------- modes


def test_each_mode_runs_and_differs_from_direct(sdxl):
    results = {mode: run(sdxl, mode=mode) for mode in
               ("direct", "direct_native", "skip_residual", "fm", "am", "fam")}
    assert results["direct"].native_images is None
    for mode, out in results.items():
        assert out.images.shape == (1, 4, 16, 16) and torch.isfinite(out.images).all()
        if mode != "direct":
            assert not torch.allclose(out.images, results["direct"].images, atol=1e-3), mode
    finals = [results[m].images for m in ("direct_native", "skip_residual", "fm", "am", "fam")]
    for i in range(len(finals)):
        for j in range(i + 1, len(finals)):
            assert not torch.equal(finals[i], finals[j])


def test_am_processors_only_on_configured_layers_during_the_high_res_pass(sdxl):
    before = processor_ids(sdxl)
    observed = []

    def inspect_processors(pipe, step, t, tensors):
        fam_layers = sorted(name[: -len(".processor")] for name, proc in pipe.unet.attn_processors.items()
                            if isinstance(proc, FAMAttnProcessor))
        observed.append((pipe.fam_pass, fam_layers))
        return {}

    run(sdxl, callback_on_step_end=inspect_processors)
    # recompute: the native pass runs the pipe's own processors (its UNet calls are kept)
    assert observed == [("native", [])] * STEPS + [("high_res", SDXL_AM_LAYERS)] * STEPS
    assert processor_ids(sdxl) == before
    observed.clear()
    run(sdxl, am_source="cache", callback_on_step_end=inspect_processors)  # cache: recorded by the processors
    assert observed == [("native", SDXL_AM_LAYERS)] * STEPS + [("high_res", SDXL_AM_LAYERS)] * STEPS

    observed.clear()
    custom = "down_blocks.2.attentions.0.transformer_blocks.1.attn1"
    run(sdxl, am_layers=[custom, "up_blocks.1"], callback_on_step_end=inspect_processors)
    up1 = sorted(n[: -len(".processor")] for n in sdxl.unet.attn_processors if n.startswith("up_blocks.1.")
                 and ".attn1." in n)
    assert observed[-1] == ("high_res", sorted([custom] + up1))


def test_am_calls_am_attention_with_native_grids(sdxl, monkeypatch):
    import fam_kernels
    calls = []
    real = fam_kernels.am_attention

    def spy(q, k, v, q_lr, k_lr, **kwargs):
        calls.append((tuple(q.shape), tuple(q_lr.shape), kwargs["hr_size"], kwargs["lr_size"], kwargs["lam"]))
        return real(q, k, v, q_lr, k_lr, **kwargs)

    monkeypatch.setattr(fam_kernels, "am_attention", spy)
    run(sdxl, scale=(2, 4), am_lambda=0.6)
    # up_blocks.0 sits at latent / 4: native 8x8 -> 2x2 tokens, target 16x32 -> 4x8; CFG batch 2, 4 heads x 16
    assert calls == [((2, 4, 32, 16), (2, 4, 4, 16), (4, 8), (2, 2), 0.6)] * (len(SDXL_AM_LAYERS) * STEPS)


def test_sdxl_time_ids_use_the_size_of_each_pass(sdxl, monkeypatch):
    seen = []
    real_forward = sdxl.unet.forward

    def forward(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist())
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(sdxl.unet, "forward", forward)
    run(sdxl, scale=(2, 4), mode="fm")
    native, high_res = [16, 16, 0, 0, 16, 16], [32, 64, 0, 0, 32, 64]
    assert seen == [[native, native]] * STEPS + [[high_res, high_res]] * STEPS  # CFG batch: 2 rows


# ----------------------------------------------------------------------------- sources, FM, determinism


def test_recompute_and_cache_are_bit_identical(sdxl):
    recompute = run(sdxl, am_source="recompute", output_type="pt")
    cache = run(sdxl, am_source="cache", output_type="pt")
    cache_cpu = run(sdxl, am_source="cache", am_cache_device="cpu", output_type="pt")
    assert torch.equal(recompute.images, cache.images) and torch.equal(recompute.images, cache_cpu.images)
    assert torch.equal(recompute.native_images, cache.native_images)
    assert recompute.am_cache_bytes is None
    # per step: 4 layers x CFG batch 2 x 4 tokens (2x2) x 64 channels x 4 bytes
    assert cache.am_cache_bytes == STEPS * 4 * 2 * 4 * 64 * 4
    diffused = run(sdxl, am_source="diffused", output_type="pt")
    assert not torch.equal(diffused.images, recompute.images)


def test_without_guidance_recompute_and_cache_agree(sd):
    recompute = run(sd, guidance_scale=1.0, am_source="recompute")
    cache = run(sd, guidance_scale=1.0, am_source="cache")
    assert torch.equal(recompute.images, cache.images)
    assert not torch.equal(recompute.images, run(sd, guidance_scale=3.0).images)


def test_recompute_and_cache_identical_with_sequential_cfg(sd):
    recompute = run(sd, am_source="recompute", cfg_sequential=True)
    cache = run(sd, am_source="cache", cfg_sequential=True)
    assert torch.equal(recompute.images, cache.images)


def test_fm_latent_matches_eq4_oracle(sdxl, monkeypatch):
    """After each high-res scheduler step the latents are modulated for the next step's
    timestep: callback latents == eq. 4 applied to the scheduler's output."""
    recorded, stepped = [], []

    def record(pipe, step, t, tensors):
        if pipe.fam_pass == "high_res":
            recorded.append({k: None if v is None else v.clone() for k, v in tensors.items()})
        return {}

    real_step = type(sdxl.scheduler).step

    def spy_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        stepped.append(out[0].clone())
        return out

    monkeypatch.setattr(type(sdxl.scheduler), "step", spy_step)
    run(sdxl, num_inference_steps=3, mode="fm", fm_c=0.5, callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "reference_latents", "modulated_latents"])
    schedule = type(sdxl.scheduler).from_config(sdxl.scheduler.config)
    schedule.set_timesteps(3)
    T = sdxl.scheduler.config.num_train_timesteps
    high_res_steps = stepped[3:]
    for i in range(2):
        oracle = fm_modulate(high_res_steps[i].double(), recorded[i]["reference_latents"].double(),
                             float(schedule.timesteps[i + 1]), T, 0.5, precision=torch.float64)
        torch.testing.assert_close(recorded[i]["latents"].double(), oracle, atol=1e-5, rtol=1e-5)
        assert torch.equal(recorded[i]["latents"], recorded[i]["modulated_latents"])
        assert not torch.allclose(high_res_steps[i], recorded[i]["latents"], atol=1e-3)
    assert recorded[2]["reference_latents"] is None and torch.equal(recorded[2]["latents"], high_res_steps[2])


def _noise_coefficients(scheduler, step):
    """(a, b) with add_noise(x0, eps, t_step) = a x0 + b eps, read from the schedule tables."""
    if isinstance(scheduler, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)):
        return 1.0, float(scheduler.sigmas[step])
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        sigma = float(scheduler.sigmas[step])
        alpha_t = (sigma ** 2 + 1) ** -0.5
        return alpha_t, sigma * alpha_t
    alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[step])])
    return alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler])
def test_reference_latents_follow_the_schedule_at_every_step(scheduler_cls):
    """z~_t = a_t z~0 + b_t eps with the step's own noise level (sigma-based schedulers
    index add_noise by begin/step index, not by t). The callback after step i gets z~ of step i + 1."""
    pipe = tiny_sdxl_pipeline(scheduler=scheduler_cls(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear"))
    refs = []
    run(pipe, num_inference_steps=4, mode="fm", callback_on_step_end_tensor_inputs=["reference_latents"],
        callback_on_step_end=lambda p, i, t, x: refs.append(x["reference_latents"]) or {}
        if p.fam_pass == "high_res" else {})
    assert refs[3] is None
    refs = [r.double() for r in refs[:3]]
    schedule = scheduler_cls.from_config(pipe.scheduler.config)
    schedule.set_timesteps(4)
    (a0, b0), (a1, b1), (a2, b2) = (_noise_coefficients(schedule, i) for i in (1, 2, 3))
    det = a0 * b1 - a1 * b0
    x0 = (b1 * refs[0] - b0 * refs[1]) / det
    eps = (a0 * refs[1] - a1 * refs[0]) / det
    torch.testing.assert_close(refs[2], a2 * x0 + b2 * eps, atol=1e-4, rtol=1e-4)
    assert eps.std() > 0.5  # a real noise draw, not a degenerate solve


def test_same_seed_bit_identical_other_seed_differs(sdxl):
    first, second = run(sdxl, output_type="pt"), run(sdxl, output_type="pt")
    assert torch.equal(first.images, second.images) and torch.equal(first.native_images, second.native_images)
    assert not torch.equal(first.images, run(sdxl, seed=1, output_type="pt").images)


def test_generator_list_per_sample(sdxl):
    fam = FAMPipeline.from_pipe(sdxl)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    batch = fam(["a red cube", "a red cube"], generator=gens, num_inference_steps=STEPS, output_type="latent")
    alone = run(sdxl, seed=1)
    assert batch.images.shape[0] == 2
    torch.testing.assert_close(batch.images[1:], alone.images, atol=1e-4, rtol=1e-4)


def test_cfg_sequential_matches_batched(sdxl):
    batched = run(sdxl, cfg_sequential=False)
    sequential = run(sdxl, cfg_sequential=True)
    torch.testing.assert_close(sequential.images, batched.images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sequential.native_images, batched.native_images, atol=1e-4, rtol=1e-4)


def test_prompt_embeds_path_matches_prompt(sdxl):
    embeds = sdxl.encode_prompt("a red cube", device="cpu", num_images_per_prompt=1,
                                do_classifier_free_guidance=True, negative_prompt="")
    by_prompt = run(sdxl, negative_prompt="")
    fam = FAMPipeline.from_pipe(sdxl)
    by_embeds = fam(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], pooled_prompt_embeds=embeds[2],
                    negative_pooled_prompt_embeds=embeds[3], generator=torch.Generator().manual_seed(0),
                    num_inference_steps=STEPS, output_type="latent")
    assert torch.equal(by_prompt.images, by_embeds.images)


# ----------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                                           DPMSolverMultistepScheduler])
def test_common_schedulers_run_reproducibly_and_leave_the_pipe_working(sdxl, scheduler_cls):
    original = sdxl.scheduler
    sdxl.scheduler = scheduler_cls.from_config(original.config)
    try:
        plain = sdxl("a red cube", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                     output_type="latent").images
        first, second = run(sdxl), run(sdxl)
        assert torch.isfinite(first.images).all()
        assert torch.equal(first.images, second.images)  # step indices reset between calls and passes
        assert type(sdxl.scheduler) is scheduler_cls
        again = sdxl("a red cube", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                     output_type="latent").images
        assert torch.equal(plain, again)
    finally:
        sdxl.scheduler = original


# ----------------------------------------------------------------------------- safety


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_in", ["native", "high_res"])
def test_raising_callback_restores_processors_scheduler_and_tiling(sdxl, fail_in):
    plain_before = sdxl("a red cube", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                        output_type="latent").images
    ids, tiling, cls = processor_ids(sdxl), sdxl.vae.use_tiling, type(sdxl)

    def explode(pipe, step, t, tensors):
        if pipe.fam_pass == fail_in and step == 1:
            raise Boom()
        return {}

    with pytest.raises(Boom):
        run(sdxl, num_inference_steps=3, vae_tiling=True, am_source="cache", callback_on_step_end=explode)
    assert processor_ids(sdxl) == ids
    assert not any(isinstance(p, FAMAttnProcessor) for p in sdxl.unet.attn_processors.values())
    assert type(sdxl) is cls and "forward" not in vars(sdxl.unet) and "prepare_latents" not in vars(sdxl)
    assert sdxl.vae.use_tiling == tiling
    plain_after = sdxl("a red cube", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                       output_type="latent").images
    assert torch.equal(plain_before, plain_after)


def test_vae_tiling_is_used_for_the_call_and_restored(sdxl, monkeypatch):
    fam = FAMPipeline.from_pipe(sdxl)
    seen = []
    real_decode = sdxl.vae.decode

    def decode(*args, **kwargs):
        seen.append(sdxl.vae.use_tiling)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(sdxl.vae, "decode", decode)
    sdxl.vae.disable_tiling()
    fam.auto_tiling_min_pixels = 32 * 32 - 1  # the 32x32 target is tiled automatically, the 16x16 native not
    fam("x", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np")
    assert seen == [False, True] and sdxl.vae.use_tiling is False  # native pass first
    seen.clear()
    sdxl.vae.enable_tiling()
    try:
        fam("x", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np",
            vae_tiling=False)
        assert seen == [False, False] and sdxl.vae.use_tiling is True
    finally:
        sdxl.vae.disable_tiling()


def test_interrupt_in_native_pass_skips_high_res(sdxl):
    ids = processor_ids(sdxl)

    def stop(pipe, step, t, tensors):
        pipe._interrupt = True
        return {}

    out = run(sdxl, num_inference_steps=3, callback_on_step_end=stop)
    assert out.images is None and out.native_images.shape == (1, 4, 8, 8)
    assert processor_ids(sdxl) == ids


def test_callback_can_replace_latents(sdxl):
    def zero_high_res(pipe, step, t, tensors):
        if pipe.fam_pass == "high_res" and step == STEPS - 1:
            return {"latents": torch.zeros_like(tensors["latents"])}
        return {}

    out = run(sdxl, callback_on_step_end=zero_high_res)
    assert torch.count_nonzero(out.images) == 0


def test_start_from_image_uses_diffused_source(sdxl):
    native = run(sdxl, output_type="pil").native_images[0]
    out = FAMPipeline.from_pipe(sdxl)("a red cube", image=native, num_inference_steps=STEPS, output_type="np",
                                      generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and out.native_images.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="am_source"):
        FAMPipeline.from_pipe(sdxl)("a red cube", image=native, am_source="cache", num_inference_steps=1)


@pytest.mark.parametrize("offload_first", [True, False])
def test_model_cpu_offload_either_order(offload_first):
    reference = run(tiny_sdxl_pipeline())
    pipe = tiny_sdxl_pipeline()
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
        fam = FAMPipeline.from_pipe(pipe)
    else:
        fam = FAMPipeline.from_pipe(pipe)
        fam.enable_model_cpu_offload(device="cpu")
    hooked = [name for name, c in pipe.components.items() if hasattr(c, "_hf_hook")]
    assert set(hooked) >= {"unet", "vae", "text_encoder", "text_encoder_2"}
    out = fam("a red cube", generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
              output_type="latent")
    assert torch.equal(out.images, reference.images)
    assert all(hasattr(pipe.components[name], "_hf_hook") for name in hooked)  # hooks re-armed afterwards


# ----------------------------------------------------------------------------- start image, delegation


@pytest.mark.parametrize("form", ["pil", "pil_list", "numpy", "numpy_batch", "tensor"])
def test_start_image_in_every_diffusers_form_and_any_size(sdxl, form):
    import numpy as np
    import PIL.Image

    pixels = np.random.RandomState(0).rand(21, 27, 3).astype("float32")  # sides not multiples of 8
    image = {"pil": PIL.Image.fromarray((pixels * 255).astype("uint8")),
             "pil_list": [PIL.Image.fromarray((pixels * 255).astype("uint8"))],
             "numpy": pixels, "numpy_batch": pixels[None],
             "tensor": torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2 - 1}[form]
    out = FAMPipeline.from_pipe(sdxl)("a red cube", image=image, num_inference_steps=STEPS, output_type="np",
                                      generator=torch.Generator().manual_seed(0))
    # 21x27 -> the nearest valid native size 24x24 (multiples of 8), aspect kept as far as the grid allows
    assert out.native_images.shape == (1, 24, 24, 3) and out.images.shape == (1, 48, 48, 3)


def test_diffusers_surface_is_delegated(sdxl):
    fam = FAMPipeline.from_pipe(sdxl)
    assert fam.components is not None and fam.components["unet"] is sdxl.unet
    assert fam.device == sdxl.device and fam.dtype == sdxl.dtype
    fam.enable_vae_tiling()
    assert sdxl.vae.use_tiling
    fam.disable_vae_tiling()
    assert not sdxl.vae.use_tiling
    fam.set_progress_bar_config(disable=True)
    assert sdxl._progress_bar_config["disable"] is True
    images, native = fam("a red cube", num_inference_steps=1, output_type="latent", return_dict=False,
                         generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 4, 16, 16) and native.shape == (1, 4, 8, 8)


def test_sequential_cpu_offload_is_delegated():
    """Only the delegation is checked: running a pipe under sequential offload fails in this
    environment for the plain diffusers pipe too (accelerate's parameter re-creation vs torch 2.13)."""
    pipe = tiny_sdxl_pipeline()
    FAMPipeline.from_pipe(pipe).enable_sequential_cpu_offload(device="cpu")
    assert any(hasattr(module, "_hf_hook") for module in pipe.unet.modules())
    assert any(hasattr(module, "_hf_hook") for module in pipe.text_encoder.modules())


def test_num_images_per_prompt_and_custom_timesteps_are_forwarded(sdxl):
    batch = run(sdxl, num_images_per_prompt=2)
    assert batch.images.shape == (2, 4, 16, 16) and batch.native_images.shape == (2, 4, 8, 8)
    assert not torch.equal(batch.images[0], batch.images[1])  # two draws of one generator
    seen = []

    def record(pipe, step, t, tensors):
        seen.append((pipe.fam_pass, float(t)))
        return {}

    run(sdxl, timesteps=[999, 500, 100], num_inference_steps=3, callback_on_step_end=record)
    assert seen == [(p, t) for p in ("native", "high_res") for t in (999.0, 500.0, 100.0)]


def test_progress_bars_are_labelled_per_pass_unless_the_user_set_a_description(capsys):
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=False)
    run(pipe, scale=(2, 4), num_inference_steps=1)
    err = capsys.readouterr().err
    assert "native 16x16" in err and "high-res 32x64" in err
    assert pipe._progress_bar_config == {"disable": False}
    pipe.set_progress_bar_config(disable=False, desc="mine")
    run(pipe, num_inference_steps=1)
    err = capsys.readouterr().err
    assert "mine" in err and "native" not in err
