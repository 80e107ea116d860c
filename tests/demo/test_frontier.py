"""`fam eval --high-res-strength / --high-res-steps` (the shortened high-res pass): checked
before any work, passed to FAMPipeline in the modes with a native pass only, recorded in
the results."""

import csv
import os

import pytest

import fam
import fam_demo as demo
from fam_demo.evaluation import EvalConfig, aggregate, markdown_table, run_eval, shortened_pass, write_csv


@pytest.fixture(scope="module")
def fam_pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    fp = fam.FAMPipeline.from_pipe(demo.load_pipeline())
    fp.set_progress_bar_config(disable=True)
    return fp


class Spy:
    """Records the keyword arguments of every FAMPipeline call."""

    def __init__(self, fp):
        self.fp, self.pipe, self.calls = fp, fp.pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.fp(**kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--high-res-strength", "0"], "--high-res-strength 0: expected a number in (0, 1]"),
    (["--high-res-strength", "1.5"], "--high-res-strength 1.5: expected a number in (0, 1]"),
    (["--high-res-strength", "nan"], "--high-res-strength nan: expected a number in (0, 1]"),
    (["--high-res-steps", "0"], "--high-res-steps 0: expected 1 or more"),
    (["--steps", "4", "--high-res-strength", "0.2"],
     "--high-res-strength 0.2: leaves no high-res step of 4 (int(4 x 0.2) = 0)"),
    (["--high-res-strength", "0.3", "--high-res-steps", "3"],
     "--high-res-strength / --high-res-steps 0.3 / 3: leaves no high-res step of 3 (int(3 x 0.3) = 0)"),
])
def test_eval_refuses_bad_high_res_options_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    from fam import cli
    from fam_demo import evaluation

    monkeypatch.setattr(evaluation, "load_fam_pipeline", lambda **_: pytest.fail("loaded the model"))
    assert cli.main(["eval", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == f"fam eval: error: {message}" and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_run_eval_checks_the_shortened_pass_first(fam_pipe):
    spy = Spy(fam_pipe)
    with pytest.raises(ValueError, match=r"high_res_strength=0.1 leaves no step of 4"):
        run_eval(spy, EvalConfig(steps=4, high_res_strength=0.1), log=lambda m: None)
    with pytest.raises(ValueError, match=r"high_res_steps=2.5 must be an int"):
        run_eval(spy, EvalConfig(steps=4, high_res_steps=2.5), log=lambda m: None)
    assert spy.calls == []


def test_shortened_pass_reaches_fam_pipeline_and_is_recorded(fam_pipe, tmp_path):
    spy = Spy(fam_pipe)
    cfg = EvalConfig(prompts=[demo.caption("star", "red", "plain grey")], seeds=(0,), modes=["direct", "fam"],
                     scales=["2x2"], steps=4, high_res_strength=0.5, high_res_steps=2)
    samples, _ = run_eval(spy, cfg, log=lambda m: None)
    by_mode = {c["mode"]: c for c in spy.calls}
    assert (by_mode["fam"]["high_res_strength"], by_mode["fam"]["high_res_steps"]) == (0.5, 2)
    assert "high_res_strength" not in by_mode["direct"] and "high_res_steps" not in by_mode["direct"]
    assert {(s.mode, s.high_res_strength, s.high_res_steps) for s in samples} == {("direct", 1.0, 4),
                                                                                   ("fam", 0.5, 2)}
    rows = aggregate(samples)
    write_csv(rows, str(tmp_path / "q.csv"))
    with open(tmp_path / "q.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["mode"], r["high_res_strength"], r["high_res_steps"]) for r in table] == [("direct", "1", "4"),
                                                                                        ("fam", "0.5", "2")]
    assert "| 2x2 | fam | 0.5 | 2 | 1 |" in markdown_table(rows)

    full = run_eval(spy, EvalConfig(prompts=cfg.prompts, seeds=(0,), modes=["fam"], scales=["2x2"], steps=4),
                    log=lambda m: None)[0][0]
    assert (full.high_res_strength, full.high_res_steps) == (1.0, 4)
    assert spy.calls[-1]["high_res_strength"] == 1.0 and spy.calls[-1]["high_res_steps"] is None
    assert "high-res strength" not in markdown_table(aggregate([full]))  # the paper's pass: the usual table
    shortened = next(s for s in samples if s.mode == "fam")
    assert (full.psnr, full.detail) != (shortened.psnr, shortened.detail)


def test_shortened_pass_rule():
    assert shortened_pass("fam", 20, 0.5, 13) == (0.5, 13)
    assert shortened_pass("fm", 20, 0.5) == (0.5, 20)
    assert shortened_pass("direct", 20, 0.5, 13) == (1.0, 20)


def test_cli_eval_options_end_to_end(tmp_path):
    from fam import cli

    out = tmp_path / "out"
    assert cli.main(["eval", "--prompts", "1", "--seeds", "1", "--modes", "fam", "--scales", "2x2", "--steps", "4",
                     "--high-res-strength", "0.5", "--high-res-steps", "2", "--out", str(out)]) == 0
    with open(out / "quality.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["high_res_strength"], row["high_res_steps"]) == ("0.5", "2")
    assert "High-res pass: strength 0.5, 2 steps" in (out / "quality.md").read_text()
