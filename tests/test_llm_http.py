"""LLM backends: the OpenAI-compatible HTTP backend against a real second `pice-cloud serve`
(cloud-only, a plain OpenAI-compatible server), the registry, and TensorRT-LLM's clear absence.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pice_cloud.bootstrap import start_system
from pice_cloud.errors import BackendError
from pice_cloud.llm import create_backend
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend, StreamingBackend, TextRequest
from pice_cloud.llm.openai_http import OpenAIHTTPBackend
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.sketch import SKETCH_PREFILL, sketch_messages
from pice_edge.runtimes.base import ChatMessage
from tests.conftest import QUESTION, Api, Mosquitto, cloud_config, serving


@pytest.fixture
async def upstream(mosquitto: Mosquitto, tiny_model: Path) -> AsyncIterator[Api]:
    """A `pice-cloud serve` with no edges: every answer is the cloud LLM's own."""
    async with serving(tiny_model, mosquitto.url, edges=0,
                       overrides={"service": {"max_answer_tokens": 64}}) as served:
        yield served


@pytest.fixture
async def direct(tiny_model: Path) -> AsyncIterator[TransformersBackend]:
    llm = TransformersBackend(tiny_model, threads=1)
    yield llm
    await llm.close()


@pytest.mark.mosquitto
async def test_http_backend_matches_the_model_behind_it(upstream: Api, direct: TransformersBackend) -> None:
    backend = create_backend("openai", model="pice", url=upstream.url)  # /v1 is added
    assert isinstance(backend, OpenAIHTTPBackend)
    assert isinstance(backend, LLMBackend)
    try:
        requests = [
            ChatRequest([ChatMessage("user", QUESTION)], max_tokens=12),
            ChatRequest([ChatMessage("system", "Answer in one word."), ChatMessage("user", "Why sleep?")],
                        max_tokens=7),
        ]
        got = await backend.complete(requests)
        want = await direct.complete(requests)
    finally:
        await backend.close()
    assert len(got) == 2
    for remote, local in zip(got, want, strict=True):
        # Greedy decoding of the same model: the same text (the server strips whitespace)
        # and the generated token count from the server's usage.
        assert remote.text == local.text.strip()
        assert remote.tokens == local.tokens
    assert got[1].tokens <= 7


@pytest.mark.mosquitto
async def test_http_backend_streams_what_it_completes(upstream: Api, direct: TransformersBackend) -> None:
    backend = OpenAIHTTPBackend(upstream.url, "pice")
    assert isinstance(backend, StreamingBackend)
    request = ChatRequest([ChatMessage("user", QUESTION)], max_tokens=24)
    try:
        pieces: list[str] = []
        final = None
        async for item in backend.stream(request):
            if isinstance(item, Completion):
                final = item
            else:
                pieces.append(item)
        [whole] = await backend.complete([request])
        # A sketch's pre-fill echoed by a server without continue_final_message is stripped,
        # as complete() strips it.
        sketch = ChatRequest(sketch_messages(QUESTION, max_points=3, max_words=5), max_tokens=20,
                             prefill=SKETCH_PREFILL)
        streamed_sketch = [p async for p in backend.stream(sketch)]
        [completed_sketch] = await backend.complete([sketch])
    finally:
        await backend.close()
    assert final is not None
    assert len(pieces) > 1  # token by token, not one chunk at the end
    assert "".join(pieces) == final.text == whole.text
    assert final.tokens == whole.tokens  # from the server's usage chunk
    last = streamed_sketch[-1]
    assert isinstance(last, Completion)
    assert last.text == completed_sketch.text


@pytest.mark.mosquitto
async def test_http_backend_continues_raw_prompts_through_v1_completions(upstream: Api,
                                                                       direct: TransformersBackend) -> None:
    backend = OpenAIHTTPBackend(upstream.url + "/v1", "pice")
    try:
        [remote] = await backend.complete_raw([TextRequest("Once upon a time", max_tokens=9)])
    finally:
        await backend.close()
    [local] = await direct.complete_raw([TextRequest("Once upon a time", max_tokens=9)])
    assert remote.text == local.text
    assert remote.tokens == local.tokens == 9


