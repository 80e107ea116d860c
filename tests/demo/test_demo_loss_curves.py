"""The training-curve plot (docs/demo/loss_curves.png) from the loss CSVs."""

import os

import numpy as np

from fam_demo.loss_curves import join_stages, main, running_mean


def test_running_mean_averages_the_last_window_values():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(running_mean(values, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(running_mean(values, 10), [1.0, 2.0, 3.0, 4.0])


def test_writes_one_png_from_the_two_csvs(tmp_path):
    unet, vae = tmp_path / "unet.csv", tmp_path / "vae.csv"
    unet.write_text("step,loss,loss_avg100,lr,elapsed_s\n" + "".join(
        f"{s},{1 / (s + 1)},{1 / (s + 1)},0.0005,{s}\n" for s in range(30)))
    vae.write_text("step,l1,mse,kl_per_dim\n" + "".join(
        f"{s},{0.5 / (s + 1)},{0.1 / (s + 1)},{s}\n" for s in range(30)))
    out = tmp_path / "curves.png"
    assert main(["--unet", str(unet), "--vae", str(vae), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "unet.csv", "vae.csv"]


def test_a_missing_csv_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    assert main(["--unet", str(tmp_path / "none.csv"), "--vae", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loss_curves: error: FileNotFoundError") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_stages_follow_each_other_on_one_step_axis(tmp_path):
    first = {"step": np.arange(3.0), "loss": np.ones(3)}
    second = {"step": np.arange(2.0), "loss": np.zeros(2)}
    joined = join_stages([first, second])
    np.testing.assert_array_equal(joined["step"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(joined["stage"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(joined["loss"], [1, 1, 1, 0, 0])
    rows = "step,loss,loss_avg100,lr,elapsed_s\n" + "".join(f"{s},1,1,0.001,{s}\n" for s in range(5))
    (tmp_path / "a.csv").write_text(rows)
    (tmp_path / "b.csv").write_text(rows)
    (tmp_path / "vae.csv").write_text("step,l1,mse,kl_per_dim\n0,1,1,1\n1,1,1,1\n")
    out = tmp_path / "c.png"
    assert main(["--unet", f"{tmp_path / 'a.csv'},{tmp_path / 'b.csv'}", "--vae", str(tmp_path / "vae.csv"),
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
