"""Quality evaluation of the FAM ablation modes on the embedded demo model.

For a fixed prompt set x seeds, every mode (direct, direct_native, skip_residual,
fm, am, fam) and every scale (2x2, 3x3, 4x4, 2x4) generates one image and we
measure
  * object count (fam_demo.segmentation) -> share of images with exactly one object;
  * structure consistency: PSNR / SSIM of the high-res image area-downsampled to the
    native size against the native image of the same prompt and seed;
  * detail: high-band spectral energy relative to a bicubic upscale of the native;
  * local quality (fam_demo.metrics.local_quality, validated on rendered ground truth):
    hue error of the main object against the prompt's colour and against the native
    image's object, boundary deviation from the native object's outline, and the area
    of saturated specks too small to count as objects.
Shared by ``benchmarks/eval_quality.py`` and ``fam eval``.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fam._io import atomic_open, save_png
from fam.modes import MODES as MODE_DEFINITIONS
from fam_kernels._device import device_description

from .dataset import caption, parse_caption
from .metrics import consistency, detail_ratio, local_quality, to_float
from .segmentation import count_objects


def _guidance_rank(name: str) -> Tuple[bool, bool, int, bool]:
    """Sort key from no guidance to full FAM: direct, direct_native, skip_residual, fm, am, fam."""
    mode = MODE_DEFINITIONS[name]
    modulations = int(mode.frequency_modulation) + int(mode.attention_modulation)
    return mode.native_pass, modulations > 0 or mode.skip_residual, modulations, mode.attention_modulation


MODES: List[str] = sorted(MODE_DEFINITIONS, key=_guidance_rank)  # the sampler's modes, in table order
SCALES: Dict[str, Tuple[int, int]] = {"2x2": (2, 2), "3x3": (3, 3), "4x4": (4, 4), "2x4": (2, 4)}

# (shape, color, background): every shape once, colours and backgrounds varied.
EVAL_SCENES: List[Tuple[str, str, str]] = [
    ("star", "red", "striped grey"),
    ("circle", "blue", "checkered beige"),
    ("triangle", "yellow", "gradient slate"),
    ("ring", "green", "noisy grey"),
    ("cross", "purple", "dotted beige"),
    ("square", "orange", "plain slate"),
    ("diamond", "cyan", "striped beige"),
    ("hexagon", "magenta", "gradient grey"),
]
EVAL_PROMPTS: List[str] = [caption(*s) for s in EVAL_SCENES]

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0


@dataclass
class EvalConfig:
    prompts: Sequence[str] = field(default_factory=lambda: list(EVAL_PROMPTS))
    seeds: Sequence[int] = (0, 1, 2)
    modes: Sequence[str] = field(default_factory=lambda: list(MODES))
    scales: Sequence[str] = field(default_factory=lambda: list(SCALES))
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    save_images: Optional[str] = None  # folder for the generated PNGs
    am_layers: Optional[Sequence[str]] = None  # None: the paper's up_blocks.0 (FAMPipeline's default)
    am_lambda: float = 0.7  # AM blend weight (the paper's and FAMPipeline's default)
    # The shortened high-res pass (FAMPipeline's high_res_strength / high_res_steps; defaults: the paper's),
    # applied to the modes with a native pass; `direct` has no native latent to start from and always runs
    # the full schedule (the baseline).
    high_res_strength: float = 1.0
    high_res_steps: Optional[int] = None  # None: num_inference_steps

    @classmethod
    def quick(cls) -> "EvalConfig":
        return cls(prompts=EVAL_PROMPTS[:4], seeds=(0,), scales=["2x2", "4x4"])

    @property
    def n_calls(self) -> int:
        return len(self.prompts) * len(self.seeds) * len(self.modes) * len(self.scales)


@dataclass
class Sample:
    prompt: str
    seed: int
    mode: str
    scale: str
    count: int
    native_count: int  # objects in the native image of the same prompt and seed
    psnr: float
    ssim: float
    detail: float
    seconds: float
    hue_prompt: float = math.nan  # degrees; nan without object or when the prompt is not a grammar caption
    hue_native: float = math.nan  # degrees; nan without object in either image
    boundary: float = math.nan  # native pixels; nan without object in either image
    speckle: float = math.nan  # per mille of the image area
    high_res_strength: float = 1.0  # as run (direct: 1.0)
    high_res_steps: int = 0  # the high-res schedule's step count as run (0: unknown)


def _prompt_color(prompt: str) -> Optional[str]:
    try:
        return parse_caption(prompt)[1]
    except ValueError:
        return None


def check_am_lambda(value: float) -> float:
    """``value`` if it is a valid AM weight (0 <= lambda <= 1), else ValueError."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):  # also refuses nan
        raise ValueError(f"am_lambda={value!r} must be in [0, 1]")
    return float(value)


