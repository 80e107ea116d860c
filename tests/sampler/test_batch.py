"""`fam batch` (and the sharded `fam eval`): the PROMPTS file, determinism whatever the
number of processes, resume, a killed rank, failures. The multi-process tests launch 2
CPU processes with torchrun (gloo) or `accelerate launch`, on the embedded demo model at
2 steps."""

import collections
import csv
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from PIL import Image

from fam import batch, cli, distributed, jobs
from fam_demo import caption
from fam_demo.model import NATIVE_SIZE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [caption("star", "red", "striped grey"), caption("circle", "blue", "checkered beige"),
           caption("triangle", "yellow", "gradient slate"), caption("ring", "green", "noisy grey"),
           caption("cross", "purple", "dotted beige"), caption("square", "orange", "plain slate")]
FAST = ["--steps", "2", "--threads", "1"]


def _env():
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def fam_command(args, nproc=None):
    if nproc is None:
        return [sys.executable, "-m", "fam", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "fam", *args]


def run(command, timeout=420):
    return subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)


def pngs(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
            if name.endswith(".png")}


def manifest(folder):
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_clean(folder):
    """No temporary file of an atomic write, no run state left, only the lock file."""
    assert [name for name in os.listdir(folder) if name.endswith(".tmp")] == []
    assert os.listdir(os.path.join(folder, ".fam-batch")) == ["lock"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process `fam batch --threads 1` sets torch's thread count: give it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n")  # a blank line is skipped
    return str(path)


@pytest.fixture(scope="module")
def reference(prompts_file, tmp_path_factory):
    """One process, no launcher: the PNGs every other run must reproduce bit for bit."""
    out = str(tmp_path_factory.mktemp("reference"))
    result = run(fam_command(["batch", prompts_file, "--out", out, *FAST]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 generated, 0 already done, 0 failed" in result.stdout
    files = pngs(out)
    assert sorted(files) == [jobs.output_name(i, p) for i, p in enumerate(PROMPTS)]
    return files


# ------------------------------------------------------------------------------ multi-process

@pytest.mark.slow
def test_two_ranks_equal_one_rank_bit_for_bit_and_a_rerun_skips_everything(prompts_file, reference, tmp_path):
    out = str(tmp_path / "out")
    result = run(fam_command(["batch", prompts_file, "--out", out, *FAST], nproc=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert pngs(out) == reference
    assert "6 jobs, 2 process(es), dynamic claiming: 6 generated, 0 already done, 0 failed" in result.stdout
    assert re.search(r"fam batch \[rank 1/2\]: job \d+ done", result.stderr)  # per-rank progress
    records = manifest(out)
    assert sorted(r["job"] for r in records) == list(range(6)) and {r["status"] for r in records} == {"done"}
    assert {r["world_size"] for r in records} == {2} and {r["rank"] for r in records} <= {0, 1}
    assert all(r["output"] == jobs.output_name(r["job"], PROMPTS[r["job"]]) and r["seed"] == r["job"]
               for r in records)
    assert_clean(out)

    before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
    lines = open(os.path.join(out, "manifest.jsonl")).read()
    again = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", _free_port(), "-m", "fam", "batch", prompts_file, "--out", out, *FAST])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 jobs, 2 process(es), dynamic claiming: 0 generated, 6 already done, 0 failed" in again.stdout
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in before if name.endswith(".png")} == \
        {name: mtime for name, mtime in before.items() if name.endswith(".png")}
    assert open(os.path.join(out, "manifest.jsonl")).read() == lines
    assert_clean(out)


@pytest.mark.slow
def test_a_killed_rank_then_a_rerun_gives_every_image_exactly_once(prompts_file, reference, tmp_path):
    out = str(tmp_path / "out")
    process = subprocess.Popen(fam_command(["batch", prompts_file, "--out", out, *FAST], nproc=2),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    pids, killed, seen = {}, False, []
    for line in process.stderr:
        seen.append(line)
        loading = re.search(r"\[rank (\d)/2\]: loading .* \(pid (\d+)\)", line)
        if loading:
            pids[int(loading.group(1))] = int(loading.group(2))
        if re.search(r"\[rank 1/2\]: job \d+ done", line):
            os.kill(pids[1], signal.SIGKILL)  # part-way: after its first image
            killed = True
            break
    process.communicate(timeout=300)
    assert killed, "".join(seen)[-3000:]
    assert process.returncode != 0
    first = pngs(out)
    assert 1 <= len(first) < 6
    assert all(reference[name] == data for name, data in first.items())  # whole images only, the right ones

    result = run(fam_command(["batch", prompts_file, "--out", out, *FAST], nproc=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{6 - len(first)} generated, {len(first)} already done, 0 failed" in result.stdout
    assert pngs(out) == reference
    done = collections.Counter(r["job"] for r in manifest(out) if r["status"] == "done")
    assert done == {i: 1 for i in range(6)}  # the killed run's lines were merged, none twice
    assert_clean(out)


@pytest.mark.slow
def test_a_bad_prompts_file_under_torchrun_is_one_line_before_loading(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red star"}\n{"prompt": "a blue circle",}\n')
    result = run(fam_command(["batch", str(bad), "--out", str(tmp_path / "out")], nproc=2))
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "fam batch" in line]
    assert errors == [f"fam batch: error: PROMPTS {bad} line 2: invalid JSON "
                      "(Expecting property name enclosed in double quotes: line 1 column 28 (char 27))"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sharded_eval_equals_single_process(tmp_path):
    args = ["eval", "--prompts", "2", "--seeds", "2", "--modes", "direct,fam", "--scales", "2x2", "--steps", "2",
            "--threads", "1"]
    tables = []
    for name, nproc in (("one", None), ("two", 2)):
        result = run(fam_command([*args, "--out", str(tmp_path / name)], nproc=nproc))
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / name / "quality.csv") as f:
            tables.append([{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)])
    assert [(row["scale"], row["mode"], row["n"]) for row in tables[0]] == [("2x2", "direct", "4"), ("2x2", "fam", "4")]
    assert tables[0] == tables[1]
    assert sorted(os.listdir(tmp_path / "two")) == ["quality.csv", "quality.md", "quality_samples.csv"]


# ------------------------------------------------------------------------------ one process

def test_a_failed_job_is_recorded_and_the_batch_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" +
                    json.dumps({"prompt": PROMPTS[1], "native_height": 20}) + "\n" +
                    json.dumps({"prompt": PROMPTS[2], "seed": 7, "scale": "2x4", "mode": "direct"}) + "\n")
    out = str(tmp_path / "out")
    argv = ["batch", str(path), "--out", out, "--seed", "10", *FAST]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "3 jobs, 1 process(es), dynamic claiming: 2 generated, 0 already done, 1 failed" in captured.out
    assert "failed: job 1 (line 2): ValueError: native_height=20" in captured.out
    assert sorted(pngs(out)) == [jobs.output_name(0, PROMPTS[0]), jobs.output_name(2, PROMPTS[2])]
    status = {r["job"]: r for r in manifest(out)}
    assert [status[i]["status"] for i in range(3)] == ["done", "failed", "done"]
    assert status[1]["line"] == 2 and "native_height=20" in status[1]["error"]
    with Image.open(os.path.join(out, jobs.output_name(2, PROMPTS[2]))) as image:
        meta = json.loads(image.text[cli.METADATA_KEY])
        assert image.size == (4 * NATIVE_SIZE, 2 * NATIVE_SIZE)  # 2x4 of the native size, (width, height)
    assert (meta["seed"], meta["scale"], meta["mode"], meta["steps"], meta["job"]) == (7, "2x4", "direct", 2, 2)
    assert status[0]["seed"] == 10  # --seed 10 + job 0

    assert cli.main(argv) == 1  # the failed job is retried (and fails again), the others are skipped
    assert "0 generated, 2 already done, 1 failed" in capsys.readouterr().out
    assert [r["status"] for r in manifest(out)] == ["done", "failed", "done", "failed"]

    assert cli.main([*argv[:-4], "--steps", "3", "--threads", "1"]) == 1  # other settings: done again
    captured = capsys.readouterr()
    assert "2 generated, 0 already done, 1 failed" in captured.out and "replaced a PNG" in captured.err
    with Image.open(os.path.join(out, jobs.output_name(0, PROMPTS[0]))) as image:
        assert json.loads(image.text[cli.METADATA_KEY])["steps"] == 3
    assert_clean(out)


def test_a_job_can_upscale_an_input_image_relative_to_the_prompts_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (48, 48), "orange").save(tmp_path / "in" / "square.png")
    path = tmp_path / "in" / "jobs.jsonl"
    path.write_text(json.dumps({"prompt": PROMPTS[5], "image": "square.png"}) + "\n" +
                    json.dumps({"prompt": PROMPTS[5], "image": "missing.png"}) + "\n")
    out = str(tmp_path / "out")
    assert cli.main(["batch", str(path), "--out", out, *FAST]) == 1
    assert "failed: job 1 (line 2): FileNotFoundError" in capsys.readouterr().out
    with Image.open(os.path.join(out, jobs.output_name(0, PROMPTS[5]))) as image:
        assert image.size == (96, 96)  # 2x the input image's size
        assert json.loads(image.text[cli.METADATA_KEY])["init_image"] == "square.png"  # as given


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name, text, message", [
    ("missing.txt", None, "no such file"),
    ("empty.txt", "\n  \n", "empty (no prompts)"),
    ("broken.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n', "line 3: invalid JSON"),
    ("list.jsonl", '{"prompt": "a"}\n["b"]\n', "line 2: expected a JSON object"),
    ("noprompt.jsonl", '{"seed": 1}\n', 'line 1: no "prompt"'),
    ("typo.jsonl", '{"prompt": "a", "sed": 1}\n', "line 1: unknown key 'sed'"),
    ("steps.jsonl", '{"prompt": "a"}\n{"prompt": "a", "steps": 0}\n', "line 2: steps = 0: expected an integer >= 1"),
    ("scale.jsonl", '{"prompt": "a", "scale": "2y"}\n', 'line 1: scale = "2y": expected N or HxW'),
    ("mode.jsonl", '{"prompt": "a", "mode": "fast"}\n', 'line 1: mode = "fast": expected one of fam, fm'),
    ("seed.jsonl", '{"prompt": "a", "seed": -1}\n', "line 1: seed = -1: expected an integer in [0, 2**64)"),
    ("notext.jsonl", '{"prompt": ""}\n', 'line 1: prompt = "": expected a non-empty string'),
])
def test_bad_prompts_files_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, name, text, message):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(distributed, "init", lambda *a, **k: pytest.fail("joined a process group"))
    path = str(tmp_path / name) if text is None else _write(tmp_path, name, text)
    assert cli.main(["batch", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fam batch: error: PROMPTS {path}") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--scale", "2y"], "--scale '2y': expected N or HxW"),
    (["--steps", "0"], "--steps 0: expected 1 or more"),
    (["--threads", "0"], "--threads 0: expected 1 or more"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(distributed, "init", lambda *a, **k: pytest.fail("joined a process group"))
    path = _write(tmp_path, "p.txt", "a red star\n")
    assert cli.main(["batch", path, "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"fam batch: error: {message}\n" or (message in err and err.count("\n") == 1)


def test_a_second_batch_on_the_same_folder_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "out"
    (out / ".fam-batch").mkdir(parents=True)
    with open(out / ".fam-batch" / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main(["batch", _write(tmp_path, "p.txt", "a red star\n"), "--out", str(out)]) == 2
    assert "another fam batch is writing to this folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ units

def test_plan_seeds_names_and_formats(tmp_path):
    text = _write(tmp_path, "p.txt", "{not json, a prompt}\n\nA Red STAR!\n")
    planned = jobs.plan(text, {"steps": 5}, base_seed=100)
    assert [(j.index, j.line, j.prompt, j.settings["seed"], j.name) for j in planned] == [
        (0, 1, "{not json, a prompt}", 100, "000000-not-json-a-prompt.png"),
        (1, 3, "A Red STAR!", 101, "000001-a-red-star.png")]
    assert planned[0].settings["steps"] == 5
    sniffed = _write(tmp_path, "p", '{"prompt": "x", "seed": 3, "steps": 4, "scale": 3}\n{"prompt": "y"}\n')
    planned = jobs.plan(sniffed, {"steps": 5, "scale": "2"}, base_seed=2 ** 64 - 1)
    assert [(j.settings["seed"], j.settings["steps"], j.settings["scale"]) for j in planned] == [
        (3, 4, "3"), (0, 5, "2")]  # its own seed; else base + i modulo 2**64
    assert jobs.slug("ÉTÉ ###") == "t" and jobs.slug("???") == "prompt" and len(jobs.slug("word " * 50)) <= 40


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_rank_walks_every_job_once_own_share_first(world_size):
    for n in range(9):
        for rank in range(world_size):
            order = batch.order_for(rank, world_size, n)
            own = distributed.shard(range(n), rank, world_size)
            assert sorted(order) == list(range(n)) and order[:len(own)] == own


def test_claims_are_exclusive_and_done_means_matching_metadata(tmp_path):
    folder = batch.OutputFolder(str(tmp_path))
    os.makedirs(os.path.join(folder.run_dir("r"), "claims"))
    assert [folder.claim("r", 3), folder.claim("r", 3), folder.claim("r", 4)] == [True, False, True]

    path = str(tmp_path / "x.png")
    expected = {"prompt": "a", "seed": 1, "fm_c": 0.5, "scale": "2"}
    assert batch.is_done(path, expected) is None
    cli.save_png_atomically(Image.new("RGB", (4, 4)), path, {**expected, "version": "0"})
    assert batch.is_done(path, expected) is True
    assert batch.is_done(path, {**expected, "seed": 2}) is False
    with open(path, "wb") as f:
        f.write(b"\x89PNG truncated")
    assert batch.is_done(path, expected) is False


def test_a_torn_manifest_line_is_dropped(tmp_path):
    path = str(tmp_path / "part.jsonl")
    batch.append_line(path, {"job": 0})
    with open(path, "a") as f:
        f.write('{"job": 1, "sta')
    assert batch.read_lines(path) == [{"job": 0}]


def test_a_job_done_on_disk_without_a_manifest_line_gets_one(tmp_path):
    planned = jobs.plan(_write(tmp_path, "p.txt", "a red star\na blue circle\n"), {"steps": 2}, base_seed=0)
    folder = batch.OutputFolder(str(tmp_path / "out"))
    os.makedirs(folder.run_dir("now"))
    killed = os.path.join(folder.state, "run-killed")
    os.makedirs(killed)
    batch.append_line(os.path.join(killed, "rank-1.jsonl"), {"job": 1, "status": "done",
                                                             **batch.expected_metadata(planned[1])})
    result = batch.RankResult(0, "cpu", "host", skipped=[0, 1])  # both found done on disk
    batch._merge_manifest(folder, "now", [result], planned)
    records = manifest(folder.root)
    assert [(r["job"], r["status"], "note" in r) for r in records] == [(1, "done", False), (0, "done", True)]
    assert os.listdir(folder.state) == ["run-now"]  # the killed run's lines were merged, its folder removed


@pytest.mark.parametrize("dynamic, expected", [
    (True, [0, 2, 4, 5, 3, 1]),  # rank 1 never shows up: rank 0 does its share, then rank 1's from the end
    (False, [0, 2, 4]),  # static interleaving (output folder not shared): its share only
])
def test_a_rank_takes_over_a_stragglers_jobs_only_with_claims(tmp_path, monkeypatch, dynamic, expected):
    import types

    done = []

    def fake_generate(pipe, job, am_cache_device):
        done.append(job.index)
        return Image.new("RGB", (4, 4))

    monkeypatch.setattr(batch, "generate", fake_generate)
    planned = jobs.plan(_write(tmp_path, "p.txt", "\n".join(PROMPTS) + "\n"), dict(batch.JOB_DEFAULTS), 0)
    options = batch.Options("p.txt", str(tmp_path / "out"), planned, "m", None, None, None, False, None, None)
    folder = batch.OutputFolder(options.out)
    os.makedirs(os.path.join(folder.run_dir("r"), "claims"))
    ctx = distributed.Context(rank=0, world_size=2)
    result = batch._job_loop(ctx, options, folder, "r", dynamic, types.SimpleNamespace(scheduler=None))
    assert done == expected and result.generated == len(expected)
    assert sorted(pngs(options.out)) == sorted(j.name for j in planned if j.index in expected)
    assert [r["job"] for r in batch.read_lines(folder.part("r", 0))] == expected
