"""A stand-in for TensorRT Edge-LLM's Python API (``experimental.server``), for tests without a GPU.

Mirrors, from NVIDIA/TensorRT-Edge-LLM (https://github.com/NVIDIA/TensorRT-Edge-LLM, main; each
file at the commit that last changed it in the copy we read):

- ``experimental/server/runtime/engine.py`` @ 39c21f41d46dabca49680df862e946be8ce4ce4d (the
  checkpoint-native API, "no ONNX export/build path"): ``SamplingParams`` (a plain
  ``@dataclass``: temperature 0.7, top_p 0.9, top_k 50, seed, max_tokens 2048, enable_thinking,
  reasoning_effort, disable_spec_decode, num_logprobs 0, stop, logit_bias, guided_decoding as a
  ``(guide_type, guide)`` tuple, skip_special_tokens, reuse_context, cache_generated_tokens; no
  repetition penalty: an unknown keyword is a ``TypeError``), ``LogprobEntry(token_id, logprob,
  token, bytes)``, ``CompletionOutput(text, token_ids, prompt_tokens, finish_reason, logprobs:
  List[List[LogprobEntry]], tool_calls, reasoning)``, ``LLM(model, *, cache_dir="",
  engine_cache_max_size_gb=50.0, clear_engine_cache=False, max_input_len=4096, max_batch_size=1,
  max_kv_cache_capacity=8192, ..., enable_in_flight_batching=False)`` (keyword-only: no
  ``engine_dir``) and ``LLM.generate(prompts, sampling_params=None, *, tools=None,
  tool_choice=None, tool_parser="auto", reasoning_parser="none")``: one ``SamplingParams`` for
  every prompt (``params = sampling_params or SamplingParams()``, then ``params.logit_bias`` ...),
  a ``str`` prompt wrapped as ``[{"role": "user", "content": p}]``, a list taken as messages,
  anything else a ``TypeError``; each prompt rendered with the chat template
  (``apply_chat_template=True, add_generation_prompt=True``) and run one after the other;
  ``num_logprobs > 0`` fills ``logprobs``; ``close()``.
- ``cpp/sampler/sampling.h`` @ 17e065c78536431a116a81dc5cc3fd4ff599dcaa: the C++ sampler's
  checks (``std::invalid_argument`` "Either topK or topP must be set" when top_k <= 0 and
  top_p >= 1; temperature < 0 refused; temperature below 1e-3 forces top-k 1), greedy for
  (temperature 1, top_k <= 1, top_p 1), and log-probabilities as the top-k of the raw logits
  (``extractTopKLogprobs``: sorted, the sampled token not necessarily among them; k <= 50).

The model is the same toy as ``fake_tensorrt_llm``'s. ``FakeEdgeLLM.instances`` records each
LLM's keyword arguments, the rendered prompts (``.rendered``) and the parameters (``.params``).
"""

from __future__ import annotations

import random
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from tests.contracts.fake_tensorrt_llm import VOCAB, WORDS, FakeTokenizer, _distribution

MAX_LOGPROBS_K = 50  # kMaxLogprobsK


@dataclass
class SamplingParams:
    """``experimental.server.SamplingParams`` (engine.py @ 39c21f41)."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int | None = None
    max_tokens: int = 2048
    enable_thinking: bool = False
    reasoning_effort: str = ""
    disable_spec_decode: bool = False
    num_logprobs: int = 0
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    guided_decoding: tuple[str, str] | None = None
    skip_special_tokens: bool = True
    reuse_context: bool = True
    cache_generated_tokens: bool = True


@dataclass
class LogprobEntry:
    token_id: int
    logprob: float
    token: str
    bytes: list[int]


@dataclass
class CompletionOutput:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str | None = None


def _native_sampling(temperature: float, top_k: int, top_p: float) -> tuple[bool, int]:
    """The C++ ``SamplingParams`` constructor's checks; (greedy, top_k) as the sampler runs it."""
    use_top_k, use_top_p = top_k > 0, top_p < 1.0
    if not use_top_k and not use_top_p:
        raise ValueError("Either topK or topP must be set")  # std::invalid_argument through pybind
    if temperature < 0.0:
        raise ValueError("Temperature must be greater than 0.0f")
    if temperature < 1e-3:
        return True, 1
    greedy = temperature == 1.0 and top_k <= 1 and top_p == 1.0
    return greedy or top_k == 1, top_k