def shortened_pass(mode: str, steps: int, high_res_strength: float = 1.0,
                   high_res_steps: Optional[int] = None) -> Tuple[float, int]:
    """The (high_res_strength, high_res_steps) that ``mode`` runs with: the given ones for
    the modes with a native pass, the full schedule (1.0, ``steps``) for ``direct``."""
    if not MODE_DEFINITIONS[mode].native_pass:
        return 1.0, steps
    return float(high_res_strength), int(high_res_steps or steps)


def high_res_steps_run(steps: int, high_res_strength: float = 1.0, high_res_steps: Optional[int] = None) -> int:
    """Denoising steps the high-res pass actually runs: int(K s) of the K-step schedule
    (diffusers' img2img rule, as FAMPipeline applies it)."""
    from fam.attach import start_step

    k = high_res_steps or steps
    return k - start_step(k, high_res_strength)


def _np(img) -> np.ndarray:
    return to_float(img)


def _pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray((img * 255 + 0.5).astype(np.uint8))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def _shortened_suffix(sample: Sample, steps: int) -> str:
    """File-name suffix of a shortened high-res pass ("" for the paper's)."""
    if sample.high_res_strength == 1.0 and sample.high_res_steps in (0, steps):
        return ""
    return f"_hrs{sample.high_res_strength:g}_hrk{sample.high_res_steps}"


def eval_units(config: EvalConfig) -> List[Tuple[str, int]]:
    """The (prompt, seed) pairs in evaluation order: the unit of work of one process
    (all modes and scales of a pair share its native image)."""
    return [(prompt, seed) for prompt in config.prompts for seed in config.seeds]


def measure(fam_pipe, prompt: str, seed: int, mode: str, scale_name: str, natives: Dict[Tuple[str, int], np.ndarray],
            *, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
            am_layers: Optional[Sequence[str]] = None, am_lambda: float = 0.7, high_res_strength: float = 1.0,
            high_res_steps: Optional[int] = None) -> Tuple[Sample, np.ndarray, np.ndarray]:
    """Generate one image (timed: the whole FAMPipeline call) and measure it against the
    native image of the same prompt and seed (kept in ``natives``; generated with
    ``direct_native`` if no native-pass mode has run yet). The shortened high-res pass
    applies to the modes with a native pass (:func:`shortened_pass`).
    Returns the sample, the high-res image and the native image."""
    strength, k = shortened_pass(mode, steps, high_res_strength, high_res_steps)
    shortened = {} if not MODE_DEFINITIONS[mode].native_pass else {
        "high_res_strength": strength, "high_res_steps": high_res_steps}
    t0 = time.perf_counter()
    out = fam_pipe(prompt=prompt, scale=SCALES[scale_name], mode=mode, am_layers=am_layers, am_lambda=am_lambda,
                   num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=torch.Generator().manual_seed(seed), output_type="np", **shortened)
    dt = time.perf_counter() - t0
    high = _np(out.images[0])
    if out.native_images is not None and (prompt, seed) not in natives:
        natives[(prompt, seed)] = _np(out.native_images[0])
    if (prompt, seed) not in natives:
        ref = fam_pipe(prompt=prompt, scale=(2, 2), mode="direct_native", num_inference_steps=steps,
                       guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                       output_type="np")
        natives[(prompt, seed)] = _np(ref.native_images[0])
    native = natives[(prompt, seed)]
    p, s = consistency(high, native)
    local = local_quality(high, native, _prompt_color(prompt))
    sample = Sample(prompt, seed, mode, scale_name, count_objects(high), count_objects(native), p, s,
                    detail_ratio(high, native), dt, hue_prompt=local.hue_error_prompt,
                    hue_native=local.hue_error_native, boundary=local.boundary, speckle=local.speckle,
                    high_res_strength=strength, high_res_steps=k)
    return sample, high, native


