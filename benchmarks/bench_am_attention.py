"""Benchmark of fam_kernels.am_attention at SDXL up_blocks.0 shapes.

B = 2 (CFG), 20 heads, d = 64, native grid 32x32; high-res 64x64 (2x), 96x96 (3x),
128x128 (4x) and 64x128 (2x4). Providers: every backend that runs on the device,
plain SDPA on the same high-res q/k/v (AM cannot cost less than that one
attention) and the materialised eq. 7 oracle where it fits in its memory cap
(otherwise the bytes it would need are reported). Time is the median over repeats
after warm-up, the providers taking turns in each round; peak memory is measured in a fresh process per provider, inputs
excluded. Writes am_attention.{csv,md,png} (time and peak memory vs token count per
provider, with the materialised form's memory) into --out (default
benchmarks/results/local/).

    python -m benchmarks.bench_am_attention [--quick] [--device cpu|cuda] [--out DIR] [--plot-only]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import statistics
import textwrap

import torch
import torch.nn.functional as F

import fam_kernels
from fam_kernels.reference import DEFAULT_MAX_BYTES, am_attention_materialized

from .common import (
    Timing,
    add_output_arguments,
    device_description,
    figure,
    markdown_table,
    metric_medians,
    peak_rss_of,
    plot_lines,
    read_csv,
    row,
    save_figure,
    time_fn,
    write_csv,
    write_text,
)

am = importlib.import_module("fam_kernels.am_attention")  # the op's module

B, HEADS, D, LAM = 2, 20, 64, 0.7
NATIVE = (32, 32)
# label, high-res grid, (warmup, repeats) -- fewer repeats where one call takes many seconds on a CPU
SHAPES = [
    ("2x 64x64", (64, 64), (1, 5)),
    ("2x4 64x128", (64, 128), (1, 3)),
    ("3x 96x96", (96, 96), (1, 3)),
    ("4x 128x128", (128, 128), (0, 2)),
]
QUICK_SHAPES = [("2x 64x64", (64, 64), (1, 2))]
TIME_TARGET, MEMORY_TARGET = 1.05, 1.10


def make_inputs(hr, device, dtype):
    g = torch.Generator().manual_seed(0)
    N, n = hr[0] * hr[1], NATIVE[0] * NATIVE[1]
    hr_t = [torch.randn(B, HEADS, N, D, generator=g).to(device, dtype) for _ in range(3)]
    lr_t = [torch.randn(B, HEADS, n, D, generator=g).to(device, dtype) for _ in range(2)]
    return (*hr_t, *lr_t)


def oracle_bytes(N: int, dtype=torch.float32) -> int:
    """What am_attention_materialized needs for its N x N maps (its own formula)."""
    return 3 * B * HEADS * N * N * torch.empty((), dtype=dtype).element_size()


def providers(device: str):
    """name -> call(q, k, v, q_lr, k_lr, hr) for every provider that runs here."""
    out = {}
    for name, backend in am.DISPATCHER.backends.items():
        if not backend.not_supported_reasons(device, head_dim=D) and not (name == "triton" and device == "cpu"):
            out[name] = (f"fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam={LAM}, hr_size=hr, "
                         f"lr_size={NATIVE}, backend={name!r})")
    out["sdpa"] = "F.scaled_dot_product_attention(q, k, v)"
    out["materialized"] = f"am_attention_materialized(q, k, v, q_lr, k_lr, lam={LAM}, hr_size=hr, lr_size={NATIVE})"
    return out


def measure_peak(call: str, hr, device: str, dtype) -> int:
    return peak_rss_of(f"""
        import torch, torch.nn.functional as F, fam_kernels
        from fam_kernels.reference import am_attention_materialized
        from benchmarks.bench_am_attention import make_inputs
        hr = {hr}
        q, k, v, q_lr, k_lr = make_inputs(hr, {device!r}, {dtype})
        _fam_mark()
        out = {call}
    """, timeout=900)


def time_interleaved(fns: dict, device: str, warmup: int, repeats: int) -> dict:
    """Median wall time per provider, the providers taking turns in every round so
    that load from other processes on a shared machine hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_fn(fn, device=device, warmup=0, repeats=1).median)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=5, method="inclusive") if len(s) >= 2 else [s[0]] * 4
        out[name] = Timing(statistics.median(s), q[0], q[3], len(s))
    return out


def run(shapes, device: str, dtype) -> list:
    results = []
    calls = providers(device)
    for label, hr, (warmup, repeats) in shapes:
        N = hr[0] * hr[1]
        inputs = make_inputs(hr, device, dtype)
        scope = dict(F=F, fam_kernels=fam_kernels, am_attention_materialized=am_attention_materialized, hr=hr)
        scope.update(zip(("q", "k", "v", "q_lr", "k_lr"), inputs))
        runnable, entries = {}, []
        for name, call in calls.items():
            entry = dict(shape=label, provider=name, N=N, flops=4 * B * HEADS * N * N * D)
            entries.append(entry)
            if name == "materialized" and oracle_bytes(N) > DEFAULT_MAX_BYTES:
                entry["skipped"] = f"needs {oracle_bytes(N) / 2**30:.1f} GiB for its N x N maps"
            else:
                runnable[name] = eval("lambda: " + call, scope)
        timings = time_interleaved(runnable, device, warmup, repeats)
        del inputs, scope, runnable
        for entry in entries:
            if "skipped" in entry:
                print(label, entry["provider"], entry["skipped"], flush=True)
                continue
            entry["time"] = timings[entry["provider"]]
            entry["peak"] = measure_peak(calls[entry["provider"]], hr, device, dtype) if device == "cpu" else None
            print(label, entry["provider"], f"{entry['time'].median:.3f} s",
                  f"peak {(entry['peak'] or 0) / 2**20:.0f} MiB", flush=True)
        results.extend(entries)
    return results


