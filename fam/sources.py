"""Where Attention Modulation gets the native attention of each high-res step.

Three sources with one interface (:class:`NativeAttentionSource`):

* :class:`RecomputeSource` keeps the native pass's UNet calls (their arguments:
  latent, timestep, text and size conditioning, ControlNet residuals...) and, at
  high-res step i, runs the native UNet again on call i, stopped after the last AM
  layer.
* :class:`CacheSource` records the AM layer inputs during the native pass.
* :class:`DiffusedSource` runs the native UNet on add_noise(z0_native, eps_native, t_i)
  with the high-res call's conditioning at the native size (no native trajectory
  needed: the only source when FAM starts from a given picture).

A UNet call is handled as a :class:`UNetCall` (every argument by name); with
``cfg_sequential`` it is split into its guidance halves ("chunks").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .attention import AttentionModulation, NativeAttentionCache, recompute_native_inputs

_POSITIONAL = ("sample", "timestep", "encoder_hidden_states")


def _split_value(value, batch: int, parts: int, index: int):
    if torch.is_tensor(value):
        if value.ndim > 0 and value.shape[0] == batch:
            return value.chunk(parts)[index]
        return value
    if isinstance(value, dict):
        return {key: _split_value(item, batch, parts, index) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_split_value(item, batch, parts, index) for item in value)
    return value


@dataclass
class UNetCall:
    """The arguments of one UNet forward call, by name."""

    kwargs: Dict[str, Any]

    @classmethod
    def bind(cls, args: Tuple, kwargs: Dict[str, Any]) -> "UNetCall":
        if len(args) > len(_POSITIONAL):
            raise TypeError(f"UNet called with {len(args)} positional arguments; FAM expects at most 3")
        return cls({**dict(zip(_POSITIONAL, args)), **kwargs})

    @property
    def batch(self) -> int:
        return self.kwargs["sample"].shape[0]

    def chunk(self, parts: int, index: int) -> "UNetCall":
        if parts == 1:
            return self
        return UNetCall(_split_value(self.kwargs, self.batch, parts, index))

    def replace(self, **changes) -> "UNetCall":
        return UNetCall({**self.kwargs, **changes})


class NativeAttentionSource(ABC):
    """Interface. ``native_call(step, chunk, call, run)`` is called around each native
    UNet chunk (``run()`` runs it); ``native_inputs(step, chunk, parts, call)`` returns
    the AM layer inputs for a high-res chunk."""

    name = ""
    needs_trajectory = True  # needs the native pass run under FAM's recorder, with the same schedule

    def __init__(self, am: AttentionModulation, run_native: Callable[[UNetCall], Any]):
        self.am, self.run_native = am, run_native
        self.native_timesteps: Dict[int, float] = {}  # native step -> its timestep
        self.step_map: Dict[int, int] = {}  # high-res schedule index -> native step
        self.released = False

    def release(self) -> None:
        """Free what only the high-res denoising needs (called after its last step,
        before the pipe decodes); a released source cannot feed another pass."""
        self.released = True

    def native_call(self, step: int, chunk: int, call: UNetCall, run: Callable[[], Any]):
        self.native_timesteps[step] = float(torch.as_tensor(call.kwargs["timestep"]).flatten()[0])
        return run()

    def begin_high_res(self, *, high_res_timesteps, **context) -> None:
        """Map every step of the high-res schedule to the native step used for it."""
        if self.needs_trajectory:
            self.step_map = nearest_native_steps(self.native_timesteps, high_res_timesteps)

    @abstractmethod
    def native_inputs(self, step: int, chunk: int, parts: int, call: UNetCall) -> Dict[str, torch.Tensor]:
        """The AM layer inputs for high-res chunk ``chunk`` of ``parts`` at schedule index ``step``."""

    def _capture(self, call: UNetCall) -> Dict[str, torch.Tensor]:
        return recompute_native_inputs(self.am, lambda: self.run_native(call))

    @property
    def nbytes(self) -> Optional[int]:
        return None


class RecomputeSource(NativeAttentionSource):
    name = "recompute"

    def __init__(self, am, run_native):
        super().__init__(am, run_native)
        self.calls: Dict[int, UNetCall] = {}

    def native_call(self, step, chunk, call, run):
        if chunk == 0:
            self.calls[step] = call
        return super().native_call(step, chunk, call, run)

    def native_inputs(self, step, chunk, parts, call):
        return self._capture(self.calls[self.step_map[step]].chunk(parts, chunk))

    def release(self):
        super().release()
        self.calls.clear()


class CacheSource(NativeAttentionSource):
    name = "cache"

    def __init__(self, am, run_native, device: Optional[torch.device] = None):
        super().__init__(am, run_native)
        self.cache = NativeAttentionCache(am, device)

    def native_call(self, step, chunk, call, run):
        self.cache.begin(step, chunk)
        try:
            return super().native_call(step, chunk, call, run)
        finally:
            self.am.off()

    def native_inputs(self, step, chunk, parts, call):
        return self.cache.load(self.step_map[step], chunk)

    def release(self):
        super().release()
        self.cache.entries.clear()

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes


class DiffusedSource(NativeAttentionSource):
    name = "diffused"
    needs_trajectory = False

    def __init__(self, am, run_native, native_latent: torch.Tensor):
        super().__init__(am, run_native)
        self.native_latent = native_latent
        self.noise: Optional[torch.Tensor] = None
        self.noiser = self.scheduler = None
        self.scale: Tuple[int, int] = (1, 1)

    def begin_high_res(self, *, generator, noiser, scheduler, scale, **context) -> None:
        from diffusers.utils.torch_utils import randn_tensor

        latent = self.native_latent
        self.noise = randn_tensor(tuple(latent.shape), generator=generator, device=latent.device, dtype=latent.dtype)
        self.noiser, self.scheduler, self.scale = noiser, scheduler, tuple(scale)

    def native_inputs(self, step, chunk, parts, call):
        t = call.kwargs["timestep"]
        noisy = self.noiser.at(step, self.native_latent, self.noise)
        model_input = self.scheduler.scale_model_input(noisy, t)  # the pipe's scheduler is at this step
        copies = call.batch // model_input.shape[0]
        changes = {"sample": torch.cat([model_input] * copies) if copies > 1 else model_input}
        added = call.kwargs.get("added_cond_kwargs")
        if added and "time_ids" in added:
            changes["added_cond_kwargs"] = {**added, "time_ids": native_time_ids(added["time_ids"], self.scale)}
        return self._capture(call.replace(**changes).chunk(parts, chunk))


def nearest_native_steps(native_timesteps: Dict[int, float], high_res_timesteps) -> Dict[int, int]:
    """The rule when the two passes' schedules differ (``high_res_steps``): high-res
    step j uses the native step whose timestep is nearest to t_j (ties: the earlier,
    noisier step). Identical schedules map every step to itself."""
    if not native_timesteps:
        raise ValueError("native: the recorded native pass ran no UNet call")
    steps = sorted(native_timesteps)
    mapping = {}
    for j, t in enumerate(torch.as_tensor(high_res_timesteps).flatten().tolist()):
        mapping[j] = min(steps, key=lambda k: (abs(native_timesteps[k] - float(t)), k))
    return mapping


def native_time_ids(time_ids: torch.Tensor, scale: Tuple[int, int]) -> torch.Tensor:
    """SDXL size conditioning (original h, w, crop top, left, target h, w) of the
    high-res pass divided by the scale factors: the native pass's."""
    if time_ids.shape[-1] != 6:
        raise ValueError(f"SDXL time ids with {time_ids.shape[-1]} entries (aesthetic-score conditioning, the "
                         "refiner's) are not supported by am_source='diffused'")
    factors = torch.tensor([scale[0], scale[1]] * 3, dtype=time_ids.dtype, device=time_ids.device)
    return time_ids / factors


SOURCES = {"recompute": RecomputeSource, "cache": CacheSource, "diffused": DiffusedSource}


def concat_outputs(outputs: List[Any]):
    """Concatenate the chunked UNet outputs ((sample,) tuples or output objects)."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    if isinstance(first, tuple):
        return (torch.cat([out[0] for out in outputs]),) + tuple(first[1:])
    first.sample = torch.cat([out.sample for out in outputs])
    return first