def check_shortened_pass(steps: int, high_res_strength: float = 1.0, high_res_steps: Optional[int] = None) -> None:
    """FAMPipeline's own checks of the two arguments, before any generation (ValueError)."""
    from fam.attach import check_number, check_strength, start_step

    check_strength(high_res_strength)
    if high_res_steps is not None:
        check_number("high_res_steps", high_res_steps, low=1, integer=True)
    start_step(high_res_steps or steps, high_res_strength)


def run_eval(fam_pipe, config: EvalConfig, log: Callable[[str], None] = print,
             rank: int = 0, world_size: int = 1) -> Tuple[List[Sample], Dict]:
    """Generate and measure every (prompt, seed, mode, scale), or with ``world_size`` > 1
    this rank's interleaved share of the (prompt, seed) pairs. Returns the samples and
    native-image statistics (``{"one_object_share": ..., "n": ..., "ones": ...}``)."""
    from fam.distributed import shard

    if config.am_layers is not None:
        from fam.attention import resolve_am_layers

        resolve_am_layers(fam_pipe.pipe.unet, config.am_layers)  # a bad name fails before any generation
    check_am_lambda(config.am_lambda)
    check_shortened_pass(config.steps, config.high_res_strength, config.high_res_steps)
    samples: List[Sample] = []
    natives: Dict[Tuple[str, int], np.ndarray] = {}
    modes = sorted(config.modes, key=lambda m: m == "direct")  # native-pass modes first
    mine = set(shard(eval_units(config), rank, world_size))
    total, k = len(mine) * len(config.modes) * len(config.scales), 0
    t_all = time.perf_counter()
    if config.save_images:
        os.makedirs(config.save_images, exist_ok=True)
    for prompt in config.prompts:
        for seed in config.seeds:
            if (prompt, seed) not in mine:
                continue
            for mode in modes:
                for scale_name in config.scales:
                    k += 1
                    sample, high, native = measure(fam_pipe, prompt, seed, mode, scale_name, natives,
                                                   steps=config.steps, guidance_scale=config.guidance_scale,
                                                   am_layers=config.am_layers, am_lambda=config.am_lambda,
                                                   high_res_strength=config.high_res_strength,
                                                   high_res_steps=config.high_res_steps)
                    p, s, dt = sample.psnr, sample.ssim, sample.seconds
                    samples.append(sample)
                    if config.save_images:
                        base = os.path.join(config.save_images, f"{_slug(prompt)}_s{seed}")
                        save_png(_pil(high), f"{base}_{mode}_{scale_name}{_shortened_suffix(sample, config.steps)}.png")
                        if not os.path.exists(f"{base}_native.png"):
                            save_png(_pil(native), f"{base}_native.png")
                    eta = (time.perf_counter() - t_all) / k * (total - k)
                    log(f"[{k}/{total}] {mode:>13} {scale_name} seed {seed} '{prompt}': {dt:.1f}s "
                        f"count={sample.count} psnr={p:.1f} ssim={s:.3f} detail={sample.detail:.2f} "
                        f"hue={sample.hue_prompt:.1f}/{sample.hue_native:.1f} "
                        f"boundary={sample.boundary:.2f} speckle={sample.speckle:.2f} "
                        f"(eta {eta / 60:.1f} min)")
    native_counts = [count_objects(img) for img in natives.values()]
    size = "x".join(str(v) for v in next(iter(natives.values())).shape[:2]) if natives else "?"
    return samples, _native_stats(sum(c == 1 for c in native_counts), len(native_counts), size)


def _native_stats(ones: int, n: int, size: str) -> Dict:
    return {"one_object_share": ones / n if n else math.nan, "n": n, "ones": ones, "size": size}


