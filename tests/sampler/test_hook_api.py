"""The hook API (``fam.record_native`` / ``fam.modulate``): the user's own pipe calls
are the two passes, bit-identical to FAMPipeline; misuse is refused before any work."""

import pytest
import torch

import fam
from fam import FAMPipeline
from fam.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

STEPS = 2
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipes():
    return {"sdxl": tiny_sdxl_pipeline(), "sd": tiny_sd_pipeline()}


def hooked(pipe, mode="fam", am_source="recompute", scale=(2, 4), seed=0, **modulate_kwargs):
    generator = torch.Generator().manual_seed(seed)
    uses_am = mode in ("fam", "am")
    with fam.record_native(pipe, am_source=am_source if uses_am else None) as native:
        low = pipe("a red cube", num_inference_steps=STEPS, generator=generator, output_type="latent").images
    with fam.modulate(pipe, native, scale=scale, mode=mode, **modulate_kwargs):
        high = pipe("a red cube", num_inference_steps=STEPS, generator=generator, output_type="latent").images
    return high, low


def wrapped(pipe, mode="fam", am_source="recompute", scale=(2, 4), seed=0):
    out = FAMPipeline.from_pipe(pipe)("a red cube", num_inference_steps=STEPS, scale=scale, mode=mode,
                                      am_source=am_source if mode in ("fam", "am") else None,
                                      generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images, out.native_images


@pytest.mark.parametrize("arch", ["sdxl", "sd"])
@pytest.mark.parametrize("mode, am_source", [("fam", "recompute"), ("fam", "cache"), ("fam", "diffused"),
                                             ("am", "recompute"), ("fm", None), ("skip_residual", None),
                                             ("direct_native", None)])
def test_hook_api_equals_fam_pipeline(pipes, arch, mode, am_source):
    high, low = hooked(pipes[arch], mode, am_source)
    expected_high, expected_low = wrapped(pipes[arch], mode, am_source)
    assert torch.equal(low, expected_low) and torch.equal(high, expected_high)


def test_native_latents_tensor_uses_the_diffused_source(pipes):
    pipe = pipes["sdxl"]
    generator = torch.Generator().manual_seed(0)
    low = pipe("a red cube", num_inference_steps=STEPS, generator=generator, output_type="latent").images
    with fam.modulate(pipe, low, scale=(2, 4)):
        high = pipe("a red cube", num_inference_steps=STEPS, generator=generator, output_type="latent").images
    assert torch.equal(high, wrapped(pipe, "fam", "diffused")[0])


def test_user_callback_is_chained_after_fam(pipes):
    pipe = pipes["sdxl"]
    seen = []

    def callback(p, step, t, tensors):
        seen.append((p.fam_pass, step, tensors["latents"].shape, tensors["reference_latents"] is None))
        return {}

    generator = torch.Generator().manual_seed(0)
    with fam.record_native(pipe) as native:
        pipe("a red cube", num_inference_steps=STEPS, generator=generator, output_type="latent",
             callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "reference_latents"])
    with fam.modulate(pipe, native, scale=2):
        pipe("a red cube", num_inference_steps=STEPS, generator=generator, output_type="latent",
             callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "reference_latents"])
    assert seen == [("native", 0, (1, 4, 8, 8), True), ("native", 1, (1, 4, 8, 8), True),
                    ("high_res", 0, (1, 4, 16, 16), False), ("high_res", 1, (1, 4, 16, 16), True)]
    assert not hasattr(pipe, "fam_pass")


