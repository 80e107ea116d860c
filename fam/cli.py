"""The ``fam`` command: ``fam generate`` (this module) plus the demo's ``fam demo`` and
``fam eval`` (defined in :mod:`fam_demo.commands`, listed in ``EXTERNAL_COMMANDS``).

``fam generate`` checks every setting, path and device before loading anything, then
writes PNGs atomically with every generation setting and the package version in a PNG
text chunk (key "fam", JSON) plus an A1111-style "parameters" chunk that other tools
read; ``--from-png`` reads the JSON back (field by field), explicit flags overriding it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._io import save_png
from .jobs import check_scale, default_model_path, is_int, is_number
from .modes import AM_SOURCES, MODES, UPSAMPLE_MODES

METADATA_KEY = "fam"
PARAMETERS_KEY = "parameters"  # A1111's text chunk

# the settings recorded in the PNG, with their defaults; None: resolved at run time
DEFAULTS: Dict[str, Any] = {
    "model": None, "prompt": None, "negative_prompt": None, "scale": "2", "native_height": None,
    "native_width": None, "steps": 50, "guidance": None, "seed": None, "mode": "fam", "am_source": None,
    "fm_c": 0.5, "am_lambda": 0.7, "upsample": "bicubic", "cfg_sequential": False, "vae_tiling": "auto",
    "dtype": None, "variant": None, "scheduler": None, "karras": False, "timestep_spacing": None,
    "num_images": 1, "init_image": None, "strength": None, "control_image": None, "controlnet": None,
    "controlnet_scale": None, "lora": [], "high_res_strength": 1.0, "high_res_steps": None, "am_layers": None,
}
# how the run was executed; recorded, but never taken from --from-png
RUNTIME = ("device", "cpu_offload", "am_cache_device", "threads", "max_memory")

# --scheduler NAME -> (diffusers class, config overrides); A1111's sampler name for the parameters chunk
SCHEDULERS: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpm++2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE"),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {}, "DPM++ 2S"),
    "dpm2": ("KDPM2DiscreteScheduler", {}, "DPM2"),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "deis": ("DEISMultistepScheduler", {}, "DEIS"),
}
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
KARRAS_SUFFIX = "_karras"


class CLIError(Exception):
    """A one-line user-facing error (printed without a traceback, exit status 2)."""


# ------------------------------------------------------------------------------ field checks
# Each check takes a value (from the command line or from a PNG's JSON) and returns it
# normalised, or raises ValueError with the reason; the caller names the flag or field.

def _int_at_least(minimum: int, maximum: Optional[int] = None, optional: bool = False) -> Callable:
    def check(value):
        if value is None and optional:
            return None
        if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be an integer {bound}")
        return value
    return check


def _finite(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
            optional: bool = False) -> Callable:
    if low is None:
        wanted = "a finite number"
    elif high is None:
        wanted = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"

    def check(value):
        if value is None and optional:
            return None
        if not is_number(value) or not math.isfinite(value) or (low is not None and (
                value < low or (low_open and value == low))) or (high is not None and value > high):
            raise ValueError(f"must be {wanted}")
        return float(value)
    return check


def _choice(choices: Sequence[str], optional: bool = False) -> Callable:
    def check(value):
        if value is None and optional:
            return None
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return check


def _text(optional: bool = True) -> Callable:
    def check(value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty string")
        return value
    return check


def _flag(value):
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def scale_factors(text) -> Tuple[int, ...]:
    """"2" -> (2,), "2x4" -> (2, 4) (height factor x width factor); factors >= 1."""
    return tuple(int(part) for part in check_scale(text).split("x"))


def _scale(value) -> str:
    scale_factors(value)
    return str(value).lower()


def _scheduler(value):
    """A --scheduler name (``NAME_karras`` is NAME with --karras) or a diffusers class name."""
    if value is None:
        return None
    if isinstance(value, str):
        by_class = [name for name, (class_name, _, _) in SCHEDULERS.items() if class_name == value]
        name = by_class[0] if by_class else value
        base = name[:-len(KARRAS_SUFFIX)] if name.endswith(KARRAS_SUFFIX) else name
        if base in SCHEDULERS:
            return name
    raise ValueError(f"must be one of {', '.join(SCHEDULERS)} (NAME{KARRAS_SUFFIX} for Karras sigmas)")


def parse_lora(spec) -> List[Any]:
    """"PATH[:SCALE]" (or a stored [PATH, SCALE] pair) -> [PATH, SCALE]; SCALE defaults to 1."""
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and isinstance(spec[0], str) and spec[0]:
        path, scale = spec
    elif isinstance(spec, str) and spec:
        path, scale = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a ':' inside the path, no scale
    else:
        raise ValueError("expected PATH[:SCALE]")
    if not is_number(scale) or not math.isfinite(scale):
        raise ValueError("the LoRA scale must be a finite number")
    return [path, float(scale)]


def _loras(value) -> List[List[Any]]:
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of [PATH, SCALE]")
    return [parse_lora(item) for item in value]


def _layers(value) -> Optional[List[str]]:
    """"up_blocks.0,up_blocks.1" (or a stored list) -> ["up_blocks.0", "up_blocks.1"]."""
    if value is None:
        return None
    entries = value.split(",") if isinstance(value, str) else value
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and e.strip() for e in entries):
        raise ValueError("expected comma-separated self-attention layer names or prefixes, e.g. up_blocks.0")
    return [entry.strip() for entry in entries]


FIELDS: Dict[str, Tuple[str, Callable]] = {  # settings key -> (its flag, its check)
    "model": ("--model", _text()),
    "prompt": ("--prompt", _text(optional=False)),
    "negative_prompt": ("--negative-prompt", _text()),
    "scale": ("--scale", _scale),
    "native_height": ("--native-height", _int_at_least(1, optional=True)),
    "native_width": ("--native-width", _int_at_least(1, optional=True)),
    "steps": ("--steps", _int_at_least(1)),
    "guidance": ("--guidance", _finite(0, optional=True)),
    "seed": ("--seed", _int_at_least(0, 2 ** 64 - 1, optional=True)),
    "mode": ("--mode", _choice(tuple(MODES))),
    "am_source": ("--am-source", _choice(AM_SOURCES, optional=True)),
    "fm_c": ("--fm-c", _finite(0)),
    "am_lambda": ("--am-lambda", _finite(0, 1)),
    "upsample": ("--upsample", _choice(UPSAMPLE_MODES)),
    "cfg_sequential": ("--cfg-sequential", _flag),
    "vae_tiling": ("--vae-tiling", _choice(("auto", "on", "off"))),
    "dtype": ("--dtype", _choice(("float16", "bfloat16", "float32"), optional=True)),
    "variant": ("--variant", _text()),
    "scheduler": ("--scheduler", _scheduler),
    "karras": ("--karras", _flag),
    "timestep_spacing": ("--timestep-spacing", _choice(TIMESTEP_SPACINGS, optional=True)),
    "num_images": ("--num-images", _int_at_least(1)),
    "init_image": ("--image", _text()),
    "strength": ("--strength", _finite(0, 1, low_open=True, optional=True)),
    "control_image": ("--control-image", _text()),
    "controlnet": ("--controlnet", _text()),
    "controlnet_scale": ("--controlnet-scale", _finite(0, optional=True)),
    "lora": ("--lora", _loras),
    "high_res_strength": ("--high-res-strength", _finite(0, 1, low_open=True)),
    "high_res_steps": ("--high-res-steps", _int_at_least(1, optional=True)),
    "am_layers": ("--am-layers", _layers),
}
assert set(FIELDS) == set(DEFAULTS)


class Settings(dict):
    """The merged settings; remembers which came from --from-png to name them in errors."""

    def __init__(self, values: Dict[str, Any], png: Optional[str] = None, from_png: Sequence[str] = ()):
        super().__init__(values)
        self.png, self.from_png = png, set(from_png)

    def where(self, key: str, value=None) -> str:
        value = self[key] if value is None else value
        if key in self.from_png:
            return f"--from-png {self.png}: field {key!r} = {value!r}"
        if key in ("lora", "am_layers") and isinstance(value, list):  # as given on the command line
            value = (":" if key == "lora" else ",").join(map(str, value))
        return f"{FIELDS[key][0]} {value!r}"


def _checked(key: str, value, where: str):
    try:
        return FIELDS[key][1](value)
    except ValueError as error:
        raise CLIError(f"{where}: {error}") from None


def parse_scale(text: str):
    """"2" -> 2, "2x4" -> (2, 4) (height factor x width factor)."""
    try:
        factors = scale_factors(text)
    except ValueError as error:
        raise CLIError(f"--scale {text!r}: {error}") from None
    return factors[0] if len(factors) == 1 else factors


def read_png_settings(path: str, overridden: Sequence[str] = ()) -> Dict[str, Any]:
    """The settings stored in a fam PNG, each field checked (one-line error naming the field)
    but the ``overridden`` ones, which are left out."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    except (OSError, ValueError) as error:
        raise CLIError(f"--from-png {path}: cannot read it ({error})") from None
    if text is None:
        raise CLIError(f"--from-png {path}: no '{METADATA_KEY}' metadata (not written by fam generate)")
    try:
        stored = json.loads(text)
    except ValueError as error:
        raise CLIError(f"--from-png {path}: the '{METADATA_KEY}' metadata is not JSON ({error})") from None
    if not isinstance(stored, dict):
        raise CLIError(f"--from-png {path}: the '{METADATA_KEY}' metadata is not a JSON object")
    return {key: _checked(key, stored[key], f"--from-png {path}: field {key!r} = {stored[key]!r}")
            for key in DEFAULTS if key in stored and key not in overridden}