def report(results, device: str, default: str, dtype, out: str):
    rows, body, verdicts = [], [], []
    by_shape = {}
    for e in results:
        by_shape.setdefault(e["shape"], {})[e["provider"]] = e
    for shape, entries in by_shape.items():
        sdpa = entries["sdpa"]
        for name, e in entries.items():
            if "skipped" in e:
                body.append([shape, name, "-", "-", "-", "-", "-", e["skipped"]])
                continue
            t = e["time"]
            tflops = e["flops"] / t.median / 1e12
            ratio_t = t.median / sdpa["time"].median
            rows.append(row("am_attention", name, "time", "s", shape, t.median, t.p20, t.p80, device))
            rows.append(row("am_attention", name, "attention_throughput", "TFLOP/s", shape, tflops, device=device))
            peak_mb = ratio_m = "-"
            if e["peak"] is not None:
                peak_mb = e["peak"] / 2**20
                ratio_m = e["peak"] / sdpa["peak"]
                rows.append(row("am_attention", name, "peak_memory", "MiB", shape, peak_mb, device=device))
            note = f"{t.repeats} runs, p20-p80 {t.p20:.3g}-{t.p80:.3g} s"
            body.append([shape, name + (" (default)" if name == default else ""), t.median, ratio_t, tflops,
                         peak_mb, ratio_m, note])
            if name == default:
                ok_t = ratio_t <= TIME_TARGET
                ok_m = ratio_m == "-" or ratio_m <= MEMORY_TARGET
                verdicts.append(f"- {shape}: time {ratio_t:.3f}x SDPA ({'met' if ok_t else 'NOT met'}), "
                                f"peak {ratio_m if ratio_m == '-' else f'{ratio_m:.3f}x'} SDPA "
                                f"({'met' if ok_m else 'NOT met'})")
    write_csv(os.path.join(out, "am_attention.csv"), rows)
    table = markdown_table(["shape", "provider", "time (s)", "x SDPA time", "attention TFLOP/s", "peak MiB",
                            "x SDPA peak", "notes"], body)
    text = textwrap.dedent(f"""\
        # am_attention benchmark

        Device: {device_description(device)}. Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC by
        `python -m benchmarks.bench_am_attention`. SDXL up_blocks.0 self-attention: B={B} (CFG), {HEADS} heads,
        d={D}, {str(dtype).replace("torch.", "")}, native grid {NATIVE[0]}x{NATIVE[1]}, lam={LAM}. `sdpa` is one plain
        `F.scaled_dot_product_attention` on the high-res q/k/v (the floor for AM);
        TFLOP/s counts that attention (4*B*heads*N^2*d) for every provider. Peak memory: fresh process per
        provider, inputs excluded. Automatic backend here: `{default}`.

        """) + table + "\n\nTargets for the default backend (<= 1.05x SDPA time, <= 1.10x SDPA peak):\n" + \
        "\n".join(verdicts) + "\n"
    write_text(os.path.join(out, "am_attention.md"), text)
    print(text)


def _tokens(shape: str) -> int:
    """``"2x4 64x128"`` -> 64 * 128 high-res tokens."""
    h, w = shape.split()[-1].split("x")
    return int(h) * int(w)


def plot(csv_path: str, png_path: str) -> None:
    """Time and peak memory vs high-res token count per provider (SDPA as the yardstick);
    the memory panel adds what the materialised eq. 7 needs for its N x N maps (fp32)."""
    rows = read_csv(csv_path)
    times, peaks = metric_medians(rows, "am_attention", "time"), metric_medians(rows, "am_attention", "peak_memory")
    shapes = sorted({x for x, _ in times}, key=_tokens)
    tokens = [_tokens(x) for x in shapes]
    names = list(dict.fromkeys(n for _, n in times))
    labels = [f"{x.split()[-1]}\nN={_tokens(x)}" for x in shapes]
    positions = range(len(shapes))  # evenly spaced, in token order
    fig, (time_ax, memory_ax) = figure(2)
    plot_lines(time_ax, positions, {n: [times.get((x, n), float("nan")) for x in shapes] for n in names},
               logy=True, xlabel="high-res grid height x width, tokens N", ylabel="s (log)",
               title=f"am_attention time, B={B}, {HEADS} heads, d={D}, native {NATIVE[0]}x{NATIVE[1]}",
               xticklabels=labels)
    memory = {n: [peaks.get((x, n), float("nan")) for x in shapes] for n in names}
    memory["materialized"] = [oracle_bytes(n) / 2**20 for n in tokens]
    plot_lines(memory_ax, positions, memory, logy=True, xlabel="high-res grid height x width, tokens N",
               ylabel="peak MiB (log)", title="am_attention peak memory (materialized: its N x N maps)",
               xticklabels=labels)
    save_figure(fig, png_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 2x shape only, 2 repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    csv_path, png_path = os.path.join(args.out, "am_attention.csv"), os.path.join(args.out, "am_attention.png")
    if not args.plot_only:
        dtype = torch.float32 if args.device == "cpu" else torch.float16
        default = am.DISPATCHER.select(None, args.device, head_dim=D).name
        report(run(QUICK_SHAPES if args.quick else SHAPES, args.device, dtype), args.device, default, dtype,
               args.out)
    plot(csv_path, png_path)
    print(png_path)


if __name__ == "__main__":
    main()
