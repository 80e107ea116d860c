"""``fam batch PROMPTS --out DIR``: many prompts, alone or data-parallel under
``torchrun`` / ``accelerate launch`` (see :mod:`fam.distributed`).

* Determinism: job ``i`` (see :mod:`fam.jobs`) has a fixed seed and output name, and the
  PNG holds only the job's settings, so a PROMPTS file gives the same files (bit for bit
  on the CPU) whatever the number of processes.
* Work split, dynamic: each rank walks its interleaved share (``rank, rank + world, ...``)
  and then the other ranks' jobs from the end backwards, and takes a job only by creating
  its claim file ``DIR/.fam-batch/run-ID/claims/i`` with O_CREAT|O_EXCL, so a fast rank
  finishes a straggler's tail and no job runs twice in a run. When some rank cannot see
  rank 0's run folder (``--out`` not shared between nodes) all ranks fall back to the
  static interleaving: a straggler then delays the end of the run by its extra jobs.
* Resume: a job counts as done only if ``DIR/<name>.png`` exists and its "fam" metadata
  equals the job's settings; re-running the same command skips it. PNGs are written
  atomically (temporary file + rename), so a killed rank leaves no partial PNG.
* Manifest: every rank appends one JSON line per finished or failed job to its own file
  ``DIR/.fam-batch/run-ID/rank-R.jsonl`` (fsync'd); at the end rank 0 merges them (and
  those of earlier killed runs) into ``DIR/manifest.jsonl``, atomically. Jobs found done on
  disk without a manifest line (killed between the rename and the line) get one there.
* Failures: a job that raises is recorded with its error and skipped; the exit status is
  1 when any job failed, 2 for usage errors (reported before any model is loaded).
* One ``fam batch`` at a time per output folder (rank 0 holds ``DIR/.fam-batch/lock``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from . import distributed
from .jobs import Job, JobFileError, check_scale, default_model_path, plan, scale_arg

STATE_DIR = ".fam-batch"
MANIFEST = "manifest.jsonl"
# generate's options that fam batch takes as they are (the PROMPTS file's lines override the per-job ones)
GENERATE_OPTIONS = ("model", "variant", "negative_prompt", "scale", "native_height", "native_width", "steps",
                    "guidance", "seed", "mode", "am_source", "am_cache_device", "fm_c", "am_lambda", "upsample",
                    "cfg_sequential", "vae_tiling", "dtype", "device", "cpu_offload", "threads")
# settings that can vary per job, with their defaults when neither the line nor the command line gives them
JOB_DEFAULTS: Dict[str, Any] = {
    "negative_prompt": None, "scale": "2", "native_height": None, "native_width": None, "steps": 50,
    "guidance": None, "mode": "fam", "am_source": None, "fm_c": 0.5, "am_lambda": 0.7, "upsample": "bicubic",
    "cfg_sequential": False, "vae_tiling": "auto",
}
HELP_OVERRIDES = {
    "model": "diffusers model: hub id or local folder (default: the embedded demo model, offline)",
    "seed": "base seed: job i gets the seed on its line, else this + i (default 0)",
    "negative_prompt": "negative prompt for the jobs whose line gives none",
}
_TEMPORARY = re.compile(r"^\.(\d{6,}-[a-z0-9-]*\.png|manifest\.jsonl)\..*\.tmp$")


def _error_class():
    from .cli import CLIError

    return CLIError


# ------------------------------------------------------------------------------ command line



def configure_batch(p: argparse.ArgumentParser) -> None:
    """Fill in the ``fam batch`` parser: generate's options (taken from its parser) +
    PROMPTS, --out, --threads."""
    from . import cli

    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    cli.add_generate_parser(scratch)
    generate = scratch.choices["generate"]
    p.description = ("Generate one FAM image per line of PROMPTS (text: one prompt per line; JSONL: one object per "
                     "line with \"prompt\" and optionally negative_prompt, seed, scale, mode, steps, guidance, "
                     "native_height, native_width, fm_c, am_lambda, am_source, upsample, cfg_sequential, vae_tiling, "
                     "image). Job i is written to DIR/{i:06d}-{slug}.png with seed (its own or --seed + i). Run it "
                     "alone, or under `torchrun --nproc-per-node N -m fam batch ...` / `accelerate launch -m fam "
                     "batch ...`; re-running the same command skips the finished jobs. Exit status 1 when a job "
                     "failed (see DIR/manifest.jsonl).")
    p.add_argument("prompts", metavar="PROMPTS", help="text file (one prompt per line) or JSONL file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (PNGs, manifest.jsonl)")
    for action in generate._actions:
        if action.dest in GENERATE_OPTIONS:
            action = copy.copy(action)
            action.help = HELP_OVERRIDES.get(action.dest, action.help)
            p._add_action(action)
    if not any(action.dest == "threads" for action in p._actions):
        p.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    p.set_defaults(func=cmd_batch)


@dataclass
class Options:
    prompts: str
    out: str
    jobs: List[Job]
    model: str
    dtype: Optional[str]
    variant: Optional[str]
    device: Optional[str]
    cpu_offload: bool
    am_cache_device: Optional[str]
    threads: Optional[int]


def check_options(args: argparse.Namespace) -> Options:
    """Every check that needs no model: the flags, then the PROMPTS file. Raises CLIError."""
    CLIError = _error_class()
    defaults = dict(JOB_DEFAULTS)
    for key in JOB_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            defaults[key] = value
    try:
        defaults["scale"] = check_scale(defaults["scale"])
    except ValueError as error:
        raise CLIError(f"--scale {defaults['scale']!r}: {error}") from None
    for flag, value in (("--steps", args.steps), ("--threads", getattr(args, "threads", None))):
        if value is not None and value < 1:
            raise CLIError(f"{flag} {value}: expected 1 or more")
    if args.seed is not None and not 0 <= args.seed < 2 ** 64:
        raise CLIError(f"--seed {args.seed}: expected an integer in [0, 2**64)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out}: exists and is not a folder")
    model = args.model or default_model_path()
    defaults.update(model=model, dtype=args.dtype, variant=args.variant)
    try:
        jobs = plan(args.prompts, defaults, base_seed=args.seed or 0)
    except JobFileError as error:
        raise CLIError(str(error)) from None
    return Options(args.prompts, args.out, jobs, model, args.dtype, args.variant, args.device, args.cpu_offload,
                   args.am_cache_device, getattr(args, "threads", None))


def cmd_batch(args: argparse.Namespace) -> int:
    CLIError = _error_class()
    try:
        options = check_options(args)
    except CLIError:
        if distributed.env_rank() == 0:
            raise
        return 2  # rank 0 reports it: one line, not one per process
    return run(options)


# ------------------------------------------------------------------------------ output folder

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class OutputFolder:
    """``DIR`` with its state folder ``DIR/.fam-batch``: lock, run folders, claims, manifest parts."""

    def __init__(self, root: str):
        self.root = root
        self.state = os.path.join(root, STATE_DIR)
        self.manifest = os.path.join(root, MANIFEST)
        self._lock = None

    def run_dir(self, run_id: str) -> str:
        return os.path.join(self.state, f"run-{run_id}")

    def part(self, run_id: str, rank: int) -> str:
        return os.path.join(self.run_dir(run_id), f"rank-{rank}.jsonl")

    def lock(self) -> None:
        """Rank 0 only: refuse a second batch writing to the same folder."""
        import fcntl  # POSIX; imported here so that building the `fam` parser never needs it

        os.makedirs(self.state, exist_ok=True)
        self._lock = open(os.path.join(self.state, "lock"), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise _error_class()(f"--out {self.root}: another fam batch is writing to this folder") from None

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove_temporaries(self) -> int:
        """Temporary files of killed writers (atomic writes that never got renamed)."""
        removed = 0
        for name in os.listdir(self.root):
            if _TEMPORARY.match(name):
                os.remove(os.path.join(self.root, name))
                removed += 1
        return removed

    def earlier_runs(self, current: str) -> List[str]:
        if not os.path.isdir(self.state):
            return []
        return sorted(os.path.join(self.state, d) for d in os.listdir(self.state)
                      if d.startswith("run-") and d != f"run-{current}")

    def claim(self, run_id: str, index: int) -> bool:
        """True for exactly one caller per (run, job): atomic exclusive create."""
        try:
            os.close(os.open(os.path.join(self.run_dir(run_id), "claims", str(index)),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return True
        except FileExistsError:
            return False


def append_line(path: str, record: Dict[str, Any]) -> None:
    """One JSON line, written by one write() on an O_APPEND file and fsync'd."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: str) -> List[Dict[str, Any]]:
    """The JSON objects of a JSONL file; a torn last line (writer killed) is dropped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


# ------------------------------------------------------------------------------ one job

def expected_metadata(job: Job) -> Dict[str, Any]:
    """What a finished job's PNG carries in its "fam" chunk besides version/scheduler/image."""
    settings = {key: value for key, value in job.settings.items() if key not in ("image", "image_path")}
    return {**settings, "init_image": job.settings.get("image"), "job": job.index}


