"""benchmarks/bench_frontier.py: the grid, the fam-fast pick and the SDXL projection's arithmetic."""

import math

from benchmarks import bench_frontier as bf


def test_frontier_pick_and_projection():
    def row(s, k, one, psnr, detail, ratio, n=8, mode="fam"):
        return {"mode": mode, "high_res_strength": s, "high_res_steps": k, "n": n, "one_object": one, "psnr": psnr,
                "detail": detail, "time_ratio_median": ratio, "eligible": "", "fam_fast": ""}

    rows = [row(1.0, 20, 1.0, 20.0, 1.0, 1.0, mode="direct"), row(1.0, 20, 7 / 8, 25.0, 40.0, 1.3),
            row(0.5, 20, 6 / 8, 24.6, 30.0, 0.8),   # eligible: one sample fewer, -0.4 dB, 75% detail
            row(0.3, 20, 7 / 8, 26.0, 29.0, 0.5),   # detail 72.5%: out
            row(0.4, 10, 5 / 8, 26.0, 40.0, 0.4),   # two samples fewer: out
            row(0.5, 10, 7 / 8, 24.4, 40.0, 0.45)]  # -0.6 dB: out
    best = bf.pick(rows, 20)
    assert (best["high_res_strength"], best["high_res_steps"]) == (0.5, 20)
    assert [r["eligible"] for r in rows] == ["", "yes", "yes", "no", "no", "no"]
    assert bf.settings(20)[0] == (1.0, 20) and bf.step_counts(20) == [20, 13, 10]

    flops = {"steps": 10, "direct_flops": 100.0,
             "phase_flops": {"text": [1.0, 1], "native_step": [2.0, 10], "high_res_step": [10.0, 10],
                             "decode": [5.0, 1], "decode_native": [1.0, 1]}}
    assert math.isclose(bf.project(flops, 1.0, 1.0), (1 + 20 + 100 + 5 + 1) / 100)
    assert math.isclose(bf.project(flops, 0.5, 0.5), (1 + 20 + 10 * 2 + 5 + 1) / 100)  # K = 5, int(2.5) = 2 steps


def test_top_band_share_separates_checkerboard_from_texture():
    import numpy as np

    y, x = np.mgrid[0:256, 0:256]
    checker = np.repeat((((x + y) % 2) * 0.5 + 0.25)[..., None], 3, axis=2)  # period 2 px
    stripes = np.repeat((0.5 + 0.25 * np.sin(2 * np.pi * x / 5.0))[..., None], 3, axis=2)  # period 5 px
    assert bf.top_band_share(checker, bf.NATIVE_SIZE) > 0.95
    assert bf.top_band_share(stripes, bf.NATIVE_SIZE) < 0.05


def test_shortened_pass_steps_with_its_own_sigmas():
    """SDXL's loop calls set_begin_index(0) before it starts: with high_res_strength 0.5 of
    4 steps the high-res pass must still step from sigma index 2 (the bug this benchmark
    found stepped from 0)."""
    import os

    import torch

    import fam
    import fam_demo as demo

    os.environ["HF_HUB_OFFLINE"] = "1"
    fp = fam.FAMPipeline.from_pipe(demo.load_pipeline())
    fp.set_progress_bar_config(disable=True)
    scheduler = fp.pipe.scheduler
    seen, step = [], scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        seen.append((sample.shape[-1], scheduler.step_index))
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = recording_step
    fp(prompt=demo.caption("star", "red", "plain grey"), scale=2, mode="fm", num_inference_steps=4,
       high_res_strength=0.5, generator=torch.Generator().manual_seed(0), output_type="np")
    native = demo.NATIVE_SIZE // 4  # latent side (VAE factor 4)
    assert [index for width, index in seen if width == 2 * native] == [2, 3]  # the high-res latent
    assert [index for width, index in seen if width == native] == [0, 1, 2, 3]  # the native pass: untouched
