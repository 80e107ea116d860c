"""fam_demo.compare on constructed per-image tables: orientation, intervals, verdicts."""

import csv
import math

import numpy as np
import pytest

from fam_demo import compare
from fam_demo.compare import Arm
from fam_demo.evaluation import SAMPLE_COLUMNS

PROMPTS = [f"prompt {i}" for i in range(8)]
SCALES = ["2x2", "3x3", "4x4", "2x4"]


def _rows(mode, values, am_layers="default", am_lambda="0.7", count=1):
    """One row per (prompt, seed, scale); ``values(i)`` gives the metrics of row i."""
    rows, i = [], 0
    for prompt in PROMPTS:
        for seed in range(3):
            for scale in SCALES:
                v = values(i)
                rows.append({"prompt": prompt, "seed": seed, "mode": mode, "scale": scale, "am_layers": am_layers,
                             "am_lambda": am_lambda, "count": count, "one_object": 1.0 if count == 1 else 0.0,
                             **{m: v for m in compare.METRICS if m != "one_object"}})
                i += 1
    return rows


def test_a_constant_improvement_is_better_with_lower_is_better_metrics_oriented():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 5, 96)
    rows = _rows("fm", lambda i: base[i]) + _rows("fam", lambda i: base[i] - 0.3)
    for metric, expected in (("boundary_native_px", "better"), ("psnr", "worse")):
        c = compare.compare(rows, Arm("fm"), Arm("fam"), metric)
        assert c.n == 96 and c.verdict == expected
        assert c.improvement == pytest.approx(0.3 if expected == "better" else -0.3)
        assert c.low == pytest.approx(c.improvement) and c.high == pytest.approx(c.improvement)
        assert list(c.per_seed) == [0, 1, 2]


def test_noise_alone_is_no_measurable_difference_and_identical_arms_are_exactly_zero():
    rng = np.random.default_rng(1)
    base, noise = rng.uniform(1, 5, 96), rng.normal(0, 1, 96)
    noise -= noise.mean()
    rows = _rows("fm", lambda i: base[i]) + _rows("fam", lambda i: base[i] + noise[i])
    c = compare.compare(rows, Arm("fm"), Arm("fam"), "speckle_permille")
    assert c.verdict == "no measurable difference" and c.low < 0 < c.high
    assert abs(c.improvement) < 1e-12
    same = _rows("fm", lambda i: base[i]) + _rows("fam", lambda i: base[i])
    c = compare.compare(same, Arm("fm"), Arm("fam"), "psnr", scale="3x3")
    assert (c.n, c.improvement, c.wins, c.losses) == (24, 0.0, 0, 0)


def test_pairs_need_both_values_finite_and_arms_are_told_apart_by_their_am_settings():
    rows = (_rows("fam", lambda i: 1.0) + _rows("fam", lambda i: math.nan if i % 2 else 2.0, am_lambda="0.9")
            + _rows("fam", lambda i: 5.0, am_layers="up_blocks.0+up_blocks.1"))
    c = compare.compare(rows, Arm("fam"), Arm.parse("fam:default:0.9"), "hue_err_native_deg")
    assert c.n == 48 and c.improvement == -1.0 and c.variant.label == "fam (lambda 0.9)"
    c = compare.compare(rows, Arm("fam"), Arm.parse("fam:up_blocks.0+up_blocks.1"), "hue_err_native_deg")
    assert c.n == 96 and c.improvement == -4.0
    assert compare.compare(rows, Arm("fm"), Arm("fam"), "psnr").verdict == "no pairs"
    with pytest.raises(ValueError, match="mode"):
        Arm.parse("fam:a:b:c")


def test_the_command_reads_eval_tables_and_writes_csv_and_markdown(tmp_path):
    path = tmp_path / "quality_samples.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SAMPLE_COLUMNS)
        for mode, count, psnr in (("fm", 2, 20.0), ("fam", 1, 21.0)):
            for seed in range(3):
                w.writerow(["a red star", seed, mode, "2x2", "default", "0.7", "1", "20", count, 1, psnr, 0.5, 3.0,
                            "4.0", "2.0", "nan", "0.0", "1.0"])
    assert compare.main([str(path), "--pair", "fm,fam", "--out", str(tmp_path)]) == 0
    table = {(r["metric"], r["scale"]): r for r in csv.DictReader(open(tmp_path / "am_effect.csv"))}
    assert float(table[("one_object", "all")]["improvement"]) == 1.0
    assert table[("psnr", "2x2")]["verdict"] == "better"
    assert table[("boundary_native_px", "all")]["verdict"] == "no pairs"
    assert "| fm | fam | PSNR dB | all | 3 |" in (tmp_path / "am_effect.md").read_text()
    assert (tmp_path / "am_effect.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "missing.csv")])


def test_the_command_refuses_a_foreign_csv_and_an_arm_without_images(tmp_path, capsys):
    foreign = tmp_path / "quality.csv"
    foreign.write_text("scale,mode,n\n2x2,fam,3\n")
    with pytest.raises(SystemExit):
        compare.main([str(foreign)])
    assert "not a per-image CSV of fam eval" in capsys.readouterr().err
    path = tmp_path / "s.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SAMPLE_COLUMNS)
        w.writerow(["a red star", 0, "fam", "2x2", "default", "0.7", "1", "20", 1, 1, 20, 0.5, 3, 1, 1, 1, 0, 1])
    with pytest.raises(SystemExit):
        compare.main([str(path), "--pair", "fm,fam", "--out", str(tmp_path)])
    assert "--pair fm,fam: no images of fm in the samples (they hold fam)" in capsys.readouterr().err
