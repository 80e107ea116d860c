"""``fam plan``: predicted peak device memory, FLOPs and the option set to use, without a GPU."""

from __future__ import annotations

import argparse
import json
import sys

GIB = 2 ** 30
PHASE_COLUMNS = ("text", "native", "high_res", "decode", "decode_native")
MODES = ("fam", "fm", "am", "skip_residual", "direct_native", "direct")


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="predict peak GPU memory and FLOPs of a FAM call (traced on the meta device, no GPU)",
        description="Trace the real model (built from its configs on the meta device, no weights) through the "
                    "sampler's code: peak allocated memory per phase for every option set, FLOPs, the FAM/direct "
                    "FLOP ratio; with --max-memory, the fastest option set that fits.")
    p.add_argument("--model", default="sdxl", help="sdxl, sd15, sd21 (shipped configs) or a diffusers folder")
    p.add_argument("--height", type=int, help="target height in pixels (default 2x native)")
    p.add_argument("--width", type=int, help="target width in pixels (default 2x native)")
    p.add_argument("--native-height", type=int, help="native height (default: the model's)")
    p.add_argument("--native-width", type=int, help="native width (default: the model's)")
    p.add_argument("--mode", default="fam", choices=MODES)
    p.add_argument("--steps", type=int, default=50, help="denoising steps per pass (default 50)")
    p.add_argument("--images", type=int, default=1, help="images per call (num_images_per_prompt, default 1)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--attention", default="fused", choices=["fused", "math"],
                   help="fused: the GPU's flash/memory-efficient kernels (default); math: N x N scores")
    p.add_argument("--max-memory", help="device memory budget, e.g. 8GB (8e9 bytes) or 8GiB; picks the fastest "
                                        "option set that fits with the safety margin, exit 2 if none does")
    p.add_argument("--tflops", type=float, help="effective TFLOP/s for the time ranking (default 50)")
    p.add_argument("--h2d-gbps", type=float, help="host<->device GB/s for the time ranking (default 12)")
    p.add_argument("--allow-fp16-fix-vae", action="store_true",
                   help="let --max-memory choose option sets that need the fp16-fix VAE (a different VAE)")
    p.add_argument("--all", action="store_true", help="list every option set, not only the Pareto front")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


def _error(message: str) -> int:
    print(f"fam plan: error: {message}", file=sys.stderr)
    return 2


def _checked(args):
    """One-line argument errors before any work; returns plan() keyword arguments."""
    from .options import DEFAULT_H2D_GBPS, DEFAULT_TFLOPS, parse_bytes

    for name in ("height", "width", "native_height", "native_width"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be a positive number of pixels")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be >= 1")
    if args.images < 1:
        raise ValueError(f"--images {args.images}: must be >= 1")
    budget = None
    if args.max_memory is not None:
        try:
            budget = parse_bytes(args.max_memory)
        except ValueError as error:
            raise ValueError(f"--max-memory {error}") from None
    for name in ("tflops", "h2d_gbps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be > 0")
    return dict(height=args.height, width=args.width, native_height=args.native_height,
                native_width=args.native_width, mode=args.mode, steps=args.steps, images=args.images, dtype=args.dtype,
                attention=args.attention, max_memory=budget, allow_vae_fp16_fix=args.allow_fp16_fix_vae,
                tflops=args.tflops or DEFAULT_TFLOPS, h2d_gbps=args.h2d_gbps or DEFAULT_H2D_GBPS)


def _gib(n: int) -> str:
    return f"{n / GIB:6.2f}"


def _row_line(row, tag: str = "", am: bool = True) -> str:
    phases = " ".join(_gib(row.phases[p]) if p in row.phases else "     -" for p in PHASE_COLUMNS)
    return (f"{_gib(row.peak_bytes)} {_gib(row.required_bytes)} {phases} {row.seconds:8.0f}  "
            f"{row.options.label(am)}{tag}")


def format_plan(result, show_all: bool = False) -> str:
    from .options import MARGIN_FIXED_BYTES, MARGIN_FRACTION, pareto

    lines = []
    am = result.mode in ("fam", "am")
    (nh, nw), (th, tw) = result.native, result.target
    lines.append(f"fam plan: {result.model} mode {result.mode}, native {nh}x{nw} -> {th}x{tw}, {result.steps} steps, "
                 f"{result.dtype}, attention {result.attention} (traced on meta in {result.trace_seconds:.0f} s)")
    lines.append("weights: " + ", ".join(f"{n} {v / GIB:.2f} GiB" for n, v in result.weights.items()))
    flops = ", ".join(f"{n} {f / 1e12:.1f} TFLOP x{c}" for n, (f, c) in result.phase_flops.items())
    lines.append(f"FLOPs per call: {flops}")
    row = result.reported
    lines.append(f"FLOPs total {row.flops / 1e15:.2f} PFLOP; direct inference at the target size "
                 f"{result.direct_flops / 1e15:.2f} PFLOP; FAM/direct {result.flop_ratio(row):.3f} "
                 f"(predicted time ratio)")
    if result.am_cache_bytes:
        lines.append(f"AM cache (am_source cache): {result.am_cache_bytes / GIB:.2f} GiB for {result.steps} steps")
    lines.append("")
    lines.append("  peak   need   text native high_res decode dec_nat  time_s  option set  (GiB; need = peak + margin)")
    lines.append(_row_line(result.default, "   <- default", am))
    if result.chosen is not None and result.chosen is not result.default:
        lines.append(_row_line(result.chosen, "   <- chosen", am))
    if result.smallest not in (result.default, result.chosen):
        lines.append(_row_line(result.smallest, "   <- smallest peak", am))
    lines.append("")
    listed = sorted(result.rows, key=lambda r: r.seconds) if show_all else pareto(result.rows)
    lines.append("all option sets, fastest first:" if show_all else
                 "Pareto front (no other option set is both faster and smaller), fastest first:")
    lines.extend(_row_line(r, am=am) for r in listed)
    a = result.assumptions
    lines.append("")
    lines.append(f"peak = allocated bytes (torch.cuda.max_memory_allocated); need = peak x {1 + MARGIN_FRACTION:.2f} "
                 f"+ {MARGIN_FIXED_BYTES / GIB:.2f} GiB (CUDA context, cuBLAS/cuDNN workspaces, fragmentation); "
                 f"time = FLOPs / {a['tflops']:g} TFLOP/s + offload bytes / {a['h2d_gbps']:g} GB/s")
    if result.max_memory is not None:
        if result.chosen is None:
            s = result.smallest
            lines.append(f"--max-memory {result.max_memory / GIB:.2f} GiB: nothing fits; smallest achievable "
                         f"peak {s.peak_bytes / GIB:.2f} GiB (needs {s.required_bytes / GIB:.2f} GiB): "
                         f"{s.options.label(am)}")
        else:
            lines.append(f"--max-memory {result.max_memory / GIB:.2f} GiB: use {result.chosen.options.label(am)} "
                         f"(peak {result.chosen.peak_bytes / GIB:.2f} GiB, needs "
                         f"{result.chosen.required_bytes / GIB:.2f} GiB)")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        kwargs = _checked(args)
    except ValueError as error:
        return _error(str(error))
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()  # optional-dependency notices on import
    from .planner import plan

    try:
        result = plan(args.model, **kwargs)
    except ValueError as error:
        return _error(str(error))
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(format_plan(result, args.all))
    if result.max_memory is not None and result.chosen is None:
        if not args.json:
            print("fam plan: nothing fits --max-memory", file=sys.stderr)
        return 2
    return 0