def save_png_atomically(image, path: str, metadata: Dict[str, Any], parameters: Optional[str] = None) -> None:
    """Write to a temporary file in the destination folder, then rename over ``path``;
    ``metadata`` as JSON in the "fam" chunk, ``parameters`` (A1111 text) in "parameters"."""
    save_png(image, path, json.dumps(metadata, sort_keys=True), key=METADATA_KEY,
             texts=None if parameters is None else {PARAMETERS_KEY: parameters})


def _resolve_settings(args: argparse.Namespace) -> Settings:
    given = [key for key in DEFAULTS if getattr(args, key) is not None]
    stored = read_png_settings(args.from_png, overridden=given) if args.from_png else {}
    settings = Settings({**DEFAULTS, **stored}, args.from_png, stored)
    for key in given:
        value = getattr(args, key)
        if key == "lora":
            value = [_checked(key, [spec], f"--lora {spec!r}")[0] for spec in value]
        settings[key] = _checked(key, value, settings.where(key, value))
    if not settings["prompt"]:
        raise CLIError("--prompt is required (or --from-png FILE with fam metadata)")
    if settings["model"] is None:
        settings["model"] = default_model_path()
    name = settings["scheduler"]
    if name is not None and name.endswith(KARRAS_SUFFIX):  # dpm++2m_karras == dpm++2m --karras
        settings["scheduler"], settings["karras"] = name[:-len(KARRAS_SUFFIX)], True
    needs = (("strength", "init_image", "--image"), ("controlnet_scale", "controlnet", "--controlnet"),
             ("control_image", "controlnet", "--controlnet"), ("controlnet", "control_image", "--control-image"))
    for key, other, flag in needs:
        if settings[key] is not None and settings[other] is None:
            raise CLIError(f"{settings.where(key)}: needs {flag}")
    for key in ("am_source", "am_layers"):
        if settings[key] is not None and not MODES[settings["mode"]].attention_modulation:
            if key not in settings.from_png:
                raise CLIError(f"{settings.where(key)}: mode {settings['mode']!r} has no attention modulation")
            settings[key] = None  # stored for another mode
    if settings["seed"] is None:
        settings["seed"] = random.SystemRandom().randrange(2 ** 32)
    return settings


