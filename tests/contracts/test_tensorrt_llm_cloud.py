"""The cloud's TensorRT-LLM backend against a fake of TensorRT-LLM's LLM API written from its
sources (``fake_tensorrt_llm`` names the files and commits): every request field PICE sends
(greedy, temperature, top_p, seed, max_tokens, logprobs, streaming, outline, raw prompts), in-flight
batching through ``generate_async``, aborts, and the errors that reach the API as 400s."""

from __future__ import annotations

import asyncio
import re

import pytest

from pice_cloud.errors import BackendError, InputTooLongError, UnavailableInModeError
from pice_cloud.llm import create_backend
from pice_cloud.llm.base import ChatRequest, LLMBackend, RawCompleter, StreamingBackend, TextRequest
from pice_cloud.llm.tensorrt_llm import TensorRTLLMBackend
from pice_cloud.server.completion import api_error
from pice_edge.runtimes.base import ChatMessage
from pice_edge.text import OutlineFormat
from tests.contracts.fake_tensorrt_llm import FakeLLM, GuidedDecodingParams, SamplingParams
from tests.contracts.streaming import stream_and_complete

QUESTION = [ChatMessage("system", "Be brief."), ChatMessage("user", "Why do leaves fall?")]


def backend(**options: object) -> TensorRTLLMBackend:
    llm = create_backend("tensorrt_llm", model="fake-model", **options)
    assert isinstance(llm, TensorRTLLMBackend)
    return llm


def sent(fake: type[FakeLLM]) -> list[SamplingParams]:
    return [params for _, params, _ in fake.instances[-1].submitted]


async def test_implements_the_cloud_protocols(fake_trtllm: type[FakeLLM]) -> None:
    llm = backend()
    try:
        assert isinstance(llm, LLMBackend)
        assert isinstance(llm, StreamingBackend)
        assert isinstance(llm, RawCompleter)
        assert llm.context_tokens == 2048  # the LLM's max_seq_len
    finally:
        await llm.close()
    assert fake_trtllm.instances[0].shut_down


async def test_temperature_zero_is_greedy_whatever_top_p_says(fake_trtllm: type[FakeLLM]) -> None:
    llm = backend()
    try:
        request = ChatRequest(QUESTION, max_tokens=9, temperature=0.0, top_p=0.5, seed=3)
        first, second = await llm.complete([request, request])
    finally:
        await llm.close()
    for params in sent(fake_trtllm):
        assert params._greedy_decoding
        assert params.top_k == 1
        assert params.temperature is None
        assert params.top_p is None
        assert params.max_tokens == 9
        # The prompt is templated already: no special tokens added to it.
        assert params.add_special_tokens is False
    assert first.text == second.text
    assert first.tokens == 9


async def test_sampled_requests_carry_temperature_top_p_and_seed(fake_trtllm: type[FakeLLM]) -> None:
    llm = backend()
    try:
        seeded = ChatRequest(QUESTION, max_tokens=12, temperature=0.8, top_p=0.9, seed=11)
        a, b = await llm.complete([seeded, seeded])
        (other,) = await llm.complete([ChatRequest(QUESTION, max_tokens=12, temperature=0.8, top_p=0.9, seed=12)])
        unseeded = await llm.complete([ChatRequest(QUESTION, max_tokens=12, temperature=0.8)] * 2)
    finally:
        await llm.close()
    params = sent(fake_trtllm)
    assert (params[0].temperature, params[0].top_p, params[0].seed) == (0.8, 0.9, 11)
    assert not params[0]._greedy_decoding
    assert a.text == b.text
    assert a.text != other.text
    # TensorRT-LLM's "no seed" is the fixed seed 0: unseeded requests get seeds of their own.
    assert params[3].seed is not None
    assert params[3].seed != params[4].seed
    assert unseeded[0].tokens == 12


async def test_concurrent_requests_are_batched_in_flight(fake_trtllm: type[FakeLLM]) -> None:
    llm = backend()
    try:
        requests = [ChatRequest([*QUESTION, ChatMessage("user", f"Part {i}?")], max_tokens=6) for i in range(4)]
        # Four callers at once (sketch, answers, expansions): none waits for another to finish.
        results = await asyncio.gather(*(llm.complete([r]) for r in requests))
    finally:
        await llm.close()
    fake = fake_trtllm.instances[0]
    assert fake.max_in_flight == 4
    assert all(not streaming for _, _, streaming in fake.submitted)
    assert [len(r) for r in results] == [1, 1, 1, 1]


@pytest.mark.parametrize("alternatives", [0, 3])
async def test_logprobs_are_the_sampled_tokens_with_ranked_alternatives(fake_trtllm: type[FakeLLM],
                                                                       alternatives: int) -> None:
    llm = backend()
    try:
        (done,) = await llm.complete([ChatRequest(QUESTION, max_tokens=8, temperature=0.9, seed=5,
                                                  logprobs=alternatives)])
    finally:
        await llm.close()
    (params,) = sent(fake_trtllm)
    assert params.logprobs == max(1, alternatives)  # 0 would read as "no log-probabilities"
    assert done.token_logprobs is not None
    assert len(done.token_logprobs) == done.tokens == 8
    assert "".join(e.token for e in done.token_logprobs) == done.text
    for entry in done.token_logprobs:
        assert entry.logprob < 0
        assert len(entry.top) == alternatives
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
    assert done.mean_logprob == pytest.approx(sum(e.logprob for e in done.token_logprobs) / 8)
    # Sampling from the top five: some token is not the most likely one, and its own
    # log-probability (not the first entry's) is reported.
    if alternatives:
        assert any(e.logprob < e.top[0][1] for e in done.token_logprobs)


