"""Cloud LLM backends behind `LLMBackend`; one module each, imported lazily.

==============  ============================================================================
kind            backend
==============  ============================================================================
transformers    a local Hugging Face model (default: the bundled SmolLM2), CPU or CUDA
openai          an OpenAI-compatible HTTP server: trtllm-serve, vLLM, SGLang, llama.cpp's
                server, or another ``pice-cloud serve``
tensorrt_llm    TensorRT-LLM's in-process ``LLM`` API (extra ``pice[trtllm]``, NVIDIA GPU)
edge            an edge runtime in-process (default onnxruntime; extra ``pice[edge]``, no
                torch), set up from a device profile: the site role's LLM
==============  ============================================================================

`SimulatedBackend` (synthetic text for load tests and benchmarks), `TransformersBackend`
(loaded with torch on first access) and `EdgeRuntimeBackend` can be imported from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pice_cloud.errors import BackendError
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend, TokenCounter
from pice_cloud.llm.simulated import SimulatedBackend
from pice_edge._lazy import lazy_exports
from pice_edge.model_store import DEFAULT_MODEL

if TYPE_CHECKING:  # imported lazily at run time by `__getattr__`: transformers pulls torch in
    from pice_cloud.llm.edge_runtime import EdgeRuntimeBackend
    from pice_cloud.llm.transformers import TransformersBackend

BACKENDS = ("transformers", "openai", "tensorrt_llm", "edge")


def create_backend(kind: str, *, model: str | Path = DEFAULT_MODEL, **options: Any) -> LLMBackend:
    """The backend of ``kind`` on ``model``; ``options`` go to its constructor.

    - transformers: ``device``, ``dtype``, ``threads``, ``max_batch``, ``memory_budget_mb``
    - openai: ``url`` (required), ``api_key``, ``timeout_s``, ``max_parallel``, ``continue_final_message``,
      ``structured_outputs``
    - tensorrt_llm: keyword arguments of ``tensorrt_llm.LLM``
    - edge: ``runtime`` (default onnxruntime), ``profile`` (a device profile's name or path),
      ``threads``, ``max_batch``, ``memory_budget_mb`` (weights + KV cache, like a profile's),
      ``precision``, ``providers``; None takes the profile's (its ``site`` section first), see
      `pice_cloud.llm.edge_runtime.load_edge_backend`

    Raises:
        BackendError: unknown kind, a missing option, or the backend's library is not installed.
        PiceError: kind edge: the profile, the runtime's library or the model is missing
            (`pice_edge.errors.ConfigError`, `RuntimeUnavailableError`, `ModelNotFoundError`).
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
    if kind == "edge":
        from pice_cloud.llm.edge_runtime import load_edge_backend

        return load_edge_backend(model, **options)
    raise BackendError(f"unknown LLM backend {kind!r}; choose one of {', '.join(BACKENDS)}")


# Backend classes named from the package root without importing their libraries until first use.
__getattr__ = lazy_exports(globals(), {"EdgeRuntimeBackend": "pice_cloud.llm.edge_runtime",
                                       "TransformersBackend": "pice_cloud.llm.transformers"})


__all__ = [
    "BACKENDS",
    "ChatRequest",
    "Completion",
    "EdgeRuntimeBackend",
    "LLMBackend",
    "SimulatedBackend",
    "TokenCounter",
    "TransformersBackend",
    "create_backend",
]
