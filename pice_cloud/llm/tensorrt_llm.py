"""Cloud LLM backend on TensorRT-LLM's in-process ``LLM`` API (NVIDIA GPU only).

``tensorrt_llm`` is an optional extra (``pip install 'pice[trtllm]'``) that needs Linux, an
NVIDIA GPU and CUDA; it cannot be installed on a CPU-only machine, so it is imported only when
this backend is created, and its absence is a `BackendError` that says so. Operators who run
``trtllm-serve`` instead use the ``openai`` backend against it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pice_cloud.errors import BackendError
from pice_cloud.llm.base import ChatRequest, Completion
from pice_edge.runtimes.base import ChatMessage

INSTALL_HINT = (
    "the tensorrt_llm backend needs TensorRT-LLM, which runs only on Linux with an NVIDIA GPU and CUDA: "
    "pip install 'pice[trtllm]' on such a machine (or serve the model with trtllm-serve and use "
    "llm.kind=openai with llm.url pointing at it)"
)


def _import() -> Any:
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise BackendError(f"{INSTALL_HINT} ({exc})") from exc
    except Exception as exc:  # a present but broken install (no GPU, CUDA mismatch) raises others
        raise BackendError(f"tensorrt_llm is installed but failed to import: {exc}; {INSTALL_HINT}") from exc
    return tensorrt_llm


class TensorRTLLMBackend:
    """`LLMBackend` on ``tensorrt_llm.LLM``; generation runs on one worker thread."""

    name = "tensorrt_llm"

    def __init__(self, model: str | Path, **llm_kwargs: Any) -> None:
        trt = _import()
        from pice_edge.model_store import resolve

        try:
            path = resolve(model)
        except Exception:
            path = Path(model)  # a Hugging Face id or an engine directory TensorRT-LLM resolves itself
        try:
            self._llm = trt.LLM(model=str(path), **llm_kwargs)
        except Exception as exc:
            raise BackendError(f"TensorRT-LLM could not load {path}: {exc}") from exc
        self._sampling_cls = trt.SamplingParams
        self._tokenizer = self._llm.tokenizer
        self.model_id = Path(str(model)).name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pice-cloud-trtllm")

    def _prompt(self, messages: Sequence[ChatMessage], prefill: str) -> str:
        rendered = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
        )
        return str(rendered) + prefill

    def _generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        prompts = [self._prompt(r.messages, r.prefill) for r in requests]
        params = [self._sampling_cls(max_tokens=r.max_tokens, temperature=r.temperature or None, seed=r.seed)
                  for r in requests]
        outputs = self._llm.generate(prompts, params)
        return [Completion(text=o.outputs[0].text, tokens=len(o.outputs[0].token_ids)) for o in outputs]

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        if not requests:
            return []
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._generate, list(requests))

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        shutdown = getattr(self._llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
