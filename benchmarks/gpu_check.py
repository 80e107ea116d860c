"""The GPU check behind ``bash tools/gpu_check.sh``: op benchmarks at SDXL shapes and a
random-weight, real-size SDXL UNet step, direct and FAM, on CUDA.

* Ops (fp16 and bf16; CUDA events; median of repeats after warm-up): ``am_attention``
  per backend that runs (plus the measured default) at SDXL's up_blocks.0
  self-attention (B = 2 for CFG, 20 heads, d = 64, native 32x32 tokens) at 2x / 3x / 4x,
  with torch SDPA on the same high-res q/k/v as the floor; TFLOP/s from the attention
  FLOPs (4 B heads N^2 d for the high-res term, plus the native term's) and their
  fraction of the GPU's dense fp16/bf16 peak. ``lowpass_blend`` per backend on SDXL
  latents (2, 4, 128 s, 128 s): GB/s (read z and z_ref, write out) against the peak
  bandwidth.
* UNet: ``UNet2DConditionModel`` built from the SDXL config shipped at
  fam/configs/sdxl/unet/config.json (random weights: the compute and memory of real
  SDXL, nothing downloaded) in fp16, at 1024^2, 2048^2 and 4096^2: ms per step of
  ``direct`` (one CFG-batched forward) and ``fam`` (the native forward that feeds AM
  + the high-res forward with ``am_attention`` in up_blocks.0's self-attention + one
  ``lowpass_blend``), and ``torch.cuda.max_memory_allocated``. This models a FAM step's
  work at the op level; it does not run the sampler.

Without CUDA it runs what a CPU can (``--cpu-smoke``, also the CI test): the same
code paths at tiny shapes on the CPU with wall-clock timing, marking every CUDA part
as skipped, and writes the same files. Results: ``<out>/gpu-<name>.{csv,md}``.

    python -m benchmarks.gpu_check [--out DIR] [--cpu-smoke] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import re
import statistics
import time

import torch
import torch.nn.functional as F

import fam_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_CONFIG = os.path.join(ROOT, "fam", "configs", "sdxl", "unet", "config.json")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "local")

# Dense fp16/bf16 tensor-core peak (TFLOP/s) and memory bandwidth (TB/s), from the vendors' data sheets.
PEAKS = {"H100 SXM": (989.0, 3.35), "H100 PCIe": (756.0, 2.0), "H100": (989.0, 3.35), "H200": (989.0, 4.8),
         "A100": (312.0, 2.0), "L40S": (362.0, 0.864), "A40": (150.0, 0.696), "L4": (121.0, 0.3),
         "RTX 4090": (165.0, 1.0), "A10": (125.0, 0.6)}

AM_B, AM_HEADS, AM_D, AM_NATIVE = 2, 20, 64, (32, 32)


def gpu_peaks(name: str):
    for key in sorted(PEAKS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAKS[key]
    return None


def timer(device: str):
    """Returns time_ms(fn, warmup, repeats) -> median milliseconds (CUDA events on CUDA)."""
    def time_ms(fn, warmup=2, repeats=10):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    return time_ms


def am_flops(N: int, n: int, B=AM_B, heads=AM_HEADS, d=AM_D) -> float:
    return 4.0 * B * heads * d * (N * N + n * n)


def bench_ops(device: str, dtypes, scales, native, repeats: int):
    am_mod = importlib.import_module("fam_kernels.am_attention")
    lp_mod = importlib.import_module("fam_kernels.lowpass_blend")
    time_ms = timer(device)
    peaks = gpu_peaks(torch.cuda.get_device_name()) if device == "cuda" else None
    rows = []
    for dtype in dtypes:
        for s in scales:
            hr = (native[0] * s, native[1] * s)
            N, n = hr[0] * hr[1], native[0] * native[1]
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(AM_B, AM_HEADS, N, AM_D, device=device, dtype=dtype, generator=g) for _ in range(3))
            q_lr, k_lr = (torch.randn(AM_B, AM_HEADS, n, AM_D, device=device, dtype=dtype, generator=g)
                          for _ in range(2))
            providers = {name: name for name, b in am_mod.DISPATCHER.backends.items()
                         if not b.not_supported_reasons(device, dtype, AM_D)}
            providers["default"] = None
            for label, backend in providers.items():
                ms = time_ms(lambda: fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam=0.7, hr_size=hr,
                                                               lr_size=native, backend=backend), repeats=repeats)
                tflops = am_flops(N, n) / ms / 1e9
                rows.append(dict(op="am_attention", provider=label, dtype=str(dtype), x=f"{s}x {hr[0]}x{hr[1]}",
                                 ms=ms, tflops=tflops, peak_fraction=tflops / peaks[0] if peaks else None))
            ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats=repeats)
            tflops = 4.0 * AM_B * AM_HEADS * N * N * AM_D / ms / 1e9
            rows.append(dict(op="am_attention", provider="sdpa (floor)", dtype=str(dtype), x=f"{s}x {hr[0]}x{hr[1]}",
                             ms=ms, tflops=tflops, peak_fraction=tflops / peaks[0] if peaks else None))
            z = torch.randn(2, 4, 4 * native[0] * s, 4 * native[1] * s, device=device, dtype=dtype)
            zr = torch.randn_like(z)
            cutoff, gain = fam_kernels.fm_schedule(500, 1000, z.shape[-2], z.shape[-1])
            for name, b in lp_mod.DISPATCHER.backends.items():
                if b.not_supported_reasons(device, dtype):
                    continue
                ms = time_ms(lambda: fam_kernels.lowpass_blend(z, zr, cutoff, gain, backend=name), repeats=repeats)
                gbs = 3 * z.numel() * z.element_size() / ms / 1e6
                rows.append(dict(op="lowpass_blend", provider=name, dtype=str(dtype), x=f"latent {tuple(z.shape)}",
                                 ms=ms, gbs=gbs, peak_fraction=gbs / (peaks[1] * 1e3) if peaks else None))
    return rows


class _AmProcessor:
    """Self-attention with am_attention against native q/k of the right size (random:
    the work and memory of FAM's AM, not its values)."""

    def __init__(self, hr, native, lam=0.7):
        self.hr, self.native, self.lam = hr, native, lam

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        B, N, _ = hidden_states.shape
        heads = attn.heads
        split = lambda x: x.view(B, N, heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        sh, sw = self.hr[0] // self.native[0], self.hr[1] // self.native[1]
        n = N // (sh * sw)
        q_lr = torch.randn(B, heads, n, q.shape[-1], device=q.device, dtype=q.dtype)
        k_lr = torch.randn_like(q_lr)
        h, w = self.hr[0] // sh, self.hr[1] // sw
        out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam=self.lam, hr_size=self.hr, lr_size=(h, w))
        out = out.transpose(1, 2).reshape(B, N, -1)
        return attn.to_out[1](attn.to_out[0](out))


def bench_unet(device: str, sizes, repeats: int):
    """Rows for the real-size SDXL UNet, or one row saying why it did not run."""
    if not os.path.exists(UNET_CONFIG):
        return [dict(op="sdxl_unet", provider="-", x="-", note=f"skipped: no SDXL UNet config at {UNET_CONFIG} "
                     "(shipped with `fam plan`); nothing measured")]
    if device != "cuda":
        return [dict(op="sdxl_unet", provider="-", x="-", note="skipped: needs CUDA (2.57B parameters)")]
    from diffusers import UNet2DConditionModel

    with open(UNET_CONFIG) as f:
        config = json.load(f)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(config).to(torch.float16).eval()
    time_ms = timer(device)
    original = dict(unet.attn_processors)  # SDPA processors: restored after every FAM run
    rows = []
    for size in sizes:
        lat = size // 8
        native = 128  # SDXL's native 1024^2 latent
        for mode in ("direct", "fam"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            x = torch.randn(2, 4, lat, lat, device="cuda", dtype=torch.float16)
            ctx = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16)
            added = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
                     "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device="cuda", dtype=torch.float16)}
            t = torch.tensor([500], device="cuda")
            note = ""
            try:
                with torch.no_grad():
                    if mode == "direct" or lat == native:
                        step = lambda: unet(x, t, ctx, added_cond_kwargs=added)  # noqa: E731
                    else:
                        s = lat // native
                        layers = [name for name in unet.attn_processors if name.startswith("up_blocks.0")
                                  and ".attn1." in name]
                        hr_tokens = (lat // 2, lat // 2)  # up_blocks.0 runs at 1/2 of the latent (SDXL)
                        procs = {name: p for name, p in unet.attn_processors.items()}
                        for name in layers:
                            procs[name] = _AmProcessor(hr_tokens, (hr_tokens[0] // s, hr_tokens[1] // s))
                        unet.set_attn_processor(procs)
                        xn = torch.randn(2, 4, native, native, device="cuda", dtype=torch.float16)

                        def step():
                            unet(xn, t, ctx, added_cond_kwargs=added)  # the native pass AM recomputes from
                            unet(x, t, ctx, added_cond_kwargs=added)
                            c, gain = fam_kernels.fm_schedule(500, 1000, lat, lat)
                            fam_kernels.lowpass_blend(x, x, c, gain)
                    ms = time_ms(step, warmup=1, repeats=repeats)
            except torch.cuda.OutOfMemoryError:
                ms, note = float("nan"), "out of memory"
            finally:
                unet.set_attn_processor(dict(original))
            rows.append(dict(op="sdxl_unet", provider=mode, x=f"{size}^2 (latent {lat}^2), CFG batch 2, fp16",
                             ms=ms, max_memory_gb=torch.cuda.max_memory_allocated() / 1e9, note=note))
    return rows


def write(rows, out: str, name: str, header_note: str):
    os.makedirs(out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    fields = ["op", "provider", "dtype", "x", "ms", "tflops", "gbs", "peak_fraction", "max_memory_gb", "note"]
    csv_path, md_path = (os.path.join(out, f"gpu-{slug}.{ext}") for ext in ("csv", "md"))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"# GPU check: {name}\n", header_note, "", "| " + " | ".join(fields) + " |",
             "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in fields) + " |" for r in rows]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if cuda:
        device, name = "cuda", torch.cuda.get_device_name()
        scales, native, repeats = ((2,) if args.quick else (2, 3, 4)), AM_NATIVE, (5 if args.quick else 20)
        dtypes, sizes = (torch.float16, torch.bfloat16), ((1024, 2048) if args.quick else (1024, 2048, 4096))
        note = (f"torch {torch.__version__}, fam_kernels {fam_kernels.__version__}; CUDA events, medians. "
                f"Peak used for fractions: {gpu_peaks(name) or 'unknown GPU (no fraction)'} (TFLOP/s, TB/s).")
    else:
        print("gpu_check: no CUDA device: running the CPU-runnable parts at tiny shapes; CUDA parts skipped")
        device, name = "cpu", "cpu-smoke"
        scales, native, repeats, dtypes, sizes = (2,), (4, 4), 2, (torch.float32,), (1024,)
        note = ("CPU smoke run (no CUDA): the benchmark code paths at tiny shapes, wall-clock timing. "
                "Not a measurement of anything; the CUDA parts are skipped.")
    rows = bench_ops(device, dtypes, scales, native, repeats)
    rows += bench_unet(device, sizes, repeats=3 if cuda else 1)
    csv_path, md_path = write(rows, args.out, name, note)
    for r in rows:
        if r.get("note"):
            print(f"gpu_check: {r['op']}: {r['note']}")
    print(f"gpu_check: wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