# ------------------------------------------------------------------------------ paths and devices

def check_device(flag: str, text: str):
    """``text`` as a torch.device that exists on this machine, else a CLIError naming ``flag``."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"{flag} {text!r}: not a device (cpu, cuda, cuda:N, mps, xpu)") from None
    backends = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}
    if device.type == "cpu":
        return device
    if device.type not in backends:
        raise CLIError(f"{flag} {text!r}: not a device (cpu, cuda, cuda:N, mps, xpu)")
    backend = backends[device.type]
    if backend is None or not backend.is_available():
        raise CLIError(f"{flag} {text!r}: {device.type} is not available on this machine")
    if device.index is not None and hasattr(backend, "device_count") and device.index >= backend.device_count():
        raise CLIError(f"{flag} {text!r}: this machine has {backend.device_count()} {device.type} device(s)")
    return device


def numbered(path: str, index: int) -> str:
    """The file of image ``index`` of a batch: out.png, out-1.png, out-2.png..."""
    if index == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{index}{ext}"


def check_outputs(outputs: Sequence[Tuple[str, str]]) -> None:
    """Each (flag, path) must name a file in an existing, writable folder, all different."""
    seen: Dict[str, Tuple[str, str]] = {}
    for flag, path in outputs:
        if not os.path.basename(path):
            raise CLIError(f"{flag} {path!r}: give a file name, e.g. fam.png")
        if os.path.isdir(path):
            raise CLIError(f"{flag} {path}: is a folder; give a file name, e.g. {os.path.join(path, 'fam.png')}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise CLIError(f"{flag} {path}: the folder {folder} does not exist")
        real = os.path.realpath(path)
        if real in seen:
            other_flag, other = seen[real]
            raise CLIError(f"{flag} {path}: the same file as {other_flag} {other}")
        seen[real] = (flag, path)
    for folder in sorted({os.path.dirname(real) for real in seen}):
        try:
            handle, probe = tempfile.mkstemp(dir=folder, prefix=".fam-write-check-")
            os.close(handle)
            os.remove(probe)
        except OSError as error:
            flag, path = next(value for real, value in seen.items() if os.path.dirname(real) == folder)
            raise CLIError(f"{flag} {path}: cannot write in {folder} ({error.strerror})") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_source(where: str, path: str) -> None:
    """A model/LoRA/ControlNet source: an existing file or folder, or a hub id (owner/name)."""
    if not os.path.exists(path) and not _HUB_ID.match(path):
        raise CLIError(f"{where}: no such file or folder (nor a hub id like owner/name)")


def load_image(where: str, path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise CLIError(f"{where}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, UnidentifiedImageError) as error:
        raise CLIError(f"{where}: cannot read it as an image ({error})") from None


# ------------------------------------------------------------------------------ loading

@contextmanager
def _library_warnings_silenced():
    """Loading failures become one CLIError line; the libraries' own warnings about
    the same failure (hub unreachable, falling back to the cache) are muted meanwhile."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils.logging as hub_logging
    import transformers.utils.logging as transformers_logging

    modules = (diffusers_logging, transformers_logging, hub_logging)
    levels = [module.get_verbosity() for module in modules]
    for module in modules:
        module.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        for module, level in zip(modules, levels):
            module.set_verbosity(level)


