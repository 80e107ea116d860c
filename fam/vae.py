"""VAE encode/decode for the sampler: SDXL latent normalisation, fp16 upcasting and
tiled decoding, each undone afterwards so the wrapped pipeline's VAE is left as it was."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def vae_tiling(vae, enabled: bool):
    was_enabled = bool(getattr(vae, "use_tiling", False))
    if enabled:
        vae.enable_tiling()
    elif was_enabled:
        vae.disable_tiling()
    try:
        yield
    finally:
        if hasattr(vae, "use_tiling"):
            vae.use_tiling = was_enabled


@contextmanager
def _fp32_if_needed(vae):
    """fp16 VAEs whose config asks for it (SDXL's) overflow; run them in fp32."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


def _mean_std(vae, like: torch.Tensor):
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean).view(shape).to(like.device, like.dtype),
            torch.tensor(std).view(shape).to(like.device, like.dtype))


def decode(pipe, latents: torch.Tensor, *, tiled: bool) -> torch.Tensor:
    """Diffusion latents -> images in [-1, 1] (B, 3, H, W)."""
    vae = pipe.vae
    with _fp32_if_needed(vae), vae_tiling(vae, tiled):
        latents = latents.to(next(vae.post_quant_conv.parameters()).dtype)
        stats = _mean_std(vae, latents)
        if stats is None:
            latents = latents / vae.config.scaling_factor
        else:
            latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
        return vae.decode(latents, return_dict=False)[0]


def encode(pipe, image: torch.Tensor) -> torch.Tensor:
    """Preprocessed images in [-1, 1] -> diffusion latents (the posterior mode: no random draw)."""
    vae = pipe.vae
    with _fp32_if_needed(vae):
        image = image.to(dtype=next(vae.encoder.parameters()).dtype)
        latents = vae.encode(image).latent_dist.mode()
        stats = _mean_std(vae, latents)
        if stats is None:
            return latents * vae.config.scaling_factor
        return (latents - stats[0]) * vae.config.scaling_factor / stats[1]
