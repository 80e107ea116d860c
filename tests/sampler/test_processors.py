"""The AM attention processor against the paper's eq. 6-7 (materialised oracle), its
capture / early-stop behaviour, layer selection and restoration."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from fam.attention import (
    AttentionModulation,
    FAMAttnProcessor,
    NativeCaptured,
    default_am_layers,
    installed_processors,
    recompute_native_inputs,
    resolve_am_layers,
    self_attention_layers,
)
from fam.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from fam_kernels.reference import am_attention_materialized


def heads(attn, x):
    b, n, inner = x.shape
    return x.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def self_attention(**kwargs):
    torch.manual_seed(0)
    return Attention(query_dim=24, heads=3, dim_head=8, **kwargs).eval()


@torch.no_grad()
def test_modulated_output_matches_materialized_eq7():
    attn = self_attention()
    state = AttentionModulation(["layer"], lam=0.7, native_latent=(4, 6), target_latent=(8, 18))  # scale 2 x 3
    x, x_native = torch.randn(2, 8 * 18, 24), torch.randn(2, 4 * 6, 24)
    state.modulate_with({"layer": x_native})
    out = FAMAttnProcessor("layer", AttnProcessor2_0(), state)(attn, x)

    q, k, v = heads(attn, attn.to_q(x)), heads(attn, attn.to_k(x)), heads(attn, attn.to_v(x))
    qn, kn = heads(attn, attn.to_q(x_native)), heads(attn, attn.to_k(x_native))
    blended = am_attention_materialized(q, k, v, qn, kn, lam=0.7, hr_size=(8, 18), lr_size=(4, 6),
                                        scale=attn.scale, precision=torch.float64)
    expected = attn.to_out[0](blended.transpose(1, 2).reshape(2, 8 * 18, 24))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("spatial", [False, True])
def test_lambda_zero_is_the_layer_own_attention(spatial):
    """With lam = 0 the processor reduces to plain attention, including 4-D inputs,
    group norm, residual and output rescaling (VAE-style attention blocks)."""
    if spatial:
        torch.manual_seed(0)
        attn = Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                         rescale_output_factor=2.0, bias=True, _from_deprecated_attn_block=True).eval()
        x, x_native = torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)
        state = AttentionModulation(["layer"], lam=0.0, native_latent=(2, 3), target_latent=(4, 6))
        # capture the native input as the processor prepares it (flattened and group-normalised)
        state.begin_capture(stop=False)
        FAMAttnProcessor("layer", AttnProcessor2_0(), state)(attn, x_native)
        native_input = state.captured["layer"]
        assert native_input.shape == (2, 6, 16)
    else:
        attn = self_attention()
        x, native_input = torch.randn(2, 36, 24), torch.randn(2, 9, 24)
        state = AttentionModulation(["layer"], lam=0.0, native_latent=(3, 3), target_latent=(6, 6))
    state.modulate_with({"layer": native_input})
    out = FAMAttnProcessor("layer", AttnProcessor2_0(), state)(attn, x)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_capture_records_the_input_and_delegates_bit_exactly():
    attn = self_attention()
    state = AttentionModulation(["layer"], lam=0.7, native_latent=(3, 3), target_latent=(6, 6))
    x = torch.randn(2, 9, 24)
    state.begin_capture(stop=False)
    out = FAMAttnProcessor("layer", AttnProcessor2_0(), state)(attn, x)
    assert torch.equal(out, AttnProcessor2_0()(attn, x))
    assert torch.equal(state.captured["layer"], x)
    state.off()
    assert torch.equal(FAMAttnProcessor("layer", AttnProcessor2_0(), state)(attn, x), out)
    assert state.captured == {}


@torch.no_grad()
def test_recompute_stops_right_after_the_last_layer():
    attn = self_attention()
    state = AttentionModulation(["a", "b"], lam=0.7, native_latent=(3, 3), target_latent=(6, 6))
    first, second = (FAMAttnProcessor(name, AttnProcessor2_0(), state) for name in "ab")
    x = torch.randn(1, 9, 24)
    after_last = []

    def native_run():
        first(attn, x)
        second(attn, x + 1)
        after_last.append(True)

    captured = recompute_native_inputs(state, native_run)
    assert after_last == [] and state.phase == "off"
    assert torch.equal(captured["a"], x) and torch.equal(captured["b"], x + 1)

    with pytest.raises(RuntimeError, match="before all AM layers were seen"):
        recompute_native_inputs(state, lambda: first(attn, x))
    state.begin_capture(stop=True)
    first(attn, x)
    with pytest.raises(NativeCaptured):
        second(attn, x)


def test_token_grids_per_level():
    state = AttentionModulation(["a"], lam=0.7, native_latent=(8, 12), target_latent=(16, 36))
    assert state.token_grids(16 * 36, 8 * 12) == ((16, 36), (8, 12))
    assert state.token_grids(4 * 9, 2 * 3) == ((4, 9), (2, 3))
    with pytest.raises(RuntimeError, match="matches no downsampling level"):
        state.token_grids(40, 7)


def test_default_layers_sdxl_and_sd15():
    sdxl, sd = tiny_sdxl_pipeline().unet, tiny_sd_pipeline().unet
    assert default_am_layers(sdxl) == [f"up_blocks.0.attentions.{a}.transformer_blocks.{b}.attn1"
                                       for a in range(2) for b in range(2)]
    sd_layers = default_am_layers(sd)
    assert sd_layers == [f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn1" for a in range(2)]
    assert all(not sd.get_submodule(name).is_cross_attention for name in sd_layers)


def test_resolve_layers_accepts_names_prefixes_and_processor_keys_in_model_order():
    unet = tiny_sdxl_pipeline().unet
    mid = "mid_block.attentions.0.transformer_blocks.0.attn1"
    chosen = resolve_am_layers(unet, ["up_blocks.0.attentions.1", mid + ".processor", mid])
    expected = {mid, "up_blocks.0.attentions.1.transformer_blocks.0.attn1",
                "up_blocks.0.attentions.1.transformer_blocks.1.attn1"}
    assert chosen == [name for name in self_attention_layers(unet) if name in expected]
    assert resolve_am_layers(unet, mid) == [mid]


def test_installed_processors_are_removed_after_an_exception():
    unet = tiny_sdxl_pipeline().unet
    before = dict(unet.attn_processors)
    layers = default_am_layers(unet)
    state = AttentionModulation(layers, lam=0.7, native_latent=(8, 8), target_latent=(16, 16))
    with pytest.raises(KeyError):
        with installed_processors(unet, layers, state):
            current = unet.attn_processors
            assert all(isinstance(current[name + ".processor"], FAMAttnProcessor) for name in layers)
            assert sum(isinstance(p, FAMAttnProcessor) for p in current.values()) == len(layers)
            raise KeyError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
