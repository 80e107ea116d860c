"""FAM's quality/time frontier for a shortened high-res pass on the embedded demo model.

For every scale (4x4 first, the target; then 2x2, 3x3, 2x4) and every setting of
FAMPipeline's ``high_res_strength`` s (1.0 ... 0.3) and ``high_res_steps`` K (N, 2N/3,
N/2 of the native pass's N steps), mode ``fam`` generates one image per (prompt, seed)
and ``fam_demo.evaluation.measure`` scores it as ``fam eval`` does (one object, LR
consistency PSNR/SSIM, detail x bicubic). Timing: one round per (prompt, seed) runs
``direct`` (full schedule) twice, at the start and in the middle, and every setting once
in a rotated order; each setting's time is divided by the mean of that round's two
``direct`` times, and the table reports the median of these ratios over the rounds.
The high-res pass runs int(K s) steps (diffusers' img2img rule).

fam-fast is picked from the data: the fastest setting whose one-object share is at least
full fam's minus one sample, whose PSNR is at least full fam's - 0.5 dB and whose
detail x bicubic is at least 75% of full fam's (same scale). The FLOP projection to SDXL
uses ``fam.plan``'s per-phase FLOPs (see ``project``).

Results are rewritten (atomically) after every round, so an interrupted run leaves a
usable table: ``frontier.csv`` (one row per scale and setting), ``frontier_samples.csv``
(every image), ``frontier.md``, ``frontier.png``.

    python benchmarks/bench_frontier.py                         # -> benchmarks/results/local/
    python benchmarks/bench_frontier.py --out benchmarks/results --seeds 2
    python benchmarks/bench_frontier.py --plot-only --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_output_arguments, device_description, figure, save_figure, write_text  # noqa: E402
from fam._io import atomic_open  # noqa: E402

STRENGTHS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3)
STEP_FRACTIONS = ((1, 1), (2, 3), (1, 2))  # K = round(N * a / b)
REDUCED_STRENGTHS = (1.0, 0.6, 0.5, 0.4, 0.3)
SCALE_ORDER = ("4x4", "2x2", "3x3", "2x4")
NATIVE_SIZE = (64, 64)  # the demo model's
SDXL_SIDES = (2048, 3072, 4096)
SDXL_STEPS = 50
# the pick's thresholds, relative to full fam at the same scale
PSNR_MARGIN_DB = 0.5
DETAIL_SHARE = 0.75

SAMPLE_FIELDS = ["round", "scale", "prompt", "seed", "mode", "high_res_strength", "high_res_steps", "steps_run",
                 "count", "native_count", "psnr", "ssim", "detail", "seconds", "direct_seconds", "time_ratio",
                 "load1", "top_band_share"]
ROW_FIELDS = ["scale", "mode", "high_res_strength", "high_res_steps", "steps_run", "n", "one_object",
              "one_object_given_native", "mean_count", "psnr", "ssim", "detail", "detail_vs_fam", "top_band_share",
              "seconds_median",
              "time_ratio_median", "time_ratio_p20", "time_ratio_p80", "time_ratio_fit", "eligible", "fam_fast"]


def step_counts(n: int) -> List[int]:
    return sorted({round(n * a / b) for a, b in STEP_FRACTIONS}, reverse=True)


def settings(n: int) -> List[Tuple[float, int]]:
    """(high_res_strength, high_res_steps) of the grid, from full fam down."""
    return [(s, k) for k in step_counts(n) for s in STRENGTHS]


def reduced_settings(n: int, extra: Sequence[Tuple[float, int]] = ()) -> List[Tuple[float, int]]:
    """The grid at the scales after the first (``--other-grid reduced``): K in {N, N/2},
    s in REDUCED_STRENGTHS, plus ``extra`` (the first scale's fam-fast)."""
    ks = (n, round(n / 2))
    grid = [(s, k) for k in ks for s in REDUCED_STRENGTHS]
    return grid + [g for g in extra if g not in grid]


# ------------------------------------------------------------------------------ measurement

@dataclass
class Measured:
    round: int
    scale: str
    prompt: str
    seed: int
    mode: str
    high_res_strength: float
    high_res_steps: int
    steps_run: int
    count: int
    native_count: int
    psnr: float
    ssim: float
    detail: float
    seconds: float
    direct_seconds: float = math.nan
    time_ratio: float = math.nan
    load1: float = math.nan
    top_band_share: float = math.nan


def top_band_share(high, native_size: Tuple[int, int]) -> float:
    """Share of the energy above the native band (what detail x bicubic counts) that lies
    in the top quarter of the frequencies (periods under 8/3 px along either axis):
    checkerboard and grid artefacts sit there, drawn texture mostly below. Uses
    fam_demo.metrics.highband_energy for both bands."""
    from fam_demo.metrics import highband_energy, to_float

    h, w = to_float(high).shape[:2]
    above = highband_energy(high, native_size)
    return highband_energy(high, (3 * h // 4, 3 * w // 4)) / above if above > 0 else math.nan


def image_name(prompt: str, seed: int, scale: str, mode: str, strength: float, k: int) -> str:
    from fam_demo.evaluation import _slug

    return f"{_slug(prompt)}_s{seed}_{scale}_{mode}" + (f"_hrs{strength:g}_hrk{k}" if mode != "direct" else "")


def run_round(fp, index: int, scale: str, prompt: str, seed: int, steps: int, guidance: float,
              grid: Sequence[Tuple[float, int]], save_images: Optional[str], log) -> List[Measured]:
    """One (prompt, seed): direct at the start and in the middle, every setting once,
    the settings' order rotated by the round index."""
    from fam._io import save_png
    from fam_demo.evaluation import _pil, high_res_steps_run, measure

    order = list(grid[index % len(grid):]) + list(grid[:index % len(grid)])
    half = len(order) // 2
    plan = [("direct", None)] + [("fam", g) for g in order[:half]] + [("direct", None)] + \
           [("fam", g) for g in order[half:]]
    natives: Dict = {}
    out: List[Measured] = []
    load = os.getloadavg()[0]
    for mode, setting in plan:
        strength, k = setting or (1.0, None)
        sample, high, _ = measure(fp, prompt, seed, mode, scale, natives, steps=steps, guidance_scale=guidance,
                                  high_res_strength=strength, high_res_steps=k)
        run = high_res_steps_run(steps, sample.high_res_strength, sample.high_res_steps)
        out.append(Measured(index, scale, prompt, seed, mode, sample.high_res_strength, sample.high_res_steps, run,
                            sample.count, sample.native_count, sample.psnr, sample.ssim, sample.detail,
                            sample.seconds, load1=load, top_band_share=top_band_share(high, NATIVE_SIZE)))
        if save_images:
            name = image_name(prompt, seed, scale, mode, sample.high_res_strength, sample.high_res_steps)
            save_png(_pil(high), os.path.join(save_images, name + ".png"))
    direct = statistics.mean(m.seconds for m in out if m.mode == "direct")
    for m in out:
        m.direct_seconds, m.time_ratio = direct, m.seconds / direct
    full = next(m.time_ratio for m in out if m.mode == "fam" and m.steps_run == steps)
    log(f"round {index} {scale} seed {seed} '{prompt}': direct {direct:.2f}s, load {load:.1f}->"
        f"{os.getloadavg()[0]:.1f}, fam full {full:.2f}x")
    return out


# ------------------------------------------------------------------------------ aggregation

def _quantile(values: Sequence[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=5, method="inclusive")[int(q * 5) - 1]


def _fit_ratio(steps_run: Sequence[int], ratios: Sequence[float]):
    """Least-squares line ratio = a + b m over every fam image of a scale (m: high-res
    steps run): the cost model of a setting, far less noisy on a shared machine than one
    setting's own median (all settings share it). Falls back to NaN with < 2 step counts."""
    import numpy as np

    if len(set(steps_run)) < 2:
        return lambda m: math.nan
    b, a = np.polyfit(np.asarray(steps_run, float), np.asarray(ratios, float), 1)
    return lambda m: float(a + b * m)


def aggregate(measured: Sequence[Measured], steps: int) -> List[Dict[str, object]]:
    """One row per (scale, mode, setting): quality through fam_demo.evaluation.aggregate,
    time ratios as median (p20, p80) over the rounds; eligibility and the pick."""
    from fam_demo.evaluation import Sample
    from fam_demo.evaluation import aggregate as quality

    rows: List[Dict[str, object]] = []
    for scale in [s for s in SCALE_ORDER if any(m.scale == s for m in measured)]:
        group = [m for m in measured if m.scale == scale]
        seen, once = set(), []  # direct runs twice a round (timing); its image counts once
        for m in group:
            key = (m.round, m.mode, m.high_res_strength, m.high_res_steps)
            if key not in seen:
                seen.add(key)
                once.append(m)
        samples = [Sample(m.prompt, m.seed, m.mode, m.scale, m.count, m.native_count, m.psnr, m.ssim, m.detail,
                          m.seconds, high_res_strength=m.high_res_strength, high_res_steps=m.high_res_steps)
                   for m in once]
        fam_samples = [m for m in group if m.mode == "fam"]
        fit = _fit_ratio([m.steps_run for m in fam_samples], [m.time_ratio for m in fam_samples])
        scale_rows = []
        for q in quality(samples):
            mine = [m for m in group if (m.mode, m.high_res_strength, m.high_res_steps) ==
                    (q.mode, q.high_res_strength, q.high_res_steps)]
            ratios = [m.time_ratio for m in mine]
            scale_rows.append({
                "scale": scale, "mode": q.mode, "high_res_strength": q.high_res_strength,
                "high_res_steps": q.high_res_steps, "steps_run": mine[0].steps_run, "n": q.n,
                "one_object": q.one_object, "one_object_given_native": q.one_object_given_native,
                "mean_count": q.mean_count, "psnr": q.psnr, "ssim": q.ssim, "detail": q.detail,
                "detail_vs_fam": math.nan,
                "top_band_share": statistics.median(m.top_band_share for m in mine),
                "seconds_median": statistics.median(m.seconds for m in mine),
                "time_ratio_median": statistics.median(ratios), "time_ratio_p20": _quantile(ratios, 0.2),
                "time_ratio_p80": _quantile(ratios, 0.8),
                "time_ratio_fit": 1.0 if q.mode == "direct" else fit(mine[0].steps_run),
                "eligible": "", "fam_fast": ""})
        pick(scale_rows, steps)
        rows += scale_rows
    return rows


def _speed(r: Dict[str, object]) -> Tuple[float, float]:
    """Sort key of the pick: the fitted ratio (the steps run), then the measured median."""
    fit = r.get("time_ratio_fit", math.nan)
    return (r["time_ratio_median"] if fit != fit else fit, r["time_ratio_median"])


def pick(rows: List[Dict[str, object]], steps: int) -> Optional[Dict[str, object]]:
    """Mark the settings within the noise of full fam (same scale) and the fastest of them
    (by the fitted cost model, i.e. the fewest high-res steps run; ties: the measured median)."""
    full = next((r for r in rows if r["mode"] == "fam" and r["high_res_strength"] == 1.0
                 and r["high_res_steps"] == steps), None)
    if full is None:
        return None
    best = None
    for r in rows:
        if r["mode"] != "fam":
            continue
        r["detail_vs_fam"] = r["detail"] / full["detail"]
        ok = (r["one_object"] >= full["one_object"] - 1 / r["n"] - 1e-9
              and r["psnr"] >= full["psnr"] - PSNR_MARGIN_DB and r["detail_vs_fam"] >= DETAIL_SHARE)
        r["eligible"] = "yes" if ok else "no"
        if ok and r is not full and (best is None or _speed(r) < _speed(best)):
            best = r
    if best is not None:
        best["fam_fast"] = "yes"
    return best


# ------------------------------------------------------------------------------ SDXL projection

def sdxl_phase_flops(sides: Sequence[int] = SDXL_SIDES, steps: int = SDXL_STEPS) -> Dict[str, Dict]:
    """fam.plan's per-phase FLOPs of fam (default options: AM source recompute) and direct's
    total FLOPs, per target side (square, native 1024)."""
    from fam.plan import plan

    out = {}
    for side in sides:
        p = plan("sdxl", side, side, mode="fam", steps=steps)
        out[str(side)] = {"steps": steps, "direct_flops": p.direct_flops,
                          "phase_flops": {k: list(v) for k, v in p.phase_flops.items()}}
    return out


def project(flops: Dict, strength: float, fraction: float, conservative: bool = False) -> float:
    """Predicted fam / direct time ratio, time taken proportional to FLOPs:

        F = text + N native_step + m high_res_step + decode + decode_native,
        m = int(K s), K = round(N fraction)  (the high-res steps run; high_res_step
        includes the AM native-attention recompute, one per high-res step)

    divided by direct's text + N direct_step + decode (fam.plan's ``flops_direct``).
    ``conservative``: high_res_step costed at least as direct's step (its share of
    ``flops_direct``) plus the native recompute, in case the AM layers' count is low."""
    from fam.attach import start_step

    n = flops["steps"]
    ph = {k: v[0] for k, v in flops["phase_flops"].items()}
    k = max(1, round(n * fraction))
    m = k - start_step(k, strength)
    step = ph["high_res_step"]
    if conservative:
        direct_step = (flops["direct_flops"] - ph["text"] - ph["decode"]) / n
        step = max(step, direct_step + ph.get("am_native_recompute", 0))
    total = ph["text"] + n * ph["native_step"] + m * step + ph["decode"] + ph["decode_native"]
    return total / flops["direct_flops"]


# ------------------------------------------------------------------------------ output

def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_rows(path: str, rows: Sequence[Dict[str, object]], fields: Sequence[str]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) for k in fields})


def read_rows(path: str) -> List[Dict[str, object]]:
    if not os.path.exists(path):
        sys.exit(f"bench_frontier: error: no {path} to plot; run the benchmark with this --out first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in ("scale", "mode", "eligible", "fam_fast"):
                continue
            r[k] = math.nan if v == "" else (int(v) if k in ("high_res_steps", "steps_run", "n") else float(v))
    return rows


def markdown(rows: Sequence[Dict[str, object]], steps: int) -> str:
    header = ["scale", "setting", "high-res steps run", "n", "x direct time (median, p20-p80)", "x direct (fit)",
              "s/image",
              "1 object", "PSNR dB", "SSIM", "detail x bicubic", "detail / full fam", "top-band share",
              "within full fam's noise"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["mode"] == "direct":
            setting = "direct"
        else:
            setting = f"fam s={r['high_res_strength']:g} K={r['high_res_steps']}"
            if r["high_res_strength"] == 1.0 and r["high_res_steps"] == steps:
                setting += " (full)"
            if r["fam_fast"] == "yes":
                setting = f"**{setting} = fam-fast**"
        ratio = f"{r['time_ratio_median']:.2f} ({r['time_ratio_p20']:.2f}-{r['time_ratio_p80']:.2f})"
        detail_vs = "" if r["mode"] == "direct" else f"{r['detail_vs_fam']:.0%}"
        lines.append("| " + " | ".join([
            r["scale"], setting, str(r["steps_run"]), str(r["n"]), ratio, f"{r['time_ratio_fit']:.2f}",
            f"{r['seconds_median']:.2f}",
            f"{r['one_object']:.0%}", f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['detail']:.2f}", detail_vs,
            "-" if math.isnan(r["top_band_share"]) else f"{r['top_band_share']:.1%}", r["eligible"] or "-"]) + " |")
    return "\n".join(lines)


def projection_table(flops: Dict, settings_: Sequence[Tuple[str, float, float]]) -> str:
    header = ["setting", "count"] + [f"{side}x{side}" for side in flops]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, strength, fraction in settings_:
        for conservative in (False, True):
            lines.append("| " + " | ".join(
                [label, "conservative" if conservative else "fam.plan"]
                + [f"{project(f, strength, fraction, conservative):.2f}x" for f in flops.values()]) + " |")
    return "\n".join(lines)


def write_report(out: str, rows: Sequence[Dict[str, object]], meta: Dict, flops: Optional[Dict]) -> None:
    steps = meta["steps"]
    text = ["# FAM quality/time frontier: shortened high-res pass on the demo model", "",
            f"Written by `benchmarks/bench_frontier.py`. {meta['conditions']}", "",
            f"Setting: `high_res_strength` s, `high_res_steps` K (native pass: N = {steps} steps, guidance "
            f"{meta['guidance']}); the high-res pass runs int(K s) steps. x direct time: per round, the setting's "
            "wall time over the mean of two `direct` calls of the same round (full schedule, interleaved); "
            "median and p20-p80 over the rounds; fit: the line a + b m (m = high-res steps run) fitted to "
            "every fam image's ratio at that scale, the less noisy cost estimate. Within full fam's noise: "
            f"one object >= full fam's minus one sample, PSNR >= full fam's - {PSNR_MARGIN_DB} dB, "
            f"detail x bicubic >= {DETAIL_SHARE:.0%} of full "
            "fam's; fam-fast: the fastest such setting at that scale (by the fit: the fewest steps run).", "",
            markdown(rows, steps), ""]
    if flops:
        full = [("fam (full)", 1.0, 1.0)]
        fast = [r for r in rows if r["fam_fast"] == "yes" and r["scale"] == SCALE_ORDER[0]]
        if fast:
            r = fast[0]
            full.append((f"fam-fast (s={r['high_res_strength']:g}, K={r['high_res_steps']}/{steps} N)",
                         r["high_res_strength"], r["high_res_steps"] / steps))
        text += ["## Projection to SDXL (FLOPs, not measured)", "",
                 f"fam.plan FLOPs of SDXL (native 1024x1024, N = {SDXL_STEPS} steps, default options) per phase; "
                 "predicted time ratio = FLOP ratio: (text + N native_step + m high_res_step + decode + "
                 "decode_native) / direct's FLOPs, m = int(K s) with K = round(N K_demo/N_demo); "
                 "high_res_step includes the AM native-attention recompute (one per high-res step). "
                 "\"conservative\": high_res_step costed at least as direct's step plus the recompute "
                 "(fam.plan counts the AM high-res step below direct's at 3072-4096, see the docs).", "",
                 projection_table(flops, full), ""]
    with atomic_open(os.path.join(out, "frontier.md"), "w") as f:
        f.write("\n".join(text))


MARKERS = {0: "o", 1: "^", 2: "s"}
COLORS = {"4x4": "tab:red", "2x2": "tab:blue", "3x3": "tab:green", "2x4": "tab:purple"}


def _envelope(rows: Sequence[Dict[str, object]], key: str) -> List[Dict[str, object]]:
    frontier, best = [], -math.inf
    for r in sorted(rows, key=lambda r: r["time_ratio_median"]):
        if r[key] > best:
            best = r[key]
            frontier.append(r)
    return frontier


def plot(rows: Sequence[Dict[str, object]], path: str, steps: int) -> None:
    fig, axes = figure(ncols=3, width=5.0, height=4.2)
    ks = step_counts(steps)
    for scale in [s for s in SCALE_ORDER if any(r["scale"] == s for r in rows)]:
        mine = [{**r, "time_ratio_median": r["time_ratio_fit"] if r["time_ratio_fit"] == r["time_ratio_fit"]
                 else r["time_ratio_median"]} for r in rows if r["scale"] == scale and r["mode"] == "fam"]
        color = COLORS[scale]
        for ax, key in zip(axes, ("one_object", "psnr", "detail_vs_fam")):
            # the line: the time/detail frontier (the most detail at or below each time; PSNR and the
            # one-object share rise as the pass gets shorter, detail is what it trades), in every panel
            frontier = _envelope(mine, "detail_vs_fam")
            ax.plot([r["time_ratio_median"] for r in frontier], [r[key] for r in frontier], "-", color=color,
                    label=scale, alpha=0.8)
            for i, k in enumerate(ks):
                pts = [r for r in mine if r["high_res_steps"] == k]
                ax.scatter([r["time_ratio_median"] for r in pts], [r[key] for r in pts], color=color,
                           marker=MARKERS[i], s=22, alpha=0.7)
            for r in mine:
                if r["fam_fast"] == "yes":
                    ax.scatter([r["time_ratio_median"]], [r[key]], marker="*", s=220, facecolor="none",
                               edgecolor="black", linewidths=1.2, zorder=5)
    for ax, label in zip(axes, ("one-object share", "LR-consistency PSNR (dB)", "detail x bicubic / full fam's")):
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="wall time / direct's (same run; fitted on the steps run)", ylabel=label)
        ax.grid(True, alpha=0.3)
    axes[2].axhline(DETAIL_SHARE, color="grey", linestyle="--", linewidth=1)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=COLORS[s], label=s) for s in SCALE_ORDER if any(r["scale"] == s for r in rows)]
    handles += [Line2D([], [], color="grey", marker=MARKERS[i], linestyle="", label=f"K={k}")
                for i, k in enumerate(ks)]
    handles += [Line2D([], [], color="black", marker="*", markerfacecolor="none", linestyle="", markersize=12,
                       label="fam-fast")]
    axes[0].legend(handles=handles, fontsize="small")
    fig.suptitle(f"FAM on the demo model, shortened high-res pass: s in {{{', '.join(f'{s:g}' for s in STRENGTHS)}}}, "
                 f"K in {ks} (N={steps}). Lines: the settings with the most detail at or below each time",
                 fontsize="medium")
    save_figure(fig, path)


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    from fam_demo.evaluation import DEFAULT_GUIDANCE, DEFAULT_STEPS, EVAL_PROMPTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(p)
    p.add_argument("--scales", default=",".join(SCALE_ORDER), help="comma-separated, in this order (default: "
                   "4x4 first)")
    p.add_argument("--prompts", type=int, default=8, help="the first N evaluation prompts (default 8)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 at the first scale (default 1)")
    p.add_argument("--other-seeds", type=int, default=1, help="seeds at the other scales (default 1)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"N (default {DEFAULT_STEPS}, fam eval's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads can collapse)")
    p.add_argument("--save-images", default=None, metavar="DIR")
    p.add_argument("--other-grid", choices=("full", "reduced"), default="reduced",
                   help="the settings at the scales after the first: all, or K in {N, N/2} x s in "
                        f"{{{', '.join(f'{s:g}' for s in REDUCED_STRENGTHS)}}} plus the first scale's fam-fast "
                        "(default reduced)")
    p.add_argument("--rescore-images", default=None, metavar="DIR",
                   help="measure nothing: fill top_band_share from the images a run saved with --save-images DIR "
                        "and rewrite the results in --out")
    p.add_argument("--reaggregate", action="store_true",
                   help="measure nothing: rewrite the tables, report and plot from frontier_samples.csv in --out")
    p.add_argument("--no-projection", action="store_true",
                   help="skip the fam.plan SDXL FLOP count (reuse frontier_flops.json in --out if there)")
    args = p.parse_args(argv)
    out = args.out
    csv_path, png_path = os.path.join(out, "frontier.csv"), os.path.join(out, "frontier.png")
    meta_path, flops_path = os.path.join(out, "frontier_meta.json"), os.path.join(out, "frontier_flops.json")
    if args.rescore_images or args.reaggregate:
        from PIL import Image

        samples_path = os.path.join(out, "frontier_samples.csv")
        with open(samples_path, newline="") as f:
            raw = list(csv.DictReader(f))
        measured = []
        for r in raw:
            m = Measured(**{k: (float(v) if v != "" else math.nan) if k not in ("scale", "prompt", "mode") else v
                            for k, v in r.items() if k in SAMPLE_FIELDS})
            for key in ("round", "seed", "high_res_steps", "steps_run", "count", "native_count"):
                setattr(m, key, int(getattr(m, key)))
            if args.rescore_images:
                name = image_name(m.prompt, m.seed, m.scale, m.mode, m.high_res_strength, m.high_res_steps)
                m.top_band_share = top_band_share(Image.open(os.path.join(args.rescore_images, name + ".png")),
                                                  NATIVE_SIZE)
            measured.append(m)
        meta = json.load(open(meta_path))
        rows = aggregate(measured, meta["steps"])
        write_rows(samples_path, [asdict(m) for m in measured], SAMPLE_FIELDS)
        write_rows(csv_path, rows, ROW_FIELDS)
        write_report(out, rows, meta, json.load(open(flops_path)) if os.path.exists(flops_path) else None)
        plot(rows, png_path, meta["steps"])
        print(f"re-aggregated {len(measured)} images")
        return 0
    if args.plot_only:
        rows = read_rows(csv_path)
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"steps": args.steps}
        plot(rows, png_path, meta["steps"])
        if "conditions" in meta:
            write_report(out, rows, meta, json.load(open(flops_path)) if os.path.exists(flops_path) else None)
        print(f"redrew {png_path}")
        return 0

    import torch

    from fam_demo.evaluation import check_shortened_pass, load_fam_pipeline

    scales = args.scales.split(",")
    if any(s not in SCALE_ORDER for s in scales):
        p.error(f"--scales {args.scales!r}: expected a subset of {','.join(SCALE_ORDER)}")
    grid = settings(args.steps)
    for strength, k in grid:
        check_shortened_pass(args.steps, strength, k)
    os.makedirs(out, exist_ok=True)
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
    fp = load_fam_pipeline(threads=args.threads)
    flops = None
    if not args.no_projection:
        t0 = time.perf_counter()
        flops = sdxl_phase_flops()
        write_text(flops_path, json.dumps(flops, indent=1))
        print(f"fam.plan SDXL FLOPs in {time.perf_counter() - t0:.0f}s", flush=True)
    elif os.path.exists(flops_path):
        flops = json.load(open(flops_path))
    measured: List[Measured] = []
    t_start, loads = time.perf_counter(), []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    index = 0
    for si, scale in enumerate(scales):
        if si == 1 and args.other_grid == "reduced":
            first = [r for r in aggregate(measured, args.steps) if r["fam_fast"] == "yes"]
            grid = reduced_settings(args.steps, [(r["high_res_strength"], r["high_res_steps"]) for r in first])
            print(f"reduced grid at the other scales: {grid}", flush=True)
        # warm-up (untimed): both modes once at this size
        for mode, strength, k in (("direct", 1.0, None), ("fam", 0.3, None)):
            fp(prompt=EVAL_PROMPTS[0], scale=tuple(int(x) for x in scale.split("x")), mode=mode,
               num_inference_steps=args.steps, generator=torch.Generator().manual_seed(99), output_type="np",
               **({} if mode == "direct" else {"high_res_strength": strength, "high_res_steps": k}))
        seeds = range(args.seeds if si == 0 else args.other_seeds)
        for seed in seeds:
            for prompt in EVAL_PROMPTS[:args.prompts]:
                loads.append(os.getloadavg()[0])
                measured += run_round(fp, index, scale, prompt, seed, args.steps, DEFAULT_GUIDANCE, grid,
                                      args.save_images, lambda m: print(m, flush=True))
                loads.append(os.getloadavg()[0])
                index += 1
                rows = aggregate(measured, args.steps)
                elapsed = time.perf_counter() - t_start
                meta = {"steps": args.steps, "guidance": DEFAULT_GUIDANCE, "conditions": (
                    f"Measured {started} on {device_description()}, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
                    f"the machine was shared with other jobs: 1-min load average {min(loads):.1f}-{max(loads):.1f} "
                    f"(median {statistics.median(loads):.1f}) on 2 cores; {index} rounds, {elapsed:.0f} s. "
                    "Prompts: the first "
                    f"{args.prompts} evaluation prompts; seeds 0-{args.seeds - 1} at {scales[0]}, "
                    f"0-{args.other_seeds - 1} at the other scales"
                    + (f"; grid at the other scales reduced to {len(grid)} settings" if si and
                       args.other_grid == "reduced" else "") + ".")}
                write_rows(os.path.join(out, "frontier_samples.csv"), [asdict(m) for m in measured], SAMPLE_FIELDS)
                write_rows(csv_path, rows, ROW_FIELDS)
                write_text(meta_path, json.dumps(meta, indent=1))
                write_report(out, rows, meta, flops)
                plot(rows, png_path, args.steps)
    print(open(os.path.join(out, "frontier.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
