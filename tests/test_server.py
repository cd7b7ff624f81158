"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client against the real
server on a loopback port: tiny random model, real Mosquitto, real edge nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pice_cloud.config import load_config
from pice_cloud.llm.base import count_prompt_tokens
from pice_edge.protocol import CLOUD_STATUS_FILTER, CloudStatus, EdgeStatus, decode, edge_status_topic, encode
from pice_edge.runtimes.base import ChatMessage
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import QUESTION, Api, Mosquitto, eventually, serving


@pytest.fixture
async def api(mosquitto: Mosquitto, tiny_model: Path) -> AsyncIterator[Api]:
    async with serving(tiny_model, mosquitto.url, edges=2) as served:
        yield served


async def _stream(client: openai.AsyncOpenAI, mode: str, **kwargs: Any) -> tuple[list[str], list[Any]]:
    stream = await client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": QUESTION}], stream=True,
        stream_options={"include_usage": True}, extra_body={"pice": {"mode": mode}}, **kwargs,
    )
    deltas: list[str] = []
    chunks: list[Any] = []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
    return deltas, chunks


@pytest.mark.mosquitto
async def test_progressive_streamed_text_equals_non_streamed(api: Api) -> None:
    client = api.client()
    full = await client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": QUESTION}], extra_body={"pice": {"mode": "progressive"}},
    )
    text = full.choices[0].message.content
    assert text is not None
    assert text.startswith("1. **")
    assert full.choices[0].finish_reason == "stop"
    assert full.model == "pice"
    extra = full.model_extra or {}
    assert extra["pice"]["mode"] == "progressive"
    n_points = extra["pice"]["points_edge"] + extra["pice"]["points_cloud"]
    assert 1 <= n_points <= 3
    assert extra["pice"]["points_edge"] == n_points, "idle edges expand every point"
    assert text.count("**") == 2 * n_points
    usage = full.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == api.state.llm.count_tokens(text)  # type: ignore[attr-defined]
    assert usage.model_extra is not None
    assert usage.model_extra["edge_tokens"] > 0
    assert usage.model_extra["cloud_tokens"] > 0  # the sketch

    assert 0 < extra["pice"]["first_content_s"] <= extra["pice"]["first_point_s"] <= extra["pice"]["total_s"]
    assert extra["pice"]["sketch_s"] <= extra["pice"]["first_content_s"]

    deltas, chunks = await _stream(client, "progressive")
    assert "".join(deltas) == text
    # The first heading alone (written by the sketch, sent before any edge answered), then its
    # text, then one delta per later point, in point order.
    assert re.fullmatch(r"1\. \*\*[^*]+\*\*", deltas[0])
    assert text.startswith(deltas[0] + deltas[1])
    assert deltas[1].startswith(" ")
    assert "**" not in deltas[1]
    assert len(deltas) == n_points + 1
    assert [d.lstrip("\n").split(".")[0] for d in deltas[2:]] == [str(i + 1) for i in range(1, n_points)]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


@pytest.mark.mosquitto
async def test_cloud_streams_the_first_point_while_edges_expand_the_rest(mosquitto: Mosquitto,
                                                                         tiny_model: Path) -> None:
    async with serving(tiny_model, mosquitto.url, edges=2,
                       overrides={"service": {"first_point": "cloud", "max_points": 3, "sketch_tokens": 60,
                                              "tokens_per_point": 12}}) as api:
        client = api.client()
        full = await client.chat.completions.create(
            model="pice", messages=[{"role": "user", "content": QUESTION}], seed=3,
            extra_body={"pice": {"mode": "progressive"}})
        text = full.choices[0].message.content or ""
        info = (full.model_extra or {})["pice"]
        n_points = info["points_edge"] + info["points_cloud"]
        assert n_points >= 2
        assert info["points_cloud"] == 1  # the first point, by the cloud
        assert info["points_edge"] == n_points - 1
        assert full.usage is not None
        assert full.usage.model_extra is not None
        assert full.usage.model_extra["edge_tokens"] > 0
        tasks = sum(n.stats.tasks_received for n in api.system.edges)
        assert tasks == n_points - 1, "the edges never got the first point"
        stream = await client.chat.completions.create(
            model="pice", messages=[{"role": "user", "content": QUESTION}], seed=3, stream=True,
            extra_body={"pice": {"mode": "progressive"}})
        deltas = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == text
    assert deltas[0].startswith("1. **")
    assert text.count("**") == 2 * n_points


