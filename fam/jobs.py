"""The PROMPTS file of ``fam batch``: parsing, checking and the per-job settings.

A text file holds one prompt per line; a JSONL file (``.jsonl`` / ``.ndjson``, or any
file whose first non-blank line starts with ``{``) one object per line with "prompt"
and optionally the keys of :data:`JOB_KEYS`. Blank lines are ignored. Job ``i`` (0-based,
in file order) gets the seed given on its line or ``base seed + i``, and the output name
``{i:06d}-{slug of the prompt}.png``: both depend on the file only, never on the
number of processes. Every check here runs before any model is loaded; errors name the
file and the line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

MODE_NAMES = ("fam", "fm", "am", "skip_residual", "direct_native", "direct")
AM_SOURCES = ("recompute", "cache", "diffused")
UPSAMPLES = ("bicubic", "bilinear", "nearest")
VAE_TILINGS = ("auto", "on", "off")
SEED_MODULUS = 2 ** 64


class JobFileError(ValueError):
    """A bad PROMPTS file (one line, naming the file and the line)."""


def default_model_path() -> str:
    """What ``--model`` defaults to: the embedded demo model (offline). The library never
    imports the demo package at import time; this is the one place that points at it."""
    from fam_demo.model import MODEL_DIR

    return MODEL_DIR


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_scale(value) -> str:
    """2, "2" or "2x4" -> "2" / "2x4" (height x width factors >= 1)."""
    parts = str(value).lower().split("x") if (is_int(value) or isinstance(value, str)) else []
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) >= 1 for p in parts):
        return "x".join(str(int(p)) for p in parts)
    raise ValueError("expected N or HxW with factors >= 1, e.g. 2 or 2x4")


def scale_arg(text: str):
    """"2" -> 2, "2x4" -> (2, 4): FAMPipeline's ``scale``."""
    factors = tuple(int(p) for p in check_scale(text).split("x"))
    return factors[0] if len(factors) == 1 else factors


def _text(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def _optional_text(value):
    if value is not None and not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _int(minimum: int, optional: bool = False) -> Callable:
    def check(value):
        if value is None and optional:
            return None
        if not is_int(value) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return value
    return check


def _number(optional: bool = False) -> Callable:
    def check(value):
        if value is None and optional:
            return None
        if not is_number(value):
            raise ValueError("expected a number")
        return float(value)
    return check


def _choice(choices) -> Callable:
    def check(value):
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    return check


def _flag(value):
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _seed(value):
    if not is_int(value) or not 0 <= value < SEED_MODULUS:
        raise ValueError("expected an integer in [0, 2**64)")
    return value


# JSONL key -> check. Values are only type-checked here; those the model decides on
# (e.g. a size that is not a multiple of its VAE factor) fail that job at run time.
JOB_KEYS: Dict[str, Callable] = {
    "prompt": _text,
    "negative_prompt": _optional_text,
    "seed": _seed,
    "scale": check_scale,
    "mode": _choice(MODE_NAMES),
    "steps": _int(1),
    "guidance": _number(optional=True),
    "native_height": _int(1, optional=True),
    "native_width": _int(1, optional=True),
    "fm_c": _number(),
    "am_lambda": _number(),
    "am_source": lambda v: None if v is None else _choice(AM_SOURCES)(v),
    "upsample": _choice(UPSAMPLES),
    "cfg_sequential": _flag,
    "vae_tiling": _choice(VAE_TILINGS),
    "image": _text,  # an input image to upscale (path, relative to the PROMPTS file's folder)
}


@dataclass
class Job:
    index: int
    line: int  # 1-based line in the PROMPTS file
    settings: Dict[str, Any]  # the generation settings (recorded in the PNG and the manifest)
    name: str = field(default="")  # output file name

    @property
    def prompt(self) -> str:
        return self.settings["prompt"]


def slug(text: str, limit: int = 40) -> str:
    """Lower-case words joined by '-', at most ``limit`` characters (never empty)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = ""
    for word in words:
        candidate = f"{out}-{word}" if out else word
        if len(candidate) > limit:
            break
        out = candidate
    return out or (words[0][:limit] if words else "prompt")


def output_name(index: int, prompt: str) -> str:
    return f"{index:06d}-{slug(prompt)}.png"


def _is_jsonl(path: str, first_line: str) -> bool:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".ndjson"):
        return True
    if ext == ".txt":
        return False
    return first_line.lstrip().startswith("{")


def read_entries(path: str, flag: str = "PROMPTS") -> List[Tuple[int, Dict[str, Any]]]:
    """``[(line number, {"prompt": ..., ...}), ...]`` from a text or JSONL file; raises
    :class:`JobFileError` naming the file and the line."""
    where = f"{flag} {path}"
    if not os.path.exists(path):
        raise JobFileError(f"{where}: no such file")
    if os.path.isdir(path):
        raise JobFileError(f"{where}: is a folder, expected a text or JSONL file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as error:
        raise JobFileError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise JobFileError(f"{where}: cannot read it ({error.strerror})") from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise JobFileError(f"{where}: empty (no prompts)")
    if not _is_jsonl(path, numbered[0][1]):
        return [(n, {"prompt": line.strip()}) for n, line in numbered]
    entries = []
    for n, line in numbered:
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise JobFileError(f"{where} line {n}: invalid JSON ({error})") from None
        if not isinstance(entry, dict):
            raise JobFileError(f"{where} line {n}: expected a JSON object like {{\"prompt\": \"...\"}}")
        if "prompt" not in entry:
            raise JobFileError(f"{where} line {n}: no \"prompt\"")
        for key, value in entry.items():
            if key not in JOB_KEYS:
                raise JobFileError(f"{where} line {n}: unknown key {key!r} (known: {', '.join(JOB_KEYS)})")
            try:
                entry[key] = JOB_KEYS[key](value)
            except ValueError as error:
                raise JobFileError(f"{where} line {n}: {key} = {json.dumps(value)}: {error}") from None
        entries.append((n, entry))
    return entries


def plan(path: str, defaults: Dict[str, Any], base_seed: int, flag: str = "PROMPTS") -> List[Job]:
    """The jobs of a PROMPTS file: ``defaults`` (the command line's settings) overridden
    per line; seed = the line's or ``base_seed + i``; ``image`` resolved against the
    file's folder (recorded as given)."""
    folder = os.path.dirname(os.path.abspath(path))
    jobs = []
    for index, (line, entry) in enumerate(read_entries(path, flag)):
        settings = {**defaults, **entry}
        settings["seed"] = entry["seed"] if "seed" in entry else (base_seed + index) % SEED_MODULUS
        settings.setdefault("image", None)
        job = Job(index, line, settings, output_name(index, settings["prompt"]))
        jobs.append(job)
    for job in jobs:
        if job.settings["image"] is not None:
            job.settings["image_path"] = os.path.join(folder, job.settings["image"])
    return jobs


def generation_settings(job: Job) -> Dict[str, Any]:
    """The settings a PNG must carry for ``job`` to count as done (no run-time paths)."""
    return {key: value for key, value in job.settings.items() if key != "image_path"}


def job_image_path(job: Job) -> Optional[str]:
    return job.settings.get("image_path")
