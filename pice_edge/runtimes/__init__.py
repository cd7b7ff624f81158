"""Inference runtimes behind one interface (`Runtime`); each imports its library lazily.

New runtimes are one module with a class implementing `Runtime`, registered in `_FACTORIES`
(or passed to `EdgeNode` directly — see ``examples/custom_runtime.py``). The simulated runtime
(`pice_edge.runtimes.simulated`, synthetic text for load tests) is deliberately not registered:
the load tools construct it, no configuration can select it for real answers.
"""

from __future__ import annotations

import importlib
from typing import Any

from pice_edge.errors import RuntimeUnavailableError
from pice_edge.runtimes.base import (
    ChatMessage,
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
    Runtime,
    SteppingRuntime,
)

# name -> (module, class, pip extra that provides its library)
_FACTORIES: dict[str, tuple[str, str, str]] = {
    "transformers": ("pice_edge.runtimes.transformers", "TransformersRuntime", "pice[edge-torch]"),
    "onnxruntime": ("pice_edge.runtimes.onnxruntime", "OnnxRuntime", "pice[edge]"),
    "tensorrt_llm": ("pice_edge.runtimes.tensorrt_llm", "TensorRTLLMRuntime", "pice[tensorrt-llm]"),
    # Built from source on the device; the module explains how when it is missing.
    "tensorrt_edgellm": ("pice_edge.runtimes.tensorrt_edgellm", "TensorRTEdgeLLMRuntime", "pice[edge]"),
}


def available_runtimes() -> list[str]:
    """Names accepted by `create_runtime`."""
    return sorted(_FACTORIES)


def create_runtime(name: str, **kwargs: Any) -> Runtime:
    """Build the runtime called ``name`` (its library is imported only now).

    Raises:
        RuntimeUnavailableError: unknown name, or its library is not installed.
    """
    try:
        module_name, class_name, extra = _FACTORIES[name]
    except KeyError:
        raise RuntimeUnavailableError(
            f"unknown runtime {name!r}; choose one of: {', '.join(available_runtimes())}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"runtime {name!r} needs a library that is not installed ({exc.name}); install it with "
            f"`pip install '{extra}'`"
        ) from exc
    runtime: Runtime = getattr(module, class_name)(**kwargs)
    return runtime


__all__ = [
    "ChatMessage",
    "DecodeBatch",
    "GenerationRequest",
    "GenerationResult",
    "Runtime",
    "SteppingRuntime",
    "available_runtimes",
    "create_runtime",
]
