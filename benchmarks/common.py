"""Shared benchmark plumbing: timing (median and percentiles after warm-up), peak
memory of a callable measured in a fresh process, the machine description, and
Liger-style CSV rows plus a markdown table.

CSV columns: op, provider, metric, unit, x, median, p20, p80, device, timestamp, version.
"""

from __future__ import annotations

import csv
import datetime as _dt
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from fam._io import atomic_open
from fam_kernels._device import device_description  # noqa: F401  (re-exported for the benchmarks)

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
