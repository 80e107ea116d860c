"""Attention Modulation inside the UNet: which layers it acts on, the processor
installed on them for the duration of one call, and the native attention inputs.

The processor stores (capture) or consumes (modulate) the tensor a layer projects
to q/k, i.e. the layer input after the processor's own normalisations. Its q/k
projections are recomputed when modulating, which halves what a cache holds and
makes "recompute" and "cache" bit-identical: both project the same tensor with the
same weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import fam_kernels

_PROCESSOR_SUFFIX = ".processor"


# --------------------------------------------------------------------------- layers


def _attention_modules(unet) -> Dict[str, torch.nn.Module]:
    names = [key[: -len(_PROCESSOR_SUFFIX)] for key in unet.attn_processors]
    return {name: unet.get_submodule(name) for name in names}


def self_attention_layers(unet) -> List[str]:
    """Names of the UNet's self-attention layers (``...attn1``), in model order."""
    return [name for name, module in _attention_modules(unet).items() if not module.is_cross_attention]


def default_am_layers(unet) -> List[str]:
    """Self-attention layers of the lowest-resolution up block that has attention
    (``up_blocks.0`` in SDXL, ``up_blocks.1`` in SD 1.5/2.1)."""
    layers = self_attention_layers(unet)
    for index, block in enumerate(unet.up_blocks):
        prefix = f"up_blocks.{index}."
        found = [name for name in layers if name.startswith(prefix)]
        if getattr(block, "attentions", None) and found:
            return found
    raise ValueError("am_layers: this UNet has no self-attention layer in its up blocks; pass am_layers explicitly")


def resolve_am_layers(unet, am_layers: Optional[Sequence[str] | str]) -> List[str]:
    """Each entry is a self-attention layer name or a prefix such as ``"up_blocks.0"``
    (with or without ``.processor``); every entry must match at least one layer."""
    if am_layers is None:
        return default_am_layers(unet)
    entries = [am_layers] if isinstance(am_layers, str) else list(am_layers)
    if not entries:
        raise ValueError("am_layers is empty; pass None for the default layers or use mode='fm'")
    layers = self_attention_layers(unet)
    modules = _attention_modules(unet)
    chosen = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"am_layers entries must be layer names, got {entry!r}")
        name = entry[: -len(_PROCESSOR_SUFFIX)] if entry.endswith(_PROCESSOR_SUFFIX) else entry
        matches = [layer for layer in layers if layer == name or layer.startswith(name + ".")]
        if not matches:
            if name in modules:
                raise ValueError(f"am_layers: {entry!r} is a cross-attention layer; AM applies to self-attention only")
            raise ValueError(
                f"am_layers: {entry!r} names no self-attention layer of this UNet "
                f"(e.g. {layers[0]!r}, or a prefix such as 'up_blocks.0')"
            )
        chosen.update(matches)
    return [layer for layer in layers if layer in chosen]


# --------------------------------------------------------------------------- processor


class NativeCaptured(Exception):
    """Raised by the processors once every AM layer has been captured: ends a native
    UNet run early (recompute and diffused sources)."""


