"""The planner next to public SDXL figures: direct 1024^2 generation (one image, and the
Hugging Face "Exploring simple optimizations for SDXL" setting: 4 images per call, fp16,
A100), and the AM-cache release before the decode (before/after the fix) at 4096^2.

    python -m benchmarks.plan_public_figures

Prints a markdown table (numbers are the planner's; the public ones are quoted in docs/plan.md).
"""

from __future__ import annotations

from fam.plan import Options, plan
from fam.plan.models import load_meta_pipeline

GIB = 2 ** 30


def main() -> int:
    meta = load_meta_pipeline("sdxl")
    sets = {"all on GPU": Options(), "model CPU offload": Options(offload="model"),
            "sequential CPU offload": Options(offload="sequential"),
            "fp16-fix VAE, all on GPU": Options(vae_fp16_fix=True)}
    print("| setting | images | attention | option set | peak GiB | peak GB | phase at peak |")
    print("|---|---|---|---|---|---|---|")
    for images in (1, 4):
        for attention in ("fused", "math"):
            result = plan(meta, 1024, 1024, mode="direct", images=images, attention=attention,
                          options=list(sets.values()))
            for (name, _), row in zip(sets.items(), result.rows):
                at = max(row.phases, key=row.phases.get)
                print(f"| SDXL direct 1024^2 | {images} | {attention} | {name} | {row.peak_bytes / GIB:.2f} "
                      f"| {row.peak_bytes / 1e9:.2f} | {at} |")
    result = plan(meta, 4096, 4096, options=[Options(am_source="cache"), Options(am_source="cache", offload="model")])
    print()
    print("| 4096^2 FAM, am_source cache on the GPU | peak GiB (cache released before decode) "
          "| peak GiB (cache held through the decode) | decode phase GiB before -> after |")
    print("|---|---|---|---|")
    for row in result.rows:
        before = row.phases["decode"] + result.am_cache_bytes
        print(f"| {row.options.label()} | {row.peak_bytes / GIB:.2f} | {row.peak_bytes_unreleased / GIB:.2f} "
              f"| {before / GIB:.2f} -> {row.phases['decode'] / GIB:.2f} |")
    print(f"\nAM cache at 4096^2, 50 steps: {result.am_cache_bytes / GIB:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
