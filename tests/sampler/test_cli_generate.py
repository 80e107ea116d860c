"""`fam generate`'s flags beyond text-to-image (issue 10 item 6), end to end on tiny
pipelines saved to folders, offline: schedulers, img2img, ControlNet, LoRA, batches,
threads, the default (demo) model, the A1111 chunk, and every check made before any
work (paths, devices, numbers, --from-png fields)."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from fam import cli
from fam.testing import tiny_controlnet, tiny_sdxl_pipeline
from fam_demo.model import NATIVE_SIZE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """LoRA weights (PEFT, random A and B so that the scale matters) for the tiny SDXL UNet."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = tmp_path_factory.mktemp("lora")
    unet = tiny_sdxl_pipeline().unet
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(str(path), unet_lora_layers=get_peft_model_state_dict(unet))
    return str(path / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    """fam.testing's tiny ControlNet of the tiny SDXL UNet (the control image matters), saved."""
    path = tmp_path_factory.mktemp("controlnet")
    tiny_controlnet(tiny_sdxl_pipeline().unet).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two 16x16 pictures (the tiny model's native size): a gradient and a checkerboard."""
    path = tmp_path_factory.mktemp("pictures")
    y, x = np.mgrid[0:16, 0:16]
    gradient = np.stack([x * 16, y * 16, 255 - x * 8], -1).astype(np.uint8)
    checker = (((x // 4 + y // 4) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    Image.fromarray(gradient).save(path / "gradient.png")
    Image.fromarray(checker).save(path / "checker.png")
    return str(path / "gradient.png"), str(path / "checker.png")


def generate(model_dir, out, *flags):
    return cli.main(["generate", "--model", model_dir, "--prompt", "a red cube", "--steps", "2", "--seed", "3",
                     "--out", str(out), *flags])


def metadata(path):
    with Image.open(path) as image:
        return json.loads(image.text[cli.METADATA_KEY])


def parameters(path):
    """The A1111 chunk as (prompt lines, {key: value}) parsed with A1111's own pattern."""
    with Image.open(path) as image:
        text = image.text[cli.PARAMETERS_KEY]
    *lines, last = text.split("\n")
    pattern = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
    return lines, {key: json.loads(value) if value.startswith('"') else value
                   for key, value in re.findall(pattern, last)}


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("fam generate: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


# ------------------------------------------------------------------------------ schedulers

@pytest.mark.parametrize("name", [name for name in cli.SCHEDULERS if name != "lms"])  # lms needs scipy
def test_every_scheduler_name_builds_from_the_model_config(name):
    template = tiny_sdxl_pipeline().scheduler
    class_name, overrides, _ = cli.SCHEDULERS[name]
    scheduler = cli.build_scheduler(template, name, False, "trailing" if name != "dpm++2s" else None)
    assert type(scheduler).__name__ == class_name
    assert scheduler.config.beta_schedule == template.config.beta_schedule == "scaled_linear"  # from the model
    assert all(scheduler.config[key] == value for key, value in overrides.items())
    assert name == "dpm++2s" or scheduler.config.timestep_spacing == "trailing"
    assert cli.build_scheduler(template, None, False, None) is template


@pytest.mark.parametrize("name", list(cli.SCHEDULERS))
def test_every_scheduler_runs_end_to_end(model_dir, tmp_path, capsys, name):
    out = tmp_path / "out.png"
    if name == "lms" and importlib.util.find_spec("scipy") is None:  # diffusers' LMS needs scipy
        assert generate(model_dir, out, "--scheduler", name, "--steps", "3") == 2
        assert "--scheduler lms: ImportError: LMSDiscreteScheduler requires the scipy library" in \
            one_line_error(capsys)
        assert not out.exists()
        return
    assert generate(model_dir, out, "--scheduler", name, "--steps", "3") == 0
    assert metadata(out)["scheduler_class"] == cli.SCHEDULERS[name][0]
    assert parameters(out)[1]["Sampler"] == cli.SCHEDULERS[name][2]
    assert pixels(out).std() > 0


def test_scheduler_flags_karras_alias_metadata_and_rerun(model_dir, tmp_path):
    karras = tmp_path / "karras.png"
    assert generate(model_dir, karras, "--scheduler", "dpm++2m", "--karras", "--timestep-spacing", "trailing") == 0
    record = metadata(karras)
    assert (record["scheduler"], record["karras"], record["timestep_spacing"]) == ("dpm++2m", True, "trailing")
    assert record["scheduler_class"] == "DPMSolverMultistepScheduler"
    config = record["scheduler_config"]
    assert (config["use_karras_sigmas"], config["timestep_spacing"], config["beta_schedule"]) == (
        True, "trailing", "scaled_linear")
    _, fields = parameters(karras)
    assert (fields["Sampler"], fields["Schedule type"]) == ("DPM++ 2M", "Karras")

    alias = tmp_path / "alias.png"
    assert generate(model_dir, alias, "--scheduler", "dpm++2m_karras", "--timestep-spacing", "trailing") == 0
    assert np.array_equal(pixels(alias), pixels(karras))
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(karras), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(karras)) and metadata(again)["scheduler_config"] == config

    euler_a = tmp_path / "euler_a.png"
    assert generate(model_dir, euler_a, "--scheduler", "euler_a") == 0
    assert metadata(euler_a)["scheduler_class"] == "EulerAncestralDiscreteScheduler"
    assert parameters(euler_a)[1]["Sampler"] == "Euler a" and "Schedule type" not in parameters(euler_a)[1]
    assert not np.array_equal(pixels(euler_a), pixels(karras))


def test_karras_on_a_scheduler_without_it_is_refused_before_generation(model_dir, tmp_path, capsys):
    assert generate(model_dir, tmp_path / "x.png", "--scheduler", "ddim", "--karras") == 2
    assert "--karras: ddim has no Karras sigmas; use one of euler, dpm++2m" in one_line_error(capsys)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ metadata

def test_a1111_parameters_chunk_and_recorded_values(model_dir, tmp_path):
    out, native = tmp_path / "out.png", tmp_path / "native.png"
    assert cli.main(["generate", "--model", model_dir, "--prompt", "a red cube, on a table", "--negative-prompt",
                     "blur", "--scale", "2x4", "--steps", "2", "--seed", "9", "--guidance", "4",
                     "--out", str(out), "--native-out", str(native)]) == 0
    lines, fields = parameters(out)
    assert lines == ["a red cube, on a table", "Negative prompt: blur"]
    assert {key: fields[key] for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "FAM mode",
                                         "FAM scale", "Native size")} == {
        "Steps": "2", "Sampler": "Euler", "CFG scale": "4.0", "Seed": "9", "Size": "64x32",  # width x height
        "Model": os.path.basename(model_dir), "FAM mode": "fam", "FAM scale": "2x4 (HxW)", "Native size": "16x16"}
    assert parameters(native)[1]["Size"] == "16x16"
    record = metadata(out)
    # the values actually used: resolved am_source and native size, the model's scheduler and its config
    assert (record["am_source"], record["native_height"], record["native_width"]) == ("recompute", 16, 16)
    assert (record["scheduler"], record["scheduler_class"]) == (None, "EulerDiscreteScheduler")
    assert record["scheduler_config"]["timestep_spacing"] == "leading"
    assert metadata(native)["image"] == "native"


def test_mode_without_attention_modulation_records_no_am_source(model_dir, tmp_path):
    out = tmp_path / "fm.png"
    assert generate(model_dir, out, "--mode", "fm", "--scale", "2x4") == 0
    record = metadata(out)
    assert (record["am_source"], record["native_height"], record["native_width"]) == (None, 16, 16)
    direct = tmp_path / "direct.png"
    assert generate(model_dir, direct, "--mode", "direct", "--scale", "2x4") == 0
    assert (metadata(direct)["native_height"], metadata(direct)["native_width"]) == (16, 16)


def test_am_layers(model_dir, tmp_path, capsys):
    default, wider = tmp_path / "default.png", tmp_path / "wider.png"
    assert generate(model_dir, default) == 0
    assert generate(model_dir, wider, "--am-layers", "up_blocks.0, up_blocks.1") == 0
    assert metadata(wider)["am_layers"] == ["up_blocks.0", "up_blocks.1"] and metadata(default)["am_layers"] is None
    assert not np.array_equal(pixels(wider), pixels(default))
    assert generate(model_dir, tmp_path / "x.png", "--am-layers", "up_blocks.9") == 2
    assert "--am-layers 'up_blocks.9': 'up_blocks.9' names no self-attention layer of this UNet" in \
        one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["default.png", "wider.png"]


def test_shortened_high_res_pass(model_dir, tmp_path):
    full, short = tmp_path / "full.png", tmp_path / "short.png"
    assert generate(model_dir, full, "--steps", "4") == 0
    assert generate(model_dir, short, "--steps", "4", "--high-res-strength", "0.5", "--high-res-steps", "6") == 0
    assert not np.array_equal(pixels(short), pixels(full))
    assert (metadata(short)["high_res_strength"], metadata(short)["high_res_steps"]) == (0.5, 6)
    assert (metadata(full)["high_res_strength"], metadata(full)["high_res_steps"]) == (1.0, None)
    fields = parameters(short)[1]
    assert (fields["FAM high-res strength"], fields["Hires steps"]) == ("0.5", "6")
    assert "Hires steps" not in parameters(full)[1]
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(short), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(short))


# ------------------------------------------------------------------------------ batches, threads, LoRA

def test_num_images_files_seeds_and_rerun(model_dir, tmp_path):
    out, native = tmp_path / "out.png", tmp_path / "nat.png"
    assert generate(model_dir, out, "--num-images", "3", "--seed", "5", "--native-out", str(native)) == 0
    assert sorted(os.listdir(tmp_path)) == ["nat-1.png", "nat-2.png", "nat.png", "out-1.png", "out-2.png", "out.png"]
    batch = [pixels(tmp_path / name) for name in ("out.png", "out-1.png", "out-2.png")]
    assert not np.array_equal(batch[0], batch[1]) and not np.array_equal(batch[1], batch[2])
    assert [parameters(tmp_path / n)[1]["Seed"] for n in ("out.png", "out-1.png", "nat-2.png")] == ["5", "6", "7"]
    assert [metadata(tmp_path / n)["index"] for n in ("out.png", "out-2.png")] == [0, 2]

    single = tmp_path / "single" / "six.png"
    single.parent.mkdir()
    assert generate(model_dir, single, "--seed", "6") == 0  # image i of a batch is seed + i on its own
    assert np.array_equal(pixels(single), batch[1])

    rerun = tmp_path / "rerun" / "again.png"
    rerun.parent.mkdir()
    assert cli.main(["generate", "--from-png", str(tmp_path / "out-1.png"), "--out", str(rerun)]) == 0
    assert sorted(os.listdir(rerun.parent)) == ["again-1.png", "again-2.png", "again.png"]
    assert np.array_equal(pixels(rerun.parent / "again-2.png"), batch[2])


def test_threads_are_set_before_loading(model_dir, tmp_path, monkeypatch, capsys):
    seen = []

    def load(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise cli.CLIError("stop here")

    monkeypatch.setattr(cli, "_load_pipeline", load)
    previous = torch.get_num_threads()
    try:
        assert generate(model_dir, tmp_path / "x.png", "--threads", "2") == 2
    finally:
        torch.set_num_threads(previous)
    assert seen == [2] and one_line_error(capsys).endswith("stop here")


def test_lora_scale_and_repeated_loras(model_dir, lora_file, tmp_path):
    plain, zero, full, halves = (tmp_path / f"{name}.png" for name in ("plain", "zero", "full", "halves"))
    assert generate(model_dir, plain) == 0
    assert generate(model_dir, zero, "--lora", f"{lora_file}:0") == 0
    assert generate(model_dir, full, "--lora", lora_file) == 0
    assert generate(model_dir, halves, "--lora", f"{lora_file}:0.5", "--lora", f"{lora_file}:0.5") == 0
    assert np.array_equal(pixels(zero), pixels(plain))  # scale 0: the LoRA adds nothing
    assert np.abs(pixels(full) - pixels(plain)).max() > 20  # scale 1 changes the picture
    assert np.abs(pixels(halves) - pixels(full)).max() <= 1  # two adapters at 0.5 each == one at 1
    assert metadata(halves)["lora"] == [[lora_file, 0.5], [lora_file, 0.5]]
    assert parameters(full)[1]["Lora"] == "pytorch_lora_weights.safetensors:1"
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(full), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(full))


def test_default_model_is_the_embedded_demo_model(tmp_path):
    out = tmp_path / "demo.png"
    assert cli.main(["generate", "--prompt", "a red circle", "--steps", "1", "--seed", "0", "--out", str(out)]) == 0
    assert os.path.isfile(os.path.join(cli.default_model_path(), "model_index.json"))
    assert metadata(out)["model"] == cli.default_model_path()
    n = 2 * NATIVE_SIZE  # the demo model's native size x 2
    assert Image.open(out).size == (n, n)
    assert parameters(out)[1]["Model"] == "fam-demo"


# ------------------------------------------------------------------------------ checks before any work

def _no_loading(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "_load_pipeline", load)


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "nan"], "--guidance nan: must be a finite number >= 0"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number >= 0"),
    (["--fm-c=-inf"], "--fm-c -inf: must be a finite number >= 0"),
    (["--am-lambda", "nan"], "--am-lambda nan: must be a number in [0, 1]"),
    (["--am-lambda", "1.5"], "--am-lambda 1.5: must be a number in [0, 1]"),
    (["--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 18446744073709551615]"),
    (["--num-images", "0"], "--num-images 0: must be an integer >= 1"),
    (["--native-height", "0"], "--native-height 0: must be an integer >= 1"),
    (["--scale", "2x0"], "--scale '2x0': expected N or HxW with factors >= 1"),
    (["--scheduler", "bogus"], "--scheduler 'bogus': must be one of euler, euler_a, ddim"),
    (["--timestep-spacing", "odd"], "--timestep-spacing 'odd': must be one of leading, linspace, trailing"),
    (["--threads", "0"], "--threads 0: must be an integer >= 1"),
    (["--high-res-strength", "0"], "--high-res-strength 0.0: must be a number in (0, 1]"),
    (["--high-res-strength", "nan"], "--high-res-strength nan: must be a number in (0, 1]"),
    (["--high-res-steps", "0"], "--high-res-steps 0: must be an integer >= 1"),
    (["--strength", "0.5"], "--strength 0.5: needs --image"),
    (["--controlnet-scale", "1"], "--controlnet-scale 1.0: needs --controlnet"),
    (["--controlnet", "x/y"], "--controlnet 'x/y': needs --control-image"),
    (["--lora", "a.safetensors:nan"], "--lora 'a.safetensors:nan': the LoRA scale must be a finite number"),
    (["--lora", "./missing.safetensors:0.5"], "--lora './missing.safetensors:0.5': no such file or folder"),
    (["--device", "nonsense"], "--device 'nonsense': not a device (cpu, cuda, cuda:N, mps, xpu)"),
    (["--device", "cuda"], "--device 'cuda': cuda is not available on this machine"),
    (["--device", "mps"], "--device 'mps': mps is not available on this machine"),
    (["--am-cache-device", "gpu7"], "--am-cache-device 'gpu7': not a device"),
    (["--am-cache-device", "cuda:0", "--am-source", "cache"], "--am-cache-device 'cuda:0': cuda is not available"),
    (["--am-cache-device", "cpu"], "--am-cache-device 'cpu': needs --am-source cache"),
    (["--am-source", "cache", "--mode", "fm"], "--am-source 'cache': mode 'fm' has no attention modulation"),
    (["--am-layers", "up_blocks.0", "--mode", "fm"], "--am-layers 'up_blocks.0': mode 'fm' has no attention"),
    (["--am-layers", ","], "--am-layers ',': expected comma-separated self-attention layer names"),
    (["--cpu-offload", "--device", "cpu"], "--cpu-offload: needs an accelerator --device"),
    (["--mode", "direct", "--native-out", "n.png"], "--native-out n.png: mode 'direct' has no native pass"),
])
def test_bad_flags_fail_in_one_line_before_loading(model_dir, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    _no_loading(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    assert generate(model_dir, out / "x.png", *flags) == 2
    assert message in one_line_error(capsys)
    assert os.listdir(out) == []


def test_device_index_beyond_the_machine_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _no_loading(monkeypatch)
    assert generate(model_dir, tmp_path / "x.png", "--device", "cuda:1") == 2
    assert one_line_error(capsys).endswith("--device 'cuda:1': this machine has 1 cuda device(s)")


def test_ctrl_c_is_one_line_and_leaves_no_file(model_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_pipeline", interrupted)
    assert generate(model_dir, tmp_path / "x.png") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fam generate: interrupted"
    assert os.listdir(tmp_path) == []


def test_paths_are_checked_before_loading(model_dir, pictures, tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    text_file = tmp_path / "notes.png"
    text_file.write_text("not a picture")
    unwritable = tmp_path / "read-only"
    unwritable.mkdir()
    unwritable.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere a permission allows; sysfs refuses it
        unwritable = "/sys"
    cases = [
        (["--out", str(tmp_path / "missing" / "x.png")], f"the folder {tmp_path / 'missing'} does not exist"),
        (["--out", str(tmp_path)], f"--out {tmp_path}: is a folder"),
        (["--out", ""], "--out '': give a file name"),
        (["--out", str(tmp_path / "sub") + os.sep], "give a file name"),
        (["--out", os.path.join(unwritable, "x.png")], f"cannot write in {unwritable}"),
        (["--out", str(tmp_path / "a.png"), "--native-out", str(tmp_path / "a.png")],
         f"--native-out {tmp_path / 'a.png'}: the same file as --out {tmp_path / 'a.png'}"),
        (["--out", str(tmp_path / "a.png"), "--native-out", str(tmp_path / "a-1.png"), "--num-images", "2"],
         f"--native-out {tmp_path / 'a-1.png'}: the same file as --out {tmp_path / 'a-1.png'}"),
        (["--image", str(tmp_path / "nope.png")], f"--image '{tmp_path / 'nope.png'}': no such file"),
        (["--image", str(text_file)], f"--image '{text_file}': cannot read it as an image"),
        (["--control-image", str(tmp_path / "nope.png"), "--controlnet", "x/y"], "--control-image '"),
        (["--model", str(tmp_path / "no-model")], f"--model '{tmp_path / 'no-model'}': no such file or folder"),
        (["--image", pictures[0], "--lora", str(tmp_path / "no.safetensors")], "no such file or folder"),
    ]
    before = sorted(os.listdir(tmp_path))
    for flags, message in cases:
        argv = ["generate", "--model", model_dir, "--prompt", "p", "--out", str(tmp_path / "ok.png"), *flags]
        assert cli.main(argv) == 2, flags
        assert message in one_line_error(capsys), flags
        assert sorted(os.listdir(tmp_path)) == before


def _fam_png(path, **fields):
    record = {"model": "x/y", "prompt": "p", "steps": 2, "seed": 1, **fields}
    cli.save_png_atomically(Image.new("RGB", (4, 4)), str(path), record)
    return str(path)


@pytest.mark.parametrize("field, value, reason", [
    ("steps", "2", "must be an integer >= 1"),
    ("steps", True, "must be an integer >= 1"),
    ("steps", 0, "must be an integer >= 1"),
    ("guidance", float("nan"), "must be a finite number >= 0"),
    ("fm_c", -1, "must be a finite number >= 0"),
    ("am_lambda", 2, "must be a number in [0, 1]"),
    ("mode", "bogus", "must be one of fam, fm, am"),
    ("scale", "2y", "expected N or HxW"),
    ("seed", -5, "must be an integer in [0, "),
    ("prompt", 5, "must be a non-empty string"),
    ("cfg_sequential", "yes", "must be true or false"),
    ("scheduler", "bogus", "must be one of euler"),
    ("lora", [["a.safetensors", "x"]], "the LoRA scale must be a finite number"),
    ("lora", "a.safetensors", "expected a list of [PATH, SCALE]"),
    ("num_images", 0, "must be an integer >= 1"),
    ("strength", 1.5, "must be a number in (0, 1]"),
    ("high_res_steps", 2.5, "must be an integer >= 1"),
])
def test_from_png_fields_are_checked_one_by_one(tmp_path, monkeypatch, capsys, field, value, reason):
    _no_loading(monkeypatch)
    png = _fam_png(tmp_path / "in.png", **{field: value})
    assert cli.main(["generate", "--from-png", png, "--out", str(tmp_path / "x.png")]) == 2
    assert one_line_error(capsys).startswith(f"fam generate: error: --from-png {png}: field {field!r} = {value!r}: "
                                             f"{reason}")
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


def test_from_png_checks_its_files_and_bad_json(tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    png = _fam_png(tmp_path / "in.png", init_image=str(tmp_path / "gone.png"))
    assert cli.main(["generate", "--from-png", png, "--out", str(tmp_path / "x.png")]) == 2
    assert one_line_error(capsys).endswith(f"--from-png {png}: field 'init_image' = '{tmp_path / 'gone.png'}': "
                                           f"no such file")
    from PIL.PngImagePlugin import PngInfo

    for text, message in [("{not json", "is not JSON"), ("[1, 2]", "is not a JSON object")]:
        info = PngInfo()
        info.add_text(cli.METADATA_KEY, text)
        Image.new("RGB", (4, 4)).save(tmp_path / "bad.png", pnginfo=info)
        assert cli.main(["generate", "--from-png", str(tmp_path / "bad.png"), "--out", str(tmp_path / "x.png")]) == 2
        assert message in one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["bad.png", "in.png"]


def test_from_png_flags_override_fields_and_errors_name_the_source(tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    png = _fam_png(tmp_path / "in.png", fm_c=float("inf"))
    # a flag replaces the bad stored field: the next check (the model) is reached
    assert cli.main(["generate", "--from-png", png, "--fm-c", "0.3", "--model", str(tmp_path / "m"),
                     "--out", str(tmp_path / "x.png")]) == 2
    assert f"--model '{tmp_path / 'm'}': no such file or folder" in one_line_error(capsys)


# ------------------------------------------------------------------------------ through the sampler's pipelines
# These need FAMPipeline to wrap img2img / ControlNet pipelines, forward their arguments
# and label its progress bars (the sampler work of issue 10 items 1-2).

def test_progress_bars_are_labelled_with_pass_and_size(model_dir, tmp_path, capsys):
    assert generate(model_dir, tmp_path / "x.png", "--scale", "2x4") == 0
    err = capsys.readouterr().err
    assert "native 16x16" in err and "high-res 32x64" in err  # height x width


def test_img2img_image_and_strength(model_dir, pictures, tmp_path):
    gradient, checker = pictures
    out, native = tmp_path / "half.png", tmp_path / "half-native.png"
    assert generate(model_dir, out, "--image", gradient, "--strength", "0.5", "--steps", "4", "--scale", "2x4",
                    "--native-out", str(native)) == 0
    assert Image.open(out).size == (64, 32) and Image.open(native).size == (16, 16)
    record = metadata(out)
    assert (record["init_image"], record["strength"], record["am_source"]) == (gradient, 0.5, "diffused")
    assert parameters(out)[1]["Denoising strength"] == "0.5"

    strong, other_picture = tmp_path / "strong.png", tmp_path / "checker.png"
    assert generate(model_dir, strong, "--image", gradient, "--strength", "0.9", "--steps", "4", "--scale", "2x4") == 0
    assert generate(model_dir, other_picture, "--image", checker, "--strength", "0.5", "--steps", "4",
                    "--scale", "2x4") == 0
    assert not np.array_equal(pixels(strong), pixels(out)) and not np.array_equal(pixels(other_picture), pixels(out))
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(out), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))

    default = tmp_path / "default.png"
    assert generate(model_dir, default, "--image", gradient, "--steps", "4") == 0
    assert metadata(default)["strength"] == 0.3  # StableDiffusionXLImg2ImgPipeline's default, recorded


def test_img2img_with_no_step_left_is_one_line(model_dir, pictures, tmp_path, capsys):
    assert generate(model_dir, tmp_path / "x.png", "--image", pictures[0]) == 2  # default strength 0.3, 2 steps
    assert one_line_error(capsys).endswith("--strength 0.3 with --steps 2: img2img would run int(2 x 0.3) = 0 "
                                           "steps; raise one of them")
    assert os.listdir(tmp_path) == []


def test_controlnet_control_image(model_dir, controlnet_dir, pictures, tmp_path):
    gradient, checker = pictures
    out = tmp_path / "checker.png"
    assert generate(model_dir, out, "--controlnet", controlnet_dir, "--control-image", checker, "--scale", "2x4") == 0
    assert Image.open(out).size == (64, 32)
    record = metadata(out)
    assert (record["controlnet"], record["control_image"], record["controlnet_scale"]) == (
        controlnet_dir, checker, 1.0)
    assert parameters(out)[1]["ControlNet weight"] == "1.0"
    other = tmp_path / "gradient.png"
    assert generate(model_dir, other, "--controlnet", controlnet_dir, "--control-image", gradient,
                    "--scale", "2x4") == 0
    assert not np.array_equal(pixels(other), pixels(out))  # the control image steers the picture
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(out), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))


def test_sd15_text_to_image_and_img2img(pictures, tmp_path_factory, tmp_path):
    from fam.testing import tiny_sd_pipeline

    model = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd_pipeline().save_pretrained(str(model))
    out, img2img = tmp_path / "t2i.png", tmp_path / "i2i.png"
    assert generate(str(model), out, "--scale", "2x4") == 0
    assert Image.open(out).size == (64, 32)
    assert (metadata(out)["guidance"], metadata(out)["scheduler_class"]) == (7.5, "DDIMScheduler")  # SD's defaults
    assert generate(str(model), img2img, "--image", pictures[0], "--strength", "0.5", "--steps", "4") == 0
    assert Image.open(img2img).size == (32, 32)
    assert (metadata(img2img)["strength"], metadata(img2img)["am_source"]) == (0.5, "diffused")


def test_controlnet_with_img2img(model_dir, controlnet_dir, pictures, tmp_path):
    gradient, checker = pictures
    out = tmp_path / "out.png"
    assert generate(model_dir, out, "--image", gradient, "--strength", "0.6", "--steps", "4", "--controlnet",
                    controlnet_dir, "--control-image", checker, "--controlnet-scale", "0.8", "--mode", "fm") == 0
    assert Image.open(out).size == (32, 32)
    record = metadata(out)
    assert (record["init_image"], record["control_image"], record["controlnet_scale"]) == (gradient, checker, 0.8)


# ------------------------------------------------------------------------------ --max-memory

def test_max_memory_picks_and_records_the_options(model_dir, tmp_path, capsys):
    out = tmp_path / "budget.png"
    assert cli.main(["generate", "--model", model_dir, "--prompt", "a red cube", "--steps", "1", "--seed", "0",
                     "--max-memory", "100GB", "--out", str(out)]) == 0
    assert "--max-memory 100GB: cfg=" in capsys.readouterr().err
    recorded = metadata(out)
    assert recorded["max_memory"] == "100GB" and recorded["am_source"] in ("recompute", "cache")


@pytest.mark.parametrize("flags, message", [
    (["--max-memory", "lots"], "--max-memory lots: 'lots' is not a size"),
    (["--max-memory", "8GB", "--cfg-sequential"], "--max-memory chooses --cfg-sequential itself"),
])
def test_max_memory_checked_before_loading(flags, message, tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    out = tmp_path / "x.png"
    assert cli.main(["generate", "--prompt", "x", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_max_memory_nothing_fits_is_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli.main(["generate", "--model", model_dir, "--prompt", "x", "--steps", "1", "--max-memory", "1MB",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "nothing fits" in err[-1] and not out.exists()
