"""The site role (issue 25): a site forwards to the cloud while it answers and answers on the site
when it does not, with real parts: two Mosquitto brokers (central, and a site broker bridged to it),
a cloud and a site each behind the real HTTP server, three real ``pice-edge run`` processes on
the site broker, and the official ``openai`` client. The uplink (the cloud's API and the bridge)
runs through `TcpLink` relays the tests cut: refused (a dead cloud) or hung (accepts, never
answers)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pice_cloud.bootstrap import start_system
from pice_cloud.llm.base import ChatRequest, Completion
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.server import bind, create_app, running, url_of
from pice_cloud.site import Uplink, site_role
from pice_edge.errors import ConfigError
from pice_edge.protocol import edge_tasks_topic
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import SMALL, Mosquitto, cloud_config
from tests.procs import EdgeProcess
from tools.tcp_link import TcpLink

pytestmark = pytest.mark.mosquitto

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "How do I keep a warehouse running smoothly?"
#: The uplink's rules, fast: probes every 0.2 s, two failures (or two answers) switch.
FAST_SITE = {"probe_interval_s": 0.2, "probe_timeout_s": 0.5, "fail_after": 2, "recover_after": 2,
             "connect_timeout_s": 1.0, "idle_timeout_s": 5.0, "request_timeout_s": 60.0}


class SlowStreams:
    """The tiny model, but cloud-only answers stream one piece every ``delay`` seconds: long
    enough for a test to cut the uplink half-way through an answer."""

    def __init__(self, inner: TransformersBackend, delay: float = 0.15) -> None:
        self.inner, self.delay = inner, delay
        self.name, self.model_id = inner.name, inner.model_id
        self.engine = inner.engine

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        out = await self.inner.complete(requests)
        if any(not r.prefill for r in requests):
            await asyncio.sleep(self.delay * 20)  # a whole answer takes a while too
        return out

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Completion, None]:
        async for piece in self.inner.stream(request):
            if isinstance(piece, str):
                await asyncio.sleep(self.delay)
            yield piece

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    async def close(self) -> None:
        pass


@dataclass
class Deployment:
    central: Mosquitto
    site_broker: Mosquitto
    bridge: TcpLink
    api: TcpLink
    cloud_url: str
    site_url: str
    uplink: Uplink
    edges: list[EdgeProcess]
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.site_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.clients.append(client)
        return client

    async def cut(self, mode: str) -> None:
        """The uplink fails: the cloud's API and the bridge both (``refuse`` or ``hang``)."""
        await asyncio.gather(self.api.set(mode), self.bridge.set(mode))  # type: ignore[arg-type]

    async def route(self, expected: str, timeout: float = 30.0) -> float:
        """Wait until new requests go to ``expected``; returns how long that took."""
        started = time.monotonic()
        while self.uplink.route != expected:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"route still {self.uplink.route} after {timeout}s; "
                                     f"switches {self.uplink.switches}, last probe {self.uplink.last_probe}")
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(self.site_url + "/health")
        assert response.status_code == 200
        return dict(response.json())

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as client:
            return (await client.get(self.site_url + "/metrics")).text


