"""Cloud LLM backends behind `LLMBackend`; one module each, imported lazily.

==============  ============================================================================
kind            backend
==============  ============================================================================
transformers    a local Hugging Face model (default: the bundled SmolLM2), CPU or CUDA
openai          an OpenAI-compatible HTTP server: trtllm-serve, vLLM, SGLang, llama.cpp's
                server, or another ``pice-cloud serve``
tensorrt_llm    TensorRT-LLM's in-process ``LLM`` API (extra ``pice[trtllm]``, NVIDIA GPU)
==============  ============================================================================

`SimulatedBackend` (synthetic text for load tests and benchmarks) and `TransformersBackend`
(loaded with torch on first access) can be imported from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pice_cloud.errors import BackendError
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend, TokenCounter
from pice_cloud.llm.simulated import SimulatedBackend
from pice_edge._lazy import lazy_exports
from pice_edge.model_store import DEFAULT_MODEL

if TYPE_CHECKING:  # imported lazily at run time by `__getattr__`: it pulls torch and transformers in
    from pice_cloud.llm.transformers import TransformersBackend

BACKENDS = ("transformers", "openai", "tensorrt_llm")


def create_backend(kind: str, *, model: str | Path = DEFAULT_MODEL, **options: Any) -> LLMBackend:
    """The backend of ``kind`` on ``model``; ``options`` go to its constructor.

    - transformers: ``device``, ``dtype``, ``threads``, ``max_batch``, ``memory_budget_mb``
    - openai: ``url`` (required), ``api_key``, ``timeout_s``, ``max_parallel``, ``continue_final_message``,
      ``structured_outputs``
    - tensorrt_llm: keyword arguments of ``tensorrt_llm.LLM``

    Raises:
        BackendError: unknown kind, a missing option, or the backend's library is not installed.
    """
    if kind == "transformers":
        from pice_cloud.llm.transformers import TransformersBackend

        return TransformersBackend(model, **options)
    if kind == "openai":
        from pice_cloud.llm.openai_http import OpenAIHTTPBackend

        url = options.pop("url", None)
        if not url:
            raise BackendError("the openai backend needs the server's base URL (llm.url, e.g. http://host:8000/v1)")
        return OpenAIHTTPBackend(url, str(model), **options)
    if kind == "tensorrt_llm":
        from pice_cloud.llm.tensorrt_llm import TensorRTLLMBackend

        return TensorRTLLMBackend(model, **options)
    raise BackendError(f"unknown LLM backend {kind!r}; choose one of {', '.join(BACKENDS)}")


# Backend classes named from the package root without importing their libraries until first use.
__getattr__ = lazy_exports(globals(), {"TransformersBackend": "pice_cloud.llm.transformers"})


__all__ = [
    "BACKENDS",
    "ChatRequest",
    "Completion",
    "LLMBackend",
    "SimulatedBackend",
    "TokenCounter",
    "TransformersBackend",
    "create_backend",
]