@pytest.mark.mosquitto
async def test_cloud_mode_streamed_and_not(api: Api) -> None:
    client = api.client()
    full = await client.chat.completions.create(
        model="pice", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        max_tokens=10, extra_body={"pice": {"mode": "cloud"}},
    )
    text = full.choices[0].message.content
    assert text
    extra = full.model_extra or {}
    assert extra["pice"] == {**extra["pice"], "mode": "cloud", "points_edge": 0, "points_cloud": 0}
    assert full.usage is not None
    assert full.usage.model_extra is not None
    assert full.usage.model_extra["edge_tokens"] == 0
    assert full.usage.completion_tokens == full.usage.model_extra["cloud_tokens"] <= 10
    assert full.choices[0].finish_reason == ("length" if full.usage.completion_tokens == 10 else "stop")
    assert sum(n.stats.tasks_received for n in api.system.edges) == 0, "cloud mode sends no task"

    stream = await client.chat.completions.create(
        model="pice", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        max_tokens=10, stream=True, extra_body={"pice": {"mode": "cloud"}},
    )
    deltas = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == text


@pytest.mark.mosquitto
async def test_models_health_and_metrics(api: Api) -> None:
    client = api.client()
    models = await client.models.list()
    assert models.data[0].id == "pice"
    await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": QUESTION}])
    async with httpx.AsyncClient(base_url=api.url) as http:
        health = (await http.get("/health")).json()
        assert health["status"] == "ok"
        assert health["broker_connected"] is True
        assert health["live_edges"] == 2
        assert health["in_flight"] == 0
        assert health["selector"]["kind"] == "confidence"
        metrics = (await http.get("/metrics")).text
    assert 'pice_requests_total{mode="progressive",outcome="ok"} 1.0' in metrics
    edge_points = re.search(r'pice_points_total\{source="edge"\} (\d+)', metrics)
    assert edge_points is not None
    assert int(edge_points.group(1)) >= 1
    # Each candidate that came back timed its round trip's overhead (beyond the edge's own time).
    trips = re.search(r"^pice_edge_round_trip_overhead_seconds_count (\S+)$", metrics, re.MULTILINE)
    overhead = re.search(r"^pice_edge_round_trip_overhead_seconds_sum (\S+)$", metrics, re.MULTILINE)
    assert trips is not None
    assert overhead is not None
    assert float(trips.group(1)) >= int(edge_points.group(1))
    assert 0.0 <= float(overhead.group(1)) / float(trips.group(1)) < 5.0
    assert "pice_live_edges 2.0" in metrics
    assert "pice_admission_queue_depth 0.0" in metrics
    assert 'pice_time_to_first_token_seconds_count{mode="progressive"} 1.0' in metrics
    assert 'pice_request_latency_seconds_count{mode="progressive"} 1.0' in metrics
    # The sketch went through the cloud's batching engine, which is idle again.
    steps = re.search(r"^pice_cloud_batch_steps (\S+)$", metrics, re.MULTILINE)
    assert steps is not None
    assert float(steps.group(1)) >= 1
    assert "pice_cloud_batch_requests 0.0" in metrics


@pytest.mark.mosquitto
async def test_health_is_degraded_without_edges_and_auto_answers_in_the_cloud(
    mosquitto: Mosquitto, tiny_model: Path
) -> None:
    async with serving(tiny_model, mosquitto.url, edges=0) as served:
        async with httpx.AsyncClient(base_url=served.url) as http:
            health = (await http.get("/health")).json()
        assert health["status"] == "degraded"
        assert health["live_edges"] == 0
        full = await served.client().chat.completions.create(
            model="pice", messages=[{"role": "user", "content": QUESTION}], max_tokens=6)
        assert (full.model_extra or {})["pice"]["mode"] == "cloud"