async def test_what_the_engine_refuses_is_a_400(fake_trtllm: type[FakeLLM]) -> None:
    llm = backend(backend="tensorrt", max_seq_len=64)  # the TensorRT engine backend, no gather_generation_logits
    try:
        with pytest.raises(UnavailableInModeError, match="gather_generation_logits") as refused:
            await llm.complete([ChatRequest(QUESTION, max_tokens=4, logprobs=1)])
        assert api_error(refused.value).status == 400
        with pytest.raises(InputTooLongError, match="max_seq_len") as long:
            await llm.complete([ChatRequest(QUESTION, max_tokens=60)])
        assert api_error(long.value).status == 400
        with pytest.raises(UnavailableInModeError, match="top_p"):
            await llm.complete([ChatRequest(QUESTION, max_tokens=4, temperature=0.5, top_p=1.5)])
        # A batch whose second request is refused leaves nothing running.
        with pytest.raises(InputTooLongError):
            await llm.complete([ChatRequest(QUESTION, max_tokens=4), ChatRequest(QUESTION, max_tokens=60)])
        assert fake_trtllm.instances[0].in_flight == 0
    finally:
        await llm.close()
    with pytest.raises(BackendError, match="refused"):
        await llm.complete([ChatRequest(QUESTION, max_tokens=4)])  # shut down


async def test_stream_pieces_add_up_to_the_completion(fake_trtllm: type[FakeLLM]) -> None:
    llm = backend()
    request = ChatRequest(QUESTION, max_tokens=10, temperature=0.7, seed=4, prefill="1.")
    pieces, final, whole = await stream_and_complete(llm, request)
    assert final is not None
    assert len(pieces) == 10
    assert "".join(pieces) == final.text == whole.text
    assert final.tokens == whole.tokens == 10
    fake = fake_trtllm.instances[0]
    prompt, _, streaming = fake.submitted[0]
    assert streaming
    assert prompt.endswith("<|im_start|>assistant\n1.")


async def test_closing_a_stream_or_cancelling_a_request_aborts_it(fake_trtllm: type[FakeLLM]) -> None:
    llm = backend()
    try:
        stream = llm.stream(ChatRequest(QUESTION, max_tokens=50))
        assert isinstance(await stream.__anext__(), str)
        await stream.aclose()  # what the service does when a stop string arrives
        fake = fake_trtllm.instances[0]
        task = asyncio.ensure_future(llm.complete([ChatRequest(QUESTION, max_tokens=500)]))
        await asyncio.sleep(0)  # one turn: complete() submits before its first await
        assert fake.in_flight == 1  # decoding; now the client goes away
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await llm.close()
    assert fake.aborted == [1, 2]
    assert fake.in_flight == 0


@pytest.mark.parametrize(("mode", "guide"), [("vllm", "regex"), ("llamacpp", "grammar"), ("none", None)])
async def test_outline_becomes_guided_decoding(fake_trtllm: type[FakeLLM], mode: str, guide: str | None) -> None:
    outline = OutlineFormat(min_points=3, max_points=5, max_words=4)
    llm = backend(structured_outputs=mode)
    try:
        (done,) = await llm.complete([ChatRequest(QUESTION, max_tokens=16, prefill="1.", outline=outline)])
    finally:
        await llm.close()
    fake = fake_trtllm.instances[0]
    (params,) = sent(fake_trtllm)
    if guide is None:
        assert params.guided_decoding is None
        assert "guided_decoding_backend" not in fake.kwargs
        return
    assert fake.kwargs["guided_decoding_backend"] == "xgrammar"
    assert isinstance(params.guided_decoding, GuidedDecodingParams)
    # The prompt ends with the pre-fill "1.", so the guide is the continuation's.
    if guide == "regex":
        assert params.guided_decoding.regex == outline.regex()
        assert re.fullmatch(outline.regex(), done.text)
    else:
        assert params.guided_decoding.grammar == outline.gbnf()


async def test_raw_prompts_and_token_counts(fake_trtllm: type[FakeLLM]) -> None:
    llm = backend()
    try:
        done = await llm.complete_raw([TextRequest("Once upon a time", max_tokens=5),
                                       TextRequest("It was", max_tokens=3, temperature=0.5, seed=1)])
        assert [d.tokens for d in done] == [5, 3]
        assert llm.count_tokens("alpha beta gamma") == 3
        assert llm.count_prompt_tokens(QUESTION) > llm.count_tokens("Why do leaves fall?")
    finally:
        await llm.close()
    prompts = [p for p, _, _ in fake_trtllm.instances[0].submitted]
    assert prompts == ["Once upon a time", "It was"]  # no chat template around raw prompts


async def test_unknown_structured_outputs_and_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackendError, match="structured_outputs"):
        TensorRTLLMBackend("fake-model", structured_outputs="json")
    monkeypatch.setitem(__import__("sys").modules, "tensorrt_llm", None)
    with pytest.raises(BackendError, match=re.escape("pip install 'pice[trtllm]'")):
        TensorRTLLMBackend("fake-model")
