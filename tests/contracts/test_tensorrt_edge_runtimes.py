"""The edge's NVIDIA runtimes against fakes of their libraries written from the libraries' sources
(``fake_tensorrt_llm``, ``fake_edgellm`` name the files and commits): TensorRT-LLM's ``LLM`` and
TensorRT Edge-LLM's ``experimental.server.LLM``, through every field of a `GenerationRequest`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pice_edge.errors import ConfigError
from pice_edge.prompts import expansion_messages
from pice_edge.runtimes import create_runtime, tensorrt_edgellm
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, Runtime
from pice_edge.runtimes.tensorrt_edgellm import TensorRTEdgeLLMRuntime
from pice_edge.runtimes.tensorrt_llm import TensorRTLLMRuntime
from pice_edge.text import OutlineFormat
from tests.contracts.fake_edgellm import FakeEdgeLLM
from tests.contracts.fake_tensorrt_llm import FakeLLM

SKETCH = ["Why leaves fall", "Shorter days", "Saving water"]


@pytest.fixture
def model(tmp_path: Path) -> str:
    """A local model folder (the engines read it themselves; the fakes never do)."""
    folder = tmp_path / "fake-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


# --- TensorRT-LLM on the edge --------------------------------------------------------------


def trtllm(model: str, **options: object) -> TensorRTLLMRuntime:
    runtime = create_runtime("tensorrt_llm", model=model, max_batch=4, **options)
    assert isinstance(runtime, TensorRTLLMRuntime)
    assert isinstance(runtime, Runtime)
    return runtime


def test_trtllm_batch_maps_every_request_field(fake_trtllm: type[FakeLLM], model: str) -> None:
    runtime = trtllm(model)
    prompt = runtime.format_chat(expansion_messages("Why do leaves fall?", SKETCH, 1))
    requests = [
        GenerationRequest(prompt, max_new_tokens=7),
        GenerationRequest(prompt, max_new_tokens=7, temperature=0.8, top_p=0.9, seed=3, repetition_penalty=1.1,
                          no_repeat_ngram_size=3),
        GenerationRequest(prompt, max_new_tokens=7, temperature=0.8),
    ]
    try:
        results = runtime.generate(requests)
    finally:
        runtime.close()
    fake = fake_trtllm.instances[0]
    assert fake.kwargs["max_batch_size"] == 4
    greedy, sampled, unseeded = (params for _, params, _ in fake.submitted)
    assert greedy._greedy_decoding
    assert greedy.top_k == 1
    assert greedy.temperature is None
    assert (sampled.temperature, sampled.top_p, sampled.seed) == (0.8, 0.9, 3)
    assert (sampled.repetition_penalty, sampled.no_repeat_ngram_size) == (1.1, 3)
    assert greedy.repetition_penalty is None  # off unless asked
    assert unseeded.seed is not None
    assert all(p.add_special_tokens is False and p.logprobs == 1 for _, p, _ in fake.submitted)
    assert [r.token_count for r in results] == [7, 7, 7]
    assert fake.shut_down


def test_trtllm_confidence_is_the_sampled_tokens_log_probability(fake_trtllm: type[FakeLLM], model: str) -> None:
    runtime = trtllm(model)
    prompt = runtime.format_chat([ChatMessage("user", "Name a tree.")])
    try:
        sampled = [runtime.generate([GenerationRequest(prompt, max_new_tokens=12, temperature=1.0, seed=s)])[0]
                   for s in range(4)]
        (greedy,) = runtime.generate([GenerationRequest(prompt, max_new_tokens=12)])
    finally:
        runtime.close()
    outputs = [out for out in fake_trtllm.instances[0].submitted]
    assert len(outputs) == 5
    assert greedy.mean_logprob < 0
    # The first entry of each position is the most likely token; a sampled token's own
    # log-probability is lower, so sampled generations are less confident than greedy.
    assert all(s.mean_logprob < greedy.mean_logprob for s in sampled)


def test_trtllm_engine_backend_without_gathered_logits_asks_for_none(fake_trtllm: type[FakeLLM], model: str) -> None:
    runtime = trtllm(model, backend="tensorrt", max_seq_len=512)
    prompt = runtime.format_chat([ChatMessage("user", "Name a tree.")])
    try:
        (result,) = runtime.generate([GenerationRequest(prompt, max_new_tokens=5)])
    finally:
        runtime.close()
    assert not runtime.logprobs
    assert result.mean_logprob == 0.0
    assert result.token_count == 5


def test_trtllm_outline_is_guided_when_the_llm_has_a_guide_backend(fake_trtllm: type[FakeLLM], model: str) -> None:
    outline = OutlineFormat(min_points=3, max_points=5, max_words=4)
    runtime = trtllm(model, guided_decoding_backend="xgrammar")
    prompt = runtime.format_chat([ChatMessage("user", "Outline leaves.")], "1.")
    try:
        (result,) = runtime.generate([GenerationRequest(prompt, max_new_tokens=16, outline=outline)])
    finally:
        runtime.close()
    (params,) = [p for _, p, _ in fake_trtllm.instances[0].submitted]
    assert params.guided_decoding is not None
    assert params.guided_decoding.regex == outline.regex()
    assert re.fullmatch(outline.regex(), result.text)


# --- TensorRT Edge-LLM ------------------------------------------------------------------------


def edgellm(model: str, **options: object) -> TensorRTEdgeLLMRuntime:
    runtime = create_runtime("tensorrt_edgellm", model=model, max_batch=4, **options)
    assert isinstance(runtime, TensorRTEdgeLLMRuntime)
    assert isinstance(runtime, Runtime)
    return runtime


def test_edgellm_loads_with_its_constructor(fake_edge_llm: type[FakeEdgeLLM], model: str) -> None:
    runtime = edgellm(model, engine_dir="/tmp/pice-edgellm-cache", max_input_len=768)
    runtime.close()
    (fake,) = fake_edge_llm.instances
    assert (fake.model, fake.cache_dir, fake.max_batch_size, fake.max_input_len) == (
        model, "/tmp/pice-edgellm-cache", 4, 768)
    assert fake.closed


def test_edgellm_templates_the_prompt_once(fake_edge_llm: type[FakeEdgeLLM], model: str) -> None:
    runtime = edgellm(model)
    messages = expansion_messages("Why do leaves fall?", SKETCH, 0)
    prompt = runtime.format_chat(messages)
    try:
        (result,) = runtime.generate([GenerationRequest(prompt, max_new_tokens=6)])
    finally:
        runtime.close()
    (rendered,) = fake_edge_llm.instances[0].rendered
    assert rendered.count("<|im_start|>") == 3  # system, user, the assistant's turn: once each
    assert "<|im_start|>user\n<|im_start|>" not in rendered
    assert rendered == prompt  # the engine saw the conversation PICE rendered, templated by itself
    assert result.token_count == 6


def test_edgellm_sampling_settings_pass_its_checks(fake_edge_llm: type[FakeEdgeLLM], model: str) -> None:
    runtime = edgellm(model)
    prompt = runtime.format_chat([ChatMessage("user", "Name a tree.")])
    try:
        runtime.generate([
            GenerationRequest(prompt, max_new_tokens=4),
            GenerationRequest(prompt, max_new_tokens=4, temperature=0.7, top_p=1.0),  # neither top-k nor top-p
            GenerationRequest(prompt, max_new_tokens=4, temperature=0.7, top_p=0.8, seed=9),
        ])
    finally:
        runtime.close()
    greedy, full, nucleus = fake_edge_llm.instances[0].params
    assert (greedy.temperature, greedy.top_k, greedy.top_p, greedy.num_logprobs) == (0.0, 1, 1.0, 1)
    assert (full.temperature, full.top_k, full.top_p) == (0.7, 0, tensorrt_edgellm.TOP_P_CEILING)
    assert full.seed is not None
    assert (nucleus.top_p, nucleus.seed) == (0.8, 9)
    assert all(p.max_tokens == 4 for p in (greedy, full, nucleus))


def test_edgellm_confidence_comes_from_its_logprob_entries(fake_edge_llm: type[FakeEdgeLLM], model: str) -> None:
    runtime = edgellm(model)
    prompt = runtime.format_chat([ChatMessage("user", "Name a tree.")])
    try:
        (greedy,) = runtime.generate([GenerationRequest(prompt, max_new_tokens=10)])
        (sampled,) = runtime.generate([GenerationRequest(prompt, max_new_tokens=10, temperature=1.0, seed=2)])
    finally:
        runtime.close()
    assert greedy.mean_logprob < 0
    assert sampled.mean_logprob < greedy.mean_logprob < 0


def test_edgellm_refuses_repetition_control_it_does_not_have(fake_edge_llm: type[FakeEdgeLLM], model: str) -> None:
    with pytest.raises(ConfigError, match=r"no repetition_penalty.*repetition_penalty: 1.0"):
        edgellm(model, repetition_penalty=1.1)
    assert not fake_edge_llm.instances  # refused before loading anything
    runtime = edgellm(model, repetition_penalty=1.0)
    prompt = runtime.format_chat([ChatMessage("user", "Name a tree.")])
    try:
        with pytest.raises(ConfigError, match=r"repetition_penalty 1\.3"):
            runtime.generate([GenerationRequest(prompt, max_new_tokens=4, repetition_penalty=1.3)])
        (ok,) = runtime.generate([GenerationRequest(prompt, max_new_tokens=4, repetition_penalty=1.0)])
    finally:
        runtime.close()
    assert ok.token_count == 4


def test_edgellm_prefill_and_outline(fake_edge_llm: type[FakeEdgeLLM], model: str) -> None:
    outline = OutlineFormat(min_points=3, max_points=5, max_words=4)
    runtime = edgellm(model)
    prompt = runtime.format_chat([ChatMessage("user", "Outline leaves.")], "1.")
    try:
        runtime.generate([GenerationRequest(prompt, max_new_tokens=5, outline=outline)])
        runtime.generate([GenerationRequest("Plain text, not from format_chat", max_new_tokens=3)])
    finally:
        runtime.close()
    fake = fake_edge_llm.instances[0]
    guided, plain = fake.params
    # The engine cannot continue a pre-filled turn: it writes "1." itself, so the guide starts with it.
    assert guided.guided_decoding == ("regex", re.escape("1.") + outline.regex())
    assert plain.guided_decoding is None
    assert fake.rendered[0].endswith("<|im_start|>assistant\n")
    assert fake.rendered[1] == "<|im_start|>user\nPlain text, not from format_chat<|im_end|>\n<|im_start|>assistant\n"
