"""Exceptions raised by the PICE edge SDK.

Tree::

    PiceError
    ├── ProtocolError          a payload that is not a valid PICE message
    │   └── PayloadTooLargeError
    ├── TransportError         the MQTT connection could not be made or was lost
    ├── ConfigError            a configuration file or value is invalid
    ├── ModelError             a model is missing, corrupt or cannot be converted
    │   └── ModelNotFoundError
    └── RuntimeUnavailableError an inference runtime's library is not installed

`pice_cloud` reuses this tree (its own errors subclass `PiceError`), so a caller can catch
one base class for the whole system.
"""

from __future__ import annotations


class PiceError(Exception):
    """Base class of every error PICE raises on purpose."""


class ProtocolError(PiceError):
    """A message that does not follow the PICE wire protocol."""

    def __init__(self, message: str, *, kind: str = "invalid") -> None:
        super().__init__(message)
        #: A short machine-readable reason (``json``, ``schema``, ``too_large``...), used as a
        #: metrics label and to log each kind of rejection once.
        self.kind = kind


class PayloadTooLargeError(ProtocolError):
    """A payload larger than the configured limit; refused before it is parsed."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"payload of {size} bytes exceeds the limit of {limit} bytes "
            "(raise max_payload_bytes on both sides if this is legitimate)",
            kind="too_large",
        )
        self.size = size
        self.limit = limit


class TransportError(PiceError):
    """The MQTT broker could not be reached or refused us."""


class ConfigError(PiceError):
    """A configuration file or value is invalid."""


class ModelError(PiceError):
    """A model could not be loaded, verified or converted."""


class ModelNotFoundError(ModelError):
    """A model that is not on disk; the message names the command that fetches it."""


class RuntimeUnavailableError(PiceError):
    """An inference runtime whose library is not installed (e.g. tensorrt_llm on a CPU box)."""
