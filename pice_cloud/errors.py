"""Exceptions raised by the PICE cloud service.

Tree::

    PiceError (pice_edge.errors)
    └── CloudError
        ├── SketchError        the LLM produced nothing usable as a sketch
        ├── ServiceUnavailable the service cannot take the request now (overload, shutdown)
        ├── BackendError       an LLM backend failed (HTTP error, missing extra, ...)
        ├── InputTooLongError  a question too long for the requested mode
        ├── UnavailableInModeError  a request option the requested mode cannot honour
        └── FinetuneError      `pice-cloud finetune` cannot go on (training, checkpoints)
            └── DataError      a training data file is malformed; the message names the line
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


class InputTooLongError(CloudError):
    """The input does not fit the requested mode (the message says the limit and what to do)."""


class UnavailableInModeError(CloudError):
    """The request asks for something its mode cannot give (logprobs of a progressive answer)."""


class FinetuneError(CloudError):
    """Fine-tuning cannot go on: no usable example, a checkpoint that does not match, ..."""


class DataError(FinetuneError):
    """A line of a training data file is malformed; the message names the file and the line."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        #: 1-based line number of the offending record (None for file-level problems).
        self.line = line


__all__ = [
    "BackendError",
    "CloudError",
    "ConfigError",
    "DataError",
    "FinetuneError",
    "InputTooLongError",
    "ModelError",
    "ModelNotFoundError",
    "PiceError",
    "ServiceUnavailable",
    "SketchError",
    "TransportError",
    "UnavailableInModeError",
]
