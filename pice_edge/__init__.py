"""PICE edge SDK: serve expansion tasks from the cloud with a local small model.

The edge core (protocol, transport, discovery, node) needs only pydantic, paho-mqtt and zeroconf; model runtimes
import their libraries (torch, onnxruntime, TensorRT-LLM) only when created.
"""

from pice_edge.discovery import CloudAdvert, Discovery, DiscoveryError, EdgeAdvert, Peer, TxtRecordError
from pice_edge.errors import (
    EXIT_CONFIG,
    EXIT_UNAVAILABLE,
    BrokerUnreachableError,
    ConfigError,
    ModelError,
    ModelNotFoundError,
    NotReachableError,
    PayloadTooLargeError,
    PiceError,
    ProtocolError,
    RuntimeUnavailableError,
    TransportError,
)
from pice_edge.node import EdgeNode, NodeStats
from pice_edge.profiles import DeviceProfile, load_profile
from pice_edge.protocol import PROTOCOL_VERSION, Candidate, CloudStatus, EdgeStatus, ExpandTask
from pice_edge.runtimes import available_runtimes, create_runtime
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult, Runtime
from pice_edge.transport import BrokerSettings, MqttTransport

__version__ = "0.1.0"

__all__ = [
    "EXIT_CONFIG",
    "EXIT_UNAVAILABLE",
    "PROTOCOL_VERSION",
    "BrokerSettings",
    "BrokerUnreachableError",
    "Candidate",
    "ChatMessage",
    "CloudAdvert",
    "CloudStatus",
    "ConfigError",
    "DeviceProfile",
    "Discovery",
    "DiscoveryError",
    "EdgeAdvert",
    "EdgeNode",
    "EdgeStatus",
    "ExpandTask",
    "GenerationRequest",
    "GenerationResult",
    "ModelError",
    "ModelNotFoundError",
    "MqttTransport",
    "NodeStats",
    "NotReachableError",
    "PayloadTooLargeError",
    "Peer",
    "PiceError",
    "ProtocolError",
    "Runtime",
    "RuntimeUnavailableError",
    "TransportError",
    "TxtRecordError",
    "available_runtimes",
    "create_runtime",
    "load_profile",
]