def merge_shards(config: EvalConfig, shards: Sequence[Tuple[List[Sample], Dict]]) -> Tuple[List[Sample], Dict]:
    """The per-rank results of :func:`run_eval` as one single-process run: the samples in
    single-process order, the native statistics summed."""
    unit = {pair: i for i, pair in enumerate(eval_units(config))}
    modes = sorted(config.modes, key=lambda m: m == "direct")
    samples = sorted((s for part, _ in shards for s in part),
                     key=lambda s: (unit[(s.prompt, s.seed)], modes.index(s.mode), list(config.scales).index(s.scale)))
    size = next((stats["size"] for _, stats in shards if stats["size"] != "?"), "?")
    return samples, _native_stats(sum(stats["ones"] for _, stats in shards), sum(stats["n"] for _, stats in shards),
                                  size)


@dataclass
class Row:
    mode: str
    scale: str
    n: int
    one_object: float
    one_object_given_native: float  # among samples whose native image has one object (nan if none)
    mean_count: float
    psnr: float
    ssim: float
    detail: float
    seconds: float
    hue_prompt: float = math.nan  # means over the samples where the metric is defined (nan if none)
    hue_native: float = math.nan
    boundary: float = math.nan
    speckle: float = math.nan
    high_res_strength: float = 1.0
    high_res_steps: int = 0


def _finite_mean(values) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def aggregate(samples: Sequence[Sample]) -> List[Row]:
    """One row per (scale, mode, high_res_strength, high_res_steps), in SCALES x MODES
    order, then from the longest high-res pass to the shortest. PSNR is averaged over
    finite values; detail is the geometric mean of the ratios."""
    rows = []
    scale_order = {s: i for i, s in enumerate(SCALES)}
    mode_order = {m: i for i, m in enumerate(MODES)}

    def key(s: Sample):
        return s.scale, s.mode, s.high_res_strength, s.high_res_steps

    keys = sorted({key(s) for s in samples},
                  key=lambda k: (scale_order.get(k[0], 99), mode_order.get(k[1], 99), -k[2], -k[3]))
    for scale, mode, strength, k in keys:
        group = [s for s in samples if key(s) == (scale, mode, strength, k)]
        finite = [s.psnr for s in group if math.isfinite(s.psnr)]
        kept = [s.count == 1 for s in group if s.native_count == 1]
        rows.append(Row(
            mode=mode, scale=scale, n=len(group),
            one_object=float(np.mean([s.count == 1 for s in group])),
            one_object_given_native=float(np.mean(kept)) if kept else math.nan,
            mean_count=float(np.mean([s.count for s in group])),
            psnr=float(np.mean(finite)) if finite else math.inf,
            ssim=float(np.mean([s.ssim for s in group])),
            detail=float(np.exp(np.mean([math.log(max(s.detail, 1e-12)) for s in group]))),
            seconds=float(np.mean([s.seconds for s in group])),
            hue_prompt=_finite_mean(s.hue_prompt for s in group),
            hue_native=_finite_mean(s.hue_native for s in group),
            boundary=_finite_mean(s.boundary for s in group),
            speckle=_finite_mean(s.speckle for s in group),
            high_res_strength=strength, high_res_steps=k,
        ))
    return rows


COLUMNS = ["scale", "mode", "n", "one_object", "one_object_given_native", "mean_count", "psnr", "ssim", "detail",
           "seconds", "hue_err_prompt_deg", "hue_err_native_deg", "boundary_native_px", "speckle_permille",
           "high_res_strength", "high_res_steps"]
HEADERS = ["scale", "mode", "n", "1 object", "1 object | native 1", "mean count", "PSNR dB", "SSIM", "detail x bicubic",
           "s/image", "hue err vs prompt deg", "hue err vs native deg", "boundary dev px", "speckle permille"]


SHORTENED_HEADERS = ["high-res strength", "high-res steps"]


def _shortened(rows: Sequence[Row]) -> bool:
    """Whether any row ran a high-res pass other than the paper's (full strength, one
    step count for all rows): the tables then show the two columns."""
    return any(r.high_res_strength != 1.0 for r in rows) or len({r.high_res_steps for r in rows}) > 1


