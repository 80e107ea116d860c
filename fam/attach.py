"""The hook API: FAM attached from outside to a diffusers pipeline's own call.

    with fam.record_native(pipe) as native:              # the native pass: any pipe call
        pipe(prompt, generator=g, output_type="latent")
    with fam.modulate(pipe, native, scale=2) as run:     # the high-res pass: the user's own call
        image = pipe(prompt, generator=g).images[0]      # height/width: the target (set if omitted)

Inside ``record_native`` the call's latents after its last step are kept (and, for
Attention Modulation, what the chosen source needs: the UNet calls for "recompute",
the AM layer inputs for "cache"). Inside ``modulate`` the call starts from z~_T (the
upsampled native latent diffused with one seeded eps, passed as ``latents=``), its
latents are modulated after every scheduler step for the next step's timestep (FM or
skip residual, through ``callback_on_step_end``; the user's callback is chained after
FAM's and sees the modulated latents), and the AM layers run Attention Modulation fed
per step by the source. ``native`` may also be a latent tensor (the "diffused" source
only). One pipe call per block; everything is removed when the block exits, whatever
the exit.

Callbacks receive the pipe, whose ``fam_pass`` is "native" or "high_res" during the
call; besides the pipe's own tensor inputs they may ask for "reference_latents" (z~ at
the next step's timestep; high-res pass) and "modulated_latents" (the latents after
FAM's modulation; None when nothing was modulated).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

import fam_kernels

from .attention import AttentionModulation, install_processors, resolve_am_layers
from .modes import AM_SOURCES, MODES, UPSAMPLE_MODES, Mode, choose, skip_residual_weight
from .patches import Patches, patched, sigint_deferred
from .sizes import Scale, _parse_scale
from .sources import SOURCES, DiffusedSource, NativeAttentionSource, UNetCall, concat_outputs

FAM_TENSOR_INPUTS = ("reference_latents", "modulated_latents")


# --------------------------------------------------------------------------- schedule


def schedule_copy(pipe, num_inference_steps: int, device, timesteps=None, sigmas=None):
    """A private copy of the pipe's scheduler set to the schedule its call will use."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
    return scheduler


class Noiser:
    """x_t = add_noise(x0, noise, t_i) at step i of a schedule. Sigma-based schedulers
    pick the noise level from their begin/step index rather than from t, so the
    private, never-stepped copy is pointed at step i before each call."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def at(self, step: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(step)
        t = self.scheduler.timesteps[step].reshape(1).repeat(x0.shape[0])
        return self.scheduler.add_noise(x0, noise, t)


def start_step(num_inference_steps: int, strength: float) -> int:
    """diffusers' img2img rule: with ``strength`` s the last int(N s) of N steps are run."""
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    if kept < 1:
        raise ValueError(f"high_res_strength={strength!r} leaves no step of {num_inference_steps} "
                         f"(int({num_inference_steps} x {strength}) = 0)")
    return num_inference_steps - kept


def upsample_latent(latent: torch.Tensor, size, mode: str) -> torch.Tensor:
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(latent.float(), size=tuple(size), mode=mode, **extra).to(latent.dtype)


# --------------------------------------------------------------------------- one pipe call under FAM


def call_arguments(pipe_cls, pipe, args, kwargs) -> Dict[str, Any]:
    """The call's arguments by name (the pipe's ``**kwargs`` flattened)."""
    bound = inspect.signature(pipe_cls.__call__).bind(pipe, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(inspect.signature(pipe_cls.__call__).parameters)))
    arguments.update(arguments.pop("kwargs", {}) if isinstance(arguments.get("kwargs"), dict) else {})
    return arguments


