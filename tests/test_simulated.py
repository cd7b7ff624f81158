"""The simulated runtime and cloud backend used by the load tools (never by correctness tests):
their cost model and the shape of what they write."""

from __future__ import annotations

import pytest

from pice_cloud.guards import check_sketch
from pice_cloud.llm.base import ChatRequest
from pice_cloud.llm.simulated import SimulatedBackend
from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, Runtime
from pice_edge.runtimes.simulated import SimulatedRuntime


def test_a_batch_takes_its_longest_sequence_at_a_step_time_that_grows_with_the_batch() -> None:
    slept: list[float] = []
    runtime = SimulatedRuntime(tokens_per_s=20.0, batch_cost=0.5, output_tokens=None, sleep=slept.append)
    assert isinstance(runtime, Runtime)
    results = runtime.generate([GenerationRequest("a b", 10), GenerationRequest("c d", 40)])
    # 40 steps of (1 + 0.5 * 1) / 20 s.
    assert slept == [pytest.approx(40 * 1.5 / 20)]
    assert [r.token_count for r in results] == [10, 40]
    assert runtime.batch_seconds([40]) == pytest.approx(2.0)
    capped = SimulatedRuntime(output_tokens=8, sleep=slept.append).generate([GenerationRequest("x", 40)])
    assert capped[0].token_count == 8


def test_the_text_is_prose_and_repeats_for_the_same_prompt_and_seed() -> None:
    runtime = SimulatedRuntime(sleep=lambda _s: None)
    one, two = runtime.generate([GenerationRequest("p", 24, seed=1), GenerationRequest("p", 24, seed=1)])
    other = runtime.generate([GenerationRequest("p", 24, seed=2)])[0]
    assert one.text == two.text != other.text
    assert one.text.count(".") == 3
    with pytest.raises(ValueError, match="tokens_per_s"):
        SimulatedRuntime(tokens_per_s=0)


async def test_the_simulated_cloud_writes_sketches_the_guards_accept_and_shares_its_steps() -> None:
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    llm = SimulatedBackend(tokens_per_s=100.0, batch_cost=0.5, sketch_points=4, sleep=record)
    sketch = ChatRequest([ChatMessage("user", "How do I save money?")], max_tokens=64, prefill=SKETCH_PREFILL)
    [first], [second] = await llm.complete([sketch]), await llm.complete([sketch])
    points = parse_sketch(first.text, max_points=6)
    assert len(points) == 4
    assert check_sketch("How do I save money?", points) == []
    assert first.text != second.text
    assert sum(slept) == pytest.approx(2 * 24 / 100)  # six tokens a heading, one sequence in flight
    slept.clear()
    answer = ChatRequest([ChatMessage("user", "q")], max_tokens=60)
    results = await llm.complete([answer] * 4)
    # Four sequences share each step: 60 steps of (1 + 0.5 * 3) / 100 s, not four times 0.6 s.
    assert sum(slept) == pytest.approx(60 * 2.5 / 100)
    assert [r.tokens for r in results] == [60] * 4
    assert llm.in_flight == 0
    slept.clear()
    # A sequence that ends frees its share of the steps: 16 tokens at two in flight, 48 alone.
    short = ChatRequest([ChatMessage("user", "q")], max_tokens=16)
    await llm.complete([short, ChatRequest([ChatMessage("user", "q")], max_tokens=64)])
    assert sum(slept) == pytest.approx(16 * 1.5 / 100 + 48 / 100)
    assert llm.in_flight == 0