class FakeEdgeLLM:
    """``experimental.server.LLM``."""

    instances: ClassVar[list[FakeEdgeLLM]] = []

    def __init__(self, model: str, *, cache_dir: str = "", engine_cache_max_size_gb: float = 50.0,
                 clear_engine_cache: bool = False, max_input_len: int = 4096, max_batch_size: int = 1,
                 max_kv_cache_capacity: int = 8192, max_image_tokens: int | None = None,
                 max_image_tokens_per_image: int | None = None, draft_top_k: int | None = None,
                 draft_step: int | None = None, verify_tree_size: int | None = None,
                 max_verify_tree_size: int | None = None, max_draft_tree_size: int | None = None,
                 build_options: Any = None, speculative_config: Any = None, context_cache_config: Any = None,
                 enable_in_flight_batching: bool = False) -> None:
        if not model:
            raise ValueError("'model' must be provided")
        self.model = model
        self.cache_dir = cache_dir
        self.max_input_len = max_input_len
        self.max_batch_size = max_batch_size
        self.rendered: list[str] = []
        self.params: list[SamplingParams] = []
        self.closed = False
        self._template = FakeTokenizer()
        FakeEdgeLLM.instances.append(self)

    def generate(self, prompts: Any, sampling_params: SamplingParams | None = None, *, tools: Any = None,
                 tool_choice: Any = None, tool_parser: str = "auto",
                 reasoning_parser: str = "none") -> list[CompletionOutput]:
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        message_batches = []
        for p in prompts:
            if isinstance(p, str):
                message_batches.append([{"role": "user", "content": p}])
            elif isinstance(p, list):
                message_batches.append(p)
            else:
                raise TypeError(f"Unsupported prompt type: {type(p)}")
        outputs = []
        for messages in message_batches:
            if self.closed:
                raise RuntimeError("Edge-LLM runtime is closed")
            # _make_generation_request reads these fields of ``params`` (a list has none of them).
            _ = (params.logit_bias, params.stop, params.seed, params.guided_decoding, params.temperature,
                 params.top_p, params.top_k, params.max_tokens, params.num_logprobs, params.reuse_context)
            rendered = self._template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            self.rendered.append(rendered)
            self.params.append(params)
            outputs.append(self._complete(rendered, params))
        return outputs

    def _complete(self, rendered: str, params: SamplingParams) -> CompletionOutput:
        greedy, top_k = _native_sampling(params.temperature, params.top_k, params.top_p)
        if params.num_logprobs > MAX_LOGPROBS_K:
            raise ValueError(f"num_logprobs must be <= {MAX_LOGPROBS_K}")
        rng = random.Random(params.seed if params.seed is not None else 42)  # philoxSeed default 42
        tokens: list[int] = []
        steps: list[list[LogprobEntry]] = []
        for position in range(params.max_tokens):
            dist = _distribution(rendered, position, tokens, None)
            ranked = sorted(range(1, len(WORDS) + 1), key=lambda t: -dist[t])
            token = ranked[0] if greedy else rng.choice(ranked[:max(2, min(top_k or len(ranked), 5))])
            if params.num_logprobs:
                steps.append([LogprobEntry(t, dist[t], VOCAB[t], list(VOCAB[t].encode()))
                              for t in ranked[:params.num_logprobs]])
            tokens.append(token)
        return CompletionOutput(text=self._template.decode(tokens), token_ids=tokens,
                                prompt_tokens=len(rendered.split()), finish_reason="length", logprobs=steps)

    def close(self) -> None:
        self.closed = True


def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeEdgeLLM]]:
    """Put ``experimental.server`` in ``sys.modules`` for one test; yields `FakeEdgeLLM`."""
    package = types.ModuleType("experimental")
    package.__path__ = []
    server = types.ModuleType("experimental.server")
    server.__path__ = []
    for name, value in {"LLM": FakeEdgeLLM, "SamplingParams": SamplingParams, "CompletionOutput": CompletionOutput,
                        "LogprobEntry": LogprobEntry}.items():
        setattr(server, name, value)
    package.server = server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "experimental", package)
    monkeypatch.setitem(sys.modules, "experimental.server", server)
    FakeEdgeLLM.instances = []
    yield FakeEdgeLLM
    FakeEdgeLLM.instances = []