BAD_REQUESTS: list[tuple[str, bytes, int, str | None, str]] = [
    ("malformed JSON", b'{"model": "pice", "messages": [', 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, "invalid_type"),
    ("missing messages", b'{"model": "pice"}', 400, "messages", "missing_required_parameter"),
    ("missing model", b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model",
     "missing_required_parameter"),
    ("messages not a list", b'{"model": "pice", "messages": "hello"}', 400, "messages", "invalid_type"),
    ("empty messages", b'{"model": "pice", "messages": []}', 400, "messages", "invalid_value"),
    ("max_tokens a string", b'{"model": "pice", "messages": [{"role": "user", "content": "hi"}], '
     b'"max_tokens": "ten"}', 400, "max_tokens", "invalid_type"),
    ("huge max_tokens", b'{"model": "pice", "messages": [{"role": "user", "content": "hi"}], '
     b'"max_tokens": 1000000000}', 400, "max_tokens", "invalid_value"),
    ("unsupported role", b'{"model": "pice", "messages": [{"role": "tool", "content": "hi"}]}', 400,
     "messages[0].role", "unsupported_role"),
    ("image content", b'{"model": "pice", "messages": [{"role": "user", "content": [{"type": "image_url", '
     b'"image_url": {"url": "x"}}]}]}', 400, "messages[0].content[0]", "unsupported_content"),
    ("no user message", b'{"model": "pice", "messages": [{"role": "system", "content": "hi"}]}', 400,
     "messages", "invalid_value"),
    ("bad pice mode", b'{"model": "pice", "messages": [{"role": "user", "content": "hi"}], '
     b'"pice": {"mode": "fast"}}', 400, "pice.mode", "invalid_value"),
    ("n above 1", b'{"model": "pice", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n",
     "invalid_value"),
    ("unknown model", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "model",
     "model_not_found"),
]


@pytest.mark.mosquitto
async def test_bad_requests_get_openai_error_shape(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        for name, body, status, param, code in BAD_REQUESTS:
            response = await http.post("/v1/chat/completions", content=body,
                                       headers={"content-type": "application/json"})
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["type"] == "invalid_request_error", name
            assert error["param"] == param, (name, error)
            assert error["code"] == code, (name, error)
            assert error["message"], name
        missing = await http.get("/v1/nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        oversized = await http.post("/v1/chat/completions", content=b" " * (2 * 1024 * 1024))
        assert oversized.status_code == 413
        assert oversized.json()["error"]["code"] == "request_too_large"
        # None of that reached the service, and the server still answers.
        assert api.state.admission.active == 0
        metrics = (await http.get("/metrics")).text
    assert f'pice_requests_total{{mode="unknown",outcome="invalid"}} {float(len(BAD_REQUESTS) + 1)}' in metrics
    # The official client maps the shape onto its exceptions.
    with pytest.raises(openai.BadRequestError) as info:
        await api.client().chat.completions.create(model="pice", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=10**9)
    assert info.value.param == "max_tokens"
    assert "too large" in info.value.message


@pytest.mark.mosquitto
async def test_overload_is_refused_with_retry_after_and_admitted_requests_complete(
    mosquitto: Mosquitto, tiny_model: Path
) -> None:
    admission = {"max_concurrent": 1, "max_queue": 1, "retry_after_s": 3}
    async with serving(tiny_model, mosquitto.url, edges=1, overrides={"server": admission}) as served:
        client = served.client()

        refused: list[openai.RateLimitError] = []

        async def one() -> str:
            try:
                done = await client.chat.completions.create(
                    model="pice", messages=[{"role": "user", "content": QUESTION}],
                    extra_body={"pice": {"mode": "progressive"}})
            except openai.RateLimitError as exc:
                refused.append(exc)
                return "429"
            assert done.choices[0].message.content
            return "ok"

        outcomes = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(6))), 60)
        assert outcomes.count("ok") >= 2, "one running and one queued are both answered"
        assert outcomes.count("429") >= 1
        assert outcomes.count("ok") + outcomes.count("429") == 6
        assert all(exc.response.headers["retry-after"] == "3" for exc in refused)
        assert all(exc.code == "overloaded" for exc in refused)
        assert served.state.admission.active == 0
        assert served.state.admission.queued == 0
        assert served.system.service.inbox.in_flight == 0
        # Capacity is back: the next request is admitted.
        again = await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": "Hi?"}],
                                                     max_tokens=4, extra_body={"pice": {"mode": "cloud"}})
        assert again.choices[0].message.content is not None
        rejected = served.state.metrics.registry.get_sample_value(
            "pice_requests_total", {"mode": "progressive", "outcome": "rejected"})
        assert rejected == outcomes.count("429")