def call_default(pipe_cls, name: str, arguments: Dict[str, Any]):
    if name in arguments:
        return arguments[name]
    parameter = inspect.signature(pipe_cls.__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


class _Pass:
    """FAM's part of one pipe call: adjusts the call's arguments, chains FAM's step-end
    callback before the user's, and wraps the UNet forward (AM sources, cfg_sequential)."""

    kind = ""

    def __init__(self, pipe, *, cfg_sequential: bool, source: Optional[NativeAttentionSource]):
        self.pipe, self.cfg_sequential, self.source = pipe, cfg_sequential, source
        self.step = 0
        self.calls = 0
        self.active = False
        self.latents: Optional[torch.Tensor] = None
        self.start: Optional[torch.Tensor] = None  # the first latent, when FAM sets it

    # ----------------------------------------------------------- attach
    def attach(self, patches: Patches, pipe_forward_needed: bool) -> None:
        base = type(self.pipe)
        handler = self

        def __call__(pipe, *args, **kwargs):
            return handler.call(base, pipe, args, kwargs)

        namespace = {"__call__": __call__, "fam_pass": self.kind, "__module__": base.__module__,
                     "__qualname__": base.__qualname__, "__doc__": base.__doc__}
        if pipe_forward_needed:
            unet = self.pipe.unet
            previous = unet.forward
            self.run_native = lambda call: previous(**call.kwargs)

            def forward(*args, **kwargs):
                if not handler.active:
                    return previous(*args, **kwargs)
                return handler.forward(previous, UNetCall.bind(args, kwargs))

            patches.set_attr(unet, "forward", forward)
        patches.set_class(self.pipe, type(base.__name__, (base,), namespace))
        self.extra_patches(patches)
        if hasattr(self.pipe, "prepare_latents"):
            prepare_latents = self.pipe.prepare_latents

            def exact_start(*args, **kwargs):
                out = prepare_latents(*args, **kwargs)
                start = handler.start
                if handler.active and start is not None and torch.is_tensor(out) and out.shape == start.shape:
                    return start.to(out.device, out.dtype)
                return out

            patches.set_attr(self.pipe, "prepare_latents", exact_start)

    def extra_patches(self, patches: Patches) -> None:
        pass

    # ----------------------------------------------------------- the call
    def call(self, base, pipe, args, kwargs):
        if self.calls:
            raise RuntimeError(f"fam: one pipe call per `with` block ({self.kind} pass already run)")
        self.calls += 1
        arguments = call_arguments(base, pipe, args, kwargs)
        user_callback = arguments.get("callback_on_step_end")
        user_inputs = list(arguments.get("callback_on_step_end_tensor_inputs") or ["latents"])
        if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
            user_inputs = list(user_callback.tensor_inputs)
        accepted = list(getattr(pipe, "_callback_tensor_inputs", ["latents"]))
        unknown = [name for name in user_inputs if name not in accepted and name not in FAM_TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not in "
                             f"{accepted + list(FAM_TENSOR_INPUTS)}")
        arguments["callback_on_step_end"] = self._chain(user_callback, user_inputs)
        arguments["callback_on_step_end_tensor_inputs"] = ["latents"] + [
            name for name in user_inputs if name != "latents" and name not in FAM_TENSOR_INPUTS]
        self.prepare(base, pipe, arguments)
        self.step, self.active = 0, True
        try:
            with torch.no_grad():
                return base.__call__(pipe, **arguments)
        finally:
            self.active = False
            if self.source is not None:
                self.source.am.off()

    def prepare(self, base, pipe, arguments: Dict[str, Any]) -> None:
        pass

    def modulate(self, step: int, t, latents: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """FAM's step-end work: the latents for the next step, and the FAM tensor inputs."""
        return latents, {"reference_latents": None, "modulated_latents": None}

    def _chain(self, user_callback, user_inputs: Sequence[str]) -> Callable:
        def callback(pipe, step, t, tensors):
            latents, extras = self.modulate(step, t, tensors["latents"])
            outputs = {"latents": latents}
            if user_callback is not None:
                given = {name: extras[name] if name in FAM_TENSOR_INPUTS else
                         (latents if name == "latents" else tensors[name]) for name in user_inputs}
                outputs.update(user_callback(pipe, step, t, given) or {})
                returned = outputs["latents"]
                if not torch.is_tensor(returned) or returned.shape != latents.shape:
                    shape = tuple(returned.shape) if torch.is_tensor(returned) else type(returned).__name__
                    raise ValueError(f"callback_on_step_end returned latents of shape {shape} in the {self.kind} "
                                     f"pass at step {step}; expected {tuple(latents.shape)}")
            self.latents = outputs["latents"]
            self.step = step + 1
            return outputs
        return callback

    # ----------------------------------------------------------- the UNet
    def chunks(self, call: UNetCall) -> int:
        guided = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        return 2 if self.cfg_sequential and guided and call.batch % 2 == 0 else 1

    def forward(self, previous, call: UNetCall):
        parts = self.chunks(call)
        return concat_outputs([self.forward_chunk(previous, call, parts, chunk) for chunk in range(parts)])

    def forward_chunk(self, previous, call: UNetCall, parts: int, chunk: int):
        return previous(**call.chunk(parts, chunk).kwargs)


class NativeRun(_Pass):
    """The native pass recorded by :func:`record_native`: ``latents`` (after the last
    step), ``steps`` (steps run) and the AM ``source`` (None without AM)."""

    kind = "native"

    def __init__(self, pipe, *, am: Optional[AttentionModulation], am_source: Optional[str], cfg_sequential: bool,
                 layers: Sequence[str] = (), am_cache_device=None):
        super().__init__(pipe, cfg_sequential=cfg_sequential, source=None)
        self.am, self.am_source, self.layers = am, am_source, list(layers)
        if am is not None and am_source != "diffused":
            cls = SOURCES[am_source]
            extra = {"device": am_cache_device} if am_source == "cache" else {}
            self.source = cls(am, lambda call: self.run_native(call), **extra)

    @property
    def steps(self) -> int:
        return self.step

    def forward_chunk(self, previous, call, parts, chunk):
        run = super().forward_chunk
        if self.source is None:
            return run(previous, call, parts, chunk)
        return self.source.native_call(self.step, chunk, call, lambda: run(previous, call, parts, chunk))


class HighResRun(_Pass):
    """The high-res pass of :func:`modulate`."""

    kind = "high_res"

    def __init__(self, pipe, native_latent: torch.Tensor, *, mode: Mode, scale: Tuple[int, int], fm_c: float,
                 upsample: str, source: Optional[NativeAttentionSource], cfg_sequential: bool,
                 high_res_strength: float = 1.0, release_native: bool = True):
        super().__init__(pipe, cfg_sequential=cfg_sequential, source=source)
        self.release_native = release_native
        self.native_latent, self.mode, self.scale = native_latent, mode, scale
        self.fm_c, self.upsample, self.high_res_strength = fm_c, upsample, high_res_strength
        self.offset = 0  # index of the first high-res step in the full schedule (high_res_strength < 1)
        h, w = native_latent.shape[-2:]
        self.target_latent = (h * scale[0], w * scale[1])
        self.noiser: Optional[Noiser] = None
        self.reference_x0 = self.eps = None

    def extra_patches(self, patches: Patches) -> None:
        """high_res_strength < 1: the pipe's loop runs only the schedule's last steps, and
        its scheduler is in the state diffusers' img2img gives it -- the full schedule with
        the begin index at the start step -- so each step uses that step's noise level and
        multistep solvers see the real end of the schedule."""
        if self.high_res_strength == 1.0:
            return
        scheduler = self.pipe.scheduler
        set_timesteps, scale_model_input = scheduler.set_timesteps, scheduler.scale_model_input
        set_begin_index = getattr(scheduler, "set_begin_index", None)
        handler, full = self, {}

        def set_timesteps_from_start(*args, **kwargs):
            out = set_timesteps(*args, **kwargs)
            if handler.active and handler.offset:
                full["timesteps"] = scheduler.timesteps
                scheduler.timesteps = scheduler.timesteps[handler.offset:]  # what the pipe's loop iterates over
                if set_begin_index is not None:
                    set_begin_index(handler.offset)
            return out

        def restore_full_schedule():  # the pipe holds its loop's timesteps by now
            if "timesteps" in full:
                scheduler.timesteps = full.pop("timesteps")

        def keep_begin_index(begin_index: int = 0):  # text-to-image loops reset it to 0 before the loop
            restore_full_schedule()
            return set_begin_index(handler.offset if handler.active and handler.offset else begin_index)

        def scale_model_input_full_schedule(*args, **kwargs):
            restore_full_schedule()
            return scale_model_input(*args, **kwargs)

        patches.set_attr(scheduler, "set_timesteps", set_timesteps_from_start)
        patches.set_attr(scheduler, "scale_model_input", scale_model_input_full_schedule)
        if set_begin_index is not None:
            patches.set_attr(scheduler, "set_begin_index", keep_begin_index)

    @property
    def target_size(self) -> Tuple[int, int]:
        factor = self.pipe.vae_scale_factor
        return self.target_latent[0] * factor, self.target_latent[1] * factor

    def prepare(self, base, pipe, arguments):
        if arguments.get("latents") is not None:
            raise ValueError("latents: FAM sets the high-res pass's first latent (the diffused native latent)")
        for name, value in zip(("height", "width"), self.target_size):
            if name not in inspect.signature(base.__call__).parameters:
                raise ValueError(f"{base.__name__} has no {name} argument: the high-res pass needs a text-to-image "
                                 "(or ControlNet) pipeline")
            if arguments.get(name) is None:
                arguments[name] = value
            elif arguments[name] != value:
                raise ValueError(f"{name}={arguments[name]}: the high-res pass is {value} (native "
                                 f"{value // self.scale[0 if name == 'height' else 1]} x the scale)")
        device = pipe._execution_device
        steps = call_default(base, "num_inference_steps", arguments)
        self.noiser = Noiser(schedule_copy(pipe, steps, device, arguments.get("timesteps"),
                                           arguments.get("sigmas")))
        self.offset = start_step(steps, self.high_res_strength) * getattr(pipe.scheduler, "order", 1)
        generator = arguments.get("generator")
        latent = self.native_latent.to(device)
        self.reference_x0 = upsample_latent(latent, self.target_latent, self.upsample)
        self.eps = randn_tensor(tuple(self.reference_x0.shape), generator=generator, device=device,
                                dtype=latent.dtype)
        if self.source is not None:
            self.source.begin_high_res(generator=generator, noiser=self.noiser, scheduler=pipe.scheduler,
                                       scale=self.scale, high_res_timesteps=self.noiser.timesteps)
        start = self.noiser.at(self.offset, self.reference_x0, self.eps)
        start = self.guide(self.offset, start, start)  # the first step's guidance (the identity up to rounding)
        # the pipe multiplies the given latents by init_noise_sigma; prepare_latents then hands over
        # start itself (division and multiplication would round)
        arguments["latents"] = start / self.noiser.scheduler.init_noise_sigma
        self.start = start

    def modulate(self, step, t, latents):
        """After step ``step``: the latents modulated for the next step's timestep."""
        extras = {"reference_latents": None, "modulated_latents": None}
        following = self.offset + step + 1
        if following >= len(self.noiser.timesteps):  # the last step: the pipe decodes next
            if self.release_native:
                self.reference_x0 = self.eps = self.start = None
                if self.source is not None:
                    self.source.release()
            return latents, extras
        if not (self.mode.frequency_modulation or self.mode.skip_residual):
            return latents, extras
        reference = self.noiser.at(following, self.reference_x0, self.eps)
        latents = self.guide(following, latents, reference)
        extras.update(reference_latents=reference, modulated_latents=latents)
        return latents, extras

    def guide(self, step: int, latents: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """FM (eq. 4-5) or the skip residual at the timestep of ``step``."""
        t = float(self.noiser.timesteps[step])
        T = self.noiser.scheduler.config.num_train_timesteps
        if self.mode.frequency_modulation:
            H, W = latents.shape[-2:]
            cutoff, gain = fam_kernels.fm_schedule(t, T, H, W, self.fm_c)
            return fam_kernels.lowpass_blend(latents, reference, cutoff, gain)
        if self.mode.skip_residual:
            c1 = skip_residual_weight(t, T)
            return (1 - c1) * latents + c1 * reference
        return latents

    def forward_chunk(self, previous, call, parts, chunk):
        if self.source is None:
            return super().forward_chunk(previous, call, parts, chunk)
        am = self.source.am
        inputs = self.source.native_inputs(self.offset + self.step, chunk, parts, call)
        am.modulate_with(inputs)
        try:
            return super().forward_chunk(previous, call, parts, chunk)
        finally:
            am.off()


# --------------------------------------------------------------------------- public API


def _check_pipe(pipe) -> None:
    if getattr(type(pipe), "fam_pass", None) is not None:
        raise RuntimeError("pipe: FAM is already attached to this pipe (nested record_native/modulate)")
    unet = getattr(pipe, "unet", None)
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"pipe: FAM needs a pipeline with a UNet2DConditionModel, got {type(pipe).__name__}")
    if "callback_on_step_end" not in inspect.signature(type(pipe).__call__).parameters:
        raise ValueError(f"pipe: {type(pipe).__name__}.__call__ has no callback_on_step_end")
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError("pipe: guidance-distilled UNets (unet.config.time_cond_proj_dim set) are not supported")


def _check_cfg_sequential(pipe, cfg_sequential) -> None:
    if not isinstance(cfg_sequential, bool):
        raise ValueError(f"cfg_sequential={cfg_sequential!r} must be True or False")
    if cfg_sequential and hasattr(pipe, "pag_scale"):
        raise ValueError("cfg_sequential: not with PAG pipelines (their attention processors need the whole batch)")


@contextmanager
def record_native(pipe, *, am_source: Optional[str] = "recompute", am_layers: Union[str, Sequence[str], None] = None,
                  am_cache_device: Union[str, torch.device, None] = None, cfg_sequential: bool = False):
    """Record the native pass: the one ``pipe(...)`` call made inside the block.
    ``am_source``: "recompute", "cache", "diffused" or None (no Attention Modulation)."""
    _check_pipe(pipe)
    _check_cfg_sequential(pipe, cfg_sequential)
    if am_source is not None:
        choose("am_source", am_source, AM_SOURCES)
    am = None
    layers: List[str] = []
    if am_source is not None:
        layers = resolve_am_layers(pipe.unet, am_layers)
        am = AttentionModulation(layers, 0.0, (1, 1), (1, 1))
    native = NativeRun(pipe, am=am, am_source=am_source, cfg_sequential=cfg_sequential, layers=layers,
                       am_cache_device=None if am_cache_device is None else torch.device(am_cache_device))
    with patched() as patches:
        with sigint_deferred():
            if am_source == "cache":
                install_processors(patches, pipe.unet, layers, am)
            native.attach(patches, pipe_forward_needed=native.source is not None or cfg_sequential)
        yield native


@contextmanager
def modulate(pipe, native: Union[NativeRun, torch.Tensor], *, scale: Scale = 2, mode: str = "fam",
             fm_c: float = 0.5, am_lambda: float = 0.7, am_layers: Union[str, Sequence[str], None] = None,
             upsample: str = "bicubic", cfg_sequential: bool = False, high_res_strength: float = 1.0,
             release_native: bool = True):
    """Make the one ``pipe(...)`` call inside the block FAM's high-res pass at
    ``scale`` x the native size. ``native``: a :func:`record_native` result, or native
    latents (B, C, h, w) (then AM uses the "diffused" source). ``mode``: "fam", "fm",
    "am", "skip_residual" or "direct_native" (the diffused start only).
    ``high_res_strength`` s in (0, 1]: start where the call's schedule has int(N s) of
    its N steps left, from z~ at that step (diffusers' img2img rule). The call's own
    ``num_inference_steps`` may differ from the native pass's: AM then uses, for each
    high-res step, the native step with the nearest timestep.
    ``release_native`` (default True): after the last step, before the pipe decodes, free
    the native attention data (the AM cache, the recorded native calls) and the
    reference latents -- at 4096^2 the cache alone is ~7 GB on the GPU; pass False to
    run several high-res passes from one ``record_native`` result."""
    _check_pipe(pipe)
    _check_cfg_sequential(pipe, cfg_sequential)
    choose("mode", mode, tuple(name for name in MODES if name != "direct"))
    choose("upsample", upsample, UPSAMPLE_MODES)
    spec = MODES[mode]
    factors = _parse_scale(scale)
    check_number("fm_c", fm_c, low=0.0)
    check_number("am_lambda", am_lambda, low=0.0, high=1.0)
    check_strength(high_res_strength)
    if am_layers is not None and not spec.attention_modulation:
        raise ValueError(f"am_layers: mode {mode!r} has no Attention Modulation")

    if isinstance(native, NativeRun):
        if native.latents is None:
            raise ValueError("native: the record_native block ran no denoising step")
        latent = native.latents
        if spec.attention_modulation and native.am is None:
            raise ValueError(f"native: recorded with am_source=None, but mode {mode!r} needs Attention Modulation")
        am, source, layers = native.am, native.source, native.layers
        if source is not None and source.released:
            raise ValueError("native: its attention data was released after an earlier high-res pass; "
                             "pass release_native=False to that modulate(...) call to reuse it")
        if am_layers is not None and resolve_am_layers(pipe.unet, am_layers) != layers:
            raise ValueError("am_layers: differ from those of the record_native block")
    elif torch.is_tensor(native) and native.ndim == 4:
        latent, source = native, None
        layers = resolve_am_layers(pipe.unet, am_layers) if spec.attention_modulation else []
        am = AttentionModulation(layers, am_lambda, (1, 1), (1, 1)) if spec.attention_modulation else None
    else:
        raise ValueError("native: a record_native(...) result or a (B, C, h, w) latent tensor")

    if spec.attention_modulation:
        h, w = latent.shape[-2:]
        am.configure(am_lambda, (h, w), (h * factors[0], w * factors[1]))
        if source is None:
            source = DiffusedSource(am, None, latent)
    else:
        source = None
    run = HighResRun(pipe, latent, mode=spec, scale=factors, fm_c=fm_c, upsample=upsample, source=source,
                     cfg_sequential=cfg_sequential, high_res_strength=float(high_res_strength),
                     release_native=bool(release_native))
    if source is not None:
        source.run_native = lambda call: run.run_native(call)
    with patched() as patches:
        with sigint_deferred():
            if spec.attention_modulation:
                install_processors(patches, pipe.unet, layers, am)
            run.attach(patches, pipe_forward_needed=source is not None or cfg_sequential)
        yield run


def check_number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                 integer: bool = False) -> None:
    """Reject bools, NaN and out-of-range values, naming the argument and the range."""
    import math
    import numbers

    kind = numbers.Integral if integer else numbers.Real
    valid = isinstance(value, kind) and not isinstance(value, bool) and not math.isnan(value)
    valid = valid and (low is None or value >= low) and (high is None or value <= high)
    if not valid:
        what = "an int" if integer else "a number"
        if low is not None and high is not None:
            bounds = f"{what} in [{low:g}, {high:g}]"
        else:
            bounds = what + (f" >= {low:g}" if low is not None else "") + (f" <= {high:g}" if high is not None else "")
        raise ValueError(f"{name}={value!r} must be {bounds}")


def check_strength(high_res_strength) -> None:
    check_number("high_res_strength", high_res_strength, low=0.0, high=1.0)
    if high_res_strength == 0:
        raise ValueError("high_res_strength=0 must be a number in (0, 1]")