def _reason(error: BaseException) -> str:
    reason = " ".join(str(error).split())
    return f"{type(error).__name__}: {reason[:237] + '...' if len(reason) > 240 else reason}"


def build_scheduler(template, name: Optional[str], karras: bool, timestep_spacing: Optional[str]):
    """``name``'s scheduler class (None: the template's own) ``.from_config(template.config, ...)``
    with Karras sigmas / a timestep spacing; ``template`` itself when nothing is asked."""
    import diffusers

    if name is None and not karras and timestep_spacing is None:
        return template
    class_name, overrides, _ = SCHEDULERS[name] if name is not None else (type(template).__name__, {}, None)
    cls = getattr(diffusers, class_name)
    label = name or f"{class_name} (the model's scheduler)"
    try:
        cls.from_config(template.config)  # a class whose dependency is missing raises here
    except ImportError as error:
        raise CLIError(f"--scheduler {name}: {_reason(error)}") from None
    accepted = inspect.signature(cls.__init__).parameters
    options = dict(overrides)
    if karras:
        if "use_karras_sigmas" not in accepted:
            with_karras = [n for n, (c, _, _) in SCHEDULERS.items()
                           if "use_karras_sigmas" in inspect.signature(getattr(diffusers, c).__init__).parameters]
            raise CLIError(f"--karras: {label} has no Karras sigmas; use one of {', '.join(with_karras)}")
        options["use_karras_sigmas"] = True
    if timestep_spacing is not None:
        if "timestep_spacing" not in accepted:
            raise CLIError(f"--timestep-spacing: {label} has no timestep spacing option")
        options["timestep_spacing"] = timestep_spacing
    return cls.from_config(template.config, **options)


