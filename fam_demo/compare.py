"""Paired comparisons of evaluation arms: is a difference between two modes (or two AM
settings) signal or noise?

Two arms are compared on the images they generated for the same (prompt, seed, scale):
the per-image CSVs of ``fam eval`` (``quality_samples.csv``). For each metric the
improvement of the variant over the baseline is averaged over the pairs (oriented so that
a positive value is always better), with

  * a 95% bootstrap interval that resamples whole (prompt, seed) units (the scales of one
    unit share a native image, so they are not independent),
  * the mean improvement of each seed separately (the spread across seeds),
  * wins / losses (pairs where the variant is better / worse by more than
    :data:`TIE`),
  * a verdict: ``better`` / ``worse`` when the interval excludes 0, otherwise
    ``no measurable difference``.

    python -m fam_demo.compare quality_samples.csv [more.csv ...] --out DIR
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fam._io import atomic_open

# metric column -> (label, +1 if higher is better / -1 if lower is better, digits)
METRICS: Dict[str, Tuple[str, int, int]] = {
    "one_object": ("1 object (share)", +1, 3),
    "psnr": ("PSNR dB", +1, 2),
    "hue_err_prompt_deg": ("hue err vs prompt deg", -1, 2),
    "hue_err_native_deg": ("hue err vs native deg", -1, 2),
    "boundary_native_px": ("boundary dev px", -1, 3),
    "speckle_permille": ("speckle permille", -1, 3),
}
TIE = {"one_object": 0.5, "psnr": 0.05, "hue_err_prompt_deg": 0.5, "hue_err_native_deg": 0.5,
       "boundary_native_px": 0.01, "speckle_permille": 0.01}
BOOTSTRAP = 2000
SCALE_ORDER = ["2x2", "3x3", "4x4", "2x4"]


@dataclass(frozen=True)
class Arm:
    """One evaluated configuration: a mode, with the AM settings it ran with."""

    mode: str
    am_layers: str = "default"
    am_lambda: str = "0.7"

    @property
    def label(self) -> str:
        extra = []
        if self.am_layers != "default":
            extra.append(self.am_layers)
        if self.am_lambda != "0.7":
            extra.append(f"lambda {self.am_lambda}")
        return self.mode + (f" ({', '.join(extra)})" if extra else "")

    @classmethod
    def parse(cls, text: str) -> "Arm":
        """``mode[:layers[:lambda]]``, e.g. ``fam``, ``fam:up_blocks.0+up_blocks.1``, ``fam:default:0.5``."""
        parts = text.split(":")
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise ValueError(f"{text!r}: expected mode[:am_layers[:am_lambda]]")
        return cls(parts[0], *(p for p in parts[1:]))


@dataclass
class Comparison:
    baseline: Arm
    variant: Arm
    metric: str
    scale: str  # one scale or "all"
    n: int
    baseline_mean: float
    variant_mean: float
    improvement: float  # oriented: > 0 means the variant is better
    low: float
    high: float
    per_seed: Dict[int, float]
    wins: int
    losses: int

    @property
    def verdict(self) -> str:
        if self.n == 0:
            return "no pairs"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no measurable difference"


REQUIRED = ["prompt", "seed", "mode", "scale", "am_layers", "am_lambda", "count", *list(METRICS)[1:]]


def read_samples(paths: Sequence[str]) -> List[dict]:
    """The rows of per-image CSVs, with ``one_object`` added (1.0 if count == 1);
    ValueError naming the file when it is not one."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: not a per-image CSV of fam eval (quality_samples.csv); "
                                 f"missing columns {', '.join(missing)}")
            for r in reader:
                r["seed"] = int(r["seed"])
                r["one_object"] = 1.0 if int(r["count"]) == 1 else 0.0
                for m in METRICS:
                    r[m] = float(r[m])
                rows.append(r)
    return rows


def _index(rows: Sequence[dict], arm: Arm) -> Dict[Tuple[str, int, str], dict]:
    return {(r["prompt"], r["seed"], r["scale"]): r for r in rows
            if (r["mode"], r["am_layers"], r["am_lambda"]) == (arm.mode, arm.am_layers, arm.am_lambda)}