@contextlib.asynccontextmanager
async def deployment(tmp_path: Path, tiny_model: Path, *, edges: int = 3,
                     faults: dict[int, tuple[str, ...]] | None = None) -> AsyncIterator[Deployment]:
    """Central broker + cloud (tiny model, slow streams) | uplink links | site broker + site + edges."""
    (tmp_path / "central").mkdir()
    (tmp_path / "site").mkdir()
    central = Mosquitto(tmp_path / "central")
    central.start()
    shipped = (ROOT / "tools" / "mosquitto" / "bridge.conf").read_text().splitlines()
    kept = [ln for ln in shipped if ln.split(" ", 1)[0] in {"topic", "bridge_protocol_version", "cleansession",
                                                             "try_private"}]
    cloud_llm = SlowStreams(TransformersBackend(tiny_model, threads=1))
    site_llm = TransformersBackend(tiny_model, threads=1)
    procs: list[EdgeProcess] = []
    async with contextlib.AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(TcpLink(central.port))
        bridge_block = "\n".join(["connection pice-test-site", f"address 127.0.0.1:{bridge.port}",
                                  "remote_clientid pice-bridge-test", "restart_timeout 1", "keepalive_interval 5",
                                  *kept])
        site_broker = Mosquitto(tmp_path / "site", template="bridged.conf", bridge=bridge_block)
        site_broker.start()
        stack.callback(site_broker.kill)
        stack.callback(central.kill)
        for i in range(edges):
            proc = EdgeProcess(f"site-edge-{i + 1}", site_broker.url, tiny_model, tmp_path,
                               fault=(faults or {}).get(i, ()))
            procs.append(proc)
            stack.callback(proc.stop)
        # The cloud on the central broker, behind the real HTTP server, behind the uplink link.
        cloud_config_ = cloud_config(central.url, cloud_id="central-cloud", server={"port": 0},
                                     service=SMALL["service"])
        cloud = await stack.enter_async_context(start_system(cloud_config_, llm=cloud_llm))  # type: ignore[arg-type]
        cloud_sock = bind("127.0.0.1", 0)
        stack.callback(cloud_sock.close)
        await stack.enter_async_context(running(create_app(cloud.service, cloud_llm, cloud_config_),  # type: ignore[arg-type]
                                                cloud_sock))
        cloud_port = int(url_of(cloud_sock).rsplit(":", 1)[1])
        api = await stack.enter_async_context(TcpLink(cloud_port))
        # The site on the site broker: the same service, its own LLM, forwarding while it can.
        site_config = cloud_config(site_broker.url, server={"port": 0}, service=SMALL["service"],
                                   site={"name": "test", "cloud_url": f"http://127.0.0.1:{api.port}/v1",
                                         "cloud_id": "central-cloud", **FAST_SITE})
        site = await stack.enter_async_context(start_system(site_config, llm=site_llm))
        app = create_app(site.service, site_llm, site_config)
        uplink = await stack.enter_async_context(site_role(app, site))
        site_sock = bind("127.0.0.1", 0)
        stack.callback(site_sock.close)
        await stack.enter_async_context(running(app, site_sock))
        assert await site.service.fleet.wait_for(edges, 90), "the site's edges did not register"
        assert await cloud.service.fleet.wait_for(edges, 60), "the edges' statuses did not cross the bridge"
        dep = Deployment(central, site_broker, bridge, api, f"http://127.0.0.1:{cloud_port}", url_of(site_sock),
                         uplink, procs)
        try:
            yield dep
        finally:
            for client in dep.clients:
                await client.close()
    await cloud_llm.inner.close()
    await site_llm.close()


async def ask(client: openai.AsyncOpenAI, mode: str = "progressive", **extra: Any) -> tuple[str, dict[str, Any]]:
    response = await client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": QUESTION}],
        extra_body={"pice": {"mode": mode}}, **extra)
    content = response.choices[0].message.content
    assert content, "an empty answer"
    pice = response.model_extra["pice"] if response.model_extra else {}
    return content, pice


async def ask_streaming(client: openai.AsyncOpenAI, on_text: Any = None, mode: str = "progressive",
                        **extra: Any) -> tuple[str, dict[str, Any], list[str]]:
    """The streamed answer, its ``pice`` extension and the finish reasons seen (one, or it is broken)."""
    stream = await client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": QUESTION}], stream=True,
        extra_body={"pice": {"mode": mode}}, **extra)
    text, pice, finishes = "", {}, []
    async for part in stream:
        for choice in part.choices:
            if choice.delta.content:
                text += choice.delta.content
                if on_text is not None:
                    await on_text(text)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        if part.model_extra and "pice" in part.model_extra:
            pice = part.model_extra["pice"]
    return text, pice, finishes