def _percent(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0%}"


def _num(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _fmt(row: Row, shortened: bool = False) -> List[str]:
    extra = [f"{row.high_res_strength:g}", str(row.high_res_steps)] if shortened else []
    return [row.scale, row.mode, *extra, str(row.n), f"{row.one_object:.0%}", _percent(row.one_object_given_native),
            f"{row.mean_count:.2f}",
            f"{row.psnr:.2f}", f"{row.ssim:.3f}", f"{row.detail:.2f}", f"{row.seconds:.1f}",
            _num(row.hue_prompt, 1), _num(row.hue_native, 1), _num(row.boundary, 2), _num(row.speckle, 2)]


def _headers(shortened: bool) -> List[str]:
    return HEADERS[:2] + SHORTENED_HEADERS + HEADERS[2:] if shortened else list(HEADERS)


def format_table(rows: Sequence[Row]) -> str:
    shortened = _shortened(rows)
    headers = _headers(shortened)
    cells = [headers] + [_fmt(r, shortened) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(c))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as markdown; the high-res strength / steps columns only where some row
    differs from the paper's pass (:func:`_shortened`)."""
    shortened = _shortened(rows)
    headers = _headers(shortened)
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(r, shortened)) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: str) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.scale, r.mode, r.n, f"{r.one_object:.4f}", f"{r.one_object_given_native:.4f}",
                        f"{r.mean_count:.4f}", f"{r.psnr:.4f}",
                        f"{r.ssim:.5f}", f"{r.detail:.4f}", f"{r.seconds:.3f}", f"{r.hue_prompt:.3f}",
                        f"{r.hue_native:.3f}", f"{r.boundary:.4f}", f"{r.speckle:.4f}",
                        f"{r.high_res_strength:g}", r.high_res_steps])


SAMPLE_COLUMNS = ["prompt", "seed", "mode", "scale", "am_layers", "am_lambda", "high_res_strength", "high_res_steps",
                  "count", "native_count", "psnr", "ssim", "detail", "hue_err_prompt_deg", "hue_err_native_deg",
                  "boundary_native_px", "speckle_permille", "seconds"]


def write_samples_csv(samples: Sequence[Sample], path: str, config: EvalConfig) -> None:
    """One row per generated image (the paired comparisons of :mod:`fam_demo.compare`
    read these); ``am_layers`` / ``am_lambda`` are the run's, "default" = up_blocks.0."""
    layers = "+".join(config.am_layers) if config.am_layers else "default"
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SAMPLE_COLUMNS)
        for s in samples:
            w.writerow([s.prompt, s.seed, s.mode, s.scale, layers, f"{config.am_lambda:g}", f"{s.high_res_strength:g}",
                        s.high_res_steps, s.count, s.native_count, f"{s.psnr:.4f}", f"{s.ssim:.5f}",
                        f"{s.detail:.4f}", f"{s.hue_prompt:.3f}", f"{s.hue_native:.3f}", f"{s.boundary:.4f}",
                        f"{s.speckle:.4f}", f"{s.seconds:.3f}"])