async def _silent_edge(url: str, device_id: str) -> MqttTransport:
    """An edge that registers and never answers, so a request waits for its point's deadline."""
    transport = MqttTransport(BrokerSettings(url=url), client_id=device_id)
    await transport.connect()
    status = EdgeStatus(device_id=device_id, online=True, max_batch=4, tokens_per_s=1000.0, heartbeat_s=30)
    await transport.publish_and_wait(edge_status_topic(device_id), encode(status), retain=True)
    return transport


@pytest.mark.mosquitto
async def test_client_disconnect_mid_stream_cancels_the_request(mosquitto: Mosquitto, tiny_model: Path) -> None:
    silent = await _silent_edge(mosquitto.url, "silent-http")
    slow = {"deadline_floor_s": 45.0, "deadline_cap_s": 45.0}
    try:
        async with serving(tiny_model, mosquitto.url, edges=0, overrides={"service": slow}) as served:
            assert await served.system.service.fleet.wait_for(1, 5.0)
            inbox = served.system.service.inbox
            stream = await served.client().chat.completions.create(
                model="pice", messages=[{"role": "user", "content": QUESTION}], stream=True,
                extra_body={"pice": {"mode": "progressive"}})
            first = await stream.__anext__()
            assert first.choices[0].delta.role == "assistant"
            # Wait until the points are out to the (silent) edge: the request now waits 45 s.
            await eventually(lambda: inbox.in_flight == 1, timeout=60, what="the points to go out")
            await stream.close()
            await eventually(lambda: not inbox.in_flight and not served.state.admission.active, timeout=10,
                             what="the disconnected request to stop")
            cancelled = served.state.metrics.registry.get_sample_value(
                "pice_requests_total", {"mode": "progressive", "outcome": "cancelled"})
            assert cancelled == 1
    finally:
        await silent.close()


@pytest.mark.mosquitto
async def test_shutdown_refuses_new_requests_and_ends_overdue_ones_with_an_error(
    mosquitto: Mosquitto, tiny_model: Path
) -> None:
    silent = await _silent_edge(mosquitto.url, "silent-drain")
    overrides = {"service": {"deadline_floor_s": 45.0, "deadline_cap_s": 45.0},
                 "server": {"shutdown_timeout_s": 1.0}}
    try:
        async with serving(tiny_model, mosquitto.url, edges=0, overrides=overrides) as served:
            assert await served.system.service.fleet.wait_for(1, 5.0)
            client = served.client()
            stream = await client.chat.completions.create(
                model="pice", messages=[{"role": "user", "content": QUESTION}], stream=True,
                extra_body={"pice": {"mode": "progressive"}})
            await stream.__anext__()
            served.server.begin_shutdown()  # what SIGTERM does first
            async with httpx.AsyncClient(base_url=served.url) as http:
                await eventually(lambda: served.state.admission.draining, timeout=1, what="draining")
                refused = await http.post("/v1/chat/completions", json={
                    "model": "pice", "messages": [{"role": "user", "content": "Hi?"}]})
                health = await http.get("/health")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "2"
            assert refused.json()["error"]["code"] == "shutting_down"
            assert health.status_code == 503
            assert health.json()["status"] == "shutting_down"
            # The request in flight would wait 45 s for its edge: after the 1 s grace period it
            # ends with an error event the client raises, not a hang or a cut connection.
            started = time.monotonic()
            with pytest.raises(openai.APIError, match="shut down before this request finished"):
                async for _ in stream:
                    pass
            assert time.monotonic() - started < 10
            assert served.system.service.inbox.in_flight == 0
    finally:
        await silent.close()


