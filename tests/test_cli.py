"""The command-line tools as users run them: subprocesses, exit codes, output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pice_edge.errors import EXIT_UNAVAILABLE
from tests.conftest import Mosquitto

#: The tiny random model writes sketches and expansions the guards would refuse every time.
NO_GUARDS = {"PICE_SERVICE__SKETCH_GUARD": "false", "PICE_SERVICE__EXPANSION_GUARD": "false"}


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, **NO_GUARDS, **(env or {})})


def test_ask_single_host_prints_sketch_then_answer(tiny_model: Path) -> None:
    # The keyword router (deterministic, no MiniLM needed) sends this generic question progressive.
    proc = run("pice_cloud.cli", "ask", "How do I learn to cook?", "--model", str(tiny_model), "--router", "heuristic",
               "--max-points", "3", "--tokens-per-point", "8", "--log-level", "warning")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("Sketch:\n1. ")
    sketch_block, answer = out.split("\nAnswer:\n", 1)
    n_points = len(sketch_block.strip().splitlines()) - 1
    assert answer.count("**") == 2 * n_points
    assert "[local-edge-" in answer
    assert "edges: local-edge-1, local-edge-2" in proc.stderr


@pytest.mark.mosquitto
def test_ask_json_over_external_broker_with_local_edges(mosquitto: Mosquitto, tiny_model: Path) -> None:
    proc = run("pice_cloud.cli", "ask", "Why sleep?", "--model", str(tiny_model), "--broker", mosquitto.url,
               "--edges", "1", "--max-points", "2", "--tokens-per-point", "8", "--json", "--mode", "progressive")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["stats"]["mode"] == "progressive"
    assert result["stats"]["points_edge"] >= 1
    assert result["answer"].startswith("1. **")


def test_router_sends_a_coding_question_cloud_only(tiny_model: Path) -> None:
    proc = run("pice_cloud.cli", "ask", "Write a Python function that reverses a list.", "--model", str(tiny_model),
               "--router", "heuristic", "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert stats["mode"] == "cloud"
    assert stats["points_edge"] == 0


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "PICE_MODELS_DIR": str(tmp_path)}
    proc = run("pice_cloud.cli", "ask", "Hi?", env=env)
    assert proc.returncode == 2
    assert "pice-edge models fetch smollm2-135m-instruct" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_broker_is_a_clear_error_that_systemd_retries(tiny_model: Path) -> None:
    from pice_cloud.broker import free_port

    proc = run("pice_cloud.cli", "ask", "Hi?", "--model", str(tiny_model), "--broker",
               f"mqtt://127.0.0.1:{free_port()}", "--edges", "0")
    # Not a configuration error (2, which the units never restart): the broker may come up later.
    assert proc.returncode == EXIT_UNAVAILABLE == 69
    assert "cannot connect to MQTT broker" in proc.stderr
    assert "Traceback" not in proc.stderr