def is_done(path: str, expected: Dict[str, Any]) -> Optional[bool]:
    """None: no file; True: a readable PNG whose "fam" metadata matches ``expected``; False otherwise."""
    from PIL import Image

    from .cli import METADATA_KEY

    if not os.path.exists(path):
        return None
    try:
        with Image.open(path) as image:
            stored = json.loads(image.text.get(METADATA_KEY) or "null")
    except (OSError, ValueError, SyntaxError):
        return False
    wanted = json.loads(json.dumps(expected))  # the JSON round trip the PNG went through
    return isinstance(stored, dict) and {key: stored.get(key) for key in wanted} == wanted


def generate(pipe, job: Job, am_cache_device: Optional[str]):
    """The high-res PIL image of ``job`` (raises what the pipeline raises)."""
    import torch

    s = job.settings
    extra = {}
    if s.get("image_path") is not None:
        from PIL import Image

        with Image.open(s["image_path"]) as image:
            extra["image"] = image.convert("RGB")
    tiling = {"auto": None, "on": True, "off": False}[s["vae_tiling"]]
    output = pipe(s["prompt"], negative_prompt=s["negative_prompt"], scale=scale_arg(s["scale"]),
                  native_height=s["native_height"], native_width=s["native_width"], num_inference_steps=s["steps"],
                  guidance_scale=s["guidance"], generator=torch.Generator("cpu").manual_seed(s["seed"]),
                  mode=s["mode"], am_source=s["am_source"], am_cache_device=am_cache_device, fm_c=s["fm_c"],
                  am_lambda=s["am_lambda"], upsample=s["upsample"], cfg_sequential=s["cfg_sequential"],
                  vae_tiling=tiling, output_type="pil", **extra)
    return output.images[0]


