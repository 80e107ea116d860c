"""Benchmark lowpass_blend (Frequency Modulation) on SDXL latent shapes.

Every available backend, each form of the torch and cpu backends, the literal
eq. 4 reference (fp32 FFTs, as a user would run it) and the memory-bandwidth floor
(read z and z_ref, write one tensor: torch.sub into a preallocated output), all in
the same run. Mid-schedule (t = T/2, c = 0.5: cutoff = size/4, gain 0.5) at every
shape, and t/T in {0.1, 0.5, 0.9} at (2, 4, 512, 512). Also the Triton kernel's
ahead-of-time sm_80 / sm_90 register, spill and shared-memory figures.

    python -m benchmarks.bench_lowpass_blend [--quick] [--threads N] [--out DIR] [--plot-only]

Writes lowpass_blend.csv, .md and .png (time vs size per backend with the reference
and the floor; time vs t/T) into --out (default benchmarks/results/local/) and prints
the table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
from typing import Callable, Dict, List, Tuple

import torch

import fam_kernels
from benchmarks.common import (
    add_output_arguments,
    device_description,
    figure,
    markdown_table,
    metric_medians,
    plot_lines,
    read_csv,
    row,
    save_figure,
    time_fn,
    write_csv,
    write_text,
)
from fam_kernels import _lowpass_basis as basis
from fam_kernels.reference import lowpass_blend_reference

lp = importlib.import_module("fam_kernels.lowpass_blend")  # the op's module

OP = "lowpass_blend"
SHAPES = [(2, 4, 128, 128), (2, 4, 256, 256), (2, 4, 384, 384), (2, 4, 512, 512), (2, 4, 256, 512)]
ACROSS_T_SHAPE = (2, 4, 512, 512)
T = 1000


def cases() -> List[Tuple[Tuple[int, ...], float]]:
    mid = [(shape, 0.5) for shape in SHAPES]
    return mid + [(ACROSS_T_SHAPE, r) for r in (0.1, 0.9)]


def label(shape, rho) -> str:
    return f"{'x'.join(map(str, shape))} t/T={rho}"


def providers(z, zr, cutoff, gain) -> Dict[str, Callable[[], object]]:
    """Name -> callable, for everything that runs on z's device."""
    H, W = z.shape[-2:]
    kh, kw = basis.kept_bins(H, cutoff[0]), basis.kept_bins(W, cutoff[1])
    out = torch.empty_like(z)
    fns = {
        "reference": lambda: lowpass_blend_reference(z, zr, cutoff, gain),
        "floor": lambda: torch.sub(zr, z, out=out),
    }
    for name in lp.DISPATCHER.names:
        if not lp.DISPATCHER.backends[name].not_supported_reasons(z.device.type, z.dtype):
            fns[name] = (lambda b: lambda: fam_kernels.lowpass_blend(z, zr, cutoff, gain, backend=b))(name)
    fns["torch_lowrank"] = lambda: lp._torch_lowrank(z, zr, kh, kw, gain)
    fns["torch_spectral"] = lambda: lp._torch_spectral(z, zr, kh, kw, gain)
    if "cpu" in fns:
        bases = lp._folded_bases(z, kh, kw)
        mask = basis.fft_band_mask(H, kh, z.device)
        fns["cpu_lowrank"] = lambda: torch.ops.fam_C.lowpass_blend_lowrank(z, zr, *bases, gain)
        fns["cpu_spectral"] = lambda: torch.ops.fam_C.lowpass_blend_spectral(z, zr, mask, kw, gain)
    return fns


def run_timings(device: str, quick: bool):
    """Providers are timed round-robin (several rounds of a few calls each), so a burst
    of load from other jobs on a shared machine does not land on one provider only;
    the median, p20 and p80 are over the rounds' medians."""
    rounds, per_round = (2, 2) if quick else (7, 3)
    rows, medians = [], {}
    for shape, rho in cases():
        z = torch.randn(shape, device=device)
        zr = torch.randn(shape, device=device)
        cutoff, gain = fam_kernels.fm_schedule(rho * T, T, shape[-2], shape[-1])
        x = label(shape, rho)
        fns = providers(z, zr, cutoff, gain)
        samples = {name: [] for name in fns}
        for r in range(rounds):
            for name, fn in fns.items():
                samples[name].append(time_fn(fn, device=device, warmup=1, repeats=per_round).median)
        for name, values in samples.items():
            values.sort()
            medians[(x, name)] = statistics.median(values)
            p20, p80 = values[int(0.2 * (len(values) - 1))], values[int(round(0.8 * (len(values) - 1)))]
            rows.append(row(OP, name, "time", "ms", x, medians[(x, name)] * 1e3, p20 * 1e3, p80 * 1e3, device=device))
        print(f"  {x}: " + ", ".join(f"{n} {medians[(x, n)] * 1e3:.2f}" for n in fns), flush=True)
    return rows, medians


