"""Whole-pipeline benchmark: "direct" vs "fam" (AM sources recompute and cache) at 2x
and 4x on an SDXL-structured model small enough for a CPU (SDXL's block layout and
transformer depths 1/2/10, shrunk channels, random weights).

Per configuration: time of the native pass, the high-res pass, FM in total (every
``fam_kernels.lowpass_blend`` call), AM's native recompute and ``am_attention``
calls, decoding, the whole call; peak resident memory of the call in a fresh
process. Targets: fam/direct <= 1 + native share + 0.05 (native share = native
pass / direct call) and peak memory fam <= 1.05 x direct.

Writes pipeline.{csv,md,png} (phase breakdown per scale and configuration) into --out
(default benchmarks/results/local/).

    python -m benchmarks.bench_pipeline [--quick] [--threads N] [--out DIR] [--plot-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from typing import Dict, List

import torch

from benchmarks.common import (
    add_output_arguments,
    device_description,
    figure,
    markdown_table,
    metric_medians,
    peak_rss_of,
    read_csv,
    row,
    save_figure,
    write_csv,
    write_text,
)

MODEL = dict(block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 2, 10), attention_heads=(2, 4, 8),
             layers_per_block=2, sample_size=32, vae_block_out_channels=(16, 32, 64, 64), text_hidden_size=32)
CONFIGS = {"direct": dict(mode="direct"), "fam-recompute": dict(mode="fam", am_source="recompute"),
           "fam-cache": dict(mode="fam", am_source="cache")}
PROMPT = "a lighthouse on a cliff at sunset"


def build():
    from fam import FAMPipeline
    from fam.testing import tiny_sdxl_pipeline

    return FAMPipeline.from_pipe(tiny_sdxl_pipeline(**MODEL))


class PhaseTimer:
    """Wall time of the two passes (from step callbacks), of every FM / AM op call and
    of the native recompute, collected by wrapping the module attributes the sampler
    calls through."""

    def __init__(self):
        import fam.pipeline
        import fam_kernels

        self.totals: Dict[str, float] = defaultdict(float)
        self.marks: List = []
        for module, name, key in ((fam_kernels, "lowpass_blend", "fm_s"), (fam_kernels, "am_attention", "am_op_s"),
                                  (fam.pipeline, "recompute_native_inputs", "am_recompute_s")):
            setattr(module, name, self._timed(getattr(module, name), key))

    def _timed(self, fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[key] += time.perf_counter() - start
        return wrapper

    def callback(self, pipe, step, t, tensors):
        self.marks.append((pipe.current_pass, time.perf_counter()))
        return {}

    def run(self, pipe, **kwargs) -> Dict[str, float]:
        self.totals.clear()
        self.marks.clear()
        start = time.perf_counter()
        out = pipe(PROMPT, callback_on_step_end=self.callback, output_type="np", **kwargs)
        end = time.perf_counter()
        native_end = max([t for p, t in self.marks if p == "native"], default=start)
        high_res_end = max(t for p, t in self.marks if p == "high_res")
        result = {"native_s": native_end - start, "high_res_s": high_res_end - native_end,
                  "decode_s": end - high_res_end, "total_s": end - start,
                  "fm_s": 0.0, "am_op_s": 0.0, "am_recompute_s": 0.0, **self.totals}
        result["cache_mb"] = (out.am_cache_bytes or 0) / 2 ** 20
        return result


def peak_memory(scale: int, config: str, steps: int, threads: int) -> int:
    kwargs = dict(CONFIGS[config], scale=scale, num_inference_steps=steps)
    return peak_rss_of(f"""
