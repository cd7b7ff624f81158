"""Runtime on TensorRT-LLM's high-level ``LLM`` API (NVIDIA GPUs only); needs ``pice[tensorrt-llm]``.

TensorRT-LLM builds (or loads) an engine for the model and batches in flight on its own, so this
runtime only maps PICE's requests onto ``LLM.generate``. It is imported lazily: a CPU machine, or
a Jetson without TensorRT-LLM, gets a `RuntimeUnavailableError` that says what to install.
"""

from __future__ import annotations

import logging
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
    """

    name = "tensorrt_llm"

    def __init__(self, model: str | Path = "smollm2-135m-instruct", *, max_batch: int = 8,
                 threads: int | None = None, **llm_options: Any) -> None:
        trtllm = _import_trtllm()
        del threads
        path = resolve(model) if not Path(str(model)).is_dir() else Path(str(model))
        self.model_id = path.name
        try:
            self._llm = trtllm.LLM(model=str(path), max_batch_size=max_batch, **llm_options)
        except Exception as exc:
            raise ModelError(f"TensorRT-LLM cannot load {path}: {exc}") from exc
        self._sampling = trtllm.SamplingParams
        self.tokenizer = self._llm.tokenizer

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        rendered = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                      tokenize=False, add_generation_prompt=True)
        return str(rendered) + prefill

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        params = [self._sampling(max_tokens=r.max_new_tokens, temperature=r.temperature or None,
                                 top_p=r.top_p if r.temperature > 0 else None, seed=r.seed, logprobs=0,
                                 **repetition_params(r))
                  for r in requests]
        outputs = self._llm.generate([r.prompt for r in requests], params)
        results = []
        for out in outputs:
            first = out.outputs[0]
            logprobs = [_logprob(lp) for lp in (first.logprobs or [])]
            mean = sum(logprobs) / len(logprobs) if logprobs else 0.0
            results.append(GenerationResult(text=first.text, token_count=len(first.token_ids),
                                            mean_logprob=min(0.0, mean)))
        return results

    def close(self) -> None:
        shutdown = getattr(self._llm, "shutdown", None)
        if callable(shutdown):
            shutdown()


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


def _logprob(entry: Any) -> float:
    # Versions differ: a float, or {token_id: Logprob(logprob=...)} for the chosen token.
    if isinstance(entry, (int, float)):
        return float(entry)
    if isinstance(entry, dict) and entry:
        value = next(iter(entry.values()))
        return float(getattr(value, "logprob", value))
    return 0.0