def write_markdown(rows: Sequence[Row], path: str, config: EvalConfig, native_stats: Dict, extra: str = "") -> None:
    text = [
        "# Quality evaluation: FAM ablation on the embedded demo model",
        "",
        f"{len(config.prompts)} prompts x {len(config.seeds)} seeds, {config.steps} steps, "
        f"guidance {config.guidance_scale}. Native images ({native_stats.get('size', '?')}) with exactly one object: "
        f"{native_stats['one_object_share']:.0%} of {native_stats['n']}.",
        "",
        f"AM layers: {', '.join(config.am_layers) if config.am_layers else 'up_blocks.0 (default)'}; "
        f"AM lambda {config.am_lambda:g}. "
        f"High-res pass: strength {config.high_res_strength:g}, {config.high_res_steps or config.steps} steps "
        f"(modes with a native pass; direct runs the full schedule). "
        f"Machine: {device_description()}; torch {torch.__version__}.",
        "",
        "- **1 object**: share of high-res images where the segmentation finds exactly one object "
        "(the prompts ask for one);",
        "- **1 object | native 1**: the same share among the samples whose native image has exactly one object "
        "(does the high-res pass keep a correct layout single?);",
        "- **PSNR / SSIM**: high-res image area-downsampled to the native size vs the native image "
        "(structure consistency);",
        "- **detail x bicubic**: spectral energy above the native Nyquist band relative to a bicubic upscale of "
        "the native image (geometric mean; 1 = no added detail);",
        "- **s/image**: wall time of one FAMPipeline call (native + high-res pass) on that machine;",
        "- **hue err vs prompt / vs native**: hue distance (degrees, 0-180) of the main object's median colour from "
        "the prompt's colour / from the native image's object (clean renders: <= ~3);",
        "- **boundary dev**: mean distance (native pixels) of the main object's outline from the native object's "
        "outline upsampled, centroids aligned (clean renders: <= 0.25);",
        "- **speckle**: area (per mille of the image) of saturated specks too small to count as objects "
        "(clean renders: 0). The local metrics are means over the samples that have an object "
        "(docs/demo.md, 'Local-quality metrics').",
        "",
        markdown_table(rows),
        "",
    ]
    if extra:
        text += [extra, ""]
    with atomic_open(path, "w") as f:
        f.write("\n".join(text))


def load_fam_pipeline(threads: Optional[int] = None, path: Optional[str] = None):
    """The embedded model (or the demo-layout pipeline folder at ``path``, e.g. a
    training checkpoint) wrapped in fam.FAMPipeline (CPU, fp32)."""
    import fam

    from .model import MODEL_DIR, load_pipeline

    if threads:
        torch.set_num_threads(threads)
    fp = fam.FAMPipeline.from_pipe(load_pipeline(path=path or MODEL_DIR))
    fp.set_progress_bar_config(disable=True)
    return fp


def evaluate(config: EvalConfig, csv_path: Optional[str], md_path: Optional[str],
             log: Callable[[str], None] = print, fam_pipe=None, model_path: Optional[str] = None,
             ctx=None, samples_path: Optional[str] = None) -> List[Row]:
    """Run, print the table, write CSV + markdown (and with ``samples_path`` the
    per-image CSV of :func:`write_samples_csv`). Returns the aggregated rows.

    ``ctx`` (a :class:`fam.distributed.Context`, e.g. under torchrun): each rank generates
    its share of the (prompt, seed) pairs; rank 0 gathers them and alone prints and writes
    the tables, identical to a single-process run's but for the timings (others return [])."""
    from fam import distributed

    ctx = ctx or distributed.Context()
    fam_pipe = fam_pipe if fam_pipe is not None else load_fam_pipeline(path=model_path)
    sharded = f", sharded over {ctx.world_size} processes" if ctx.world_size > 1 else ""
    if ctx.is_main:
        log(f"evaluating {config.n_calls} generations ({len(config.prompts)} prompts x {len(config.seeds)} seeds x "
            f"{len(config.modes)} modes x {len(config.scales)} scales, {config.steps} steps{sharded})")
    t0 = time.perf_counter()
    part = run_eval(fam_pipe, config, (lambda m: log(f"[{ctx.tag}] {m}")) if ctx.world_size > 1 else log,
                    rank=ctx.rank, world_size=ctx.world_size)
    gathered = distributed.gather_to_main(ctx, part)
    if not ctx.is_main:
        return []
    samples, native_stats = merge_shards(config, gathered)
    rows = aggregate(samples)
    log("")
    log(format_table(rows))
    log(f"native one-object share: {native_stats['one_object_share']:.0%} of {native_stats['n']}; "
        f"total {time.perf_counter() - t0:.0f}s")
    if csv_path:
        write_csv(rows, csv_path)
        log(f"wrote {csv_path}")
    if samples_path:
        write_samples_csv(samples, samples_path, config)
        log(f"wrote {samples_path}")
    if md_path:
        write_markdown(rows, md_path, config, native_stats,
                       extra=f"Total evaluation time: {time.perf_counter() - t0:.0f} s.")
        log(f"wrote {md_path}")
    return rows
