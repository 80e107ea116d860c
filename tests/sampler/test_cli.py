"""`fam generate` end to end on a tiny SDXL pipeline folder (save_pretrained), offline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fam
from fam import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def metadata(path):
    with Image.open(path) as image:
        return json.loads(image.text[cli.METADATA_KEY])


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_metadata_and_from_png_round_trip(model_dir, tmp_path, capsys):
    out, native = str(tmp_path / "out.png"), str(tmp_path / "native.png")
    status = cli.main(["generate", "--model", model_dir, "--prompt", "a red cube", "--negative-prompt", "blur",
                       "--scale", "2x4", "--steps", "2", "--seed", "3", "--guidance", "4", "--am-source", "cache",
                       "--out", out, "--native-out", native])
    assert status == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [out, native]
    assert "seed 3" in captured.err and "2/2" in captured.err  # the progress bars of both passes
    assert Image.open(out).size == (64, 32) and Image.open(native).size == (16, 16)  # PIL: (width, height)

    recorded = metadata(out)
    assert recorded["version"] == fam.__version__
    assert {key: recorded[key] for key in ("model", "prompt", "negative_prompt", "scale", "steps", "seed",
                                           "guidance", "mode", "am_source", "fm_c", "am_lambda", "image")} == {
        "model": model_dir, "prompt": "a red cube", "negative_prompt": "blur", "scale": "2x4", "steps": 2,
        "seed": 3, "guidance": 4.0, "mode": "fam", "am_source": "cache", "fm_c": 0.5, "am_lambda": 0.7,
        "image": "high_res"}
    assert metadata(native)["image"] == "native"

    again = str(tmp_path / "again.png")
    assert cli.main(["generate", "--from-png", out, "--out", again]) == 0
    assert np.array_equal(pixels(again), pixels(out))
    assert metadata(again) == recorded

    overridden = str(tmp_path / "direct.png")
    assert cli.main(["generate", "--from-png", out, "--mode", "direct", "--seed", "4", "--out", overridden]) == 0
    changed = metadata(overridden)
    assert (changed["mode"], changed["seed"], changed["prompt"], changed["scale"]) == ("direct", 4, "a red cube",
                                                                                       "2x4")
    assert sorted(os.listdir(tmp_path)) == ["again.png", "direct.png", "native.png", "out.png"]  # no temp files


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    cli.save_png_atomically(Image.new("RGB", (4, 4), "red"), str(target), {"v": 1})
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cli.save_png_atomically(Image.new("RGB", (4, 4), "blue"), str(target), {"v": 2})
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.png"]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "m"], "--prompt is required"),
    (["generate", "--model", "m", "--prompt", "p", "--scale", "2y"], "--scale '2y': expected N or HxW"),
    (["generate", "--from-png", "/nonexistent.png"], "--from-png /nonexistent.png: cannot read it"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fam generate: error: {err.split('error: ', 1)[1]}" and message in err and "\n" not in err


def test_invalid_size_for_the_model_is_one_line(model_dir, tmp_path, capsys):
    assert cli.main(["generate", "--model", model_dir, "--prompt", "p", "--native-height", "20",
                     "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fam generate: error: native_height=20 must be a positive multiple of 8")
    assert os.listdir(tmp_path) == []


def test_offline_model_load_failure_is_one_line_without_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "fam.cli", "generate", "--model", "nobody/no-such-model",
                             "--prompt", "p", "--out", str(tmp_path / "x.png")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fam generate: error: cannot load model 'nobody/no-such-model'")
    assert not (tmp_path / "x.png").exists()
