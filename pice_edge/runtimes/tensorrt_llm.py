"""Runtime on TensorRT-LLM's high-level ``LLM`` API (NVIDIA GPUs only); needs ``pice[tensorrt-llm]``.

TensorRT-LLM builds (or loads) an engine for the model and batches in flight on its own: a batch
of PICE requests goes to ``LLM.generate`` at once (it submits each with ``generate_async`` and
waits for all). It is imported lazily: a CPU machine, or a Jetson without TensorRT-LLM, gets a
`RuntimeUnavailableError` that says what to install.

Requests map onto ``tensorrt_llm.SamplingParams`` as in the cloud backend
(`sampling_kwargs`, shared with the cloud backend: greedy is ``top_k=1``, a sampled request without
a seed gets a random one, ``add_special_tokens=False`` for the templated prompt). The edge's
confidence (mean token log-probability) comes from ``logprobs=1``: each position's entry is a
``{token_id: Logprob}`` dict that holds the sampled token, which is looked up by its id (the
first entry is the most likely token, not necessarily the sampled one). On the TensorRT engine
backend the LLM must be created with ``gather_generation_logits=True`` for that; without it the
runtime asks for no log-probabilities and reports 0 (it says so once at start).
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pice_edge.errors import ModelError, RuntimeUnavailableError
from pice_edge.model_store import resolve
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT-LLM needs an NVIDIA GPU with CUDA; install it with `pip install 'pice[tensorrt-llm]'` "
                "(NVIDIA's wheel for your CUDA/JetPack version), or choose `--runtime onnxruntime` or "
                "`--runtime transformers`")

#: LLM API backends that compute log-probabilities without extra engine options.
_LOGPROB_BACKENDS = ("pytorch", "_autodeploy")
#: Seeds drawn for sampled requests that carry none (TensorRT-LLM's seed is a uint64; below 2**63
#: it is a positive int64 for every binding).
_SEED_RANGE = 1 << 63


def _import_trtllm() -> Any:
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise RuntimeUnavailableError(f"the tensorrt_llm runtime is unavailable ({exc}). {INSTALL_HINT}") from exc
    except Exception as exc:  # it fails at import time without a GPU or with a mismatched CUDA
        raise RuntimeUnavailableError(f"tensorrt_llm cannot start here ({exc}). {INSTALL_HINT}") from exc
    return tensorrt_llm


class TensorRTLLMRuntime:
    """`Runtime` on ``tensorrt_llm.LLM``.

    Args:
        model: model name or Hugging Face folder (TensorRT-LLM builds its engine from it) or an
            engine folder.
        max_batch: the engine's maximum batch size.
        threads: ignored (GPU runtime); accepted for a uniform constructor.
        llm_options: keyword arguments of ``tensorrt_llm.LLM`` (``backend``,
            ``gather_generation_logits``, ``guided_decoding_backend``, ``kv_cache_config`` ...).
    """

    name = "tensorrt_llm"

    def __init__(self, model: str | Path = "smollm2-135m-instruct", *, max_batch: int = 8,
                 threads: int | None = None, **llm_options: Any) -> None:
        trtllm = _import_trtllm()
        del threads
        try:
            path = resolve(model) if not Path(str(model)).is_dir() else Path(str(model))
        except Exception:
            path = Path(str(model))  # a Hugging Face id or an engine folder TensorRT-LLM resolves itself
        self.model_id = path.name
        try:
            self._llm = trtllm.LLM(model=str(path), max_batch_size=max_batch, **llm_options)
        except Exception as exc:
            raise ModelError(f"TensorRT-LLM cannot load {path}: {exc}") from exc
        self._sampling = trtllm.SamplingParams
        self.tokenizer = self._llm.tokenizer
        args = getattr(self._llm, "args", None)
        backend = getattr(args, "backend", None) or llm_options.get("backend") or "pytorch"
        #: Whether generations carry log-probabilities (the edge's confidence).
        self.logprobs = backend in _LOGPROB_BACKENDS or bool(
            getattr(args, "gather_generation_logits", llm_options.get("gather_generation_logits", False)))
        if not self.logprobs:
            log.warning("TensorRT-LLM's %s backend computes log-probabilities only with gather_generation_logits="
                        "True; candidates from this edge report confidence 0", backend)
        self._guided: Any = None
        if llm_options.get("guided_decoding_backend"):
            self._guided = getattr(importlib.import_module("tensorrt_llm.sampling_params"),
                                   "GuidedDecodingParams", None)

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        rendered = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                      tokenize=False, add_generation_prompt=True)
        return str(rendered) + prefill

    def sampling_params(self, request: GenerationRequest) -> Any:
        """``request`` as ``tensorrt_llm.SamplingParams``."""
        kwargs = sampling_kwargs(max_tokens=request.max_new_tokens, temperature=request.temperature,
                                 top_p=request.top_p, seed=request.seed)
        kwargs.update(repetition_params(request))
        if self.logprobs:
            kwargs["logprobs"] = 1
        if request.outline is not None and self._guided is not None:
            kwargs["guided_decoding"] = self._guided(regex=request.outline.regex())
        return self._sampling(**kwargs)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        params = [self.sampling_params(r) for r in requests]
        outputs = self._llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        results = []
        for out in outputs:
            first = out.outputs[0]
            ids = [int(t) for t in (first.token_ids or ())]
            results.append(GenerationResult(text=str(first.text), token_count=len(ids),
                                            mean_logprob=min(0.0, mean_logprob(first.logprobs, ids))))
        return results

    def close(self) -> None:
        shutdown = getattr(self._llm, "shutdown", None)
        if callable(shutdown):
            shutdown()


def sampling_kwargs(*, max_tokens: int, temperature: float, top_p: float, seed: int | None) -> dict[str, Any]:
    """A PICE request's decoding settings as ``tensorrt_llm.SamplingParams`` arguments.

    Greedy (temperature 0) is ``top_k=1`` and nothing else: TensorRT-LLM decodes ``top_k == 1``
    greedily whatever the other settings, while a ``top_p`` sent with no temperature would make
    it sample at temperature 1. A sampled request without a seed gets a random one.
    """
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "add_special_tokens": False}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p,
                      seed=seed if seed is not None else random.randrange(_SEED_RANGE))
    else:
        kwargs["top_k"] = 1
    return kwargs


def chosen_logprob(entry: Any, token_id: int) -> float | None:
    """The log-probability of ``token_id`` in one position's entry of ``CompletionOutput.logprobs``.

    An entry is a ``{token_id: Logprob(logprob, rank)}`` dict (the top-k and the sampled token)
    or, from the C++ runtime's own log-probabilities, the sampled token's float. None when the
    token is not in the entry.
    """
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry)
    if isinstance(entry, dict):
        value = entry.get(token_id)
        return None if value is None else logprob_value(value)
    return None


def logprob_value(value: Any) -> float:
    """A ``Logprob(logprob, rank)`` (or a bare number) as a float."""
    number: Any = getattr(value, "logprob", value)
    return float(number)


def repetition_params(request: GenerationRequest) -> dict[str, Any]:
    """The request's repetition control as ``tensorrt_llm.SamplingParams`` arguments.

    TensorRT-LLM's ``repetition_penalty`` has Hugging Face's semantics (divide positive logits,
    multiply negative ones, over prompt and output tokens) and ``no_repeat_ngram_size`` blocks
    repeated n-grams; settings the request leaves at ``None`` are not passed, so the engine's
    defaults (off) apply.
    """
    params: dict[str, Any] = {}
    if request.repetition_penalty is not None and request.repetition_penalty != 1.0:
        params["repetition_penalty"] = request.repetition_penalty
    if request.no_repeat_ngram_size:
        params["no_repeat_ngram_size"] = request.no_repeat_ngram_size
    return params


def mean_logprob(logprobs: Any, token_ids: Sequence[int]) -> float:
    """Mean log-probability of the sampled tokens from ``CompletionOutput.logprobs`` (0 when absent).

    Each position's entry is a ``{token_id: Logprob(logprob, rank)}`` dict (the top-k and the
    sampled token) or a float (the sampled token's, from the C++ runtime).
    """
    values = [v for entry, token in zip(logprobs or (), token_ids, strict=False)
              if (v := chosen_logprob(entry, token)) is not None]
    return sum(values) / len(values) if values else 0.0
