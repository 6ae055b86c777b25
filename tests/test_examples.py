"""examples/quickstart.py runs and shows what the library is for: a long prompt's cache stored
several times smaller than fp16, close to the uncompressed model's predictions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real_model
def test_quickstart_prints_ratios_several_times_over_fp16_at_a_small_kl():
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m["spec"]: (float(m["ratio"]), float(m["kl"]), float(m["top1"])) for m in re.finditer(
        r"^(?P<spec>\S+) .* = (?P<ratio>[\d.]+)x smaller; KL (?P<kl>[\d.]+), top-1 agreement (?P<top1>[\d.]+)$",
        proc.stdout, re.M)}
    assert set(rows) == {"int4", "prompt-6x"}, proc.stdout
    assert rows["int4"][0] > 2.4 and rows["prompt-6x"][0] > 5.5  # whole cache, window and sinks included
    for ratio, kl, top1 in rows.values():
        assert 0 < kl < 0.05 and top1 > 0.85, proc.stdout  # lossy, but close to the uncompressed model
    generated = re.search(r"^prompt-6x continues the prompt with: (['\"])(.+)\1$", proc.stdout, re.M)
    assert generated and generated.group(2).strip(), proc.stdout


def test_the_readme_first_example_is_the_quickstart_script():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    script = (ROOT / "examples" / "quickstart.py").read_text()
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    missing = [line for line in lines if line not in script]
    assert len(lines) > 10 and not missing, f"README lines not in examples/quickstart.py: {missing}"
