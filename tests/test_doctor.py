"""``pice-edge doctor`` as users run it: a subprocess, its checklist and its exit code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pice_cloud.broker import free_port
from tests.conftest import Mosquitto

ROOT = Path(__file__).resolve().parents[1]


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pice_edge.cli", "doctor", "--timeout", "2", *args],
                          capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def checks(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    report = json.loads(proc.stdout)
    return {c["name"]: c for c in report["checks"]}


@pytest.mark.mosquitto
def test_ready_device_exits_zero(mosquitto: Mosquitto, tiny_model: Path) -> None:
    proc = doctor("--broker", mosquitto.url, "--model", str(tiny_model), "--profile", "x86-cpu-dev", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = checks(proc)
    assert json.loads(proc.stdout)["ok"] is True
    assert found["broker"]["status"] == "ok"
    assert mosquitto.url in found["broker"]["detail"]
    assert found["model"]["status"] == "ok"
    assert str(tiny_model) in found["model"]["detail"]
    assert found["torch"]["status"] == "ok"
    assert found["torch"]["required"] is True
    assert {"python", "cpu", "memory", "jetson", "onnxruntime", "tensorrt"} <= set(found)
    assert not [c for c in found.values() if c["status"] == "fail"]


@pytest.mark.mosquitto
def test_text_checklist(mosquitto: Mosquitto, tiny_model: Path) -> None:
    proc = doctor("--broker", mosquitto.url, "--model", str(tiny_model))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("pice-edge doctor (no profile, runtime transformers")
    assert any(line.startswith("[ ok ] broker") for line in lines)
    assert lines[-1] == "ready: every required check passed"


@pytest.mark.mosquitto
def test_missing_model_fails_with_the_fetch_command(mosquitto: Mosquitto, tmp_path: Path) -> None:
    proc = doctor("--broker", mosquitto.url, env={"PICE_MODELS_DIR": str(tmp_path)})
    assert proc.returncode == 1
    assert "[FAIL] model" in proc.stdout
    assert "fix: pice-edge models fetch smollm2-135m-instruct" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "1 required check(s) failed: model"
    assert "Traceback" not in proc.stderr

    proc = doctor("--broker", mosquitto.url, "--model", str(tmp_path / "nothing"), "--json")
    assert proc.returncode == 1
    model = checks(proc)["model"]
    assert model["status"] == "fail"
    assert "neither a known model name" in model["detail"]
    assert "--model" in model["fix"]


def test_unreachable_broker_fails_with_a_fix(tiny_model: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    proc = doctor("--broker", url, "--model", str(tiny_model))
    assert proc.returncode == 1
    text = proc.stdout
    assert "[FAIL] broker" in text
    assert "cannot reach 127.0.0.1" in text
    assert f"fix: start the MQTT broker at {url}" in text
    assert "Traceback" not in proc.stderr


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections but never speaks MQTT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_a_port_that_is_not_mqtt_fails_the_mqtt_step(tiny_model: Path, silent_listener: int) -> None:
    proc = doctor("--broker", f"mqtt://127.0.0.1:{silent_listener}", "--model", str(tiny_model), "--json")
    assert proc.returncode == 1
    broker = checks(proc)["broker"]
    assert broker["detail"].startswith("TCP ok but MQTT connect failed")
    assert "credentials" in broker["fix"]


def test_no_broker_and_no_cloud_on_zeroconf(tiny_model: Path) -> None:
    proc = doctor("--model", str(tiny_model), "--fleet", f"none-{uuid.uuid4().hex[:8]}", "--interfaces",
                  "127.0.0.1", "--json")
    assert proc.returncode == 1
    broker = checks(proc)["broker"]
    assert broker["status"] == "fail"
    assert "no PICE cloud of fleet" in broker["detail"]
    assert "--broker" in broker["fix"]


@pytest.mark.mosquitto
def test_missing_runtime_library_is_required(mosquitto: Mosquitto, tiny_model: Path) -> None:
    proc = doctor("--broker", mosquitto.url, "--model", str(tiny_model), "--runtime", "tensorrt_llm", "--json")
    assert proc.returncode == 1
    trtllm = checks(proc)["tensorrt_llm"]
    assert (trtllm["status"], trtllm["required"]) == ("fail", True)
    assert "TensorRT-LLM" in trtllm["fix"]


def test_jetson_profile_on_a_pc_warns_but_does_not_fail(tiny_model: Path, silent_listener: int) -> None:
    proc = doctor("--profile", "jetson-orin-nano-8gb", "--broker", f"mqtt://127.0.0.1:{silent_listener}",
                  "--model", str(tiny_model), "--timeout", "1", "--json")
    found = checks(proc)
    if found["jetson"]["status"] == "ok":
        pytest.skip("running on a Jetson")
    assert found["jetson"]["status"] == "warn"
    assert "x86-cpu-dev" in found["jetson"]["fix"]
    assert found["jetson"]["required"] is False
