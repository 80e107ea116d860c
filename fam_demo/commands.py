"""The `fam demo` and `fam eval` subcommands. ``fam.cli`` lists them by name
(``fam.cli.EXTERNAL_COMMANDS``) and imports this module only when one of them is
run; ``configure_demo`` / ``configure_eval`` then fill in the subcommand's parser.

Each parser stores its handler as ``func`` (``set_defaults(func=...)``); the
handler takes the parsed namespace and returns an exit status."""

from __future__ import annotations

import argparse
import os
import time

from fam.cli import CLIError


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def cmd_demo(args: argparse.Namespace) -> int:
    from .evaluation import load_fam_pipeline
    from .showcase import DEMO_PROMPTS, run_demo, summarize

    _at_least_one("--steps", args.steps)
    _threads(args.threads)
    t0 = time.perf_counter()
    print("fam demo: loading the embedded model (offline) ...", flush=True)
    fp = load_fam_pipeline(path=args.model)
    print(f"loaded in {time.perf_counter() - t0:.1f}s; generating native, 2x2, 3x3, 4x4 and 2x4 in modes "
          f"fam / direct / direct_native ({args.steps} steps, guidance {args.guidance})", flush=True)
    prompts = args.prompt or DEMO_PROMPTS
    res = run_demo(fp, out_dir=args.out, prompts=prompts, steps=args.steps, guidance_scale=args.guidance,
                   seed=args.seed, log=lambda m: print(m, flush=True))
    print()
    print(summarize(res))
    print(f"\nwrote {len(res.files)} PNGs under {res.out_dir}")
    print(f"contact sheet: {res.sheet}")
    print(f"total {res.total_seconds:.0f}s")
    return 0


def _at_least_one(flag: str, value: int) -> int:
    if value < 1:
        raise CLIError(f"{flag} {value}: expected 1 or more")
    return value


def _subset(flag: str, value: str, choices) -> list:
    """``"a,b"`` -> ``["a", "b"]``, every item one of ``choices``."""
    items = value.split(",")
    if any(item not in choices for item in items):
        raise CLIError(f"{flag} {value!r}: expected a comma-separated subset of {','.join(choices)}")
    return items


def _shortened_pass(args: argparse.Namespace, steps: int) -> tuple:
    """--high-res-strength / --high-res-steps checked as FAMPipeline checks them (range,
    type, at least one high-res step left), before the model loads."""
    from .evaluation import check_shortened_pass

    strength, k = args.high_res_strength, args.high_res_steps
    if not (0 < strength <= 1):  # also refuses nan
        raise CLIError(f"--high-res-strength {strength:g}: expected a number in (0, 1]")
    if k is not None:
        _at_least_one("--high-res-steps", k)
    try:
        check_shortened_pass(steps, strength, k)
    except ValueError as error:
        flag = "--high-res-strength" if k is None else "--high-res-strength / --high-res-steps"
        raise CLIError(f"{flag} {strength:g}{'' if k is None else f' / {k}'}: "
                       f"leaves no high-res step of {k or steps} (int({k or steps} x {strength:g}) = 0)") from error
    return strength, k