def _load_pipeline(settings: Settings, device: str, cpu_offload: bool):
    import torch

    dtype = getattr(torch, settings["dtype"])
    with _library_warnings_silenced():
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, ControlNetModel, DiffusionPipeline

        from .pipeline import FAMPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(settings["model"], dtype=dtype, variant=settings["variant"])
        except Exception as error:  # diffusers raises OSError, ValueError, EnvironmentError, HTTP errors...
            raise CLIError(f"cannot load model {settings['model']!r} ({_reason(error)}); "
                           f"give a local diffusers folder or a hub id that is cached or reachable") from None
        names = []
        for index, (path, scale) in enumerate(settings["lora"]):
            try:
                pipe.load_lora_weights(path, adapter_name=f"lora{index}")
            except Exception as error:
                raise CLIError(f"{settings.where('lora', [path, scale])}: cannot load it ({_reason(error)})") from None
            names.append(f"lora{index}")
        if names:
            pipe.set_adapters(names, adapter_weights=[scale for _, scale in settings["lora"]])
        extra = {}
        if settings["controlnet"] is not None:
            try:
                extra["controlnet"] = ControlNetModel.from_pretrained(settings["controlnet"], dtype=dtype)
            except Exception as error:
                raise CLIError(f"{settings.where('controlnet')}: cannot load it ({_reason(error)})") from None
        auto = AutoPipelineForImage2Image if settings["init_image"] is not None else \
            AutoPipelineForText2Image if extra else None
        if auto is not None:
            try:
                pipe = auto.from_pipe(pipe, **extra)
            except Exception as error:
                flag = "--image" if auto is AutoPipelineForImage2Image else "--controlnet"
                raise CLIError(f"{flag}: no such pipeline for {type(pipe).__name__} ({_reason(error)})") from None
    pipe.scheduler = build_scheduler(pipe.scheduler, settings["scheduler"], settings["karras"],
                                     settings["timestep_spacing"])
    try:
        fam = FAMPipeline.from_pipe(pipe)
    except ValueError as error:
        raise CLIError(f"model {settings['model']!r}: {error}") from None
    if cpu_offload:
        fam.enable_model_cpu_offload(device=device)
    else:
        fam.to(device)
    return fam


def _call_default(pipe, name: str):
    """The default of ``name`` in the wrapped diffusers pipeline's ``__call__`` (what it uses when not given)."""
    parameter = inspect.signature(type(pipe.pipe).__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


# ------------------------------------------------------------------------------ PNG text

def sampler_name(scheduler_name: Optional[str], scheduler) -> str:
    """A1111's name of the scheduler used (diffusers' class name when it has none)."""
    if scheduler_name is not None:
        return SCHEDULERS[scheduler_name][2]
    for class_name, overrides, a1111 in SCHEDULERS.values():
        if class_name == type(scheduler).__name__ and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return a1111
    return type(scheduler).__name__


def _a1111_quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(record: Dict[str, Any], seed: int, size_hw: Sequence[int]) -> str:
    """A1111's "parameters" text: prompt, "Negative prompt: ...", then "Key: value, ..."
    (Size as width x height, A1111's order)."""
    model = record["model"]
    if model == default_model_path():
        model = "fam-demo"
    elif os.path.exists(model):
        model = os.path.basename(os.path.normpath(model))  # A1111 writes the name, not the path
    fields = [("Steps", record["steps"]), ("Sampler", record["sampler"])]
    if record["scheduler_config"].get("use_karras_sigmas"):
        fields.append(("Schedule type", "Karras"))
    fields += [("CFG scale", record["guidance"]), ("Seed", seed), ("Size", f"{size_hw[1]}x{size_hw[0]}"),
               ("Model", model)]
    if record["init_image"] is not None:
        fields.append(("Denoising strength", record["strength"]))
    if record["controlnet"] is not None:
        fields += [("ControlNet", record["controlnet"]), ("ControlNet weight", record["controlnet_scale"])]
    if record["lora"]:
        fields.append(("Lora", "; ".join(f"{os.path.basename(path)}:{scale:g}" for path, scale in record["lora"])))
    if record["high_res_strength"] != 1.0 or record["high_res_steps"] is not None:
        fields += [("FAM high-res strength", record["high_res_strength"]),
                   ("Hires steps", record["high_res_steps"] or record["steps"])]
    fields += [("FAM mode", record["mode"]), ("FAM scale", f"{record['scale']} (HxW)"),
               ("Native size", f"{record['native_width']}x{record['native_height']}"),
               ("Version", f"fam {record['version']}")]
    lines = [record["prompt"]]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_a1111_quote(value)}" for key, value in fields))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ fam generate