class AttentionModulation:
    """State shared by the processors of one call.

    ``phase`` is "off" (the original processors run), "capture" (layer inputs are
    recorded, then the original processors run; with ``stop_when_captured`` the run
    ends by :class:`NativeCaptured` after the last AM layer) or "modulate" (the AM
    layers run ``fam_kernels.am_attention`` with ``native_inputs``).
    """

    def __init__(self, layers: Iterable[str], lam: float, native_latent: Tuple[int, int],
                 target_latent: Tuple[int, int]):
        self.layers = tuple(layers)
        self.lam = float(lam)
        self.native_latent = tuple(native_latent)
        self.target_latent = tuple(target_latent)
        self.phase = "off"
        self.stop_when_captured = False
        self.capture_device: Optional[torch.device] = None
        self.captured: Dict[str, torch.Tensor] = {}
        self.native_inputs: Dict[str, torch.Tensor] = {}
        self._grids: Dict[Tuple[int, int], Tuple[Tuple[int, int], Tuple[int, int]]] = {}

    def configure(self, lam: float, native_latent: Tuple[int, int], target_latent: Tuple[int, int]) -> None:
        """Set the blend weight and the two passes' latent sizes (known once the native pass ran)."""
        self.lam, self.native_latent, self.target_latent = float(lam), tuple(native_latent), tuple(target_latent)
        self._grids.clear()

    def begin_capture(self, *, stop: bool, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        self.phase, self.stop_when_captured, self.capture_device = "capture", stop, device
        self.captured = {}
        return self.captured

    def record(self, layer: str, layer_input: torch.Tensor) -> None:
        self.captured[layer] = layer_input if self.capture_device is None else layer_input.to(self.capture_device)
        if self.stop_when_captured and len(self.captured) == len(self.layers):
            raise NativeCaptured()

    def modulate_with(self, native_inputs: Dict[str, torch.Tensor]) -> None:
        self.phase, self.native_inputs = "modulate", native_inputs

    def off(self) -> None:
        self.phase, self.native_inputs, self.captured = "off", {}, {}

    def token_grids(self, n_high_res: int, n_native: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(H, W) and (h, w) token grids of a layer, from its token counts: the layer
        sits at latent / 2**level, the same level in both passes."""
        key = (n_high_res, n_native)
        if key not in self._grids:
            (h0, w0), (H0, W0) = self.native_latent, self.target_latent
            for level in range(16):
                f = 2 ** level
                if h0 % f or w0 % f:
                    break
                if (h0 // f) * (w0 // f) == n_native and (H0 // f) * (W0 // f) == n_high_res:
                    self._grids[key] = ((H0 // f, W0 // f), (h0 // f, w0 // f))
                    break
            if key not in self._grids:
                raise RuntimeError(
                    f"AM layer with {n_high_res} high-res / {n_native} native tokens matches no downsampling level "
                    f"of latents {self.target_latent} / {self.native_latent}"
                )
        return self._grids[key]


def attention_input(attn, hidden_states: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (B, N, C) tensor a diffusers ``Attention`` projects to q/k/v (as AttnProcessor2_0 prepares it)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def _split_heads(attn, x: torch.Tensor) -> torch.Tensor:
    b, n, inner = x.shape
    return x.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def _queries_keys(attn, layer_input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k = _split_heads(attn, attn.to_q(layer_input)), _split_heads(attn, attn.to_k(layer_input))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k


class FAMAttnProcessor:
    """Installed on the AM layers for one call; delegates to the layer's own
    processor except when modulating."""

    def __init__(self, layer: str, original, state: AttentionModulation):
        self.layer, self.original, self.state = layer, original, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.state.phase == "modulate":
            return self._modulate(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.state.phase == "capture":
            self.state.record(self.layer, attention_input(attn, hidden_states, temb))
        optional = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask, "temb": temb}
        optional = {name: value for name, value in optional.items() if value is not None}
        return self.original(attn, hidden_states, **optional, **kwargs)

    def _modulate(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"AM layer {self.layer} received encoder states or a mask; AM needs plain self-attention")
        residual = hidden_states
        shape_4d = hidden_states.shape if hidden_states.ndim == 4 else None
        layer_input = attention_input(attn, hidden_states, temb)
        native_input = self.state.native_inputs[self.layer].to(layer_input.device)
        if native_input.shape[0] != layer_input.shape[0]:
            raise RuntimeError(f"AM layer {self.layer}: native batch {native_input.shape[0]} != {layer_input.shape[0]}")

        q, k = _queries_keys(attn, layer_input)
        v = _split_heads(attn, attn.to_v(layer_input))
        q_native, k_native = _queries_keys(attn, native_input)
        hr_size, lr_size = self.state.token_grids(q.shape[2], q_native.shape[2])
        out = fam_kernels.am_attention(q, k, v, q_native, k_native, lam=self.state.lam,
                                       hr_size=hr_size, lr_size=lr_size, scale=attn.scale)

        batch, heads, tokens, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if shape_4d is not None:
            out = out.transpose(-1, -2).reshape(shape_4d)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_processors(patches, unet, layers: Sequence[str], state: AttentionModulation) -> None:
    """Put a :class:`FAMAttnProcessor` on ``layers``, registered in ``patches`` (a
    :class:`fam.patches.Patches` undo log): restoring puts every original processor
    object back and switches ``state`` off."""
    for layer in layers:
        module = unet.get_submodule(layer)
        patches.set_processor(module, FAMAttnProcessor(layer, module.processor, state))
    patches.on_restore(state.off)


@contextmanager
def installed_processors(unet, layers: Sequence[str], state: AttentionModulation):
    """:func:`install_processors` for the duration of the block (interrupt-safe)."""
    from .patches import patched, sigint_deferred

    with patched() as patches:
        with sigint_deferred():
            install_processors(patches, unet, layers, state)
        yield


# --------------------------------------------------------------------------- native inputs


class NativeAttentionCache:
    """``am_source="cache"``: AM layer inputs recorded during the native pass, per
    (step, CFG chunk), kept on ``device`` (None: where they were computed)."""

    def __init__(self, state: AttentionModulation, device: Optional[torch.device] = None):
        self.state, self.device = state, device
        self.entries: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}

    def begin(self, step: int, chunk: int) -> None:
        self.entries[(step, chunk)] = self.state.begin_capture(stop=False, device=self.device)

    def load(self, step: int, chunk: int) -> Dict[str, torch.Tensor]:
        return self.entries[(step, chunk)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.entries.values() for t in entry.values())


def recompute_native_inputs(state: AttentionModulation, run_native_chunk) -> Dict[str, torch.Tensor]:
    """Run ``run_native_chunk()`` (the native UNet on one CFG chunk) only as far as the
    last AM layer and return the inputs it recorded."""
    captured = state.begin_capture(stop=True)
    try:
        run_native_chunk()
    except NativeCaptured:
        pass
    else:
        raise RuntimeError(f"the native UNet run ended before all AM layers were seen ({len(captured)} of "
                           f"{len(state.layers)})")
    finally:
        state.off()
    return captured
