"""Benchmarks write into --out (default benchmarks/results/local/, git-ignored) and never
touch the committed results unless told to; --plot-only redraws from an existing CSV."""

import hashlib
import os
import shutil
import subprocess

import pytest

from benchmarks import bench_am_attention, bench_lowpass_blend, bench_pipeline, common

BENCHMARKS = {"lowpass_blend": bench_lowpass_blend, "am_attention": bench_am_attention, "pipeline": bench_pipeline}


def _snapshot(folder: str) -> dict:
    """Path -> content hash of every file under ``folder`` except the local results."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.join(root, d) != common.DEFAULT_OUT]
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.join(root, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_default_out_is_local_and_ignored_by_git():
    assert common.DEFAULT_OUT == os.path.join(common.RESULTS_DIR, "local")
    if shutil.which("git") is None or not os.path.exists(os.path.join(common.RESULTS_DIR, "..", "..", ".git")):
        pytest.skip("not a git checkout")
    probe = os.path.join(common.DEFAULT_OUT, "lowpass_blend.csv")
    result = subprocess.run(["git", "check-ignore", "-q", probe], cwd=common.RESULTS_DIR)
    assert result.returncode == 0, f"{probe} is not git-ignored"


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_plot_only_redraws_from_the_csv_in_out(name, tmp_path):
    shutil.copy(os.path.join(common.RESULTS_DIR, f"{name}.csv"), tmp_path)
    committed = _snapshot(common.RESULTS_DIR)
    BENCHMARKS[name].main(["--plot-only", "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == [f"{name}.csv", f"{name}.png"]
    with open(tmp_path / f"{name}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert _snapshot(common.RESULTS_DIR) == committed


def test_plot_only_without_a_csv_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench_pipeline.main(["--plot-only", "--out", str(tmp_path)])
    message = str(exit_info.value.code)
    assert "no " + str(tmp_path / "pipeline.csv") in message and "\n" not in message
    assert os.listdir(tmp_path) == []


def test_a_quick_run_writes_csv_markdown_and_plot_to_out_only(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setattr(bench_lowpass_blend, "cases", lambda: [((1, 2, 12, 20), 0.5), ((1, 2, 16, 16), 0.1),
                                                               ((1, 2, 16, 16), 0.5)])
    monkeypatch.setattr(bench_lowpass_blend, "aot_figures", lambda: ([], []))  # the Triton compile: not here
    committed = _snapshot(common.RESULTS_DIR)
    bench_lowpass_blend.main(["--quick", "--out", str(tmp_path / "run")])
    assert sorted(os.listdir(tmp_path / "run")) == ["lowpass_blend.csv", "lowpass_blend.md", "lowpass_blend.png"]
    rows = common.read_csv(str(tmp_path / "run" / "lowpass_blend.csv"))
    assert {r["x"] for r in rows} == {"1x2x12x20 t/T=0.5", "1x2x16x16 t/T=0.1", "1x2x16x16 t/T=0.5"}
    assert {"reference", "floor", "torch"} <= {r["provider"] for r in rows}
    assert _snapshot(common.RESULTS_DIR) == committed