def _check_before_work(args: argparse.Namespace, settings: Settings):
    """Devices, output files, input pictures and model sources, before anything is loaded:
    returns the device and the input pictures ({"init_image": PIL, "control_image": PIL})."""
    import torch

    if args.max_memory is not None:
        from .plan.options import parse_bytes

        try:
            parse_bytes(args.max_memory)
        except ValueError as error:
            raise CLIError(f"--max-memory {args.max_memory}: {error}") from None
        chosen_by_budget = [flag for flag, given in (("--cfg-sequential", settings["cfg_sequential"]),
                                                     ("--am-source", settings["am_source"]),
                                                     ("--am-cache-device", args.am_cache_device),
                                                     ("--cpu-offload", args.cpu_offload),
                                                     ("--vae-tiling", settings["vae_tiling"] != "auto")) if given]
        if chosen_by_budget:
            raise CLIError(f"--max-memory chooses {', '.join(chosen_by_budget)} itself; do not give them with it")
    device = str(check_device("--device", args.device)) if args.device else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if args.am_cache_device is not None:
        check_device("--am-cache-device", args.am_cache_device)
        if settings["am_source"] != "cache":
            raise CLIError(f"--am-cache-device {args.am_cache_device!r}: needs --am-source cache")
    if args.cpu_offload and torch.device(device).type == "cpu":
        raise CLIError("--cpu-offload: needs an accelerator --device (e.g. cuda)")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads {args.threads}: must be an integer >= 1")
    if args.native_out and not MODES[settings["mode"]].native_pass:
        raise CLIError(f"--native-out {args.native_out}: mode {settings['mode']!r} has no native pass")
    outputs = [("--out", numbered(args.out, i)) for i in range(settings["num_images"])]
    if args.native_out:
        outputs += [("--native-out", numbered(args.native_out, i)) for i in range(settings["num_images"])]
    check_outputs(outputs)
    pictures = {key: load_image(settings.where(key), settings[key])
                for key in ("init_image", "control_image") if settings[key] is not None}
    check_source(settings.where("model"), settings["model"])
    for lora in settings["lora"]:
        check_source(settings.where("lora", lora), lora[0])
    if settings["controlnet"] is not None:
        check_source(settings.where("controlnet"), settings["controlnet"])
    return device, pictures


def _pipe_arguments(pipe, settings: Settings, pictures) -> Dict[str, Any]:
    """The wrapped pipeline's own arguments (img2img, ControlNet); the defaults it would use
    for those not given are filled into ``settings`` so that the PNG records them."""
    arguments: Dict[str, Any] = {}
    if "init_image" in pictures:
        if settings["strength"] is None:
            settings["strength"] = _call_default(pipe, "strength")
        if int(settings["steps"] * settings["strength"]) < 1:  # diffusers' img2img runs int(steps x strength)
            raise CLIError(f"--strength {settings['strength']:g} with --steps {settings['steps']}: img2img would run "
                           f"int({settings['steps']} x {settings['strength']:g}) = 0 steps; raise one of them")
        arguments.update(image=pictures["init_image"], strength=settings["strength"])
    if "control_image" in pictures:  # the ControlNet text-to-image pipelines call it `image`
        arguments["control_image" if "init_image" in pictures else "image"] = pictures["control_image"]
        if settings["controlnet_scale"] is None:
            settings["controlnet_scale"] = _call_default(pipe, "controlnet_conditioning_scale")
        arguments["controlnet_conditioning_scale"] = settings["controlnet_scale"]
    if settings["guidance"] is None:
        default = _call_default(pipe, "guidance_scale")
        settings["guidance"] = None if default is None else float(default)
    return arguments