@pytest.mark.mosquitto
def test_serve_subprocess_sigterm_finishes_in_flight_and_publishes_offline(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    config = tmp_path / "pice.yaml"
    config.write_text(f"server:\n  port: 0\nbroker:\n  url: {mosquitto.url}\nedges:\n  local: 1\n"
                      "service:\n  max_points: 3\n  tokens_per_point: 8\n  sketch_tokens: 30\n"
                      # the tiny random model's sketches would never pass the guards
                      "  sketch_guard: false\n  expansion_guard: false\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pice_cloud.cli", "serve", "--config", str(config), "--model", str(tiny_model),
         "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 120
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"serving on (http://\S+)/v1", line)
            url = found.group(1) if found else None
        assert url is not None, "".join(lines)
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").json()["live_edges"] == 1
            body = {"model": "pice", "stream": True, "messages": [{"role": "user", "content": QUESTION}],
                    "pice": {"mode": "progressive"}}
            events: list[str] = []
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:])
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)  # mid-request
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        # The in-flight request finished (or, past the grace period, would end with an error event).
        assert payloads[-1]["choices"][0]["finish_reason"] == "stop" or "error" in payloads[-1]
        assert proc.wait(timeout=60) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    # The retained cloud status says offline.
    asyncio.run(_assert_cloud_offline(mosquitto.url))


async def _assert_cloud_offline(url: str) -> None:
    got: asyncio.Queue[Message] = asyncio.Queue()
    transport = MqttTransport(BrokerSettings(url=url))
    transport.add_subscription(CLOUD_STATUS_FILTER, got.put_nowait)
    await transport.connect()
    try:
        message = await asyncio.wait_for(got.get(), 10)
    finally:
        await transport.close()
    status = decode(CloudStatus, message.payload)
    assert status.online is False
    assert status.api_url.startswith("http://127.0.0.1:")


@pytest.mark.mosquitto
async def test_slow_body_gets_408_and_the_server_keeps_serving(mosquitto: Mosquitto, tiny_model: Path) -> None:
    async with serving(tiny_model, mosquitto.url, edges=0, overrides={"server": {"body_timeout_s": 1.0}}) as api:
        host, port = api.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"model\": \"pice\", ")
        await writer.drain()
        started = time.monotonic()
        head = await asyncio.wait_for(reader.read(4096), timeout=10)
        assert time.monotonic() - started < 5
        assert head.startswith(b"HTTP/1.1 408")
        assert b"request_timeout" in head or b"request_timeout" in await reader.read(4096)
        writer.close()
        # A well-behaved client right after is served.
        reply = await api.client().chat.completions.create(
            model="pice", messages=[{"role": "user", "content": "Hi?"}], extra_body={"pice": {"mode": "cloud"}})
        assert reply.choices[0].message.content is not None


# --- input limits, checked before any compute ------------------------------------------------------

@pytest.mark.mosquitto
async def test_long_inputs_are_refused_or_routed_before_any_compute(mosquitto: Mosquitto, tiny_model: Path) -> None:
    overrides = {"service": {"max_question_chars": 500}}
    async with serving(tiny_model, mosquitto.url, edges=1, overrides=overrides) as api:
        assert await api.system.service.fleet.wait_for(1, 10)
        client = api.client()
        huge = "Tell me about this. " * 2500  # 50,000 characters: ~10k tokens, past the 2,048-token context
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": huge}])
        assert info.value.code == "context_length_exceeded"
        assert "maximum context length is 2048 tokens" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": huge}],
                                                 extra_body={"pice": {"mode": "progressive"}})
        assert info.value.code == "question_too_long"
        assert "service.max_question_chars" in info.value.message
        # Streamed too: refused with a 400 before the stream's 200 is sent, not as an error event.
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": huge}],
                                                 stream=True, extra_body={"pice": {"mode": "progressive"}})
        assert info.value.code == "question_too_long"
        # A long chat history: the progressive question carries it, so it is too long for the edges.
        history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "We talked about plans. " * 8}
                   for i in range(4)]
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="pice", messages=[*history, {"role": "user", "content": "And now?"}],
                extra_body={"pice": {"mode": "progressive"}})
        assert info.value.code == "question_too_long"
        refused_in = time.monotonic() - started
        # Under auto the same conversation is answered, cloud-only, although an edge is live.
        answer = await client.chat.completions.create(
            model="pice", messages=[*history, {"role": "user", "content": "And now?"}], max_tokens=8)
        assert answer.model_extra is not None
        assert answer.model_extra["pice"]["mode"] == "cloud"
        work = answer.model_extra["pice"]["cloud_work"]
        assert set(work) == {"cloud_answer", "total"}, "no sketch: only the answer, counted with its prompt"
        assert work["total"]["decode_tokens"] == answer.usage.completion_tokens  # type: ignore[union-attr]
        assert work["cloud_answer"]["prefill_tokens"] > 32
        assert api.system.service.inbox.accepted == 0, "no task went to an edge"
    generated = api.state.metrics.registry.get_sample_value("pice_generated_tokens_total", {"where": "cloud"})
    assert generated is not None
    assert generated <= 8, "the refused requests generated nothing"
    # The cloud's ledger on /metrics: the one answer's prompt and tokens; no sketch was written.
    def work(purpose: str, phase: str) -> float | None:
        return api.state.metrics.registry.get_sample_value("pice_cloud_work_tokens_total",
                                                           {"purpose": purpose, "phase": phase})
    assert work("cloud_answer", "decode") == generated
    assert work("cloud_answer", "prefill") > 8 * 4  # type: ignore[operator]
    assert work("sketch", "prefill") == work("sketch", "decode") == 0
    assert refused_in < 30  # generous for CI; nothing was generated (checked above)


