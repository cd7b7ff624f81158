"""A stand-in for ``tensorrt_llm``'s LLM API with the real one's interface, for tests without a GPU.

Mirrors, from NVIDIA/TensorRT-LLM (https://github.com/NVIDIA/TensorRT-LLM; each file at the
commit that last changed it in the copy we read, on main after release 1.0.0rc4, the
``params_imply_greedy_decoding`` generation):

- ``tensorrt_llm/sampling_params.py`` @ a98a9061d72f6fd39f5d055ebdd2c6878a100e2c:
  ``SamplingParams`` (``@dataclass(slots=True, kw_only=True)``: an unknown keyword is a
  ``TypeError``), its ``_validate`` (top_p in [0, 1], top_k >= 0, temperature >= 0, best_of >=
  n, one guide at most, ``logprobs = logprobs and int(logprobs)`` so 0 means none),
  ``params_imply_greedy_decoding`` and ``GuidedDecodingParams``;
- ``tensorrt_llm/llmapi/llm.py`` @ 4c05a74891e4df8066f08ed4ce14b0972abe4e25: ``LLM.generate``
  (one ``SamplingParams`` or a list, ``use_tqdm``; it submits each prompt with
  ``generate_async`` and waits), ``LLM.generate_async(inputs, sampling_params=None,
  lora_request=None, prompt_adapter_request=None, streaming=False, kv_cache_retention_config=None,
  disaggregated_params=None, _postproc_params=None, scheduling_params=None, cache_salt=None)``,
  ``_prepare_sampling_params`` (``TypeError`` for anything but ``SamplingParams`` or None) and
  ``_check_arguments`` (``ValueError``: prompt + max_tokens over ``max_seq_len`` on the TensorRT
  backend, prompt over ``max_num_tokens`` on PyTorch, logprobs on the TensorRT backend without
  ``gather_generation_logits``), ``RuntimeError("LLM is shutting down")`` after ``shutdown``;
- ``tensorrt_llm/executor/result.py`` @ 005bc848893f575ec14b45d6b13139360d67c790:
  ``CompletionOutput`` (``text``, ``token_ids``, ``logprobs`` as ``list[dict[int, Logprob]]``
  holding the top-k and the sampled token, ``finish_reason``, ``text_diff``),
  ``Logprob(logprob, rank)``, and the result object (``RequestOutput``): ``aresult()``,
  ``result()``, ``await``, ``async for`` (streaming: the same object, updated, once per decoded
  token), ``abort()``, ``finished``, and the assertion when awaited without an event loop at
  submission;
- ``tensorrt_llm/llmapi/__init__.py`` @ 036a60f7ff9257595c96a578560651da5c4df577: what the package exports.

The "model" is a toy: a word vocabulary, a deterministic distribution per position, greedy =
argmax, sampling = a draw from the top five with ``random.Random(seed)`` (seed None is the
C++ default 0), ``repetition_penalty`` lowers repeated words. Guided decoding emits a three-item
outline, checked against the given regex. Every ``LLM`` records what it was asked
(``FakeLLM.instances``, ``.submitted``, ``.max_in_flight``, ``.aborted``).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import pytest

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")
EOS = 0  # "<|im_end|>"
#: Token ids: 0 end of turn, 1..len(WORDS) the words (decoded with a leading space), then the
#: outline's item marks "\n2." .. "\n9." (only guided decoding emits them).
VOCAB = ("<|im_end|>", *(" " + w for w in WORDS), *(f"\n{n}." for n in range(2, 10)))
_MARK = 1 + len(WORDS) - 2  # id of "\n{n}." is _MARK + n


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    """``tensorrt_llm.sampling_params.GuidedDecodingParams`` (one guide per request)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self) -> None:
        num_guides = sum(bool(getattr(self, f.name)) for f in fields(self))
        if num_guides > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {num_guides}.")


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """``tensorrt_llm.SamplingParams``: every public field of the pinned file, same defaults."""

    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    embedding_bias: Any = None
    logits_processor: Any = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    beam_search_diversity_rate: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    no_repeat_ngram_size: int | None = None
    min_p: float | None = None
    beam_width_array: list[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: list[str] | None = None
    lookahead_config: Any = None
    guided_decoding: GuidedDecodingParams | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        self._validate()

    def _validate(self) -> None:
        if self.top_p is not None and (self.top_p < 0 or self.top_p > 1):
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if self.best_of is not None and self.best_of > 1 and self._greedy_decoding:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        if self.guided_decoding is not None:
            self.guided_decoding._validate()
        self.logprobs = self.logprobs and int(self.logprobs)
        self.prompt_logprobs = self.prompt_logprobs and int(self.prompt_logprobs)

    @staticmethod
    def params_imply_greedy_decoding(*, temperature: float | None, top_p: float | None, top_k: int | None) -> bool:
        return ((temperature is None and top_p is None and top_k is None) or top_k == 1 or top_p == 0.0
                or temperature == 0)

    @property
    def _greedy_decoding(self) -> bool:
        return not self.use_beam_search and self.params_imply_greedy_decoding(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


@dataclass(slots=True)
class Logprob:
    """``tensorrt_llm.executor.result.Logprob``."""

    logprob: float
    rank: int | None = None


@dataclass(slots=True)
class CompletionOutput:
    """``tensorrt_llm.executor.result.CompletionOutput`` (the fields PICE can read)."""

    index: int
    text: str = ""
    token_ids: list[int] | None = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob]] | None = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generation_logits: Any = None
    disaggregated_params: Any = None
    _last_text_len: int = field(default=0, init=False, repr=False)
    _last_token_ids_len: int = field(default=0, init=False, repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids or ())

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len:]

    @property
    def token_ids_diff(self) -> list[int]:
        return (self.token_ids or [])[self._last_token_ids_len:]