def compare(rows: Sequence[dict], baseline: Arm, variant: Arm, metric: str, scale: str = "all",
            seed: int = 0) -> Comparison:
    """The paired comparison of ``variant`` against ``baseline`` on ``metric`` over the
    (prompt, seed) pairs both generated at ``scale`` ("all": every scale, pooled)."""
    sign = METRICS[metric][1]
    a, b = _index(rows, baseline), _index(rows, variant)
    keys = [k for k in a if k in b and (scale == "all" or k[2] == scale)
            and math.isfinite(a[k][metric]) and math.isfinite(b[k][metric])]
    keys.sort(key=lambda k: (k[0], k[1], SCALE_ORDER.index(k[2]) if k[2] in SCALE_ORDER else 99))
    va = np.array([a[k][metric] for k in keys])
    vb = np.array([b[k][metric] for k in keys])
    diff = sign * (vb - va)
    if not keys:
        nan = math.nan
        return Comparison(baseline, variant, metric, scale, 0, nan, nan, nan, nan, nan, {}, 0, 0)
    units = sorted({(k[0], k[1]) for k in keys})
    members = [np.array([i for i, k in enumerate(keys) if (k[0], k[1]) == u]) for u in units]
    rng = np.random.default_rng(seed)
    boot = np.empty(BOOTSTRAP)
    for i in range(BOOTSTRAP):
        pick = rng.integers(0, len(units), len(units))
        boot[i] = diff[np.concatenate([members[j] for j in pick])].mean()
    low, high = np.quantile(boot, [0.025, 0.975])
    seeds = sorted({k[1] for k in keys})
    per_seed = {s: float(diff[[i for i, k in enumerate(keys) if k[1] == s]].mean()) for s in seeds}
    tie = TIE[metric]
    return Comparison(baseline, variant, metric, scale, len(keys), float(va.mean()), float(vb.mean()),
                      float(diff.mean()), float(low), float(high), per_seed, int((diff > tie).sum()),
                      int((diff < -tie).sum()))


def compare_all(rows: Sequence[dict], pairs: Sequence[Tuple[Arm, Arm]],
                metrics: Optional[Sequence[str]] = None) -> List[Comparison]:
    """Every pair x metric, pooled over scales and then per scale that both arms ran."""
    scales = [s for s in SCALE_ORDER if any(r["scale"] == s for r in rows)]
    found = [compare(rows, base, var, m, scale) for base, var in pairs for m in (metrics or METRICS)
             for scale in ["all", *scales]]
    return [c for c in found if c.n > 0 or c.scale == "all"]  # a scale one arm did not run is left out


def _num(x: float, digits: int) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def _signed(x: float, digits: int) -> str:
    return "-" if not math.isfinite(x) else f"{x:+.{digits}f}"


HEADERS = ["baseline", "variant", "metric", "scale", "n pairs", "baseline mean", "variant mean",
           "improvement", "95% interval", "per seed", "wins / losses", "verdict"]


def _cells(c: Comparison) -> List[str]:
    label, _, digits = METRICS[c.metric]
    seeds = " / ".join(_signed(v, digits) for v in c.per_seed.values())
    return [c.baseline.label, c.variant.label, label, c.scale, str(c.n), _num(c.baseline_mean, digits),
            _num(c.variant_mean, digits), _signed(c.improvement, digits),
            f"[{_signed(c.low, digits)}, {_signed(c.high, digits)}]", seeds, f"{c.wins} / {c.losses}", c.verdict]


def markdown(comparisons: Sequence[Comparison]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(c)) + " |" for c in comparisons]
    return "\n".join(lines)


def write_csv(comparisons: Sequence[Comparison], path: str) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["baseline", "variant", "metric", "scale", "n", "baseline_mean", "variant_mean", "improvement",
                    "ci_low", "ci_high", "per_seed", "wins", "losses", "verdict"])
        for c in comparisons:
            w.writerow([c.baseline.label, c.variant.label, c.metric, c.scale, c.n, f"{c.baseline_mean:.5f}",
                        f"{c.variant_mean:.5f}", f"{c.improvement:.5f}", f"{c.low:.5f}", f"{c.high:.5f}",
                        " ".join(f"{s}:{v:.5f}" for s, v in c.per_seed.items()), c.wins, c.losses, c.verdict])


