"""Inference runtimes behind one interface (`Runtime`); each imports its library lazily.

New runtimes are one module with a class implementing `Runtime`, registered in `_FACTORIES`
(or passed to `EdgeNode` directly — see ``examples/custom_runtime.py``). The simulated runtime
(`pice_edge.runtimes.simulated`, synthetic text for load tests) is deliberately not registered:
the load tools construct it, no configuration can select it for real answers.

`TransformersRuntime` and `SimulatedRuntime` can be imported from here; each is loaded (with
its library) on first access. `export_onnx` is `onnx_export.export` (it imports
torch, transformers and onnxruntime only when called).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pice_edge._lazy import lazy_exports
from pice_edge.errors import RuntimeUnavailableError
from pice_edge.runtimes.base import (
    ChatMessage,
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
    Runtime,
    SteppingRuntime,
)
from pice_edge.runtimes.onnx_export import export as export_onnx

if TYPE_CHECKING:  # imported lazily at run time by `__getattr__`: each pulls its model library in
    from pice_edge.runtimes.simulated import SimulatedRuntime
    from pice_edge.runtimes.transformers import TransformersRuntime

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


# Runtime classes named from the package root without importing their libraries until first use (PEP 562).
__getattr__ = lazy_exports(globals(), {
    "SimulatedRuntime": "pice_edge.runtimes.simulated",
    "TransformersRuntime": "pice_edge.runtimes.transformers",
})


__all__ = [
    "ChatMessage",
    "DecodeBatch",
    "GenerationRequest",
    "GenerationResult",
    "Runtime",
    "SimulatedRuntime",
    "SteppingRuntime",
    "TransformersRuntime",
    "available_runtimes",
    "create_runtime",
    "export_onnx",
]