class FakeTokenizer:
    """The LLM's ``tokenizer`` (``TransformersTokenizer``): encode, decode, apply_chat_template."""

    eos_token_id = EOS
    pad_token_id = EOS

    def encode(self, text: str, *args: Any, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        ids = [1 + (sum(map(ord, w)) % len(WORDS)) for w in text.split()]
        return ([EOS] if add_special_tokens else []) + ids  # a BOS-like special when asked for

    def decode(self, token_ids: Sequence[int], *args: Any, **kwargs: Any) -> str:
        return "".join(VOCAB[t] for t in token_ids if t != EOS)

    def apply_chat_template(self, conversation: list[dict[str, str]], *args: Any, tokenize: bool = True,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversation)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _distribution(prompt: str, position: int, previous: Sequence[int], penalty: float | None) -> list[float]:
    """Log-probabilities over the word tokens at ``position`` (end of turn never chosen)."""
    base = sum(map(ord, prompt)) + 7 * position
    logits = [-((base + 3 * j) % len(WORDS)) / 2.0 for j in range(len(WORDS))]
    if penalty:
        for token in set(previous) & set(range(1, len(WORDS) + 1)):
            logits[token - 1] = logits[token - 1] / penalty if logits[token - 1] > 0 else logits[token - 1] * penalty
    norm = math.log(sum(math.exp(v) for v in logits))
    # End of turn and the outline marks are impossible unguided.
    return [-1e9] + [v - norm for v in logits] + [-1e9] * (len(VOCAB) - 1 - len(WORDS))


class RequestOutput:
    """The object ``generate_async`` returns (``RequestOutput`` over ``GenerationResult``)."""

    def __init__(self, llm: FakeLLM, request_id: int, prompt: str, prompt_token_ids: list[int],
                 params: SamplingParams, tokens: list[int], logprobs: list[dict[int, Logprob]] | None,
                 streaming: bool) -> None:
        self._llm = llm
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = params
        self._tokens = tokens
        self._logprobs = logprobs
        self._streaming = streaming
        self._shown = 0
        self._done = False
        self._aborted = False
        self._outputs = [CompletionOutput(0)]
        try:
            asyncio.get_running_loop()
            self._has_loop = True
        except RuntimeError:
            self._has_loop = False

    @property
    def outputs(self) -> list[CompletionOutput]:
        return self._outputs

    @property
    def finished(self) -> bool:
        return self._done

    def _step(self) -> None:
        out = self._outputs[0]
        out._last_text_len = len(out.text)
        out._last_token_ids_len = len(out.token_ids or ())
        self._shown = len(self._tokens) if not self._streaming else self._shown + 1
        ids = self._tokens[:self._shown]
        out.token_ids = list(ids)
        out.text = self._llm.tokenizer.decode(ids) if self.sampling_params.detokenize else ""
        if self._logprobs is not None:
            out.logprobs = self._logprobs[:self._shown]
        if self._shown >= len(self._tokens):
            self._done = True
            out.finish_reason = "length"
            self._llm._retire(self)

    def result(self, timeout: float | None = None) -> RequestOutput:
        while not self._done:
            self._step()
        return self

    async def _aresult_step(self) -> None:
        assert self._has_loop, ("The asyncio event loop was not present during initialization, so async "
                                "operations are not available.")
        # The executor decodes on its own; a response comes after each token when streaming, else
        # once at the end. Others run meanwhile (one loop turn per token).
        for _ in range(1 if self._streaming else len(self._tokens)):
            await asyncio.sleep(0)
        if not self._done:
            self._step()

    async def aresult(self) -> RequestOutput:
        while not self._done:
            await self._aresult_step()
        return self

    def __await__(self) -> Any:
        return self.aresult().__await__()

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        await self._aresult_step()
        return self

    def abort(self) -> None:
        self._aborted = True
        if not self._done:
            self._done = True
            self._outputs[0].finish_reason = "cancelled"
            self._llm.aborted.append(self.request_id)
            self._llm._retire(self)

    def aborted(self) -> bool:
        return self._aborted


class FakeLLM:
    """``tensorrt_llm.LLM`` (the PyTorch backend unless ``backend="tensorrt"``)."""

    instances: ClassVar[list[FakeLLM]] = []
    #: LlmArgs fields PICE may pass (the real LlmArgs rejects unknown ones).
    ARGS = frozenset({"max_batch_size", "max_num_tokens", "max_seq_len", "backend", "gather_generation_logits",
                      "guided_decoding_backend", "kv_cache_config", "enable_chunked_prefill", "max_beam_width",
                      "dtype", "tensor_parallel_size", "trust_remote_code", "build_config"})

    def __init__(self, model: str, tokenizer: Any = None, tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 dtype: str = "auto", revision: str | None = None, tokenizer_revision: str | None = None,
                 **kwargs: Any) -> None:
        unknown = set(kwargs) - self.ARGS
        if unknown:
            raise ValueError(f"Failed to parse the arguments for the LLM constructor: unknown {sorted(unknown)}")
        self.model = model
        self.kwargs = kwargs
        self.args = types.SimpleNamespace(backend=kwargs.get("backend", "pytorch"),
                                          gather_generation_logits=kwargs.get("gather_generation_logits", False),
                                          max_seq_len=kwargs.get("max_seq_len", 2048),
                                          max_num_tokens=kwargs.get("max_num_tokens", 8192),
                                          guided_decoding_backend=kwargs.get("guided_decoding_backend"))
        self.tokenizer = None if skip_tokenizer_init else FakeTokenizer()
        self.submitted: list[tuple[str, SamplingParams, bool]] = []
        self.aborted: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.shut_down = False
        self._next_id = 0
        FakeLLM.instances.append(self)

    def generate(self, inputs: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: Any = None, prompt_adapter_request: Any = None,
                 kv_cache_retention_config: Any = None, disaggregated_params: Any = None,
                 scheduling_params: Any = None, cache_salt: Any = None) -> RequestOutput | list[RequestOutput]:
        unbatched = not isinstance(inputs, list)
        prompts = [inputs] if unbatched else inputs
        futures = [self.generate_async(p, sampling_params=sampling_params[i] if isinstance(sampling_params, list)
                                       else sampling_params, streaming=False) for i, p in enumerate(prompts)]
        for future in futures:
            future.result()
        return futures[0] if unbatched else futures

    def generate_async(self, inputs: Any, sampling_params: SamplingParams | None = None, lora_request: Any = None,
                       prompt_adapter_request: Any = None, streaming: bool = False,
                       kv_cache_retention_config: Any = None, disaggregated_params: Any = None,
                       _postproc_params: Any = None, scheduling_params: Any = None,
                       cache_salt: str | None = None) -> RequestOutput:
        if self.shut_down:
            raise RuntimeError("LLM is shutting down")
        params = self._prepare_sampling_params(sampling_params)
        if not isinstance(inputs, str):
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        prompt_ids = self.tokenizer.encode(inputs, add_special_tokens=params.add_special_tokens)
        self._check_arguments(len(prompt_ids), params)
        tokens, logprobs = self._decode(inputs, params)
        self._next_id += 1
        self.submitted.append((inputs, params, streaming))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return RequestOutput(self, self._next_id, inputs, prompt_ids, params, tokens, logprobs, streaming)

    def _prepare_sampling_params(self, sampling_params: SamplingParams | None) -> SamplingParams:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"The sampling_params must be type SamplingParams or None, but got "
                            f"{type(sampling_params)}")
        if sampling_params.end_id is None:
            sampling_params.end_id = EOS
            sampling_params.pad_id = EOS
        return sampling_params

    def _check_arguments(self, prompt_len: int, params: SamplingParams) -> None:
        if self.args.backend == "pytorch":
            if prompt_len > self.args.max_num_tokens:
                raise ValueError(f"The sum of prompt length ({prompt_len}), query length (0) should not exceed "
                                 f"max_num_tokens ({self.args.max_num_tokens})")
            return
        if prompt_len + (params.max_tokens or 0) > self.args.max_seq_len:
            raise ValueError(f"The sum of prompt length ({prompt_len}) and query length (0) max_tokens "
                             f"({params.max_tokens}) should not exceed max_seq_len ({self.args.max_seq_len})")
        if params.logprobs and not self.args.gather_generation_logits:
            raise ValueError(f"`sampling_params.logprobs={params.logprobs}` requires `gather_generation_logits=True` "
                             "to be passed explicitly to the `LLM()` constructor.")

    def _decode(self, prompt: str, params: SamplingParams) -> tuple[list[int], list[dict[int, Logprob]] | None]:
        greedy = params._greedy_decoding
        rng = random.Random(params.seed if params.seed is not None else 0)  # C++ default seed 0
        guide = params.guided_decoding
        if guide is not None and (guide.regex or guide.grammar):
            tokens = self._outline(guide, params.max_tokens)
        else:
            tokens = []
            for position in range(params.max_tokens):
                dist = _distribution(prompt, position, tokens, params.repetition_penalty)
                ranked = sorted(range(1, len(VOCAB)), key=lambda t: -dist[t])
                tokens.append(ranked[0] if greedy else rng.choice(ranked[:5]))
        if not params.logprobs:
            return tokens, None
        logprobs = []
        for position, token in enumerate(tokens):
            dist = _distribution(prompt, position, tokens[:position], params.repetition_penalty)
            ranked = sorted(range(1, len(VOCAB)), key=lambda t: -dist[t])
            entry = {t: Logprob(dist[t], rank + 1) for rank, t in enumerate(ranked[:params.logprobs])}
            if token not in entry:  # the sampled token is always there (compute_logprobs)
                entry[token] = Logprob(dist[token], ranked.index(token) + 1)
            logprobs.append(entry)
        return tokens, logprobs

    def _outline(self, guide: GuidedDecodingParams, max_tokens: int) -> list[int]:
        """Three items of two words (" alpha beta\\n2. gamma delta\\n3. epsilon zeta"), checked
        against the regex; xgrammar needs the LLM built with a guided decoding backend."""
        if self.args.guided_decoding_backend is None:
            raise ValueError("guided decoding needs the LLM to be created with guided_decoding_backend")
        tokens = [1, 2, _MARK + 2, 3, 4, _MARK + 3, 5, 6][:max_tokens]
        text = FakeTokenizer().decode(tokens)
        if guide.regex is not None and not re.fullmatch(guide.regex, text):
            raise AssertionError(f"the fake's outline {text!r} does not match the guide {guide.regex!r}")
        return tokens

    def _retire(self, output: RequestOutput) -> None:
        self.in_flight -= 1

    def shutdown(self) -> None:
        self.shut_down = True