def cmd_eval(args: argparse.Namespace) -> int:
    from fam.attention import resolve_am_layers

    from .evaluation import EVAL_PROMPTS, MODES, SCALES, EvalConfig, check_am_lambda, evaluate, load_fam_pipeline

    cfg = EvalConfig.quick() if args.quick else EvalConfig()
    if args.prompts is not None:
        if not 1 <= args.prompts <= len(EVAL_PROMPTS):
            raise CLIError(f"--prompts {args.prompts}: expected 1 to {len(EVAL_PROMPTS)}")
        cfg.prompts = EVAL_PROMPTS[:args.prompts]
    if args.seeds is not None:
        cfg.seeds = tuple(range(_at_least_one("--seeds", args.seeds)))
    if args.modes is not None:
        cfg.modes = _subset("--modes", args.modes, MODES)
    if args.scales is not None:
        cfg.scales = _subset("--scales", args.scales, list(SCALES))
    cfg.steps = _at_least_one("--steps", args.steps)
    cfg.high_res_strength, cfg.high_res_steps = _shortened_pass(args, cfg.steps)
    cfg.guidance_scale = args.guidance
    cfg.save_images = args.save_images
    try:
        cfg.am_lambda = check_am_lambda(args.am_lambda)
    except ValueError:
        raise CLIError(f"--am-lambda {args.am_lambda}: expected a number from 0 to 1") from None
    _threads(args.threads)
    from fam.distributed import init

    ctx = init("cpu")  # alone, or this rank's share under torchrun / accelerate launch (CPU: gloo)
    fp = load_fam_pipeline(path=args.model)
    if args.am_layers is not None:
        cfg.am_layers = args.am_layers.split(",")
        try:
            resolve_am_layers(fp.pipe.unet, cfg.am_layers)
        except ValueError as error:
            raise CLIError(f"--am-layers {args.am_layers!r}: {str(error).removeprefix('am_layers: ')}") from None
    csv_path = os.path.join(args.out, "quality.csv") if args.csv is None else args.csv
    md_path = os.path.join(args.out, "quality.md") if args.md is None else args.md
    samples_path = os.path.join(args.out, "quality_samples.csv") if args.samples_csv is None else args.samples_csv
    try:
        evaluate(cfg, csv_path or None, md_path or None, log=lambda m: print(m, flush=True), fam_pipe=fp, ctx=ctx,
                 samples_path=samples_path or None)
    finally:
        ctx.close()
    return 0


def add_eval_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    from .evaluation import DEFAULT_GUIDANCE, DEFAULT_STEPS, MODES, SCALES

    p.add_argument("--quick", action="store_true", help="4 prompts x 1 seed, scales 2x2 and 4x4")
    p.add_argument("--prompts", type=int, default=None, help="use the first N evaluation prompts (max 8)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--scales", default=None, help=f"comma-separated subset of {','.join(SCALES)}")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--high-res-strength", type=float, default=1.0, metavar="S",
                   help="start the high-res pass where its schedule has S of its steps left, from the diffused "
                        "upsampled native latent (0 < S <= 1; default 1.0, the paper); modes with a native pass "
                        "only, direct always runs the full schedule")
    p.add_argument("--high-res-steps", type=int, default=None, metavar="K",
                   help="step count of the high-res schedule (default: --steps, the paper; the native pass keeps "
                        "--steps); modes with a native pass only")
    p.add_argument("--am-layers", default=None, metavar="LAYERS",
                   help="comma-separated self-attention layers or block prefixes for AM in modes am and fam "
                        "(default: up_blocks.0, as in the paper), e.g. up_blocks.0,up_blocks.1")
    p.add_argument("--am-lambda", type=float, default=0.7, metavar="LAMBDA",
                   help="AM blend weight of the native attention, 0 to 1 (default 0.7, as in the paper)")
    p.add_argument("--out", default=default_out,
                   help="folder for quality.csv, quality.md and quality_samples.csv (one row per image)")
    p.add_argument("--csv", default=None, help="CSV path (overrides --out; '' to skip)")
    p.add_argument("--samples-csv", default=None,
                   help="per-image CSV path, read by fam_demo.compare (overrides --out; '' to skip)")
    p.add_argument("--md", default=None, help="markdown path (overrides --out; '' to skip)")
    p.add_argument("--save-images", default=None, metavar="DIR", help="also save every generated image")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    _add_model_argument(p)


def _add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a demo-layout StableDiffusionXLPipeline folder, e.g. a training checkpoint "
                        "(default: the embedded model)")


def configure_demo(p: argparse.ArgumentParser) -> None:
    p.description = ("Load the embedded demo model offline and generate, for a few prompts, the native image "
                     "and the 2x2, 3x3, 4x4 and 2x4 (height x width) results in modes fam, direct and "
                     "direct_native; write the PNGs and one labelled contact sheet.")
    p.add_argument("--out", default="fam-demo-output", help="output folder (default ./fam-demo-output)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per pass (default 20)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for several); default: three built-in captions")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    _add_model_argument(p)
    p.set_defaults(func=cmd_demo)


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.description = "Object count, structure consistency (PSNR/SSIM) and detail per mode and scale."
    add_eval_arguments(p, default_out="fam-eval-output")
    p.set_defaults(func=cmd_eval)
