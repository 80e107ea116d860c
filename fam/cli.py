"""The ``fam`` command: ``fam generate`` (this module) plus the demo's ``fam demo`` and
``fam eval`` (defined in :mod:`fam_demo.commands`, listed in ``EXTERNAL_COMMANDS``).

``fam generate`` writes PNGs atomically with every generation setting and the
package version in a PNG text chunk (key "fam", JSON); ``--from-png`` reads such a
chunk back, explicit flags overriding it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import random
import sys
from contextlib import contextmanager
from typing import Any, Dict, Optional, Sequence, Tuple

from ._io import save_png
from .modes import AM_SOURCES, MODES, UPSAMPLE_MODES

METADATA_KEY = "fam"

# the settings recorded in the PNG, with their defaults; None: resolved at run time
DEFAULTS: Dict[str, Any] = {
    "model": None, "prompt": None, "negative_prompt": None, "scale": "2", "native_height": None,
    "native_width": None, "steps": 50, "guidance": None, "seed": None, "mode": "fam", "am_source": None,
    "fm_c": 0.5, "am_lambda": 0.7, "upsample": "bicubic", "cfg_sequential": False, "vae_tiling": "auto",
    "dtype": None, "variant": None,
}
# how the run was executed; recorded, but never taken from --from-png
RUNTIME = ("device", "cpu_offload", "am_cache_device")


class CLIError(Exception):
    """A one-line user-facing error (printed without a traceback, exit status 2)."""


def parse_scale(text: str):
    """"2" -> 2, "2x4" -> (2, 4) (height factor x width factor)."""
    parts = str(text).lower().split("x")
    try:
        factors = [int(part) for part in parts]
    except ValueError:
        raise CLIError(f"--scale {text!r}: expected N or HxW, e.g. 2 or 2x4") from None
    if len(factors) == 1:
        return factors[0]
    if len(factors) == 2:
        return tuple(factors)
    raise CLIError(f"--scale {text!r}: expected N or HxW, e.g. 2 or 2x4")


def read_png_settings(path: str) -> Dict[str, Any]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    except (OSError, ValueError) as error:
        raise CLIError(f"--from-png {path}: cannot read it ({error})") from None
    if text is None:
        raise CLIError(f"--from-png {path}: no '{METADATA_KEY}' metadata (not written by fam generate)")
    settings = json.loads(text)
    return {key: settings[key] for key in DEFAULTS if key in settings}


def save_png_atomically(image, path: str, metadata: Dict[str, Any]) -> None:
    """Write to a temporary file in the destination folder, then rename over ``path``."""
    save_png(image, path, json.dumps(metadata, sort_keys=True), key=METADATA_KEY)


def _resolve_settings(args: argparse.Namespace) -> Dict[str, Any]:
    settings = dict(DEFAULTS)
    if args.from_png:
        settings.update(read_png_settings(args.from_png))
    settings.update({key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None})
    for required in ("model", "prompt"):
        if not settings[required]:
            raise CLIError(f"--{required} is required (or --from-png FILE with fam metadata)")
    if settings["seed"] is None:
        settings["seed"] = random.SystemRandom().randrange(2 ** 32)
    return settings


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


def _load_pipeline(settings: Dict[str, Any], device: str, cpu_offload: bool):
    import torch

    dtype = getattr(torch, settings["dtype"])
    try:
        with _library_warnings_silenced():
            from diffusers import DiffusionPipeline

            from .pipeline import FAMPipeline

            pipe = DiffusionPipeline.from_pretrained(settings["model"], dtype=dtype, variant=settings["variant"])
    except Exception as error:  # diffusers raises OSError, ValueError, EnvironmentError, HTTP errors...
        reason = " ".join(str(error).split())
        if len(reason) > 240:
            reason = reason[:237] + "..."
        raise CLIError(f"cannot load model {settings['model']!r} ({type(error).__name__}: {reason}); "
                       f"give a local diffusers folder or a hub id that is cached or reachable") from None
    try:
        fam = FAMPipeline.from_pipe(pipe)
    except ValueError as error:
        raise CLIError(f"model {settings['model']!r}: {error}") from None
    if cpu_offload:
        fam.enable_model_cpu_offload(device=device)
    else:
        fam.to(device)
    return fam


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import fam

    settings = _resolve_settings(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if settings["dtype"] is None:
        settings["dtype"] = "float16" if device.startswith("cuda") else "float32"
    scale = parse_scale(settings["scale"])
    pipe = _load_pipeline(settings, device, args.cpu_offload)
    tiling = {"auto": None, "on": True, "off": False}[settings["vae_tiling"]]
    print(f"fam generate: {settings['mode']} x{settings['scale']} with {type(pipe.pipe).__name__} on {device}, "
          f"seed {settings['seed']}", file=sys.stderr, flush=True)
    try:
        output = pipe(settings["prompt"], negative_prompt=settings["negative_prompt"], scale=scale,
                      native_height=settings["native_height"], native_width=settings["native_width"],
                      num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                      generator=torch.Generator("cpu").manual_seed(settings["seed"]), mode=settings["mode"],
                      am_source=settings["am_source"], am_cache_device=args.am_cache_device,
                      fm_c=settings["fm_c"], am_lambda=settings["am_lambda"], upsample=settings["upsample"],
                      cfg_sequential=settings["cfg_sequential"], vae_tiling=tiling, output_type="pil")
    except ValueError as error:
        raise CLIError(str(error)) from None

    settings["guidance"] = pipe.guidance_scale
    record = {**settings, "version": fam.__version__, "scheduler": type(pipe.scheduler).__name__,
              **{key: getattr(args, key) for key in RUNTIME}, "device": device}
    save_png_atomically(output.images[0], args.out, {**record, "image": "high_res"})
    written = [args.out]
    if args.native_out and output.native_images is not None:
        save_png_atomically(output.native_images[0], args.native_out, {**record, "image": "native"})
        written.append(args.native_out)
    for path in written:
        print(path)
    return 0


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate a high-resolution image with FAM diffusion",
        description="Generate at the model's native size, then at --scale x that size with FAM (frequency + "
                    "attention modulation). Unset options come from --from-png, else the defaults shown.")
    p.add_argument("--model", help="diffusers model: hub id or local folder (SDXL or SD 1.5/2.1)")
    p.add_argument("--variant", help="weights variant, e.g. fp16")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt")
    p.add_argument("--scale", help="N or HxW (height x width factors), default 2")
    p.add_argument("--native-height", type=int, help="native height in pixels (default: the model's)")
    p.add_argument("--native-width", type=int, help="native width in pixels (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps per pass (default 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: 5 SDXL, 7.5 SD)")
    p.add_argument("--seed", type=int, help="default: a random seed, recorded in the PNG")
    p.add_argument("--mode", choices=list(MODES))
    p.add_argument("--am-source", choices=list(AM_SOURCES))
    p.add_argument("--am-cache-device", help="keep the AM cache here, e.g. cpu (with --am-source cache)")
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


if __name__ == "__main__":
    sys.exit(main())
