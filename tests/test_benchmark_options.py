"""Options of the prompt-preset benchmark scripts: a wrong value is one line naming the option, exit 2,
before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, option", [
    (["benchmarks/passkey_eviction.py", "--policies", "", "--specs", "int4"], "--specs int4"),  # evicts nothing
    (["benchmarks/passkey_eviction.py", "--policies", "", "--specs", "no-such-preset"], "no-such-preset"),
    (["benchmarks/select_prompt_presets.py", "--kinds", "docs,novels"], "--kinds docs,novels"),
    (["benchmarks/select_prompt_presets.py", "--kinds", "docs,docs"], "--kinds docs,docs"),
])
def test_wrong_option_is_one_line_and_exit_2(args, option):
    proc = run_script(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], proc.stderr
