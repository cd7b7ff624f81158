"""The site's front door against a cloud that misbehaves on purpose: a scripted OpenAI-compatible
server (a real HTTP server on loopback) in front of which the real site runs (embedded broker,
the tiny model, the official client). What tests/test_site.py cannot make a real cloud do:
refuse the site's key, answer 503 while merely busy, split its events with CRLF, end a stream
without text; and the pure parts (stop strings across the cut, which addresses are learned)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pice_cloud.bootstrap import start_system
from pice_cloud.cloud_meter import CloudMeter
from pice_cloud.config import SiteConfig
from pice_cloud.llm.base import ChatRequest, Completion
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.server import bind, create_app, running, url_of
from pice_cloud.site import Uplink, site_role
from pice_cloud.site.forward import SiteForwarder, _cut_at_stop
from pice_edge.protocol import CloudStatus, cloud_status_topic, encode
from pice_edge.runtimes.base import ChatMessage
from pice_edge.transport import Message
from tests.conftest import SMALL, cloud_config

FAST = {"probe_interval_s": 0.1, "probe_timeout_s": 0.5, "fail_after": 2, "recover_after": 1,
        "connect_timeout_s": 1.0, "idle_timeout_s": 5.0, "request_timeout_s": 30.0}


class ScriptedCloud:
    """A cloud whose next completion is what ``script`` says: ``("json", status, body)`` or
    ``("sse", [raw event bytes...])``; ``/health`` answers ``health``."""

    def __init__(self) -> None:
        self.script: tuple[Any, ...] = ("json", 200, {})
        self.health: tuple[int, dict[str, Any]] = (200, {"status": "ok"})
        self.seen: list[dict[str, str]] = []

        async def health(request: Request) -> Response:
            return JSONResponse(self.health[1], status_code=self.health[0])

        async def chat(request: Request) -> Response:
            self.seen.append(dict(request.headers))
            if self.script[0] == "json":
                return JSONResponse(self.script[2], status_code=self.script[1])
            events: list[bytes] = self.script[1]

            async def body() -> AsyncIterator[bytes]:
                for event in events:
                    yield event

            return StreamingResponse(body(), media_type="text/event-stream")

        self.app = Starlette(routes=[Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])])


def _completion(text: str, **pice: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1, "model": "pice",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "pice": pice}


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1, "model": "pice",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


@contextlib.asynccontextmanager
async def site_before(cloud: ScriptedCloud, tiny_model: Path) -> AsyncIterator[tuple[str, Uplink]]:
    """The real site (embedded broker, no peers, the tiny model) forwarding to ``cloud``."""
    cloud_sock = bind("127.0.0.1", 0)
    # The scripted cloud needs no PICE state: plain uvicorn.
    uv = uvicorn.Server(uvicorn.Config(cloud.app, lifespan="off", log_config=None, log_level="warning"))
    task = asyncio.create_task(uv.serve(sockets=[cloud_sock]))
    llm = TransformersBackend(tiny_model, threads=1)
    config = cloud_config(None, service=SMALL["service"], server={"port": 0},
                          site={"name": "t", "cloud_url": url_of(cloud_sock) + "/v1", **FAST})
    sock = bind("127.0.0.1", 0)
    try:
        async with start_system(config, llm=llm) as system:
            app = create_app(system.service, llm, config)
            async with site_role(app, system) as uplink, running(app, sock):
                for _ in range(100):
                    if uplink.route == "cloud":
                        break
                    await asyncio.sleep(0.05)
                yield url_of(sock), uplink
    finally:
        uv.should_exit = True
        await task
        cloud_sock.close()
        sock.close()
        await llm.close()


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


async def _ask(url: str, **extra: Any) -> dict[str, Any]:
    async with _client(url) as client:
        response = await client.chat.completions.create(
            model="pice", messages=[{"role": "user", "content": "How do I water tomatoes?"}],
            extra_body={"pice": {"mode": "cloud"}}, **extra)
    return {"text": response.choices[0].message.content, **(response.model_extra or {}).get("pice", {})}


async def test_what_the_cloud_refuses_or_is_too_busy_for_is_answered_here_without_leaving_the_cloud(
        tiny_model: Path) -> None:
    cloud = ScriptedCloud()
    async with site_before(cloud, tiny_model) as (url, uplink):
        assert uplink.route == "cloud"
        cloud.script = ("json", 200, _completion("From the cloud.", served_by="cloud"))
        assert (await _ask(url))["served_by"] == "cloud"
        # A wrong key (the site's own client did nothing wrong) and a busy cloud: this request
        # is answered here; the cloud stays the route for the next ones.
        for status, code in ((401, "invalid_api_key"), (503, "queue_timeout"), (429, "rate_limited")):
            cloud.script = ("json", status, {"error": {"message": "no", "code": code}})
            answer = await _ask(url)
            assert answer["served_by"] == "device", (status, answer)
            assert answer["text"]
            assert uplink.route == "cloud", status
        # A cloud that says it is going: the site leaves it at once.
        cloud.script = ("json", 503, {"error": {"message": "bye", "code": "shutting_down"}})
        cloud.health = (503, {"status": "shutting_down"})
        assert (await _ask(url))["served_by"] == "device"
        assert uplink.route == "site"
        assert "shutting_down" in uplink.switches[-1].reason


async def test_a_request_that_came_through_a_site_is_never_forwarded_again(tiny_model: Path) -> None:
    cloud = ScriptedCloud()
    cloud.script = ("json", 200, _completion("From the cloud.", served_by="cloud"))
    async with site_before(cloud, tiny_model) as (url, _):
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": "pice", "messages": [{"role": "user", "content": "Hi"}], "pice": {"mode": "cloud"}}
            passed = await http.post(url + "/v1/chat/completions", json=body, headers={"x-pice-site": "other"})
            direct = await http.post(url + "/v1/chat/completions", json=body)
        assert passed.json()["pice"]["served_by"] == "device"
        assert direct.json()["pice"]["served_by"] == "cloud"
        assert len(cloud.seen) == 1
        assert cloud.seen[0]["x-pice-site"] == "t"  # what the site forwards says so


async def test_crlf_events_and_a_stream_without_text_are_relayed_whole(tiny_model: Path) -> None:
    cloud = ScriptedCloud()
    async with site_before(cloud, tiny_model) as (url, uplink):
        events = [b"data: " + json.dumps(_chunk({"role": "assistant", "content": ""})).encode() + b"\r\n\r\n",
                  b"data: " + json.dumps(_chunk({"content": "Water "})).encode() + b"\r\n\r\n",
                  b"data: " + json.dumps(_chunk({"content": "deeply."})).encode()[:20],  # split mid-event
                  json.dumps(_chunk({"content": "deeply."})).encode()[20:] + b"\r\n\r\n",
                  b"data: " + json.dumps(_chunk({}, "stop", pice={"served_by": "cloud"})).encode() + b"\r\n\r\n",
                  b"data: [DONE]\r\n\r\n"]
        cloud.script = ("sse", events)
        async with _client(url) as client:
            stream = await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": "x"}],
                                                          stream=True)
            parts = [p async for p in stream]
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "Water deeply."
        assert [p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason] == ["stop"]
        # An answer with no text at all still gets its response (held opening, then the end).
        cloud.script = ("sse", [b"data: " + json.dumps(_chunk({"role": "assistant"})).encode() + b"\n\n",
                                b"data: " + json.dumps(_chunk({}, "stop")).encode() + b"\n\n", b"data: [DONE]\n\n"])
        async with _client(url) as client:
            stream = await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": "x"}],
                                                          stream=True)
            finishes = [p.choices[0].finish_reason async for p in stream if p.choices and p.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert uplink.route == "cloud"


class _Pieces:
    """A streaming LLM that writes the given pieces (the hold-back logic's input, exactly)."""

    name = model_id = "pieces"

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    async def complete(self, requests: Any) -> list[Completion]:
        return [Completion("".join(self.pieces), len(self.pieces)) for _ in requests]

    async def close(self) -> None:
        return None

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | Completion]:
        for piece in self.pieces:
            yield piece
        yield Completion("".join(self.pieces), len(self.pieces))