def test_misuse_is_refused(pipes):
    pipe = pipes["sdxl"]
    generator = torch.Generator().manual_seed(0)
    with fam.record_native(pipe) as native:
        pipe("x", num_inference_steps=STEPS, generator=generator, output_type="latent")
        with pytest.raises(RuntimeError, match="one pipe call per `with` block"):
            pipe("x", num_inference_steps=STEPS, output_type="latent")
        with pytest.raises(RuntimeError, match="already attached"):
            with fam.record_native(pipe):
                pass
    with fam.modulate(pipe, native, scale=2):
        with pytest.raises(ValueError, match="latents: FAM sets the high-res pass's first latent"):
            pipe("x", num_inference_steps=STEPS, latents=torch.zeros(1, 4, 16, 16))
    with fam.modulate(pipe, native, scale=2):
        with pytest.raises(ValueError, match=r"height=48: the high-res pass is 32"):
            pipe("x", num_inference_steps=STEPS, height=48, width=32)
    with fam.modulate(pipe, native, scale=2, high_res_strength=0.1):
        with pytest.raises(ValueError, match=r"high_res_strength=0.1 leaves no step of 2 \(int\(2 x 0.1\) = 0\)"):
            pipe("x", num_inference_steps=2)
    with pytest.raises(ValueError, match=r"high_res_strength=1.5 must be a number in \[0, 1\]"):
        with fam.modulate(pipe, native, high_res_strength=1.5):
            pass
    with pytest.raises(ValueError, match="mode='direct' is not one of"):
        with fam.modulate(pipe, native, mode="direct"):
            pass
    with pytest.raises(ValueError, match="am_layers: mode 'fm' has no Attention Modulation"):
        with fam.modulate(pipe, native, mode="fm", am_layers="up_blocks.0"):
            pass
    with fam.record_native(pipe, am_source=None) as plain:
        pipe("x", num_inference_steps=STEPS, output_type="latent")
    with pytest.raises(ValueError, match="recorded with am_source=None, but mode 'fam' needs"):
        with fam.modulate(pipe, plain):
            pass
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and not hasattr(type(pipe), "fam_pass")


@pytest.mark.parametrize("am_source", ["cache", "recompute"])
def test_native_attention_is_released_before_the_decode(pipes, am_source):
    """What only the high-res denoising needs (the AM cache: ~7 GB at SDXL 4096^2, the
    recorded native calls, the reference latents) is freed before the pipe decodes."""
    pipe = pipes["sdxl"]
    held_at_decode = []
    decode = pipe.vae.decode

    def recording_decode(*args, **kwargs):
        source = native.source
        held_at_decode.append(len(source.cache.entries) if am_source == "cache" else len(source.calls))
        return decode(*args, **kwargs)

    generator = torch.Generator().manual_seed(0)
    with fam.record_native(pipe, am_source=am_source) as native:
        pipe("a red cube", num_inference_steps=STEPS, generator=generator, output_type="latent")
    for release in (False, True):
        pipe.vae.decode = recording_decode
        try:
            with fam.modulate(pipe, native, scale=2, release_native=release):
                pipe("a red cube", num_inference_steps=STEPS, generator=generator)
        finally:
            del pipe.vae.decode
    assert held_at_decode[0] > 0 and held_at_decode[1] == 0  # kept on request (reuse), freed by default
    with pytest.raises(ValueError, match="release_native=False"):
        with fam.modulate(pipe, native, scale=2):
            pass


def test_fam_pipeline_decodes_the_native_image_after_the_cache_is_released(pipes, monkeypatch):
    """am_source="cache": the native image is decoded after the high-res pass released the
    cache (not by the native call with the whole cache held); the pixels are the pipe's own."""
    from fam import sources

    pipe, events = pipes["sdxl"], []
    decode, release = pipe.vae.decode, sources.CacheSource.release
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: events.append("decode") or decode(*a, **k))
    monkeypatch.setattr(sources.CacheSource, "release", lambda self: events.append("release") or release(self))

    def run(am_source):
        return FAMPipeline.from_pipe(pipe)("a red cube", num_inference_steps=STEPS, scale=2, am_source=am_source,
                                           generator=torch.Generator().manual_seed(0), output_type="pt")

    cached = run("cache")
    assert events == ["release", "decode", "decode"]  # high-res decode, then the deferred native one
    recomputed = run("recompute")
    assert torch.equal(cached.native_images, recomputed.native_images)
    assert torch.equal(cached.images, recomputed.images)
