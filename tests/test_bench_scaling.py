"""benchmarks/scaling_curves.py --quick: one PNG and a machine-readable last line (TRL needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scaling_curves_quick_writes_the_png_and_the_exponents(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "curves.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling_curves.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fields = dict(x.split("=", 1) for x in proc.stdout.strip().splitlines()[-1].split())
    for algo in ("grpo", "dpo"):
        for side in ("alignlab", "trl"):
            for axis in ("group", "prompt", "model"):
                assert float(fields[f"{algo}_{side}_{axis}_exp"]) == float(fields[f"{algo}_{side}_{axis}_exp"])
    assert fields["png"] == str(out)