async def _streamed_rest(pieces: list[str], sent: str, stops: tuple[str, ...],
                         left: int = 10) -> tuple[str, str, list[str]]:
    emitted: list[str] = []

    async def emit(piece: str) -> None:
        emitted.append(piece)

    llm = _Pieces(pieces)
    meter = CloudMeter(llm)
    forwarder = SimpleNamespace(_meter=meter, llm=llm)
    request = ChatRequest([ChatMessage("user", "q")], max_tokens=left, prefill=sent)
    added, finish = await SiteForwarder._stream_rest(forwarder, request, sent, stops, left, emit)  # type: ignore[arg-type]
    # On the site LLM's ledger as a cloud-only answer, also when a stop string closed it early.
    assert meter.ledger.by_purpose["cloud_answer"].calls == 1
    return added, finish, emitted


async def test_a_continuation_streams_and_holds_back_only_what_could_open_a_stop_string() -> None:
    # Without stop strings each piece goes out as it comes.
    assert await _streamed_rest([" Step", " two.", " Done."], "Step one.", ()) == (
        " Step two. Done.", "stop", [" Step", " two.", " Done."])
    # "END" ends it: the text before it goes out, none of "EN" ever does.
    added, finish, emitted = await _streamed_rest([" Step", " two.", " EN", "D more", " text"], "Step one.", ("END",))
    assert (added, finish) == (" Step two. ", "stop")
    assert "".join(emitted) == added
    assert len(emitted) >= 2
    # A stop string that began in what the client already has ends the answer at once.
    assert await _streamed_rest(["D of it"], "Step one. EN", ("END",)) == ("", "stop", [])
    # Every token the budget allowed, no stop: cut by the length.
    assert (await _streamed_rest([" a", " b"], "x", (), left=2))[:2] == (" a b", "length")


