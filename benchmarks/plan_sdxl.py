"""The planner's table for real SDXL (public configs, meta device): predicted peak
allocated memory and FLOPs at 1024^2, 2048^2, 3072^2, 4096^2 and 2x4 (2048x4096), for
the default option set, the minimum-memory one and the fastest one within 8 GiB.

    python -m benchmarks.plan_sdxl [--out benchmarks/results/local] [--sizes 1024x1024,4096x4096]

Writes plan_sdxl.csv and plan_sdxl.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import time

from fam._io import atomic_open
from fam.plan import plan, required_memory
from fam.plan.models import load_meta_pipeline
from fam.plan.phases import Tracer

GIB = 2 ** 30
SIZES = ("1024x1024", "2048x2048", "3072x3072", "4096x4096", "2048x4096")
BUDGET = 8 * GIB  # an "8 GB" card
FIELDS = ["model", "target", "option_set", "options", "peak_gib", "required_gib", "text_gib", "native_gib",
          "high_res_gib", "decode_gib", "decode_native_gib", "peak_without_cache_release_gib", "pflops",
          "direct_pflops", "flop_ratio_fam_direct", "predicted_s", "trace_s", "machine", "timestamp"]


def _row(result, kind, row, machine, stamp):
    g = lambda n: round(n / GIB, 2)  # noqa: E731
    return {"model": "sdxl", "target": f"{result.target[0]}x{result.target[1]}", "option_set": kind,
            "options": row.options.label(), "peak_gib": g(row.peak_bytes), "required_gib": g(row.required_bytes),
            **{f"{p}_gib": g(row.phases.get(p, 0)) for p in ("text", "native", "high_res", "decode",
                                                              "decode_native")},
            "peak_without_cache_release_gib": g(row.peak_bytes_unreleased), "pflops": round(row.flops / 1e15, 2),
            "direct_pflops": round(result.direct_flops / 1e15, 2),
            "flop_ratio_fam_direct": round(result.flop_ratio(row), 3), "predicted_s": round(row.seconds),
            "trace_s": round(result.trace_seconds, 1), "machine": machine, "timestamp": stamp}


def run(sizes, steps: int = 50):
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores (planner host; meta device)"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    tracer = Tracer(load_meta_pipeline("sdxl"))
    rows = []
    for size in sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        start = time.perf_counter()
        result = plan(None, height, width, steps=steps, tracer=tracer)
        result.trace_seconds = time.perf_counter() - start
        fitting = [r for r in result.choosable if required_memory(r.peak_bytes) <= BUDGET]
        chosen = {"default": result.default, "min_memory": result.smallest}
        if fitting:
            chosen["fastest_within_8GiB"] = min(fitting, key=lambda r: (r.seconds, r.peak_bytes))
        chosen["min_memory_fp16_fix_vae"] = min(result.rows, key=lambda r: (r.peak_bytes, r.seconds))
        for kind, row in chosen.items():
            rows.append(_row(result, kind, row, machine, stamp))
        print(f"{size}: done in {result.trace_seconds:.0f} s", flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| target | option set | options | peak GiB | needs GiB | high-res step | decode | FAM/direct FLOPs "
             "| predicted s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['option_set']} | {r['options']} | {r['peak_gib']} | {r['required_gib']} "
                     f"| {r['high_res_gib']} | {r['decode_gib']} | {r['flop_ratio_fam_direct']} | {r['predicted_s']} |")
    lines.append("")
    lines.append("SDXL base 1.0 (public configs), FAM, 50 steps, fp16, one image, attention = fused kernels; "
                 "peak = allocated bytes incl. weights; needs = peak x 1.05 + 0.75 GiB; 8 GiB = an '8 GB' card; "
                 "predicted s at 50 TFLOP/s and 12 GB/s host-device; min_memory and fastest_within_8GiB keep the "
                 "stock VAE, min_memory_fp16_fix_vae may swap in the fp16-fix VAE. "
                 f"Planner run on {rows[0]['machine']}, {rows[0]['timestamp']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "local"))
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    rows = run(args.sizes.split(","), args.steps)
    os.makedirs(args.out, exist_ok=True)
    with atomic_open(os.path.join(args.out, "plan_sdxl.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_open(os.path.join(args.out, "plan_sdxl.md"), "w") as f:
        f.write(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
