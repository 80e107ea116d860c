"""Training pipeline plumbing at toy sizes: native size as a parameter, resumable runs
(killed or stopped cleanly) that end exactly where an uninterrupted run ends."""

import csv
import json

import pytest
import torch

from fam_demo import model as M
from fam_demo import train as T

TINY = ["--native-size", "32", "--unet-channels", "16,16,32", "--transformer-layers", "1,1,1", "--images", "8",
        "--vae-steps", "3", "--vae-batch", "2", "--steps", "5", "--batch", "2", "--warmup", "2",
        "--decay-steps", "2", "--ckpt-every", "2", "--threads", "1"]


def _run(tmp_path, name, extra=()):
    work, out = tmp_path / name, tmp_path / f"{name}-model"
    assert T.main(TINY + ["--workdir", str(work), "--out", str(out), *extra]) == 0
    return work, out


def _loss_rows(work):
    with open(work / "loss.csv") as f:
        return [r[:4] for r in csv.reader(f)]  # without the wall-clock column


def _final_weights(work):
    return torch.load(work / "state.pt", weights_only=False)["modules"]


def _assert_same(a, b):
    for sa, sb in zip(_final_weights(a), _final_weights(b)):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    return _run(tmp_path_factory.mktemp("train"), "full")


def test_native_size_reaches_data_vae_and_unet(uninterrupted):
    work, out = uninterrupted
    with open(out / "unet" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["sample_size"] == 8 and cfg["block_out_channels"] == [16, 16, 32]
    assert cfg["addition_embed_type"] == "text_time"
    assert (out / "loss.csv").exists() and (out / "training.json").exists()
    with open(out / "training.json") as f:
        assert json.load(f)["invocations"][0]["unet_steps"] == [0, 5]
    assert [r[0] for r in _loss_rows(work)] == ["step", "0", "1", "2", "3", "4"]
    assert T.micro_sizes(128).tolist() == [128, 256, 384, 512]


def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path, monkeypatch):
    real = T.learning_rate

    def crash_at_step_3(step, args):
        if step == 3:
            raise RuntimeError("killed")
        return real(step, args)

    monkeypatch.setattr(T, "learning_rate", crash_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, "killed")
    assert torch.load(tmp_path / "killed" / "state.pt", weights_only=False)["step"] == 2  # last checkpoint
    monkeypatch.setattr(T, "learning_rate", real)
    work, _ = _run(tmp_path, "killed")
    assert _loss_rows(work) == _loss_rows(uninterrupted[0])  # the logged step 2 was cut and recomputed
    _assert_same(work, uninterrupted[0])


def test_clean_stops_in_every_stage_resume_to_the_same_result(uninterrupted, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "DATA_SHARD", 3)  # 8 images: shards of 3, 3 and 2
    invocations = 0
    while not (tmp_path / "chunks-model" / "training.json").exists():
        _run(tmp_path, "chunks", ["--max-minutes", "1e-9"])  # stops after every step
        invocations += 1
        assert invocations < 20
    assert invocations == 9  # stops after data shards 1, 2, VAE steps 1, 2, UNet steps 1, 2, 3, 4; then the end
    assert _loss_rows(tmp_path / "chunks") == _loss_rows(uninterrupted[0])
    _assert_same(tmp_path / "chunks", uninterrupted[0])
    for name in ("data.npz", "latents.pt"):
        assert (tmp_path / "chunks" / name).read_bytes() == (uninterrupted[0] / name).read_bytes()


def test_signal_handlers_are_restored_after_a_run(uninterrupted):
    import signal

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's Ctrl-C still works


def _safetensors(folder):
    from safetensors.torch import load_file

    return {sub: load_file(str(next((folder / sub).glob("*.safetensors"))))
            for sub in ("unet", "vae", "text_encoder", "text_encoder_2")}


def test_init_from_starts_every_component_from_a_trained_pipeline(uninterrupted, tmp_path):
    """Zero UNet steps after --init-from give back the trained weights exactly (the VAE is
    not retrained; data and latents are made at the new native size)."""
    _, trained = uninterrupted
    work, out = _run(tmp_path, "init", ["--init-from", str(trained), "--steps", "0", "--native-size", "48"])
    before, after = _safetensors(trained), _safetensors(out)
    for sub in before:
        assert before[sub].keys() == after[sub].keys()
        for k in before[sub]:
            assert torch.equal(before[sub][k], after[sub][k]), (sub, k)
    with open(out / "unet" / "config.json") as f:
        assert json.load(f)["sample_size"] == 12
    assert json.load(open(work / "vae_time.json"))["init_from"] == str(trained)
    with open(out / "training.json") as f:
        assert json.load(f)["init_from_training"]["settings"]["native_size"] == 32
    with pytest.raises(SystemExit, match="its unet does not match"):
        T.main([*TINY[:2], "--unet-channels", "16,32,32", *TINY[4:], "--workdir", str(tmp_path / "other"),
                "--out", str(tmp_path / "o"), "--init-from", str(trained)])


def test_resume_refuses_changed_model_settings(uninterrupted, tmp_path):
    work, out = uninterrupted
    with pytest.raises(SystemExit, match="started with other --unet-channels"):
        T.main([*TINY[:2], "--unet-channels", "16,32,32", *TINY[4:], "--workdir", str(work), "--out", str(out)])


@pytest.mark.parametrize("argv, message", [
    (["--native-size", "64"], "--out is required for a 64 px run"),
    (["--init-from", "/nonexistent"], "--init-from /nonexistent: not a pipeline folder"),
    (["--native-size", "40", "--out", "x"], "native_size 40: expected a multiple of 16"),
    (["--unet-channels", "32,64"], "expected three positive multiples of 16"),
])
def test_bad_settings_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(argv)
    assert message in capsys.readouterr().err


def test_unet_config_keeps_the_sdxl_layout_at_128px():
    cfg = M.unet_config(128, (48, 96, 192))
    assert cfg["sample_size"] == 32 and cfg["attention_head_dim"] == (3, 6, 12)
    assert cfg["down_block_types"][0] == "DownBlock2D" and cfg["up_block_types"][0] == "CrossAttnUpBlock2D"
    assert M.unet_config() == M.UNET_CONFIG and M.vae_config() == M.VAE_CONFIG


def test_measure_step_seconds_reports_wall_and_cpu_time(tmp_path, capsys):
    assert T.main(TINY + ["--workdir", str(tmp_path), "--out", str(tmp_path / "x"), "--measure-step-seconds", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 2 and res["latent"] == 8 and res["batch"] == 2
    assert res["wall_s_per_step"] > 0 and res["cpu_s_per_step"] > 0 and res["fp16_mb_all"] > 0
    assert not (tmp_path / "x").exists() and not (tmp_path / "args.json").exists()  # nothing trained


def test_128px_unet_has_8x8_native_tokens_in_up_blocks_0():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**M.unet_config(128, (32, 64, 128), layers_per_block=2))
    seen = set()

    def hook(module, args, kwargs):
        seen.add(tuple((args[0] if args else kwargs["hidden_states"]).shape))

    unet.up_blocks[0].attentions[0].transformer_blocks[0].attn1.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        unet(torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.randn(1, 16, 2 * M.TEXT_HIDDEN),
             added_cond_kwargs={"text_embeds": torch.randn(1, M.TEXT_PROJECTION), "time_ids": torch.zeros(1, 6)})
    assert seen == {(1, 64, 128)}  # 8 x 8 tokens of the lowest-resolution level, 128 channels
    assert not hasattr(unet.down_blocks[0], "attentions")  # no attention at the top level