async def test_a_site_forwards_answers_on_the_site_when_the_cloud_is_gone_and_comes_back(
        tmp_path: Path, tiny_model: Path) -> None:
    async with deployment(tmp_path, tiny_model) as dep:
        await dep.route("cloud")
        client = dep.client()
        _, pice = await ask(client)
        assert pice["served_by"] == "cloud"
        text, pice, finishes = await ask_streaming(client)
        assert pice["served_by"] == "cloud"
        assert finishes == ["stop"]
        assert text
        health = await dep.health()
        assert health["site"]["route"] == "cloud"
        assert health["site"]["peers"] == 3

        # The cloud dies (connection refused) and the bridge with it. The first request after the
        # cut is answered on the site even before the probes notice: nothing is lost.
        await dep.cut("refuse")
        _, pice = await ask(client)
        assert pice["served_by"] == "site", pice
        assert pice["mode"] == "progressive"
        assert pice["points_edge"] > 0
        assert set(pice["devices"]) <= {"site-edge-1", "site-edge-2", "site-edge-3"}
        assert dep.uplink.route == "site"
        health = await dep.health()
        assert health["site"]["route"] == "site"
        assert 'pice_site_route{route="site"} 1.0' in await dep.metrics()
        text, pice, finishes = await ask_streaming(client)
        assert pice["served_by"] == "site"
        assert finishes == ["stop"]
        assert text

        # The way back: new requests go to the cloud once it answers again.
        await dep.cut("pass")
        back = await dep.route("cloud")
        assert back < 15
        _, pice = await ask(client)
        assert pice["served_by"] == "cloud"
        metrics = await dep.metrics()
        assert 'pice_site_switches_total{to="site"} 1.0' in metrics
        assert 'pice_site_switches_total{to="cloud"} 2.0' in metrics  # at start, and back


def _answer_calls(metrics: str) -> float:
    """The site LLM's calls for cloud-only answers so far, from its /metrics."""
    found = re.search(r'^pice_cloud_work_calls_total\{purpose="cloud_answer"\} (\S+)$', metrics, re.MULTILINE)
    assert found is not None
    return float(found.group(1))


async def test_a_hung_cloud_is_given_up_and_a_half_streamed_answer_is_finished_on_the_site(
        tmp_path: Path, tiny_model: Path) -> None:
    """The uplink hangs (accepts, never answers) while a stream is half-way and a non-streamed
    answer is pending: both finish, each once; new requests are answered on the site."""
    async with deployment(tmp_path, tiny_model) as dep:
        await dep.route("cloud")
        client = dep.client()
        cut = asyncio.Event()
        lengths: list[int] = []  # the answer's length after each delta the client got

        async def cut_at_first_text(text: str) -> None:
            lengths.append(len(text))
            if not cut.is_set():
                cut.set()
                await dep.cut("hang")

        calls_before = _answer_calls(await dep.metrics())
        pending = asyncio.ensure_future(ask(client, mode="cloud", max_tokens=40))
        await asyncio.sleep(0.3)  # the whole answer is on its way to the cloud
        started = time.monotonic()
        text, pice, finishes = await ask_streaming(client, cut_at_first_text, mode="cloud", max_tokens=40)
        assert cut.is_set()
        assert pice["served_by"] == "cloud+site", pice
        assert finishes == ["stop"] or finishes == ["length"], finishes
        assert pice["continued_at_chars"] > 0
        assert len(text) >= pice["continued_at_chars"]
        # The site's part streams as its LLM writes it: a delta per piece, not one at the end.
        site_deltas = [n for n in lengths if n > pice["continued_at_chars"]]
        if len(text[pice["continued_at_chars"]:].split()) >= 3:
            assert len(site_deltas) >= 3, (lengths, pice)
        whole, pending_pice = await asyncio.wait_for(pending, 60)
        assert pending_pice["served_by"] in ("site", "device"), pending_pice
        assert whole
        assert time.monotonic() - started < 30
        # Two cloud-only answers on the site's ledger: the pending one (the site wrote it) and the
        # continuation, which is the site LLM's work like any other (and took an admission slot).
        assert _answer_calls(await dep.metrics()) - calls_before == 2
        assert dep.uplink.route == "site"
        _, pice = await ask(client)
        assert pice["served_by"] == "site"