import torch
torch.set_num_threads({threads})
from benchmarks.bench_pipeline import build, PROMPT
pipe = build()
generator = torch.Generator().manual_seed(0)
_fam_mark()
pipe(PROMPT, generator=generator, output_type="np", **{kwargs!r})
""")


# stacked phases of one call: (label, CSV metric); "high-res UNet" is the high-res pass
# less the FM and AM parts measured inside it
PHASES = [("native pass", "native"), ("high-res UNet", None), ("FM", "fm"), ("AM recompute", "am_recompute"),
          ("AM op", "am_op"), ("decode", "decode")]


def plot(csv_path: str, png_path: str) -> None:
    """Per scale, one stacked bar per configuration: where the time of a call goes."""
    rows = read_csv(csv_path)
    values = {metric: metric_medians(rows, "pipeline", metric)
              for metric in ("native", "high_res", "fm", "am_recompute", "am_op", "decode")}
    scales = list(dict.fromkeys(x for x, _ in values["native"]))
    fig, axes = figure(len(scales), width=5.0, height=3.2)
    for ax, x in zip(axes, scales):
        configs = [config for scale, config in values["native"] if scale == x]
        left = [0.0] * len(configs)
        for label, metric in PHASES:
            if metric is None:
                widths = [values["high_res"][(x, c)] - sum(values[m][(x, c)] for m in ("fm", "am_recompute", "am_op"))
                          for c in configs]
            else:
                widths = [values[metric][(x, c)] for c in configs]
            ax.barh(range(len(configs)), widths, left=left, label=label)
            left = [a + w for a, w in zip(left, widths)]
        ax.set_yticks(range(len(configs)), configs)
        ax.invert_yaxis()
        ax.set(xlabel="seconds per call (median)", title=f"scale {x.split()[0]} (height x width)")
        ax.grid(True, axis="x", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(PHASES), fontsize="small")
    save_figure(fig, png_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 repeat")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: per-op overhead of a tiny model on a shared CPU)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    csv_path, md_path, png_path = (os.path.join(args.out, f"pipeline.{ext}") for ext in ("csv", "md", "png"))
    if args.plot_only:
        plot(csv_path, png_path)
        print(png_path)
        return
    steps = args.steps or (2 if args.quick else 4)
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)

    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    timer = PhaseTimer()
    pipe(PROMPT, num_inference_steps=1, scale=2, output_type="latent")  # warm-up
    device = device_description("cpu")
    native_latent = MODEL["sample_size"]

    measured = {}
    for scale in (2, 4):
        for config, kwargs in CONFIGS.items():
            runs = [timer.run(pipe, scale=scale, num_inference_steps=steps,
                              generator=torch.Generator().manual_seed(0), **kwargs) for _ in range(repeats)]
            stats = {key: sorted(r[key] for r in runs) for key in runs[0]}
            peak = peak_memory(scale, config, steps, args.threads)
            measured[(scale, config)] = (stats, peak)
            print(f"{scale}x {config}: total {statistics.median(stats['total_s']):.2f}s, peak {peak / 2**20:.0f} MB",
                  flush=True)

    rows, body = [], []
    for (scale, config), (stats, peak) in measured.items():
        x = f"{scale}x{scale} native latent {native_latent}^2, {steps} steps"
        for key, values in stats.items():
            unit = "MB" if key == "cache_mb" else "s"
            rows.append(row("pipeline", config, key[: -len("_s")] if unit == "s" else "am_cache", unit, x,
                            statistics.median(values), values[0], values[-1], device="cpu"))
        rows.append(row("pipeline", config, "peak_rss", "MB", x, peak / 2 ** 20, device="cpu"))
        direct_stats, direct_peak = measured[(scale, "direct")]
        median = {key: statistics.median(values) for key, values in stats.items()}
        direct_total = statistics.median(direct_stats["total_s"])
        ratio = median["total_s"] / direct_total
        share = median["native_s"] / direct_total
        target = 1 + share + 0.05
        memory_ratio = peak / direct_peak
        if config != "direct":
            rows.append(row("pipeline", config, "time_vs_direct", "x", x, ratio, device="cpu"))
            rows.append(row("pipeline", config, "peak_vs_direct", "x", x, memory_ratio, device="cpu"))
        body.append([f"{scale}x{scale}", config, median["native_s"], median["high_res_s"], median["fm_s"],
                     median["am_recompute_s"], median["am_op_s"], median["decode_s"], median["total_s"],
                     "-" if config == "direct" else f"{ratio:.2f} (<= {target:.2f}: "
                                                     f"{'met' if ratio <= target else 'missed'})",
                     peak / 2 ** 20,
                     "-" if config == "direct"
                     else f"{memory_ratio:.2f} ({'met' if memory_ratio <= 1.05 else 'missed'})",
                     median["cache_mb"]])

    write_csv(csv_path, rows)
    header = ["scale", "config", "native pass s", "high-res pass s", "FM s", "AM recompute s", "AM op s",
              "decode s", "total s", "vs direct (target)", "peak MB", "peak vs direct (<= 1.05)", "AM cache MB"]
    table = markdown_table(header, body)
    text = (f"# Pipeline benchmark: direct vs FAM\n\n"
            f"Device: {device}. Model: SDXL block layout (DownBlock2D, CrossAttnDown x2 / CrossAttnUp x2, "
            f"UpBlock2D; transformer depths 1/2/10; 2 layers per block), channels {MODEL['block_out_channels']}, "
            f"4-level VAE (factor 8), random weights; native latent {native_latent}x{native_latent} "
            f"({native_latent * 8} px), {steps} steps per pass, CFG batched, median of {repeats} run(s). "
            f"FM, AM op and AM recompute are included in the high-res pass time; peak memory is the resident-set "
            f"growth of one call in a fresh process.\n\n{table}\n")
    write_text(md_path, text)
    plot(csv_path, png_path)
    print(text)
    print(f"wrote {csv_path}, {md_path}, {png_path}")


if __name__ == "__main__":
    main()
