"""Packaging: the ``edge`` extra is what a Jetson installs, so it must bring the onnxruntime
runtime and no torch, and an edge installed that way must serve an exported model.

This test builds the project into a fresh virtual environment from PyPI (no system packages,
no checkout on the path), then runs the installed ``pice-edge`` against a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pice_edge.protocol import (
    CANDIDATES_FILTER,
    Candidate,
    EdgeStatus,
    ExpandTask,
    decode,
    edge_status_topic,
    edge_tasks_topic,
    encode,
)
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import Mosquitto, eventually

pytest.importorskip("onnx")  # exporting the test model needs the export extra (installed by dev)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.packaging, pytest.mark.mosquitto]

#: Building the wheel and installing onnxruntime, numpy, tokenizers and the base dependencies.
INSTALL_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install ".[edge]"`` (a regular, non-editable install)."""
    venv = tmp_path_factory.mktemp("venv") / "edge"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    done = subprocess.run([*pip, f"{ROOT}[edge]"], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, f"pip install .[edge] failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return venv


def test_edge_extra_installs_no_torch(edge_venv: Path) -> None:
    listed = subprocess.run([str(edge_venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "onnxruntime" in names or "onnxruntime-gpu" in names
    assert "pice" in names
    for heavy in ("torch", "transformers", "accelerate", "fastapi", "amqtt", "pydantic-settings"):
        assert heavy not in names, f"the edge extra pulled {heavy}"
    probe = subprocess.run([str(edge_venv / "bin" / "python"), "-c", "import torch"], capture_output=True,
                           cwd=edge_venv)
    assert probe.returncode != 0


def _start_installed_edge(venv: Path, model: Path, broker_url: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(log_path, "w") as log:
        # cwd outside the checkout: only the installed package can be imported.
        return subprocess.Popen(
            [str(venv / "bin" / "pice-edge"), "run", "--runtime", "onnxruntime", "--model", str(model),
             "--broker", broker_url, "--no-zeroconf", "--device-id", "pkg-edge", "--threads", "1",
             "--heartbeat", "0.5"],
            stdout=subprocess.DEVNULL, stderr=log, cwd=log_path.parent, env=env)


async def test_installed_edge_serves_an_onnx_export(edge_venv: Path, tiny_model: Path, mosquitto: Mosquitto,
                                                    tmp_path: Path) -> None:
    from pice_edge.runtimes.onnx_export import export

    onnx_dir = tmp_path / "tiny-onnx"
    await asyncio.to_thread(export, tiny_model, onnx_dir, precisions=("fp32",))
    statuses: list[EdgeStatus] = []
    candidates: list[Candidate] = []
    cloud = MqttTransport(BrokerSettings(url=mosquitto.url), client_id="pkg-cloud")

    def on_status(message: Message) -> None:
        if message.payload:
            statuses.append(decode(EdgeStatus, message.payload))

    cloud.add_subscription(edge_status_topic("pkg-edge"), on_status)
    cloud.add_subscription(CANDIDATES_FILTER, lambda m: candidates.append(decode(Candidate, m.payload)))
    await cloud.connect()
    log_path = tmp_path / "edge.log"
    proc = _start_installed_edge(edge_venv, onnx_dir, mosquitto.url, log_path)
    try:
        await eventually(lambda: any(s.online for s in statuses) or proc.poll() is not None, timeout=120,
                         what="the installed edge's status")
        assert proc.poll() is None, f"pice-edge exited: {log_path.read_text()[-2000:]}"
        online = next(s for s in statuses if s.online)
        assert online.runtime == "onnxruntime"
        task = ExpandTask(request_id="pkg1", point_index=0, question="How do I sleep better?",
                          sketch=["Keep a schedule", "Avoid screens"], max_new_tokens=6, deadline=time.time() + 60)
        cloud.publish(edge_tasks_topic("pkg-edge"), encode(task))
        await eventually(lambda: bool(candidates), timeout=60, what="a candidate from the installed edge")
        [cand] = candidates
        assert (cand.request_id, cand.point_index, cand.device_id) == ("pkg1", 0, "pkg-edge")
        assert 1 <= cand.token_count <= 6
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        await cloud.close()
