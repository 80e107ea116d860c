"""One harness for every op's Triton-interpreter tests.

Triton chooses the interpreter when a kernel is decorated, i.e. when its module is
first imported, and the ahead-of-time compile tests need the same modules compiled
normally; so interpreted cases run in one child process per test file, started
with ``TRITON_INTERPRET=1``. A test file declares ``INTERPRETED_CASES = {id: fn}``
(each ``fn()`` raises on failure) and parametrizes one pytest test per case over
:func:`interpreted_results`; the child reports each case on its own line as it
finishes, so a crash fails the cases it did not reach, naming the crash.

    python tests/triton_harness.py tests/kernels/test_am_triton.py   # run a file's cases by hand
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from typing import Dict, Optional

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
MARK = "FAM_TRITON_CASE "
_cache: Dict[str, Dict[str, Optional[str]]] = {}


def interpreted_results(test_file: str) -> Dict[str, Optional[str]]:
    """{case id: None (passed) or the error} for ``test_file``'s INTERPRETED_CASES,
    run once per process in a TRITON_INTERPRET=1 child."""
    test_file = os.path.abspath(test_file)
    if test_file not in _cache:
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, os.path.dirname(test_file), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), test_file], capture_output=True, text=True,
                              env=env, timeout=900, cwd=ROOT)
        results = {}
        for line in proc.stdout.splitlines():
            if line.startswith(MARK):
                case_id, error = json.loads(line[len(MARK):])
                results[case_id] = error
        if proc.returncode != 0:
            crash = f"interpreter child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
            results = {"__crash__": crash, **results}
        _cache[test_file] = results
    return _cache[test_file]


def check_case(test_file: str, case_id: str) -> None:
    """Fail unless ``case_id`` ran and passed in the interpreter child."""
    results = interpreted_results(test_file)
    if case_id not in results:
        pytest.fail(f"case {case_id!r} did not report: {results.get('__crash__', 'no output')}")
    assert results[case_id] is None, results[case_id]


def _child(test_file: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through interpreted_results()"
    import torch

    spec = importlib.util.spec_from_file_location("_interpreted_cases", test_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for case_id, fn in module.INTERPRETED_CASES.items():
        torch.manual_seed(0)
        try:
            fn()
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"
        print(MARK + json.dumps([case_id, error]), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
