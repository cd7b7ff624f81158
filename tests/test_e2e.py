"""The whole path over real brokers: cloud service + edge nodes + a real model.

- tiny random model over a real Mosquitto (fast, runs everywhere .ci/run runs);
- an edge that registers but never answers: the deadline hands its points to the cloud;
- the real SmolLM2 over the embedded broker (slow marker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pice_cloud.bootstrap import start_system
from pice_cloud.events import AnswerEvent, PointEvent, SketchEvent
from pice_cloud.llm.base import ChatRequest
from pice_cloud.llm.transformers import TransformersBackend
from pice_edge.prompts import expansion_messages
from pice_edge.protocol import EdgeStatus, edge_status_topic, edge_tasks_topic, encode
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import Mosquitto, cloud_config, eventually

QUESTION = "How can I improve my time management skills?"


async def collect(events: AsyncIterator[object]) -> tuple[list[str], list[PointEvent], AnswerEvent]:
    sketch: list[str] = []
    points: list[PointEvent] = []
    final: AnswerEvent | None = None
    async for event in events:
        if isinstance(event, SketchEvent):
            assert not points, "the sketch comes first"
            assert final is None
            sketch = event.points
        elif isinstance(event, PointEvent):
            points.append(event)
        elif isinstance(event, AnswerEvent):
            final = event
    assert final is not None
    return sketch, points, final


@pytest.fixture
async def tiny_llm(tiny_model: Path) -> AsyncIterator[TransformersBackend]:
    llm = TransformersBackend(tiny_model, threads=1)
    yield llm
    await llm.close()


@pytest.mark.mosquitto
async def test_cloud_and_two_edges_over_mosquitto(mosquitto: Mosquitto, tiny_model: Path,
                                                  tiny_llm: TransformersBackend) -> None:
    settings = dict(max_points=4, tokens_per_point=12, sketch_tokens=40)
    config = cloud_config(mosquitto.url, edges=2, edge_model=tiny_model, service=settings)
    async with start_system(config, llm=tiny_llm) as system:
        live = {e.device_id for e in system.service.fleet.live()}
        assert live == {"local-edge-1", "local-edge-2"}
        sketch, points, final = await collect(system.service.answer(QUESTION, mode="progressive"))

        assert 1 <= len(sketch) <= 4
        assert [p.point.index for p in points] == list(range(len(sketch)))
        # Every point was expanded at the edge (they are idle and fast), spread over both.
        assert final.stats.points_edge == len(sketch)
        assert final.stats.points_cloud == 0
        # The cloud's ledger: the sketch and nothing else (points from edges cost it nothing).
        work = final.stats.cloud_work.as_dict()
        assert set(work) - {"resketch"} == {"sketch", "total"}, work
        assert work["total"]["prefill_tokens"] > 0
        assert final.stats.cloud_tokens == work["total"]["decode_tokens"] > 0
        assert system.service.cloud.ledger.total.decode_tokens >= final.stats.cloud_tokens
        used = {p.point.device_id for p in points}
        assert used == ({"local-edge-1", "local-edge-2"} if len(sketch) > 1 else used & live)
        assert sum(n.stats.candidates_published for n in system.edges) == len(sketch)
        # Points of one request that land on one edge share a batch.
        assert max(max(n.stats.batch_sizes, default=0) for n in system.edges) == (len(sketch) + 1) // 2
        # Every point's text is in the answer, in order (the random model may write one text twice).
        position = 0
        for p in points:
            assert p.point.text
            position = final.text.index(p.point.text, position) + len(p.point.text)


async def _silent_edge(url: str, device_id: str, tokens_per_s: float = 1000.0) -> tuple[MqttTransport, list[Message]]:
    """An edge that registers, receives its tasks and never answers them."""
    received: list[Message] = []
    transport = MqttTransport(BrokerSettings(url=url), client_id=device_id)
    transport.add_subscription(edge_tasks_topic(device_id), received.append)
    await transport.connect()
    status = EdgeStatus(device_id=device_id, online=True, max_batch=4, tokens_per_s=tokens_per_s,
                        heartbeat_s=30)
    await transport.publish_and_wait(edge_status_topic(device_id), encode(status), retain=True)
    return transport, received


@pytest.mark.mosquitto
async def test_dead_edge_points_fall_back_to_cloud_within_deadline(
    mosquitto: Mosquitto, tiny_llm: TransformersBackend
) -> None:
    deadline = 1.0
    settings = dict(max_points=3, tokens_per_point=10, sketch_tokens=30,
                               deadline_floor_s=deadline, deadline_cap_s=deadline)
    silent, received = await _silent_edge(mosquitto.url, "silent-1")
    try:
        async with start_system(cloud_config(mosquitto.url, edges=0, service=settings), llm=tiny_llm) as system:
            assert await system.service.fleet.wait_for(1, 5.0)
            # Time a batched cloud expansion of the same size, to bound the fallback.
            points_guess = ["Plan the day", "Set goals", "Take breaks"]
            t0 = time.perf_counter()
            await tiny_llm.complete([ChatRequest(expansion_messages(QUESTION, points_guess, i), max_tokens=10)
                                     for i in range(3)])
            expansion_s = time.perf_counter() - t0

            sketch, points, final = await collect(system.service.answer(QUESTION, mode="progressive"))
            assert len(received) == len(sketch), "the silent edge did get every task"
            assert [p.point.index for p in points] == list(range(len(sketch)))
            assert all(p.point.source == "cloud" for p in points)
            assert final.stats.points_cloud == len(sketch)
            fallback = final.stats.cloud_work.by_purpose["fallback_expansion"]
            assert fallback.sequences >= len(sketch), "every point's expansion is on the cloud's ledger"
            assert fallback.prefill_tokens > fallback.sequences * 20, "the expansion prompts are counted"
            assert fallback.decode_tokens > 0
            # After the sketch: the deadline, then one batched cloud expansion (slack for CI noise).
            after_sketch = final.stats.total_s - final.stats.sketch_s
            assert deadline * 0.9 <= after_sketch < deadline + 2 * expansion_s + 1.0
    finally:
        await silent.close()


@pytest.mark.mosquitto
async def test_mixed_fleet_dead_and_live_edge(mosquitto: Mosquitto, tiny_model: Path,
                                              tiny_llm: TransformersBackend) -> None:
    settings = dict(max_points=4, tokens_per_point=10, sketch_tokens=40,
                               deadline_floor_s=1.5, deadline_cap_s=1.5)
    # Unmeasured, like the live edge: points split between them.
    silent, _ = await _silent_edge(mosquitto.url, "silent-2", tokens_per_s=0.0)
    try:
        config = cloud_config(mosquitto.url, edges=1, edge_model=tiny_model, service=settings)
        async with start_system(config, llm=tiny_llm) as system:
            assert await system.service.fleet.wait_for(2, 5.0)
            sketch, points, _final = await asyncio.wait_for(
                collect(system.service.answer(QUESTION, mode="progressive")), 60
            )
            assert [p.point.index for p in points] == list(range(len(sketch)))
            sources = {p.point.device_id or "cloud" for p in points}
            assert "silent-2" not in sources
            if len(sketch) > 1:
                assert {"local-edge-1", "cloud"} <= sources
    finally:
        await silent.close()


@pytest.mark.slow
async def test_smollm2_answer_over_embedded_broker(smollm2: Path) -> None:
    llm = TransformersBackend(smollm2, threads=1)
    settings = dict(max_points=4, tokens_per_point=48)
    try:
        async with start_system(cloud_config(None, edges=2, edge_model=smollm2, service=settings), llm=llm) as system:
            assert system.broker_url.startswith("mqtt://127.0.0.1:")
            sketch, points, final = await collect(system.service.answer(QUESTION, mode="progressive"))
    finally:
        await llm.close()
    assert 2 <= len(sketch) <= 4
    assert [p.point.index for p in points] == list(range(len(sketch)))
    assert final.stats.points_edge >= 1
    for p, heading in zip(points, sketch, strict=False):
        assert p.heading == heading
        text = p.point.text.strip()
        assert len(text.split()) >= 3, f"point {p.point.index + 1} barely expanded: {text!r}"
        assert text.lower().rstrip(".") != heading.lower().rstrip(".")
    # Paragraphs appear in point order.
    positions = [final.text.index(p.point.text) for p in points]
    assert positions == sorted(positions)
    assert final.text.count("\n\n") == len(sketch) - 1


@pytest.mark.mosquitto
async def test_sot_mode_expands_every_point_in_the_cloud(mosquitto: Mosquitto,
                                                         tiny_llm: TransformersBackend) -> None:
    settings = dict(max_points=3, tokens_per_point=8, sketch_tokens=30)
    silent, received = await _silent_edge(mosquitto.url, "silent-3")
    try:
        async with start_system(cloud_config(mosquitto.url, edges=0, service=settings), llm=tiny_llm) as system:
            assert await system.service.fleet.wait_for(1, 5.0)
            sketch, points, final = await collect(system.service.answer(QUESTION, mode="sot"))
            assert final.stats.mode == "sot"
            assert [p.point.source for p in points] == ["cloud"] * len(sketch)
            # A marker sent after the answer on the cloud's connection arrives after any task it sent.
            system.service.transport.publish(edge_tasks_topic("silent-3"), b"marker")
            await eventually(lambda: bool(received), what="the marker")
            assert [m.payload for m in received] == [b"marker"], \
                "no task may reach an edge in cloud-only Skeleton-of-Thought"
    finally:
        await silent.close()