# ------------------------------------------------------------------------------ the run

@dataclass
class RankResult:
    rank: int
    device: str
    host: str
    generated: int = 0
    failed: int = 0
    skipped: List[int] = field(default_factory=list)  # found done on disk
    replaced: int = 0  # a PNG with other settings was there
    seconds: float = 0.0  # wall time of the job loop
    records: List[Dict[str, Any]] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)


def order_for(rank: int, world_size: int, n: int) -> List[int]:
    """Own interleaved share first, then everybody else's jobs from the end backwards."""
    own = list(range(rank, n, world_size))
    mine = set(own)
    return own + [i for i in range(n - 1, -1, -1) if i not in mine]


def _log(ctx: distributed.Context, message: str) -> None:
    prefix = f"fam batch [{ctx.tag}]" if ctx.tag else "fam batch"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)


def _prepare(folder: OutputFolder) -> Dict[str, Any]:
    """Rank 0, before anything is loaded: lock the folder, clear killed writers' leftovers,
    create this run's folder. Returns what the other ranks need (or the error)."""
    CLIError = _error_class()
    try:
        os.makedirs(folder.root, exist_ok=True)
        folder.lock()
    except CLIError as error:
        return {"error": str(error)}
    except OSError as error:
        return {"error": f"--out {folder.root}: cannot write there ({error.strerror})"}
    folder.remove_temporaries()
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    os.makedirs(os.path.join(folder.run_dir(run_id), "claims"))
    return {"error": None, "run_id": run_id}


