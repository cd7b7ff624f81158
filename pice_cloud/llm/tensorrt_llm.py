"""Cloud LLM backend on TensorRT-LLM's in-process ``LLM`` API (NVIDIA GPU only).

``tensorrt_llm`` is an optional extra (``pip install 'pice[trtllm]'``) that needs Linux, an
NVIDIA GPU and CUDA; it cannot be installed on a CPU-only machine, so it is imported only when
this backend is created, and its absence is a `BackendError` that says so. Operators who run
``trtllm-serve`` instead use the ``openai`` backend against it.

Every request is submitted with ``LLM.generate_async`` from the event loop, so concurrent
sketches, answers and expansions are batched in flight by TensorRT-LLM's executor (nothing
serialises them on a thread of ours); streamed answers iterate the same request object
(``generate_async(..., streaming=True)``), and closing a stream aborts its request.

The request contract is the other backends' (`pice_cloud.llm.transformers`,
`pice_cloud.llm.openai_http`), mapped onto ``tensorrt_llm.SamplingParams`` (written against
``tensorrt_llm/sampling_params.py`` and ``tensorrt_llm/llmapi/llm.py`` of NVIDIA/TensorRT-LLM;
``tests/contracts/fake_tensorrt_llm.py`` names the commits):

- temperature 0 is greedy: ``top_k=1``, which every TensorRT-LLM version decodes greedily
  (``params_imply_greedy_decoding``); a sampled request sends its temperature and top_p, and a
  seed (a random one when the request has none: TensorRT-LLM's "no seed" is the fixed seed 0,
  so unseeded requests would all draw the same tokens);
- the prompt is already templated (and pre-filled), so ``add_special_tokens=False``;
- log-probabilities: ``logprobs=max(1, n)`` (TensorRT-LLM reads 0 as "none"); each entry is a
  ``{token_id: Logprob(logprob, rank)}`` dict holding the top ``n`` and the sampled token;
- stop strings are applied by the service above the backend; a stream it closes is aborted;
- a sketch's outline format (`ChatRequest.outline`) becomes ``GuidedDecodingParams`` (``regex``
  or an EBNF ``grammar``) when ``structured_outputs`` asks for it; the LLM is then created with
  ``guided_decoding_backend="xgrammar"`` unless the caller chose one.

What the engine refuses before queueing a request (its ``ValueError``: a prompt over
``max_seq_len``, log-probabilities from an engine built without ``gather_generation_logits``)
is a client error: `InputTooLongError` or `UnavailableInModeError` (HTTP 400) with the engine's
reason. A failure while generating is a `BackendError` (HTTP 502).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from pice_cloud.errors import BackendError, InputTooLongError, UnavailableInModeError
from pice_cloud.llm.base import ChatRequest, Completion, TextRequest, TokenLogprob
from pice_edge.runtimes.base import ChatMessage
from pice_edge.runtimes.tensorrt_llm import chosen_logprob, logprob_value, sampling_kwargs
from pice_edge.text import OutlineFormat

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the tensorrt_llm backend needs TensorRT-LLM, which runs only on Linux with an NVIDIA GPU and CUDA: "
    "pip install 'pice[trtllm]' on such a machine (or serve the model with trtllm-serve and use "
    "llm.kind=openai with llm.url pointing at it)"
)

#: How a sketch's outline format is sent (`ChatRequest.outline`): the names of
#: ``llm.structured_outputs`` (vllm: a regex, llamacpp: a GBNF grammar) or the guide's own name.
STRUCTURED_OUTPUTS: dict[str, str | None] = {"none": None, "vllm": "regex", "regex": "regex",
                                             "llamacpp": "grammar", "grammar": "grammar"}

def _import() -> Any:
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise BackendError(f"{INSTALL_HINT} ({exc})") from exc
    except Exception as exc:  # a present but broken install (no GPU, CUDA mismatch) raises others
        raise BackendError(f"tensorrt_llm is installed but failed to import: {exc}; {INSTALL_HINT}") from exc
    return tensorrt_llm


def _rank(item: tuple[int, Any]) -> tuple[float, float]:
    rank = getattr(item[1], "rank", None)
    return (float(rank) if isinstance(rank, int) else math.inf, -logprob_value(item[1]))


def _abort(output: Any) -> None:
    """Abort a request still in flight (a consumer that stopped waiting)."""
    if getattr(output, "finished", True):
        return
    with contextlib.suppress(Exception):  # already finished or the executor is gone
        output.abort()


class TensorRTLLMBackend:
    """`LLMBackend`, `StreamingBackend`, `RawCompleter` and `TokenCounter` on ``tensorrt_llm.LLM``.

    Args:
        model: model name or folder (`pice_edge.model_store.resolve`), a Hugging Face id, or an
            engine folder TensorRT-LLM loads itself.
        structured_outputs: how a sketch's outline format is enforced: ``regex``/``vllm``
            (``GuidedDecodingParams(regex=...)``), ``grammar``/``llamacpp`` (an EBNF grammar),
            ``none`` (not sent; the sketch guards alone).
        context_tokens: the model's context window, when known (else TensorRT-LLM checks).
        llm_kwargs: keyword arguments of ``tensorrt_llm.LLM`` (``max_batch_size``,
            ``kv_cache_config``, ``gather_generation_logits``, ``backend`` ...).
    """

    name = "tensorrt_llm"

    def __init__(self, model: str | Path, *, structured_outputs: str = "none", context_tokens: int | None = None,
                 **llm_kwargs: Any) -> None:
        if structured_outputs not in STRUCTURED_OUTPUTS:
            raise BackendError(f"structured_outputs {structured_outputs!r}: choose one of "
                               f"{', '.join(STRUCTURED_OUTPUTS)}")
        self.guide = STRUCTURED_OUTPUTS[structured_outputs]
        trt = _import()
        from pice_edge.model_store import resolve

        try:
            path = resolve(model)
        except Exception:
            path = Path(model)  # a Hugging Face id or an engine directory TensorRT-LLM resolves itself
        if self.guide is not None:
            llm_kwargs.setdefault("guided_decoding_backend", "xgrammar")
        try:
            self._llm = trt.LLM(model=str(path), **llm_kwargs)
        except Exception as exc:
            raise BackendError(f"TensorRT-LLM could not load {path}: {exc}") from exc
        self._sampling_cls = trt.SamplingParams
        self._guided_cls: Any = None
        if self.guide is not None:
            self._guided_cls = getattr(importlib.import_module("tensorrt_llm.sampling_params"),
                                       "GuidedDecodingParams", None)
            if self._guided_cls is None:
                self._llm.shutdown()
                raise BackendError("this TensorRT-LLM has no guided decoding (GuidedDecodingParams); set "
                                   "llm.structured_outputs to none or upgrade TensorRT-LLM")
        self._tokenizer = self._llm.tokenizer
        if self._tokenizer is None:
            self._llm.shutdown()
            raise BackendError(f"TensorRT-LLM loaded {path} without a tokenizer; PICE renders chat templates "
                               "itself and needs one (do not pass skip_tokenizer_init)")
        self.model_id = Path(str(model)).name
        #: The model's context window (prompt + completion) when known.
        self.context_tokens: int | None = context_tokens or _max_seq_len(self._llm)

    # --- prompts and parameters -------------------------------------------------------------

    def _prompt(self, messages: Sequence[ChatMessage], prefill: str) -> str:
        rendered = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
        )
        return str(rendered) + prefill

    def _params(self, kwargs: dict[str, Any]) -> Any:
        try:
            return self._sampling_cls(**kwargs)
        except (TypeError, ValueError) as exc:  # the LLM API validates on construction
            raise UnavailableInModeError(f"TensorRT-LLM refuses these sampling settings: {exc}") from exc

    def _chat_params(self, request: ChatRequest) -> Any:
        kwargs = sampling_kwargs(max_tokens=request.max_tokens, temperature=request.temperature,
                                 top_p=request.top_p, seed=request.seed)
        if request.logprobs is not None:
            kwargs["logprobs"] = max(1, request.logprobs)  # 0 reads as "no log-probabilities"
        if request.outline is not None and self.guide is not None:
            kwargs["guided_decoding"] = self._guided(request.outline)
        return self._params(kwargs)

    def _guided(self, outline: OutlineFormat) -> Any:
        # The prompt ends with the pre-fill, so the guide describes the continuation only.
        if self.guide == "regex":
            return self._guided_cls(regex=outline.regex())
        return self._guided_cls(grammar=outline.gbnf())

    # --- requests -----------------------------------------------------------------------------

    def _submit(self, prompt: str, params: Any, *, streaming: bool) -> Any:
        """Queue one request with the executor (from the event loop: its result is awaitable)."""
        try:
            return self._llm.generate_async(prompt, sampling_params=params, streaming=streaming)
        except ValueError as exc:  # checked before queueing (_check_arguments)
            message = f"TensorRT-LLM cannot serve this request: {exc}"
            if "max_seq_len" in str(exc) or "max_num_tokens" in str(exc):
                raise InputTooLongError(message) from exc
            raise UnavailableInModeError(message) from exc
        except Exception as exc:  # shut down, or its executor failed
            raise BackendError(f"TensorRT-LLM refused the request: {exc}") from exc

    async def _finish(self, output: Any) -> Any:
        try:
            return await output.aresult()
        except asyncio.CancelledError:
            _abort(output)  # nobody waits for it any more: free its slot in the batch
            raise
        except Exception as exc:
            raise BackendError(f"TensorRT-LLM failed while generating: {exc}") from exc

    async def _run(self, jobs: Sequence[tuple[str, Any]]) -> list[Any]:
        """Submit every (prompt, params) at once and wait for all: they are batched in flight."""
        submitted: list[Any] = []
        try:
            for prompt, params in jobs:
                submitted.append(self._submit(prompt, params, streaming=False))
            return list(await asyncio.gather(*(self._finish(o) for o in submitted)))
        except BaseException:
            for output in submitted:
                _abort(output)
            raise

    def _completion(self, output: Any, alternatives: int | None) -> Completion:
        first = output.outputs[0]
        ids = [int(t) for t in (first.token_ids or ())]
        text = str(first.text)
        if alternatives is None:
            return Completion(text=text, tokens=len(ids))
        entries = self._token_logprobs(first, ids, alternatives)
        mean = sum(e.logprob for e in entries) / len(entries) if entries else 0.0
        return Completion(text=text, tokens=len(ids), mean_logprob=mean, token_logprobs=entries)

    def _token_logprobs(self, first: Any, ids: list[int], alternatives: int) -> tuple[TokenLogprob, ...]:
        raw = list(first.logprobs or ())
        if len(raw) != len(ids):
            raise BackendError(f"TensorRT-LLM returned {len(raw)} log-probabilities for {len(ids)} tokens; start "
                               "the LLM so that it computes them (gather_generation_logits=True on the TensorRT "
                               "engine backend)")
        def decode(token: int) -> str:
            return str(self._tokenizer.decode([token]))

        entries = []
        for token, entry in zip(ids, raw, strict=True):
            value = chosen_logprob(entry, token)
            if value is None:
                raise BackendError(f"TensorRT-LLM's log-probabilities lack the sampled token {token}")
            top: tuple[tuple[str, float], ...] = ()
            if isinstance(entry, dict) and alternatives:
                top = tuple((decode(int(t)), logprob_value(v))
                            for t, v in sorted(entry.items(), key=_rank)[:alternatives])
            entries.append(TokenLogprob(decode(token), value, top))
        return tuple(entries)

    # --- LLMBackend, StreamingBackend, RawCompleter --------------------------------------------

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        if not requests:
            return []
        jobs = [(self._prompt(r.messages, r.prefill), self._chat_params(r)) for r in requests]
        outputs = await self._run(jobs)
        return [self._completion(o, r.logprobs) for o, r in zip(outputs, requests, strict=True)]

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Completion, None]:
        """Stream one continuation as TensorRT-LLM decodes it (`StreamingBackend`).

        The pieces are the growth of the request's detokenized text (a trailing replacement
        character, half of a multi-byte character, is held back), so they concatenate to the
        completion's text, which is what `complete` returns for the same request and seed.
        Closing the iterator early aborts the request.
        """
        output = self._submit(self._prompt(request.messages, request.prefill), self._chat_params(request),
                              streaming=True)
        sent = ""
        try:
            try:
                async for step in output:
                    text = str(step.outputs[0].text)
                    safe = text[:-1] if text.endswith("\ufffd") else text
                    if len(safe) > len(sent) and safe.startswith(sent):
                        piece, sent = safe[len(sent):], safe
                        yield piece
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise BackendError(f"TensorRT-LLM failed while streaming: {exc}") from exc
            done = self._completion(output, request.logprobs)
            if len(done.text) > len(sent) and done.text.startswith(sent):
                yield done.text[len(sent):]
            yield done
        finally:
            _abort(output)

    async def complete_raw(self, requests: Sequence[TextRequest]) -> list[Completion]:
        """Continue raw prompts as they are (no chat template), batched in flight like `complete`."""
        if not requests:
            return []
        jobs = [(r.prompt, self._params(sampling_kwargs(max_tokens=r.max_tokens, temperature=r.temperature,
                                                        top_p=r.top_p, seed=r.seed))) for r in requests]
        outputs = await self._run(jobs)
        return [self._completion(o, None) for o in outputs]

    # --- TokenCounter -----------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        # The LLM API detokenizes on the thread that awaits its results (this event loop), so
        # counting here never races a generation for the tokenizer.
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return self.count_tokens(self._prompt(messages, ""))

    async def close(self) -> None:
        shutdown = getattr(self._llm, "shutdown", None)
        if callable(shutdown):
            shutdown()


def _max_seq_len(llm: Any) -> int | None:
    value = getattr(getattr(llm, "args", None), "max_seq_len", None)
    return value if isinstance(value, int) and value > 0 else None
