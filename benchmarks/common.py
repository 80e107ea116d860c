"""Shared benchmark plumbing: timing (median and percentiles after warm-up), peak
memory of a callable measured in a fresh process, the machine description,
Liger-style CSV rows plus a markdown table, the ``--out`` / ``--plot-only`` options
and PNG plots (matplotlib, Agg backend).

CSV columns: op, provider, metric, unit, x, median, p20, p80, device, timestamp, version.

Every benchmark writes into ``--out DIR``, by default ``benchmarks/results/local/``
(git-ignored), so a run never overwrites the committed results; those are written
with an explicit ``--out benchmarks/results``. ``--plot-only`` redraws the plots from
the CSV already in ``DIR`` without measuring anything.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from fam._io import atomic_open
from fam_kernels._device import device_description  # noqa: F401  (re-exported for the benchmarks)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # the committed results
DEFAULT_OUT = os.path.join(RESULTS_DIR, "local")

CSV_FIELDS = ["op", "provider", "metric", "unit", "x", "median", "p20", "p80", "device", "timestamp", "version"]


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    median: float
    p20: float
    p80: float
    repeats: int


def time_fn(fn: Callable[[], object], *, device="cpu", warmup: int = 2, repeats: int = 10,
            min_seconds: float = 0.0) -> Timing:
    """Median wall time in seconds over ``repeats`` calls (more if ``min_seconds`` not reached)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * repeats:
            break
    samples.sort()
    q = statistics.quantiles(samples, n=5) if len(samples) >= 2 else [samples[0]] * 4
    return Timing(statistics.median(samples), q[0], q[3], len(samples))


def row(op: str, provider: str, metric: str, unit: str, x: str, median: float, p20: Optional[float] = None,
        p80: Optional[float] = None, device: str = "cpu") -> Dict[str, object]:
    import fam_kernels

    return {
        "op": op, "provider": provider, "metric": metric, "unit": unit, "x": x,
        "median": median, "p20": median if p20 is None else p20, "p80": median if p80 is None else p80,
        "device": device_description(device),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": fam_kernels.__version__,
    }


def write_csv(path: str, rows: Iterable[Dict[str, object]]) -> None:
    """Write atomically (temporary file + rename)."""
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(r)


def markdown_table(header: Sequence[str], body: Iterable[Sequence[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in body]
    return "\n".join(lines)


def peak_rss_of(fn_source: str, timeout: float = 600.0) -> int:
    """Peak resident memory (bytes) of a fresh Python process that runs ``fn_source``
    minus that of the same process right before it (imports and inputs excluded when
    the source sets them up first and calls ``_fam_mark()``)."""
    import subprocess
    import sys
    import textwrap

    program = textwrap.dedent(
        """
        import resource, sys
        def _fam_rss():
            with open('/proc/self/status') as f:
                for line in f:
                    if line.startswith('VmHWM'):
                        return int(line.split()[1]) * 1024
        _fam_base = [None]
        def _fam_mark():
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset the peak to the current RSS
            _fam_base[0] = _fam_rss()
        """
    ) + textwrap.dedent(fn_source) + "\nprint('FAM_PEAK', _fam_rss() - (_fam_base[0] or 0))\n"
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith("FAM_PEAK"):
            return int(line.split()[1])
    raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")


# ------------------------------------------------------------------------------ output

def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help="folder for the CSV, markdown and PNG plots (default benchmarks/results/local/, "
                             "git-ignored; the committed results are written with --out benchmarks/results)")
    parser.add_argument("--plot-only", action="store_true",
                        help="measure nothing: redraw the plots from the CSV already in --out")


def write_text(path: str, text: str) -> None:
    """Write atomically (temporary file + rename)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def read_csv(path: str) -> List[Dict[str, object]]:
    """The rows of a CSV written by :func:`write_csv`, numbers as floats. A missing file
    ends the program with a one-line message."""
    if not os.path.exists(path):
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: no {path} to plot; run the benchmark with this --out "
                 f"first, or pass --out {os.path.relpath(RESULTS_DIR)} for the committed results")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("median", "p20", "p80"):
            r[key] = float(r[key])
    return rows


def metric_medians(rows: Iterable[Dict[str, object]], op: str, metric: str) -> Dict[tuple, float]:
    """``{(x, provider): median}`` of one op's metric."""
    return {(r["x"], r["provider"]): r["median"] for r in rows if r["op"] == op and r["metric"] == metric}


# ------------------------------------------------------------------------------ plots

# the two yardsticks every plot draws the same way
STYLES = {"reference": dict(color="black", linestyle="--", marker="s"),
          "floor": dict(color="grey", linestyle=":", marker="v"),
          "sdpa": dict(color="black", linestyle="--", marker="s"),
          "materialized": dict(color="tab:red", linestyle=":", marker="x")}


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib figure with ``ncols`` axes side by side (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def plot_lines(ax, xs: Sequence[float], series: Dict[str, Sequence[float]], *, xlabel: str, ylabel: str,
               title: str = "", logx: bool = False, logy: bool = False, xticklabels: Optional[Sequence[str]] = None,
               secondary: Sequence[str] = ()):
    """One line per series (NaN points are skipped), styled by :data:`STYLES` where named;
    the ``secondary`` series (e.g. a backend's internal forms) are drawn faint."""
    for name, ys in series.items():
        points = [(x, y) for x, y in zip(xs, ys) if y == y]
        style = dict(marker=".", linestyle="-.", alpha=0.6) if name in secondary else dict(marker="o")
        if points:
            ax.plot(*zip(*points), label=name, **STYLES.get(name, style))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if xticklabels is not None:
        ax.set_xticks(list(xs), list(xticklabels))
        ax.minorticks_off()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def save_figure(fig, path: str) -> None:
    """Write the figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