@pytest.mark.mosquitto
async def test_pice_service_runs_on_the_http_backend(upstream: Api, mosquitto: Mosquitto, tiny_model: Path) -> None:
    """A whole PICE system whose cloud LLM is the remote server: sketch over HTTP, edges expand."""
    backend = OpenAIHTTPBackend(upstream.url + "/v1", "pice")
    settings = dict(max_points=3, tokens_per_point=8, sketch_tokens=30)
    try:
        # Without continue_final_message the sketch's pre-fill is not sent: whatever comes back
        # is parsed as an outline (the tiny random model writes noise; the parser copes).
        [sketch] = await backend.complete([ChatRequest(sketch_messages(QUESTION, max_points=3, max_words=6),
                                                       max_tokens=30, prefill=SKETCH_PREFILL)])
        assert not sketch.text.lstrip().startswith(SKETCH_PREFILL)
        config = cloud_config(mosquitto.url, edges=1, edge_model=tiny_model, service=settings, cloud_id="cloud-b")
        async with start_system(config, llm=backend) as system:
            final = await system.service.ask(QUESTION, mode="progressive")
    finally:
        await backend.close()
    assert final.stats.mode == "progressive"
    assert final.stats.points_edge + final.stats.points_cloud >= 1
    assert final.stats.cloud_tokens > 0
    assert final.text.startswith("1. **")


@pytest.mark.mosquitto
async def test_http_backend_errors_are_backend_errors(upstream: Api) -> None:
    wrong_model = OpenAIHTTPBackend(upstream.url, "no-such-model")
    try:
        with pytest.raises(BackendError, match=r"answered 404: the model 'no-such-model' does not exist"):
            await wrong_model.complete([ChatRequest([ChatMessage("user", "Hi?")], max_tokens=4)])
    finally:
        await wrong_model.close()


async def test_unreachable_http_server_is_a_clear_error() -> None:
    from pice_cloud.broker import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIHTTPBackend(url, "pice", timeout_s=5)
    try:
        with pytest.raises(BackendError, match=rf"LLM server {url} unreachable.*check llm.url"):
            await backend.complete([ChatRequest([ChatMessage("user", "Hi?")], max_tokens=4)])
    finally:
        await backend.close()


def test_tensorrt_llm_absent_names_the_extra_and_the_gpu() -> None:
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt_llm is installed here")
    with pytest.raises(BackendError) as info:
        create_backend("tensorrt_llm", model="smollm2-135m-instruct")
    message = str(info.value)
    assert "pip install 'pice[trtllm]'" in message
    assert "NVIDIA GPU" in message
    assert "llm.kind=openai" in message


def test_unknown_backend_and_missing_url() -> None:
    with pytest.raises(BackendError, match="unknown LLM backend 'vllm'; choose one of transformers, openai"):
        create_backend("vllm")
    with pytest.raises(BackendError, match="needs the server's base URL"):
        create_backend("openai", model="x")


@pytest.mark.mosquitto
async def test_http_backend_passes_logprobs_through(upstream: Api, direct: TransformersBackend) -> None:
    backend = OpenAIHTTPBackend(upstream.url + "/v1", "pice")
    request = ChatRequest([ChatMessage("user", QUESTION)], max_tokens=6, logprobs=3)
    try:
        [remote] = await backend.complete([request])
    finally:
        await backend.close()
    [local] = await direct.complete([request])
    assert remote.token_logprobs is not None
    assert local.token_logprobs is not None
    assert [e.token for e in remote.token_logprobs] == [e.token for e in local.token_logprobs]
    assert all(len(e.top) == 3 for e in remote.token_logprobs)
    assert remote.token_logprobs[0].logprob == pytest.approx(local.token_logprobs[0].logprob, abs=1e-4)
