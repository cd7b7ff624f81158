"""Continuous batching in EdgeNode over a real (embedded) broker with the tiny model: tasks that
arrive mid-batch start before the running sequences finish, and batches respect the bounds."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pice_edge.node import EdgeNode
from pice_edge.prompts import expansion_messages
from pice_edge.protocol import (
    CANDIDATES_FILTER,
    Candidate,
    ExpandTask,
    Sampling,
    decode,
    edge_tasks_topic,
    encode,
)
from pice_edge.runtimes._decode import StepBatch
from pice_edge.runtimes.base import GenerationRequest, GenerationResult
from pice_edge.runtimes.transformers import TransformersRuntime
from pice_edge.transport import BrokerSettings, MqttTransport
from tests.conftest import eventually

SKETCH = ["Set clear goals", "Plan the day", "Take short breaks", "Sleep well"]


def _task(request_id: str, point: int, tokens: int) -> ExpandTask:
    return ExpandTask(request_id=request_id, point_index=point, question="How can I manage my time?", sketch=SKETCH,
                      max_new_tokens=tokens, deadline=time.time() + 120)


@contextlib.asynccontextmanager
async def _serving(node: EdgeNode, url: str) -> AsyncIterator[tuple[MqttTransport, list[Candidate]]]:
    """``node`` started, and a cloud client that collects its candidates; both stopped after."""
    got: list[Candidate] = []
    cloud = MqttTransport(BrokerSettings(url=url), client_id="cb-cloud")
    cloud.add_subscription(CANDIDATES_FILTER, lambda m: got.append(decode(Candidate, m.payload)))
    await node.start()
    try:
        await cloud.connect()
        yield cloud, got
    finally:
        await cloud.close()
        await node.stop()


def _publish(cloud: MqttTransport, task: ExpandTask) -> None:
    cloud.publish(edge_tasks_topic("cb-edge"), encode(task))


async def test_task_arriving_mid_batch_starts_before_the_batch_finishes(embedded_broker: str,
                                                                         tiny_model: Path) -> None:
    runtime = TransformersRuntime(tiny_model, threads=1)
    node = EdgeNode(runtime, device_id="cb-edge", broker=BrokerSettings(url=embedded_broker), max_batch=4)
    async with _serving(node, embedded_broker) as (cloud, got):
        # The tiny model never emits end-of-turn: these run their whole (long) budget.
        _publish(cloud, _task("long", 0, 150))
        _publish(cloud, _task("long", 1, 150))
        await eventually(lambda: node.stats.steps >= 5)
        assert not got
        _publish(cloud, _task("short", 2, 4))
        await eventually(lambda: len(got) == 3)
    # The late short task joined the running batch and finished first.
    assert [(c.request_id, c.token_count) for c in got] == [("short", 4), ("long", 150), ("long", 150)]
    # (the second long task may itself have joined the first if it came after the gathering window)
    assert node.stats.tasks_joined_running >= 1
    assert node.stats.peak_batch == 3


@pytest.mark.parametrize(("max_batch", "room", "peak"), [(3, 2.5, 2), (3, None, 3)])
async def test_batch_never_exceeds_max_batch_or_memory_budget(embedded_broker: str, tiny_model: Path, max_batch: int,
                                                              room: float | None, peak: int) -> None:
    runtime = TransformersRuntime(tiny_model, threads=1)
    longest = _task("m", 3, 30)
    one = runtime.kv_cache_bytes(GenerationRequest(
        prompt=runtime.format_chat(expansion_messages(longest.question, SKETCH, 3)), max_new_tokens=30))
    # ``room`` sequences' worth of KV cache (None: only max_batch bounds the batch).
    budget_mb = room * one / 2**20 if room else None
    node = EdgeNode(runtime, device_id="cb-edge", broker=BrokerSettings(url=embedded_broker), max_batch=max_batch,
                    memory_budget_mb=budget_mb)
    async with _serving(node, embedded_broker) as (cloud, got):
        for i in range(5):
            _publish(cloud, _task(f"m{i // 4}", i % 4, 30))
        await eventually(lambda: len(got) == 5)
    assert sorted((c.request_id, c.point_index) for c in got) == [("m0", 0), ("m0", 1), ("m0", 2), ("m0", 3), ("m1", 0)]
    assert all(c.token_count == 30 for c in got)
    assert node.stats.peak_batch == peak
    assert max(node.stats.batch_sizes) == peak


@pytest.mark.parametrize("max_batch", [1, 2])
async def test_plain_runtime_batches_are_bounded(embedded_broker: str, tiny_model: Path, max_batch: int) -> None:
    class Plain:
        """A runtime with only `generate` (no step-level interface): batch-by-batch path."""

        name = "plain"
        model_id = "plain"

        def __init__(self) -> None:
            self.inner = TransformersRuntime(tiny_model, threads=1)
            self.sizes: list[int] = []

        def format_chat(self, messages: object, prefill: str = "") -> str:
            return self.inner.format_chat(messages, prefill)  # type: ignore[arg-type]

        def generate(self, requests: list[GenerationRequest]) -> object:
            self.sizes.append(len(requests))
            return self.inner.generate(requests)

        def close(self) -> None:
            pass

    runtime = Plain()
    node = EdgeNode(runtime, device_id="cb-edge", broker=BrokerSettings(url=embedded_broker),  # type: ignore[arg-type]
                    max_batch=max_batch)
    async with _serving(node, embedded_broker) as (cloud, got):
        for i in range(3):
            _publish(cloud, _task("p", i, 6))
        await eventually(lambda: len(got) == 3)
    assert sum(runtime.sizes) == 3
    assert max(runtime.sizes) <= max_batch
    assert node.stats.peak_batch == max(runtime.sizes)


async def test_repetition_control_comes_from_the_node_unless_the_task_sets_it(embedded_broker: str,
                                                                               tiny_model: Path) -> None:
    class Recording(TransformersRuntime):
        """Records the requests of each decode batch."""

        seen: list[GenerationRequest]

        def new_batch(self) -> StepBatch:
            batch = super().new_batch()
            add = batch.add

            def recording_add(key: object, request: GenerationRequest) -> None:
                self.seen.append(request)
                add(key, request)

            batch.add = recording_add  # type: ignore[method-assign]
            return batch

    runtime = Recording(tiny_model, threads=1)
    runtime.seen = []
    # The profile's setting, and a task that asks for the penalty off.
    node = EdgeNode(runtime, device_id="cb-edge", broker=BrokerSettings(url=embedded_broker), max_batch=4,
                    repetition_penalty=1.2, no_repeat_ngram_size=3)
    async with _serving(node, embedded_broker) as (cloud, got):
        _publish(cloud, _task("profile", 0, 8))
        await eventually(lambda: len(got) == 1)
        _publish(cloud, _task("task", 1, 8).model_copy(update={"sampling": Sampling(repetition_penalty=1.0)}))
        await eventually(lambda: len(got) == 2)
    assert [(r.repetition_penalty, r.no_repeat_ngram_size) for r in runtime.seen] == [(1.2, 3), (1.0, 3)]


async def test_a_failed_step_fails_its_tasks_and_the_node_keeps_serving(embedded_broker: str,
                                                                        tiny_model: Path) -> None:
    class FailsOnFive(TransformersRuntime):
        """A decode batch that holds a 5-token request fails at every step (an out-of-memory)."""

        def new_batch(self) -> StepBatch:
            batch = super().new_batch()
            add, step = batch.add, batch.step
            doomed: list[object] = []

            def recording_add(key: object, request: GenerationRequest) -> None:
                if request.max_new_tokens == 5:
                    doomed.append(key)
                add(key, request)

            def failing_step() -> list[tuple[object, GenerationResult]]:
                if doomed:
                    raise RuntimeError("out of memory")
                return step()

            batch.add = recording_add  # type: ignore[method-assign]
            batch.step = failing_step  # type: ignore[method-assign]
            return batch

    node = EdgeNode(FailsOnFive(tiny_model, threads=1), device_id="cb-edge",
                    broker=BrokerSettings(url=embedded_broker), max_batch=4)
    async with _serving(node, embedded_broker) as (cloud, got):
        _publish(cloud, _task("doomed", 0, 5))
        _publish(cloud, _task("doomed", 1, 5))
        await eventually(lambda: node.stats.tasks_received == 2 and node.stats.engine.failed_steps >= 1
                         and node._outstanding() == 0, what="the doomed batch to fail")
        _publish(cloud, _task("after", 2, 4))
        await eventually(lambda: len(got) == 1)
    # The failed batch's tasks published nothing (the cloud expands those points); the next task ran.
    assert [(c.request_id, c.point_index, c.token_count) for c in got] == [("after", 2, 4)]
    assert node.stats.batches == 1