def _record_resolved(settings: Settings, output, factors, started_from_image: bool) -> None:
    """The native size and am_source the call actually used, into ``settings``."""
    height, width = output.images[0].size[::-1]
    settings["native_height"], settings["native_width"] = (
        output.native_images[0].size[::-1] if output.native_images is not None
        else (height // factors[0], width // factors[-1]))
    if MODES[settings["mode"]].attention_modulation:  # img2img keeps no native trajectory: 'diffused'
        settings["am_source"] = getattr(output, "am_source", None) or settings["am_source"] or (
            "diffused" if started_from_image else "recompute")
    else:
        settings["am_source"] = None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import fam

    settings = _resolve_settings(args)
    factors = scale_factors(settings["scale"])
    device, pictures = _check_before_work(args, settings)
    if settings["dtype"] is None:
        settings["dtype"] = "float16" if device.startswith("cuda") else "float32"

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = _load_pipeline(settings, device, args.cpu_offload)
    if settings["am_layers"] is not None:
        from .attention import resolve_am_layers

        try:
            resolve_am_layers(pipe.unet, settings["am_layers"])
        except ValueError as error:
            raise CLIError(f"{settings.where('am_layers')}: {str(error).removeprefix('am_layers: ')}") from None
    arguments = _pipe_arguments(pipe, settings, pictures)
    count = settings["num_images"]
    seeds = [(settings["seed"] + i) % 2 ** 64 for i in range(count)]  # image i of the batch: seed + i
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    print(f"fam generate: {settings['mode']} x{settings['scale']} with {type(pipe.pipe).__name__} "
          f"({type(pipe.scheduler).__name__}) on {device}, seed {settings['seed']}", file=sys.stderr, flush=True)
    try:
        output = pipe(settings["prompt"], negative_prompt=settings["negative_prompt"],
                      scale=factors[0] if len(factors) == 1 else factors,
                      native_height=settings["native_height"], native_width=settings["native_width"],
                      num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                      num_images_per_prompt=count, generator=generators[0] if count == 1 else generators,
                      mode=settings["mode"], am_source=settings["am_source"], am_layers=settings["am_layers"],
                      am_cache_device=args.am_cache_device, max_memory=args.max_memory,
                      fm_c=settings["fm_c"], am_lambda=settings["am_lambda"], upsample=settings["upsample"],
                      cfg_sequential=settings["cfg_sequential"], high_res_strength=settings["high_res_strength"],
                      high_res_steps=settings["high_res_steps"],
                      vae_tiling={"auto": None, "on": True, "off": False}[settings["vae_tiling"]],
                      output_type="pil", **arguments)
    except ValueError as error:
        raise CLIError(str(error)) from None

    if output.memory_options is not None:
        chosen = output.memory_options
        print(f"fam generate: --max-memory {args.max_memory}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()),
              file=sys.stderr, flush=True)
        settings["cfg_sequential"] = chosen["cfg"] == "sequential"
        settings["vae_tiling"] = chosen["vae_tiling"]
        if MODES[settings["mode"]].attention_modulation:
            settings["am_source"] = chosen["am_source"].split("_")[0]
            args.am_cache_device = "cpu" if chosen["am_source"] == "cache_cpu" else None
    _record_resolved(settings, output, factors, "init_image" in pictures)
    record = {**settings, "version": fam.__version__, "scheduler_class": type(pipe.scheduler).__name__,
              "scheduler_config": json.loads(pipe.scheduler.to_json_string()),
              "sampler": sampler_name(settings["scheduler"], pipe.scheduler),
              **{key: getattr(args, key) for key in RUNTIME}, "device": device}
    batches = [("high_res", args.out, output.images)]
    if args.native_out and output.native_images is not None:
        batches.append(("native", args.native_out, output.native_images))
    for kind, path, images in batches:
        for i, image in enumerate(images):
            save_png_atomically(image, numbered(path, i), {**record, "image": kind, "index": i},
                                a1111_parameters(record, seeds[i], image.size[::-1]))
    for kind, path, images in batches:
        for i in range(len(images)):
            print(numbered(path, i))
    return 0


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate a high-resolution image with FAM diffusion",
        description="Generate at the model's native size, then at --scale x that size with FAM (frequency + "
                    "attention modulation). Unset options come from --from-png, else the defaults shown.")
    p.add_argument("--model", help="diffusers model: hub id or local folder (SDXL or SD 1.5/2.1); default: the "
                                   "embedded demo model (offline)")
    p.add_argument("--variant", help="weights variant, e.g. fp16")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt")
    p.add_argument("--scale", help="N or HxW (height x width factors), default 2")
    p.add_argument("--native-height", type=int, help="native height in pixels (default: the model's)")
    p.add_argument("--native-width", type=int, help="native width in pixels (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps per pass (default 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: 5 SDXL, 7.5 SD)")
    p.add_argument("--seed", type=int, help="default: a random seed, recorded in the PNG; image i of a batch "
                                            "uses seed + i")
    p.add_argument("--num-images", type=int, help="images per prompt (default 1): OUT, OUT-1, OUT-2...")
    p.add_argument("--scheduler", metavar="NAME", help=f"one of {', '.join(SCHEDULERS)} (NAME_karras = NAME "
                                                       f"--karras); default: the model's own")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                   help="Karras sigmas (euler, dpm++2m, dpm2, heun, unipc, deis...)")
    p.add_argument("--timestep-spacing", metavar="SPACING", help=f"one of {', '.join(TIMESTEP_SPACINGS)} "
                                                                 f"(default: the model's)")
    p.add_argument("--image", dest="init_image", metavar="PATH", help="img2img: start from this picture (the "
                                                                      "model's img2img pipeline)")
    p.add_argument("--strength", type=float, help="img2img strength in (0, 1] (default: the pipeline's)")
    p.add_argument("--control-image", metavar="PATH", help="ControlNet conditioning image (with --controlnet)")
    p.add_argument("--controlnet", metavar="ID_OR_PATH", help="ControlNet model: hub id or local folder")
    p.add_argument("--controlnet-scale", type=float, help="controlnet_conditioning_scale (default 1)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="LoRA weights (file, folder or hub id), scale default 1; repeatable")
    p.add_argument("--high-res-strength", type=float, help="start the high-res pass later, as img2img strength "
                                                            "in (0, 1] does (default 1: the whole schedule)")
    p.add_argument("--high-res-steps", type=int, help="steps of the high-res schedule (default: --steps)")
    p.add_argument("--mode", choices=list(MODES))
    p.add_argument("--am-source", choices=list(AM_SOURCES))
    p.add_argument("--am-layers", metavar="LAYERS", help="comma-separated self-attention layers or prefixes for AM "
                                                         "(default: the paper's, up_blocks.0 on SDXL)")
    p.add_argument("--am-cache-device", help="keep the AM cache here, e.g. cpu (with --am-source cache)")
    p.add_argument("--max-memory", metavar="SIZE", help="GPU memory budget, e.g. 8GiB: fam plan picks the fastest "
                                                        "option set that fits (CFG, VAE tiling, AM source, offload)")
    p.add_argument("--fm-c", type=float, help="FM low-frequency box size c (default 0.5)")
    p.add_argument("--am-lambda", type=float, help="AM blend weight lambda (default 0.7)")
    p.add_argument("--upsample", choices=list(UPSAMPLE_MODES))
    p.add_argument("--cfg-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="run the two guidance halves one after the other (less memory)")
    p.add_argument("--vae-tiling", choices=["auto", "on", "off"])
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload on --device")
    p.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads, before loading)")
    p.add_argument("--out", default="fam.png", help="high-res PNG (default fam.png)")
    p.add_argument("--native-out", help="also write the native image here")
    p.add_argument("--from-png", metavar="FILE", help="re-run with the settings stored in a fam PNG")
    p.set_defaults(func=cmd_generate)


# Subcommands defined outside the library, which never imports them at load time:
# name -> ("module:function", one-line help). The module is imported only when its
# command is named on the command line; the function fills in the subcommand's parser.
EXTERNAL_COMMANDS: Dict[str, Tuple[str, str]] = {
    "demo": ("fam_demo.commands:configure_demo",
             "generate native/2x/3x/4x/2x4 images with the embedded model and a contact sheet"),
    "eval": ("fam_demo.commands:configure_eval", "quality evaluation of the FAM ablation modes on the embedded model"),
    "batch": ("fam.batch:configure_batch", "generate one image per line of a prompts file, on one or many processes"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``fam`` parser; of the external subcommands only ``command``'s is filled in
    (the others are listed by name and help)."""
    parser = argparse.ArgumentParser(prog="fam", description="FAM diffusion: training-free high-resolution "
                                                             "generation with SDXL / SD")
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_generate_parser(subparsers)
    for name, (target, help_text) in EXTERNAL_COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == command:
            module, _, function = target.partition(":")
            try:
                configure = getattr(importlib.import_module(module), function)
            except ImportError as error:
                parser.exit(2, f"fam {name}: error: cannot import {module} ({error})\n")
            configure(sub)
    from .plan.cli import add_plan_parser  # fam plan (fam/plan/cli.py; imports torch only when run)

    add_plan_parser(subparsers)
    return parser


def _version() -> str:
    import fam_kernels

    return f"fam {fam_kernels.__version__}"


class _VersionAction(argparse.Action):
    """``--version``, importing the package (torch and all) only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(0, _version() + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    import fam_kernels  # noqa: F401  (before torch: sets OpenMP's wait policy, fam_kernels/_threads.py)

    try:
        return int(args.func(args) or 0)
    except CLIError as error:
        print(f"fam {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # files are written atomically: nothing half-written is left
        print(f"\nfam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
