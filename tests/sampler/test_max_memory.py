"""FAMPipeline(max_memory=...): the fastest option set fam.plan predicts to fit, applied
before any work; a budget nothing fits, or conflicting arguments, refused up front."""

import pytest
import torch

from fam import FAMPipeline
from fam.testing import tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CALL = dict(num_inference_steps=2, scale=2, output_type="latent")


@pytest.fixture(scope="module")
def fam_pipe():
    return FAMPipeline.from_pipe(tiny_sdxl_pipeline())


def _call(fam_pipe, **kwargs):
    return fam_pipe("a red cube", generator=torch.Generator().manual_seed(0), **CALL, **kwargs)


def test_chosen_options_are_applied_and_reported(fam_pipe):
    out = _call(fam_pipe, max_memory="100GB")
    options = out.memory_options
    assert options["offload"] == "none"  # the CPU: offloading is never chosen
    explicit = {"cfg_sequential": options["cfg"] == "sequential", "am_source": options["am_source"].split("_")[0]}
    if options["am_source"] == "cache_cpu":
        explicit["am_cache_device"] = "cpu"
    explicit["vae_tiling"] = {"auto": None, "on": True, "off": False}[options["vae_tiling"]]
    assert torch.equal(out.images, _call(fam_pipe, **explicit).images)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_memory": "1MB"}, "nothing fits; the smallest predicted need is"),
    ({"max_memory": "eight"}, "max_memory: 'eight' is not a size"),
    ({"max_memory": True}, "max_memory=True"),
    ({"max_memory": "8GB", "cfg_sequential": True}, "do not pass cfg_sequential"),
])
def test_refused_before_any_work(fam_pipe, kwargs, message, monkeypatch):
    def unet_must_not_run(*args, **kw):
        raise AssertionError("the UNet ran before max_memory was checked")

    monkeypatch.setattr(fam_pipe.pipe.unet, "forward", unet_must_not_run)
    with pytest.raises(ValueError, match=message):
        _call(fam_pipe, **kwargs)
