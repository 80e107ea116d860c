"""The UNet call of one denoising pass: text and size conditioning, classifier-free
guidance batched (one UNet call on [uncond, cond]) or sequential (two calls, half
the activation memory, the same result up to float rounding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class TextConditioning:
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor]
    pooled_prompt_embeds: Optional[torch.Tensor] = None  # SDXL
    negative_pooled_prompt_embeds: Optional[torch.Tensor] = None


@dataclass
class _Chunk:
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Optional[dict]
    copies: int  # how many times the latent batch is repeated in this chunk


class GuidedUNet:
    """``predict(model_input, t)`` is the guided noise prediction of one step.

    ``time_ids`` (SDXL only) carries the pass's (original size, crop, target size)
    vector, one row per sample.
    """

    def __init__(self, unet, text: TextConditioning, guidance_scale: float, *, sequential: bool,
                 time_ids: Optional[torch.Tensor] = None):
        self.unet, self.guidance_scale = unet, guidance_scale
        self.cfg = text.negative_prompt_embeds is not None
        self.chunks: List[_Chunk] = []

        def added(pooled):
            return None if time_ids is None else {"text_embeds": pooled, "time_ids": time_ids}

        uncond = (text.negative_prompt_embeds, added(text.negative_pooled_prompt_embeds))
        cond = (text.prompt_embeds, added(text.pooled_prompt_embeds))
        if not self.cfg:
            self.chunks.append(_Chunk(*cond, copies=1))
        elif sequential:
            self.chunks += [_Chunk(*uncond, copies=1), _Chunk(*cond, copies=1)]
        else:
            both_added = None if time_ids is None else {
                key: torch.cat([uncond[1][key], cond[1][key]]) for key in cond[1]
            }
            self.chunks.append(_Chunk(torch.cat([uncond[0], cond[0]]), both_added, copies=2))

    def run_chunk(self, model_input: torch.Tensor, t, chunk: int) -> torch.Tensor:
        spec = self.chunks[chunk]
        sample = torch.cat([model_input] * spec.copies) if spec.copies > 1 else model_input
        return self.unet(sample, t, encoder_hidden_states=spec.encoder_hidden_states,
                         added_cond_kwargs=spec.added_cond_kwargs, return_dict=False)[0]

    def predict(self, model_input: torch.Tensor, t, before_chunk: Optional[Callable[[int], None]] = None):
        outputs = []
        for chunk in range(len(self.chunks)):
            if before_chunk is not None:
                before_chunk(chunk)
            outputs.append(self.run_chunk(model_input, t, chunk))
        if not self.cfg:
            return outputs[0]
        uncond, cond = outputs if len(outputs) == 2 else outputs[0].chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)
