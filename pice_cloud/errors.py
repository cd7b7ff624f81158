"""Exceptions raised by the PICE cloud service.

Tree::

    PiceError (pice_edge.errors)
    └── CloudError
        ├── SketchError        the LLM produced nothing usable as a sketch
        ├── ServiceUnavailable the service cannot take the request now (overload, shutdown)
        └── BackendError       an LLM backend failed (HTTP error, missing extra, ...)
"""

from __future__ import annotations

from pice_edge.errors import ConfigError, ModelError, ModelNotFoundError, PiceError, TransportError


class CloudError(PiceError):
    """Base class of the cloud service's errors."""


class SketchError(CloudError):
    """The LLM's output could not be turned into a sketch."""


class ServiceUnavailable(CloudError):
    """The service cannot take a request now; retry later."""


class BackendError(CloudError):
    """An LLM backend failed or is not installed."""


__all__ = [
    "BackendError",
    "CloudError",
    "ConfigError",
    "ModelError",
    "ModelNotFoundError",
    "PiceError",
    "ServiceUnavailable",
    "SketchError",
    "TransportError",
]
