"""The library stays light and demo-free: `import fam` loads no diffusers, the `fam`
parser loads neither torch nor the demo package until a subcommand needs them, and
the demo's subcommands are reached through `fam.cli.EXTERNAL_COMMANDS`."""

import subprocess
import sys
import types

import pytest

from fam import cli, modes

ROOT = __file__.rsplit("/tests/", 1)[0]


def _loaded_after(code: str) -> set:
    """Top-level packages a fresh interpreter has imported after running ``code``."""
    probe = code + "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_import_fam_loads_no_diffusers_and_no_torch():
    loaded = _loaded_after("import fam")
    assert not loaded & {"diffusers", "transformers", "torch", "fam_kernels", "fam_demo"}


def test_fam_parser_loads_nothing_heavy_until_a_subcommand_is_named():
    loaded = _loaded_after("import fam.cli; fam.cli.build_parser().format_help()")
    assert not loaded & {"diffusers", "transformers", "torch", "fam_kernels", "fam_demo", "PIL"}
    loaded = _loaded_after("import fam.cli; fam.cli.build_parser('demo').format_help()")
    assert "fam_demo" in loaded and not loaded & {"diffusers", "transformers"}


def test_lazy_names_resolve_and_unknown_names_fail():
    import fam
    import fam_demo

    assert fam.FAMPipeline.__name__ == "FAMPipeline" and fam.__version__
    assert "FAMPipeline" in dir(fam) and "load_pipeline" in dir(fam_demo)
    assert fam_demo.caption("star", "red", "striped grey") == "a red star on a striped grey background"
    with pytest.raises(AttributeError, match="no attribute 'demo'"):
        fam.demo
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fam_demo.nothing


def test_choices_come_from_the_mode_definitions():
    parser = cli.build_parser("generate")
    generate = parser._subparsers._group_actions[0].choices["generate"]
    choices = {action.dest: action.choices for action in generate._actions if action.choices}
    assert choices["mode"] == list(modes.MODES)
    assert choices["am_source"] == list(modes.AM_SOURCES)
    assert choices["upsample"] == list(modes.UPSAMPLE_MODES)


def test_external_subcommands_are_imported_only_when_run(monkeypatch, capsys):
    probe = types.ModuleType("fam_probe_commands")
    probe.configure = lambda parser: parser.set_defaults(func=lambda args: 7)
    monkeypatch.setitem(sys.modules, "fam_probe_commands", probe)
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "probe", ("fam_probe_commands:configure", "a probe"))
    assert cli.main(["probe"]) == 7
    assert cli.main(["generate", "--model", "m"]) == 2

    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "probe", ("fam_no_such_module:configure", "a probe"))
    assert "a probe" in cli.build_parser().format_help()  # listed without importing it
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["probe"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("fam probe: error: cannot import fam_no_such_module")


def test_demo_and_eval_are_listed_and_parsed():
    assert {"demo", "eval"} <= set(cli.EXTERNAL_COMMANDS)
    args = cli.build_parser("eval").parse_args(["eval", "--quick", "--modes", "fam,direct"])
    assert args.quick and args.modes == "fam,direct" and callable(args.func)
