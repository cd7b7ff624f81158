"""Exceptions raised by the PICE edge SDK.

Tree::

    PiceError
    ├── ProtocolError          a payload that is not a valid PICE message
    │   └── PayloadTooLargeError
    ├── TransportError         the MQTT connection could not be made or was lost
    │   └── BrokerUnreachableError   (also a NotReachableError)
    ├── NotReachableError      something the process needs is not reachable *yet* (broker, cloud):
    │                          the CLIs exit with EXIT_UNAVAILABLE (69), which systemd restarts
    ├── ConfigError            a configuration file or value is invalid
    ├── ModelError             a model is missing, corrupt or cannot be converted
    │   └── ModelNotFoundError
    └── RuntimeUnavailableError an inference runtime's library is not installed

`pice_cloud` reuses this tree (its own errors subclass `PiceError`), so a caller can catch
one base class for the whole system.
"""

from __future__ import annotations

#: Exit status of a command whose configuration is wrong: restarting cannot help (the units set
#: ``RestartPreventExitStatus=2``).
EXIT_CONFIG = 2
#: Exit status (sysexits' EX_UNAVAILABLE) when the broker or the cloud is not reachable yet: the
#: units restart the process, so a fleet whose broker comes up last still comes up.
EXIT_UNAVAILABLE = 69


class PiceError(Exception):
    """Base class of every error PICE raises on purpose."""


class NotReachableError(PiceError):
    """Something this process needs (the broker, the cloud) is not reachable now; the same
    command may succeed later, so a service manager should restart it."""


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


class BrokerUnreachableError(TransportError, NotReachableError):
    """The broker did not answer (down, not started yet, or a network problem); retry later."""


class ConfigError(PiceError):
    """A configuration file or value is invalid."""


class ModelError(PiceError):
    """A model could not be loaded, verified or converted."""


class ModelNotFoundError(ModelError):
    """A model that is not on disk; the message names the command that fetches it."""


class RuntimeUnavailableError(PiceError):
    """An inference runtime whose library is not installed (e.g. tensorrt_llm on a CPU box)."""