def _resolve_after_load(jobs: List[Job], pipe, device: str, dtype: Optional[str]) -> str:
    """Fill in what the model decides: the guidance default and the dtype."""
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    guidance = 5.0 if pipe.is_sdxl else 7.5
    for job in jobs:
        job.settings["dtype"] = dtype
        if job.settings["guidance"] is None:
            job.settings["guidance"] = guidance
    return dtype


def _job_loop(ctx, options: Options, folder: OutputFolder, run_id: str, dynamic: bool, pipe) -> RankResult:
    import fam

    jobs, n = options.jobs, len(options.jobs)
    device_type = ctx.device.split(":")[0]
    result = RankResult(ctx.rank, ctx.device, socket.gethostname())
    part = folder.part(run_id, ctx.rank)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    order = order_for(ctx.rank, ctx.world_size, n) if dynamic else distributed.shard(range(n), ctx.rank,
                                                                                      ctx.world_size)
    start = time.perf_counter()
    for index in order:
        if dynamic and not folder.claim(run_id, index):
            continue
        job = jobs[index]
        path = os.path.join(folder.root, job.name)
        expected = expected_metadata(job)
        done = is_done(path, expected)
        if done:
            result.skipped.append(index)
            continue
        base = {"job": index, "line": job.line, "output": job.name, **expected, "rank": ctx.rank,
                "world_size": ctx.world_size, "host": result.host, "device": ctx.device, "run": run_id,
                "started": _now()}
        t0 = time.perf_counter()
        try:
            image = generate(pipe, job, options.am_cache_device)
            from .cli import save_png_atomically

            save_png_atomically(image, path, {**expected, "version": fam.__version__,
                                              "scheduler": type(pipe.scheduler).__name__, "image": "high_res",
                                              "device": device_type})
        except Exception as error:  # the job fails, the batch goes on
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            record = {**base, "status": "failed", "error": reason, "seconds": round(time.perf_counter() - t0, 3),
                      "finished": _now()}
            append_line(part, record)
            result.failed += 1
            result.records.append(record)
            result.failures.append(f"job {index} (line {job.line}): {reason}")
            _log(ctx, f"job {index} (line {job.line}) FAILED: {reason}")
            continue
        seconds = time.perf_counter() - t0
        record = {**base, "status": "done", "seconds": round(seconds, 3), "finished": _now()}
        append_line(part, record)
        result.records.append(record)
        result.generated += 1
        result.replaced += done is False
        note = " (replaced a PNG with other settings)" if done is False else ""
        _log(ctx, f"job {index} done in {seconds:.2f} s -> {job.name}{note} [{result.generated} here]")
    result.seconds = time.perf_counter() - start
    return result


def _merge_manifest(folder: OutputFolder, run_id: str, results: List[RankResult], jobs: List[Job]) -> int:
    """Rank 0: manifest.jsonl = its old lines + earlier killed runs' lines + this run's
    (+ a line for each job found done on disk that has none). Returns the lines added."""
    from ._io import atomic_open

    old = read_lines(folder.manifest) if os.path.exists(folder.manifest) else []
    earlier = []
    for run in folder.earlier_runs(run_id):
        for name in sorted(os.listdir(run)):
            if name.endswith(".jsonl"):
                earlier += read_lines(os.path.join(run, name))
    current = sorted((r for result in results for r in result.records), key=lambda r: r["job"])
    keys = sorted(expected_metadata(jobs[0]))

    def done_with(record):  # the job and the settings it was done with
        return json.dumps([record.get(key) for key in keys])

    recorded = {done_with(r) for r in old + earlier + current if r.get("status") == "done"}
    recovered = []
    for result in results:
        for index in result.skipped:
            if done_with(expected_metadata(jobs[index])) not in recorded:
                job = jobs[index]
                recovered.append({"job": index, "line": job.line, "output": job.name, **expected_metadata(job),
                                  "status": "done", "note": "found done on disk without a manifest line",
                                  "rank": result.rank, "run": run_id, "finished": _now()})
    added = sorted(earlier, key=lambda r: (r.get("finished", ""), r.get("job", 0))) + current + recovered
    with atomic_open(folder.manifest, "w", encoding="utf-8") as f:
        for record in old + added:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    for run in folder.earlier_runs(run_id):
        shutil.rmtree(run, ignore_errors=True)
    return len(added)


