"""The short version of tools/load_test.py: more concurrent streaming requests than admission
holds, against a real `pice-cloud serve` with local edges. None may be lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_burst_of_streaming_requests_loses_nothing(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "load_test.py"), "--requests", "60", "--edges", "2",
         "--max-concurrent", "4", "--max-queue", "12", "--model", str(tiny_model), "--json", str(out)],
        capture_output=True, text=True, timeout=500, check=False, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["lost"] == 0
    assert report["completed"] + report["refused"] == 60
    assert report["completed"] >= 16  # everything admitted (4 running + 12 queued) finished
    assert report["refused"] > 0  # and the rest was turned away, not piled up
    assert report["server_alive_after"]
