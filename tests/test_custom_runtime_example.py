"""examples/custom_runtime.py runs end to end against the embedded broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_custom_runtime_example_runs() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_runtime.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line[:2] in ("1.", "2.", "3.")]
    assert [line[:2] for line in sorted(lines)] == ["1.", "2.", "3."]
    assert all("[custom-edge/keyword-expander]" in line for line in lines)
    assert "Prioritize tasks matters" in proc.stdout