DEFAULT_PAIRS = ["fm,fam", "direct_native,am"]
INTRO = ("Paired comparisons (fam_demo/compare.py): the variant against the baseline on the images both generated "
         "for the same prompt, seed and scale. **improvement** is oriented so that > 0 always means the variant is "
         "better (higher share / PSNR, lower hue error / boundary deviation / speckle); the 95% interval "
         f"resamples whole (prompt, seed) units ({BOOTSTRAP} bootstrap draws); **per seed** is the mean "
         "improvement of each seed alone (the spread across seeds); the verdict is better / worse when the "
         "interval excludes 0. Local metrics are compared only where both images have an object.")


def plot(comparisons: Sequence[Comparison], png_path: str) -> None:
    """One panel per metric: each comparison's improvement with its 95% interval, per
    scale and pooled (0 = no difference; above 0 = the variant is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(c.metric == m for c in comparisons)]
    pairs = list(dict.fromkeys((c.baseline, c.variant) for c in comparisons))
    scales = list(dict.fromkeys(c.scale for c in comparisons))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), layout="constrained", squeeze=False)
    width = 0.8 / max(1, len(pairs))
    for ax, metric in zip(axes[0], metrics):
        for j, (base, var) in enumerate(pairs):
            rows = {c.scale: c for c in comparisons if (c.baseline, c.variant, c.metric) == (base, var, metric)}
            xs = [i + (j - (len(pairs) - 1) / 2) * width for i, sc in enumerate(scales) if sc in rows]
            cs = [rows[sc] for sc in scales if sc in rows]
            ax.errorbar(xs, [c.improvement for c in cs],
                        yerr=[[c.improvement - c.low for c in cs], [c.high - c.improvement for c in cs]],
                        fmt="o", capsize=2, markersize=3, label=f"{var.label} vs {base.label}")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(scales)), scales)
        ax.set_title(METRICS[metric][0] + " (better: up)", fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("improvement, 95% interval")
    axes[0][0].legend(fontsize="x-small", loc="best")
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="+", help="per-image CSVs written by fam eval (quality_samples.csv)")
    p.add_argument("--pair", action="append", default=None, metavar="BASE,VARIANT",
                   help="arms as mode[:am_layers[:am_lambda]] (repeatable; default: fm,fam and direct_native,am)")
    p.add_argument("--out", default=".", help="folder for <name>.csv, <name>.md and <name>.png")
    p.add_argument("--name", default="am_effect", help="file name stem (default am_effect)")
    p.add_argument("--title", default=None, help="markdown title (default: from --name)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    for path in args.samples:
        if not os.path.isfile(path):
            p.error(f"samples {path}: no such file")
    pairs = []
    for text in args.pair or DEFAULT_PAIRS:
        try:
            base, var = text.split(",")
            pairs.append((Arm.parse(base), Arm.parse(var)))
        except ValueError:
            p.error(f"--pair {text!r}: expected BASE,VARIANT with each mode[:am_layers[:am_lambda]]")
    try:
        rows = read_samples(args.samples)
    except ValueError as error:
        p.error(f"samples {error}")
    arms = {(r["mode"], r["am_layers"], r["am_lambda"]) for r in rows}
    for base, var in pairs:
        for arm in (base, var):
            if (arm.mode, arm.am_layers, arm.am_lambda) not in arms:
                p.error(f"--pair {base.label},{var.label}: no images of {arm.label} in the samples (they hold "
                        + "; ".join(sorted(Arm(*a).label for a in arms)) + ")")
    comparisons = compare_all(rows, pairs)
    pooled = [c for c in comparisons if c.scale == "all"]
    os.makedirs(args.out, exist_ok=True)
    write_csv(comparisons, os.path.join(args.out, f"{args.name}.csv"))
    if not args.no_plot:
        plot(comparisons, os.path.join(args.out, f"{args.name}.png"))
    text = ["# " + (args.title or args.name.replace("_", " ")), "", INTRO, "", "## All scales pooled", "",
            markdown(pooled), "", "## Per scale", "", markdown([c for c in comparisons if c.scale != "all"]), ""]
    with atomic_open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(text))
    print(markdown(pooled))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