def test_prompt_token_limit_defaults_below_the_context_on_a_cpu_only() -> None:
    """server.max_prompt_tokens unset: 2,048 for the embedded model on a CPU (SmolLM2's context
    is 8,192), no limit of the server's own on a GPU or behind a remote engine; set: as set."""
    assert load_config(None, {}).prompt_token_limit == 2048
    assert load_config(None, {"llm": {"device": "cuda"}}).prompt_token_limit is None
    assert load_config(None, {"llm": {"kind": "openai", "url": "http://gpu:8000/v1"}}).prompt_token_limit is None
    assert load_config(None, {"server": {"max_prompt_tokens": 9000}, "llm": {"device": "cuda"}}
                       ).prompt_token_limit == 9000


@pytest.mark.mosquitto
async def test_prompt_over_max_prompt_tokens_is_400_before_any_compute(mosquitto: Mosquitto, tiny_model: Path) -> None:
    """A prompt inside the model's context but past server.max_prompt_tokens is refused with a
    400 naming the limit, streamed or not, chat or legacy completions, and nothing is generated;
    a prompt under the limit is answered."""
    async with serving(tiny_model, mosquitto.url, edges=0, overrides={"server": {"max_prompt_tokens": 300}}) as api:
        client = api.client()
        long = "Tell me about this. " * 40  # ~560 tokens of the tiny tokenizer: past 300, inside 2,048
        assert 300 < count_prompt_tokens(api.state.llm, [ChatMessage("user", long)]) < 2048 - 400
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": long}],
                                                     stream=stream, extra_body={"pice": {"mode": "cloud"}})
            assert info.value.code == "prompt_too_long"
            assert info.value.param == "messages"
            assert "at most 300 tokens" in info.value.message
            assert "server.max_prompt_tokens" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="pice", prompt=long, max_tokens=4)
        assert info.value.code == "prompt_too_long"
        assert info.value.param == "prompt"
        generated = api.state.metrics.registry.get_sample_value("pice_generated_tokens_total", {"where": "cloud"})
        assert not generated, "the refused requests generated nothing"
        prefill = api.state.metrics.registry.get_sample_value("pice_cloud_work_tokens_total",
                                                              {"purpose": "cloud_answer", "phase": "prefill"})
        assert not prefill, "and the cloud prefilled nothing"
        reply = await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": QUESTION}],
                                                     max_tokens=4, extra_body={"pice": {"mode": "cloud"}})
        assert reply.choices[0].message.content is not None


@pytest.mark.mosquitto
async def test_body_over_the_limit_is_413(mosquitto: Mosquitto, tiny_model: Path) -> None:
    async with serving(tiny_model, mosquitto.url, edges=0) as api, httpx.AsyncClient(base_url=api.url) as http:
        assert api.state.config.server.max_body_bytes == 256 * 1024  # the default
        body = {"model": "pice", "messages": [{"role": "user", "content": "x" * 300_000}]}
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
