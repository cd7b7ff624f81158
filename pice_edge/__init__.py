"""PICE edge SDK: serve expansion tasks from the cloud with a local small model.

The edge core (protocol, transport, discovery, node, model store) needs only pydantic, paho-mqtt and
zeroconf; model runtimes import their libraries (torch, onnxruntime, TensorRT-LLM) only when created
(`pice_edge.runtimes` names their classes lazily). What ``__all__`` lists is the public API; the
submodules are implementation and may change. ``install_model`` and ``resolve_model`` are
`pice_edge.model_store`'s ``install`` and ``resolve``, renamed for the package root.
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
from pice_edge.model_store import DEFAULT_MODEL, build_id, build_random_model
from pice_edge.model_store import install as install_model
from pice_edge.model_store import resolve as resolve_model
from pice_edge.model_transfer import fetch_from
from pice_edge.node import EdgeNode, NodeStats
from pice_edge.profiles import DeviceProfile, load_profile
from pice_edge.prompts import (
    EXPANSION_NO_REPEAT_NGRAM_SIZE,
    EXPANSION_REPETITION_PENALTY,
    clean_expansion,
    expansion_messages,
)
from pice_edge.protocol import (
    CANDIDATES_FILTER,
    PROTOCOL_VERSION,
    Candidate,
    CloudStatus,
    EdgeStatus,
    ExpandTask,
    decode,
    edge_tasks_topic,
    encode,
)
from pice_edge.rollout import RolloutPolicy
from pice_edge.runtimes import available_runtimes, create_runtime
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult, Runtime
from pice_edge.text import RenderedPoint, list_item, paragraphs, parse_point, parse_points
from pice_edge.timing import finish_s, per_sequence_rate
from pice_edge.transport import BrokerSettings, Message, MqttTransport

__version__ = "0.1.0"

__all__ = [
    "CANDIDATES_FILTER",
    "DEFAULT_MODEL",
    "EXIT_CONFIG",
    "EXIT_UNAVAILABLE",
    "EXPANSION_NO_REPEAT_NGRAM_SIZE",
    "EXPANSION_REPETITION_PENALTY",
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
    "Message",
    "ModelError",
    "ModelNotFoundError",
    "MqttTransport",
    "NodeStats",
    "NotReachableError",
    "PayloadTooLargeError",
    "Peer",
    "PiceError",
    "ProtocolError",
    "RenderedPoint",
    "RolloutPolicy",
    "Runtime",
    "RuntimeUnavailableError",
    "TransportError",
    "TxtRecordError",
    "available_runtimes",
    "build_id",
    "build_random_model",
    "clean_expansion",
    "create_runtime",
    "decode",
    "edge_tasks_topic",
    "encode",
    "expansion_messages",
    "fetch_from",
    "finish_s",
    "install_model",
    "list_item",
    "load_profile",
    "paragraphs",
    "parse_point",
    "parse_points",
    "per_sequence_rate",
    "resolve_model",
]