async def test_a_peer_that_vanishes_mid_answer_does_not_lose_the_answer(tmp_path: Path, tiny_model: Path) -> None:
    """On the site (the cloud gone), one of the three peers holds its task for seconds and is
    killed while it does: the site writes that point itself and the answer is whole."""
    async with deployment(tmp_path, tiny_model, faults={0: ("--delay", "4")}) as dep:
        await dep.cut("refuse")
        await dep.route("site")
        # Edge 1 is killed the moment a task for it reaches the site broker.
        watcher = MqttTransport(BrokerSettings(url=dep.site_broker.url), client_id="test-watcher")
        given = asyncio.Event()

        def on_task(message: Message) -> None:
            if not given.is_set():
                given.set()
                dep.edges[0].kill()

        watcher.add_subscription(edge_tasks_topic("site-edge-1"), on_task)
        await watcher.connect()
        try:
            client = dep.client()
            for _ in range(3):  # until the site places a point on edge 1
                text, pice = await asyncio.wait_for(ask(client), 90)
                assert pice["served_by"] == "site"
                assert pice["points_edge"] + pice["points_cloud"] == 3
                assert text.count("\n\n") >= 2  # three points
                if given.is_set():
                    break
        finally:
            await watcher.close()
        assert given.is_set(), "the site never placed a point on edge 1"
        assert not dep.edges[0].alive
        assert "site-edge-1" not in pice["devices"]
        # The next answer uses the two peers left.
        _, pice = await asyncio.wait_for(ask(client), 90)
        assert pice["served_by"] == "site"
        assert "site-edge-1" not in pice["devices"]


def test_site_configuration_names_the_field_and_the_cli_prints_it(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pice_cloud.cli import main
    from pice_cloud.config import load_config

    bad = tmp_path / "site.yaml"
    bad.write_text("site:\n  cloud_urll: http://cloud:8000/v1\n")
    with pytest.raises(ConfigError, match=r"site\.cloud_urll"):
        load_config(bad)
    bad.write_text("site:\n  fail_after: 0\n")
    with pytest.raises(ConfigError, match=r"site\.fail_after"):
        load_config(bad)
    assert main(["site", "--print-config", "--cloud", "http://cloud.example:8000/v1", "--name", "dock-4",
                 "--broker", "mqtt://127.0.0.1:1"]) == 0
    out = capsys.readouterr().out
    assert "cloud_url: http://cloud.example:8000/v1" in out
    assert "name: dock-4" in out
    config = load_config(None, {"site": {"name": "dock-4"}, "broker": {"url": "mqtt://127.0.0.1:1"}})
    assert config.local_edges == 0, "a site's peers are edge processes; it starts none of its own"



def test_a_site_profile_sizes_what_nothing_else_set(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from pice_cloud.cli import main

    flags = ["site", "--print-config", "--profile", "jetson-orin-nx-16gb", "--broker", "mqtt://127.0.0.1:1"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "kind: edge" in out
    assert "max_concurrent: 8" in out  # the profile's site section
    monkeypatch.setenv("PICE_SERVER__MAX_CONCURRENT", "3")  # the operator's own setting wins
    assert main(flags) == 0
    assert "max_concurrent: 3" in capsys.readouterr().out
    assert main(["site", "--print-config", "--profile", "jetson-orin-nano-8gb", "--broker", "mqtt://127.0.0.1:1"]) \
        == 0, "a profile without a site section still runs (sized from its edge settings)"
