"""Schemathesis over the live server: every operation of the OpenAPI document, every check.

A real uvicorn serves the tiny test models; ``st run`` (schemathesis, from the ``dev`` extra)
generates requests from ``/openapi.json`` in all its phases (examples, coverage, fuzzing, stateful
sequences following the document's links) and checks each response: no 5xx, status codes,
content types, headers and bodies as documented, schema-valid requests accepted and invalid
ones refused, ``OPTIONS``/405 ``Allow`` lists, resources usable after creation and gone after
deletion. Any failure fails the test, with schemathesis' report (and a curl line per failure).

Bounded for CI: ``MAX_EXAMPLES`` cases per operation and phase, one worker, a fixed seed (so a run
is repeatable): 3,364 requests in 28 s on two idle cores, one to three minutes when they are busy.
``tests/schemathesis.toml`` and ``tests/schemathesis_hooks.py`` hold the two allowances, each with
its reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
MAX_EXAMPLES = 100
SEED = 3


def _st() -> list[str]:
    pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[dev]')")
    found = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    if found is None:
        pytest.skip("the schemathesis command line (st) is not on PATH")
    return [found]


@pytest.mark.timeout(480)
def test_schemathesis_finds_nothing(model_repository: Path, start_server: Callable, tmp_path: Path) -> None:
    st = _st()
    server = start_server(model_repository)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "NO_COLOR": "1",
    }
    argv = [
        *st, "--config-file", str(TESTS / "schemathesis.toml"),
        "run", f"{server.url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        # One worker: hypothesis describes strategies with ast.parse, which is not thread-safe on
        # Python 3.11 (parallel workers fail now and then with "AST constructor recursion depth").
        "--workers", "1",
        "--request-timeout", "30",
        "--report", "junit", "--report-dir", str(tmp_path / "report"),
    ]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    selected, total = map(int, re.search(r"Selected: (\d+)/(\d+)", output).groups())  # type: ignore[union-attr]
    tested = int(re.search(r"Tested: (\d+)", output).group(1))  # type: ignore[union-attr]
    assert selected == tested == total > 20, output[-4000:]  # every operation, none skipped
    assert server.alive(), server.log_tail()
