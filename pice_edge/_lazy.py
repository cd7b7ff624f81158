"""Names a package root exports without importing their (heavy) modules until first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(namespace: dict[str, Any], modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) for a package whose ``namespace`` (its
    ``globals()``) exports each name of ``modules`` from the module named beside it: that module
    is imported on first access, and the value cached in ``namespace``."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        try:
            module_name = modules[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module_name), name)
        namespace[name] = value
        return value

    return __getattr__
