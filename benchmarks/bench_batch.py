"""`fam batch` throughput: images per minute with 1 and 2 processes on the embedded demo
model (CPU), one torch thread per process (``--with-2-threads`` adds 1 process with 2
threads, the other way to use the same 2 cores).

Each configuration runs the same PROMPTS file into a fresh folder as the user would run
it (``python -m fam batch`` / ``torchrun --standalone --nproc-per-node 2 -m fam batch``).
Reported per run: the steady-state rate (images / the slowest rank's job-loop time, from
the batch's own summary) and the end-to-end rate (images / the command's wall time:
interpreter start, imports, rendezvous, model load included). Configurations are
interleaved round by round so that outside load hits them alike; medians over rounds.

    python -m benchmarks.bench_batch [--quick] [--rounds 3] [--jobs 12] [--steps 20] [--with-2-threads] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from benchmarks.common import device_description, markdown_table, row, write_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "local")
CONFIGS = {  # name -> (processes, threads per process)
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread (torchrun)": (2, 1),
}
TWO_THREADS = {"1 process x 2 threads": (1, 2)}
_ALL = re.compile(r"^\s*all\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)


def prompts(n: int) -> List[str]:
    from fam_demo.evaluation import EVAL_PROMPTS

    return [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(n)]


def run_once(prompts_path: str, processes: int, threads: int, steps: int, scale: str, out: str) -> Dict[str, float]:
    args = ["batch", prompts_path, "--out", out, "--steps", str(steps), "--scale", scale, "--threads", str(threads)]
    if processes == 1:
        command = [sys.executable, "-m", "fam", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "fam", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - t0
    match = _ALL.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    generated, loop_s, rate = int(match.group(1)), float(match.group(4)), float(match.group(5))
    return {"images": generated, "loop_s": loop_s, "steady_ipm": rate, "wall_s": wall,
            "end_to_end_ipm": 60 * generated / wall, "load_before": load}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 jobs, 2 steps, 1 round")
    parser.add_argument("--jobs", type=int, default=None, help="prompts in the batch (default 12)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per pass (default 20)")
    parser.add_argument("--scale", default="2", help="FAM scale (default 2: the demo model's 128 px native -> 256 px)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, each runs every configuration (default 3)")
    parser.add_argument("--with-2-threads", action="store_true", help="also 1 process x 2 threads")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder for batch.csv / batch.md (default benchmarks/results/local/)")
    args = parser.parse_args(argv)
    n_jobs = args.jobs or (4 if args.quick else 12)
    steps = args.steps or (2 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 3)

    configs = {**CONFIGS, **(TWO_THREADS if args.with_2_threads else {})}
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="fam_bench_batch_") as tmp:
        prompts_path = os.path.join(tmp, "prompts.txt")
        with open(prompts_path, "w") as f:
            f.write("\n".join(prompts(n_jobs)) + "\n")
        for r in range(rounds):
            names = list(configs) if r % 2 == 0 else list(reversed(configs))  # alternate the order too
            for name in names:
                processes, threads = configs[name]
                out = os.path.join(tmp, f"round{r}-{processes}x{threads}")
                measured = run_once(prompts_path, processes, threads, steps, args.scale, out)
                runs[name].append(measured)
                print(f"round {r + 1}/{rounds} {name}: {measured['steady_ipm']:.1f} images/min steady, "
                      f"{measured['end_to_end_ipm']:.1f} end to end ({measured['wall_s']:.1f} s wall, "
                      f"load {measured['load_before']:.1f} before)", flush=True)

    device = device_description("cpu")
    x = f"{n_jobs} jobs, demo model, scale {args.scale}, {steps} steps"
    csv_rows, body = [], []
    base = statistics.median(r["steady_ipm"] for r in runs[next(iter(CONFIGS))])
    for name, measured in runs.items():
        steady = sorted(m["steady_ipm"] for m in measured)
        e2e = sorted(m["end_to_end_ipm"] for m in measured)
        wall = sorted(m["wall_s"] for m in measured)
        loads = [m["load_before"] for m in measured]
        csv_rows += [row("batch", name, "steady_images_per_min", "images/min", x, statistics.median(steady),
                         steady[0], steady[-1]),
                     row("batch", name, "end_to_end_images_per_min", "images/min", x, statistics.median(e2e),
                         e2e[0], e2e[-1]),
                     row("batch", name, "wall", "s", x, statistics.median(wall), wall[0], wall[-1])]
        # each run against the 1-process run of the same round: less sensitive to slow drifts of the outside load
        paired = sorted(m["steady_ipm"] / b["steady_ipm"] for m, b in zip(measured, runs[next(iter(CONFIGS))]))
        csv_rows.append(row("batch", name, "steady_vs_1_process_same_round", "x", x, statistics.median(paired),
                            paired[0], paired[-1]))
        body.append([name, statistics.median(steady), f"{steady[0]:.1f}-{steady[-1]:.1f}",
                     statistics.median(steady) / base, f"{statistics.median(paired):.2f} ({paired[0]:.2f}-"
                     f"{paired[-1]:.2f})", statistics.median(e2e), statistics.median(wall),
                     f"{min(loads):.1f}-{max(loads):.1f}"])
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "batch.csv"), csv_rows)
    table = markdown_table(["configuration", "steady images/min (median)", "min-max", "x 1 process (medians)",
                            "x 1 process, same round: median (min-max)", "end-to-end images/min", "wall s",
                            "load avg before runs"], body)
    rounds_table = markdown_table(["round"] + list(runs), [
        [r + 1] + [f"{runs[name][r]['steady_ipm']:.1f} ({runs[name][r]['load_before']:.1f})" for name in runs]
        for r in range(rounds)])
    text = (f"# `fam batch` throughput\n\n{x}; {rounds} rounds, configurations interleaved (order alternating), "
            f"medians. Machine: {device}; {os.cpu_count()} logical CPUs. Steady: images / the slowest rank's "
            f"job-loop time; end to end: images / the command's wall time (start-up, rendezvous, model load "
            f"included).\n\n{table}\n\nSteady images/min per round (load average before the run):\n\n"
            f"{rounds_table}\n")
    from fam._io import atomic_open

    with atomic_open(os.path.join(args.out, "batch.md"), "w") as f:
        f.write(text)
    print()
    print(table)
    print(f"\nwrote {os.path.join(args.out, 'batch.csv')} and batch.md")


if __name__ == "__main__":
    main()