def test_stop_strings_cut_a_continuation_even_across_what_was_already_sent() -> None:
    assert _cut_at_stop("Step one. EN", "D of it", ("END",)) == ("", True)
    assert _cut_at_stop("Step one.", " Step two. END more", ("END",)) == (" Step two. ", True)
    assert _cut_at_stop("END was sent", " and more", ("END",)) == (" and more", False)
    assert _cut_at_stop("abc", "def", ()) == ("def", False)


def test_learned_addresses_the_site_must_not_follow_and_retained_status_is_not_a_heartbeat() -> None:
    uplink = Uplink(SiteConfig(name="s"), own_id="site-s", own_url="http://10.0.0.5:8000/v1",
                    client=httpx.AsyncClient())
    uplink.learn("cloud-a", "http://0.0.0.0:8000/v1")
    assert uplink.cloud_url is None
    uplink.learn("cloud-a", "http://10.0.0.5:8000/v1")  # our own address
    assert uplink.cloud_url is None
    uplink.learn("site-s", "http://10.0.0.9:8000/v1")  # our own id
    assert uplink.cloud_url is None
    uplink.learn("cloud-a", "http://10.0.0.9:8000/v1")
    assert uplink.cloud_url == "http://10.0.0.9:8000"
    assert not uplink.url_configured
    # The followed cloud's status: a retained one is memory, a live one a heartbeat.
    uplink.transport = object()  # type: ignore[assignment]  # only its presence is read
    status = encode(CloudStatus(cloud_id="cloud-a", online=True, heartbeat_s=1.0))
    uplink._on_status(Message(cloud_status_topic("cloud-a"), status, retain=True))
    assert uplink._status_problem() is not None
    uplink._on_status(Message(cloud_status_topic("cloud-a"), status, retain=False))
    assert uplink._status_problem() is None
    uplink._on_status(Message(cloud_status_topic("cloud-a"), b"{not json", retain=False))  # ignored, no crash
    offline = encode(CloudStatus(cloud_id="cloud-a", online=False))
    uplink._on_status(Message(cloud_status_topic("cloud-a"), offline, retain=False))
    assert "offline" in (uplink._status_problem() or "")



async def test_a_probe_answered_after_the_route_moved_does_not_move_it_back() -> None:
    # The cloud's /health answers 200, but only after a forwarded request found the cloud going:
    # that answer was sent before the reason to leave, so it must not bring the route back.
    sent, release = asyncio.Event(), asyncio.Event()

    async def health(request: httpx.Request) -> httpx.Response:
        sent.set()
        await release.wait()
        return httpx.Response(200, json={"status": "ok"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(health)) as client:
        uplink = Uplink(SiteConfig(name="s", cloud_url="http://127.0.0.1:9/v1", recover_after=1), own_id="site-s",
                        client=client)
        release.set()
        await uplink.check()  # the route starts on the site; one probe answered brings the cloud back
        assert uplink.route == "cloud"
        release.clear()
        sent.clear()
        probe = asyncio.create_task(uplink.check())
        await sent.wait()
        uplink.report_failure("the cloud answered 503 (shutting_down)")
        release.set()
        await probe
        assert uplink.route == "site"
        await uplink.check()  # a probe sent after the switch counts
        assert uplink.route == "cloud"
