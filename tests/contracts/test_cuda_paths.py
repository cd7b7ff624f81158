"""The CUDA paths PICE runs on a GPU box: the cloud's embedded backend (continuous batching,
streaming, its KV-cache memory budget) and the edge's transformers runtime, on the tiny random
model. Marked ``cuda``: skipped without a CUDA device; ``tools/gpu_check.sh`` runs them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pice_cloud.llm.base import ChatRequest
from pice_cloud.llm.transformers import TransformersBackend
from pice_edge.runtimes.base import ChatMessage, GenerationRequest
from pice_edge.runtimes.transformers import TransformersRuntime
from tests.contracts.streaming import stream_and_complete

pytestmark = pytest.mark.cuda

QUESTIONS = ["Why do leaves fall?", "How do bees make honey?", "What is rain?", "Why is the sea salty?"]


def chat(question: str, tokens: int = 16, **options: object) -> ChatRequest:
    return ChatRequest([ChatMessage("user", question)], max_tokens=tokens, **options)  # type: ignore[arg-type]


async def test_cloud_backend_batches_on_cuda_as_it_decodes_alone(tiny_model: Path) -> None:
    llm = TransformersBackend(tiny_model, device="cuda", max_batch=8)
    try:
        assert next(llm.runtime.model.parameters()).is_cuda
        alone = [(await llm.complete([chat(q)]))[0] for q in QUESTIONS]
        together = await asyncio.gather(*(llm.complete([chat(q)]) for q in QUESTIONS))
    finally:
        await llm.close()
    assert [c.text for c in alone] == [c[0].text for c in together]
    assert all(c.tokens == 16 for c in alone)


async def test_cloud_stream_on_cuda_adds_up_to_the_completion(tiny_model: Path) -> None:
    llm = TransformersBackend(tiny_model, device="cuda")
    request = chat(QUESTIONS[0], 24, temperature=0.8, seed=7)
    pieces, final, whole = await stream_and_complete(llm, request)
    assert final is not None
    assert "".join(pieces) == final.text == whole.text


async def test_cloud_memory_budget_on_cuda_admits_what_fits(tiny_model: Path) -> None:
    # A budget of one sequence's KV cache: requests queue instead of sharing the batch, and finish.
    llm = TransformersBackend(tiny_model, device="cuda", max_batch=8, memory_budget_mb=1)
    try:
        done = await asyncio.gather(*(llm.complete([chat(q, 8)]) for q in QUESTIONS))
    finally:
        await llm.close()
    assert [d[0].tokens for d in done] == [8, 8, 8, 8]


def test_edge_runtime_generates_a_batch_on_cuda(tiny_model: Path) -> None:
    runtime = TransformersRuntime(tiny_model, device="cuda")
    try:
        prompts = [runtime.format_chat([ChatMessage("user", q)]) for q in QUESTIONS]
        results = runtime.generate([GenerationRequest(p, max_new_tokens=12) for p in prompts])
        sampled = runtime.generate([GenerationRequest(prompts[0], max_new_tokens=12, temperature=0.9, seed=1)] * 2)
    finally:
        runtime.close()
    assert [r.token_count for r in results] == [12, 12, 12, 12]
    assert all(r.mean_logprob <= 0 for r in results)
    assert sampled[0].token_count == 12
