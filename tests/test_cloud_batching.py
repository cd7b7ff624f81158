"""Continuous batching in the cloud's embedded backend (`pice_cloud.llm.step_engine`) with the
tiny model: requests join a running batch, short ones are not held behind long ones, greedy
results do not depend on what else is in the batch, the bounds hold, and a stream that is
closed early frees its slot."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pice_cloud.llm.base import ChatMessage, ChatRequest, Completion
from pice_cloud.llm.transformers import TransformersBackend
from tests.conftest import eventually

QUESTIONS = ["How can I sleep better?", "What is a good breakfast?", "Why is the sky blue?",
             "How do I learn a language?"]


def chat(question: str, tokens: int, **sampling: float) -> ChatRequest:
    return ChatRequest([ChatMessage("user", question)], max_tokens=tokens, **sampling)  # type: ignore[arg-type]


async def test_a_request_joins_a_running_batch_and_is_not_held_behind_a_long_one(tiny_model: Path) -> None:
    llm = TransformersBackend(tiny_model, threads=1, max_batch=4)
    try:
        engine = llm.engine
        long = asyncio.create_task(llm.complete([chat(QUESTIONS[0], 200)]))
        await eventually(lambda: engine.stats.steps >= 3, timeout=60, what="the long request to be decoding")
        [short] = await llm.complete([chat(QUESTIONS[1], 4)])
        # The short one joined mid-generation and finished while the long one was still running.
        assert engine.stats.joined_running >= 1
        assert not long.done()
        assert short.tokens <= 4
        [done] = await long
        assert done.tokens > 4
    finally:
        await llm.close()


async def test_greedy_results_do_not_depend_on_the_batch(tiny_model: Path) -> None:
    llm = TransformersBackend(tiny_model, threads=1, max_batch=4)
    try:
        requests = [chat(q, 12 + 4 * i) for i, q in enumerate(QUESTIONS)]
        alone = [(await llm.complete([r]))[0].text for r in requests]
        together = [c.text for c in await llm.complete(requests)]
        assert together == alone
        assert llm.engine.stats.peak_batch == 4
        # Sampled with a seed: the same text whatever else is batched with it.
        seeded = chat(QUESTIONS[0], 16, temperature=0.9, seed=11)
        [first] = await llm.complete([seeded])
        mixed = await llm.complete([chat(QUESTIONS[2], 20), seeded, chat(QUESTIONS[3], 8)])
        assert mixed[1].text == first.text
    finally:
        await llm.close()


async def test_max_batch_and_memory_budget_bound_the_batch(tiny_model: Path) -> None:
    llm = TransformersBackend(tiny_model, threads=1, max_batch=2)
    try:
        await llm.complete([chat(q, 8) for q in QUESTIONS])
        assert llm.engine.stats.peak_batch == 2
    finally:
        await llm.close()
    # A budget smaller than two sequences' KV caches: one at a time, and every request still runs.
    llm = TransformersBackend(tiny_model, threads=1, max_batch=8)
    try:
        one = llm.runtime.kv_cache_bytes(llm._request(chat(QUESTIONS[0], 8)))
        llm.engine.memory_budget_bytes = one + one // 2  # one sequence fits, two do not
        results = await llm.complete([chat(q, 8) for q in QUESTIONS])
        assert len(results) == 4
        assert all(r.tokens > 0 for r in results)
        assert llm.engine.stats.peak_batch == 1
    finally:
        await llm.close()


async def test_streamed_text_equals_the_completion_and_a_closed_stream_frees_its_slot(tiny_model: Path) -> None:
    llm = TransformersBackend(tiny_model, threads=1, max_batch=4)
    try:
        request = chat(QUESTIONS[0], 24)
        [whole] = await llm.complete([request])
        pieces: list[str] = []
        final = None
        async for item in llm.stream(request):
            if isinstance(item, Completion):
                final = item
            else:
                pieces.append(item)
        assert final is not None
        assert final.text == whole.text
        assert "".join(pieces) == whole.text
        assert len(pieces) > 1  # it did stream

        stream = llm.stream(chat(QUESTIONS[1], 400))
        await anext(stream)
        await stream.aclose()  # the client went away
        await eventually(lambda: llm.engine.load == 0, timeout=30, what="the closed stream's slot to free")
        [after] = await llm.complete([chat(QUESTIONS[2], 4)])
        assert after.tokens > 0
    finally:
        await llm.close()