def module() -> types.ModuleType:
    """A ``tensorrt_llm`` package with ``LLM``, ``SamplingParams`` and the submodules PICE imports."""
    root = types.ModuleType("tensorrt_llm")
    root.__path__ = []  # a package: submodules import
    root.LLM = FakeLLM  # type: ignore[attr-defined]
    root.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    root.__version__ = "fake-a98a906"  # type: ignore[attr-defined]
    sampling = types.ModuleType("tensorrt_llm.sampling_params")
    sampling.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    sampling.GuidedDecodingParams = GuidedDecodingParams  # type: ignore[attr-defined]
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    for name, value in {"LLM": FakeLLM, "SamplingParams": SamplingParams, "RequestOutput": RequestOutput,
                        "CompletionOutput": CompletionOutput, "GuidedDecodingParams": GuidedDecodingParams}.items():
        setattr(llmapi, name, value)
    root.sampling_params = sampling  # type: ignore[attr-defined]
    root.llmapi = llmapi  # type: ignore[attr-defined]
    return root


def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeLLM]]:
    """Put the fake in ``sys.modules`` for one test; yields `FakeLLM` (its ``instances``)."""
    root = module()
    monkeypatch.setitem(sys.modules, "tensorrt_llm", root)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.sampling_params", root.sampling_params)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", root.llmapi)
    FakeLLM.instances = []
    yield FakeLLM
    FakeLLM.instances = []