def aot_figures():
    """(rows for the CSV, table body) of the Triton kernel's default config per arch and variant."""
    from fam_kernels.triton import lowpass_blend as k
    from fam_kernels.triton.aot import ARCHS, compile_kernel

    rows, body = [], []
    for arch in ARCHS:
        for variant in k.LAUNCHED_VARIANTS:
            signature, constexprs = k.aot_signature(*variant)
            rep = compile_kernel(k.lowpass_gemm_kernel, signature, constexprs, arch, num_warps=k.DEFAULT_NUM_WARPS)
            name = f"diff={int(variant[0])} blend={int(variant[1])} {variant[2]}"
            for metric, unit, value in (("registers", "count", rep.registers), ("spills", "bytes", rep.spills),
                                        ("shared_memory", "bytes", rep.shared_bytes)):
                rows.append(row(OP + "_triton_aot", f"sm_{arch}", metric, unit, name, value))
            body.append([f"sm_{arch}", name, rep.registers, rep.spills, rep.shared_bytes])
    return rows, body


def report(medians, device: str, aot_body) -> str:
    names = sorted({n for _, n in medians}, key=lambda n: (n not in ("reference", "floor"), n))
    xs = list(dict.fromkeys(x for x, _ in medians))
    backends = [n for n in lp.DISPATCHER.names if any((x, n) in medians for x in xs)]
    header = ["case"] + [f"{n} ms" for n in names] + [f"{b} speed-up vs reference" for b in backends] + \
        [f"{b} / floor" for b in backends]
    body = []
    for x in xs:
        ms = [medians.get((x, n), float("nan")) * 1e3 for n in names]
        speedups = [medians[(x, "reference")] / medians[(x, b)] for b in backends]
        floors = [medians[(x, b)] / medians[(x, "floor")] for b in backends]
        body.append([x] + ms + speedups + floors)
    auto = lp.DISPATCHER.select(None, device, torch.float32).name
    parts = [
        f"# {OP} benchmark\n",
        f"Device: {device_description(device)}; torch {torch.__version__}; fp32; medians. "
        f"Default backend here: `{auto}`. Mid-schedule: t = T/2, c = 0.5 (cutoff = size/4, gain 0.5). "
        "`floor`: read z and z_ref, write one tensor (torch.sub into a preallocated output). "
        "`*_lowrank` / `*_spectral`: the two forms the torch and cpu backends choose between.\n",
        markdown_table(header, body),
    ]
    if aot_body:
        parts += ["\n## Triton kernel, default config (BLOCK 64x64x32, 4 warps), ahead-of-time compile\n",
                  markdown_table(["arch", "variant", "registers", "spill bytes", "shared bytes"], aot_body)]
    return "\n".join(parts) + "\n"


def _case(x: str):
    """``"2x4x256x512 t/T=0.5"`` -> ((H, W), 0.5)."""
    shape, rho = x.split(" t/T=")
    return tuple(int(n) for n in shape.split("x")[-2:]), float(rho)


def plot(csv_path: str, png_path: str) -> None:
    """Time vs size at mid-schedule (log-log) and vs t/T at the largest square size, per provider."""
    times = metric_medians(read_csv(csv_path), OP, "time")
    names = list(dict.fromkeys(n for _, n in times))
    cases = {x: _case(x) for x, _ in times}

    forms = [n for n in names if n.endswith(("_lowrank", "_spectral"))]  # the two forms inside cpu / torch

    def series(xs):
        return {n: [times.get((x, n), float("nan")) for x in xs] for n in names}

    fig, (by_size, by_t) = figure(2)
    mid = sorted((x for x in cases if cases[x][1] == 0.5), key=lambda x: cases[x][0][0] * cases[x][0][1])
    plot_lines(by_size, range(len(mid)), series(mid), logy=True, secondary=forms,
               xlabel="latent height x width (batch 2, 4 channels), by pixel count", ylabel="ms (log)",
               title="lowpass_blend at t = T/2 (c = 0.5)", xticklabels=["%dx%d" % cases[x][0] for x in mid])
    square = max(hw for hw, _ in cases.values() if hw[0] == hw[1])
    across = sorted((x for x in cases if cases[x][0] == square), key=lambda x: cases[x][1])
    plot_lines(by_t, [cases[x][1] for x in across], series(across), logy=True, secondary=forms, xlabel="t / T",
               ylabel="ms (log)", title="lowpass_blend at %dx%d across the schedule" % square)
    save_figure(fig, png_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a CPU shared with other jobs")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    csv_path, md_path, png_path = (os.path.join(args.out, f"{OP}.{ext}") for ext in ("csv", "md", "png"))
    if args.plot_only:
        plot(csv_path, png_path)
        print(png_path)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{OP}: {device_description(device)}", flush=True)
    rows, medians = run_timings(device, args.quick)
    try:
        aot_rows, aot_body = aot_figures()
    except Exception as exc:  # no Triton or no ptxas: the timings still stand
        print(f"Triton AOT figures unavailable: {type(exc).__name__}: {exc}")
        aot_rows, aot_body = [], []
    write_csv(csv_path, rows + aot_rows)
    text = report(medians, device, aot_body)
    write_text(md_path, text)
    plot(csv_path, png_path)
    print(text)
    print(f"wrote {csv_path}, {md_path}, {png_path}")


if __name__ == "__main__":
    main()