def summary(results: List[RankResult], n_jobs: int, folder: OutputFolder, dynamic: bool) -> str:
    generated = sum(r.generated for r in results)
    skipped = sum(len(r.skipped) for r in results)
    failed = sum(r.failed for r in results)
    split = "dynamic claiming" if dynamic else "static interleaving"
    lines = [f"fam batch: {n_jobs} jobs, {len(results)} process(es), {split}: {generated} generated, "
             f"{skipped} already done, {failed} failed; manifest {folder.manifest}",
             f"{'rank':>4}  {'host':<16} {'device':<8} {'generated':>9} {'skipped':>7} {'failed':>6} "
             f"{'loop s':>8} {'images/min':>10}"]

    def rate(count, seconds):
        return f"{60 * count / seconds:.1f}" if seconds > 0 and count else "-"

    for r in results:
        lines.append(f"{r.rank:>4}  {r.host[:16]:<16} {r.device:<8} {r.generated:>9} {len(r.skipped):>7} "
                     f"{r.failed:>6} {r.seconds:>8.1f} {rate(r.generated, r.seconds):>10}")
    wall = max(r.seconds for r in results)
    lines.append(f"{'all':>4}  {'':<16} {'':<8} {generated:>9} {skipped:>7} {failed:>6} {wall:>8.1f} "
                 f"{rate(generated, wall):>10}")
    for r in results:
        lines += [f"failed: {f}" for f in r.failures]
    return "\n".join(lines)


def run(options: Options) -> int:
    """The batch on this process (every rank calls it). Returns the exit status."""
    CLIError = _error_class()
    folder = OutputFolder(options.out)
    ctx = distributed.init(options.device)
    previous = signal.getsignal(signal.SIGTERM)
    # a launcher stopping the group (another rank died) sends SIGTERM: unwind, so the
    # atomic writer removes its temporary file
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        prep = distributed.broadcast_from_main(ctx, _prepare(folder) if ctx.is_main else None)
        if prep["error"]:
            if ctx.is_main:
                raise CLIError(prep["error"])
            return 2
        run_id = prep["run_id"]
        shared = all(distributed.all_gather(ctx, os.path.isdir(folder.run_dir(run_id))))
        if options.threads:
            import torch

            torch.set_num_threads(options.threads)
        _log(ctx, f"loading {options.model} on {ctx.device} (pid {os.getpid()})")
        pipe = _load(options, ctx)
        _resolve_after_load(options.jobs, pipe, ctx.device, options.dtype)
        if ctx.is_main:
            _log(ctx, f"{len(options.jobs)} jobs from {options.prompts} on {ctx.world_size} process(es), "
                      f"{'dynamic claiming' if shared else 'static split (output folder not shared)'}")
        result = _job_loop(ctx, options, folder, run_id, shared, pipe)
        results = distributed.gather_to_main(ctx, result)
        if ctx.is_main:
            _merge_manifest(folder, run_id, results, options.jobs)
            print(summary(results, len(options.jobs), folder, shared), flush=True)
        # after the merge has read every part file; every rank exits with the same status
        failed = distributed.broadcast_from_main(ctx, sum(r.failed for r in results) if ctx.is_main else None)
        if ctx.is_main:
            shutil.rmtree(folder.run_dir(run_id), ignore_errors=True)
        elif not shared:
            shutil.rmtree(folder.run_dir(run_id), ignore_errors=True)
        return 1 if failed else 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        folder.unlock()
        ctx.close()


def _load(options: Options, ctx: distributed.Context):
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from . import cli

    diffusers_logging.disable_progress_bar()  # one "loading" bar per rank is noise
    transformers_logging.disable_progress_bar()
    settings = {**cli.DEFAULTS, "model": options.model, "variant": options.variant,
                "dtype": options.dtype or ("float16" if ctx.device.startswith("cuda") else "float32")}
    pipe = cli._load_pipeline(settings, ctx.device, options.cpu_offload)
    pipe.set_progress_bar_config(disable=True)
    return pipe
