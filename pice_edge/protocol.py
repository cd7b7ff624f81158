"""The PICE wire protocol, version 1: MQTT topics and the JSON messages sent on them.

Both sides import this module; it is the only place where topics and payloads are defined.

=================================================== ============ =========================
topic                                               direction    payload
=================================================== ============ =========================
``pice/v1/edge/{device_id}/status``                 edge->cloud  `EdgeStatus` (retained; last will)
``pice/v1/edge/{device_id}/tasks``                  cloud->edge  `ExpandTask`
``pice/v1/cloud/{cloud_id}/candidates/{request_id}/{device}``
                                                    edge->cloud  `Candidate`
``pice/v1/cloud/{cloud_id}/refusals/{request_id}/{device}``
                                                    edge->cloud  `TaskRefusal`
``pice/v1/cloud/{cloud_id}/status``                 cloud->all   `CloudStatus` (retained; last will)
``pice/v1/candidates/{request_id}/{device}``        edge->cloud  `Candidate` of a task without
                                                                 ``reply_to`` (senders before it)
``pice/v1/fleet/rollout``                           cloud->all   `FleetRollout` (retained)
``pice/v1/edge/{device_id}/rollout``                edge->all    `EdgeRolloutState` (retained)
=================================================== ============ =========================

Several cloud replicas can share one broker and one fleet: each has its own ``cloud_id``, a task
names the replica that sent it (``ExpandTask.reply_to``), and the edge answers on that replica's
topics, so a replica sees only its own candidates and an ACL can pin each replica to its topics.

Additions to v1 are optional fields, omitted from the wire while unset; receivers forbid unknown
fields, so upgrade edges before clouds (an edge older than ``reply_to`` refuses tasks that carry
it, and says so in its log).

The candidate topic carries the publishing device's id as its last level (DESIGN.md names
``pice/v1/candidates/{request_id}``): a broker ACL such as Mosquitto's
``pattern write pice/v1/candidates/+/%u`` can then stop a device from publishing as another,
and the cloud checks that the id in the payload matches the topic on any broker.

Every message is validated strictly: unknown fields, wrong types (no silent coercion of
``"3"`` to ``3``), out-of-range numbers and oversized text are rejected with `ProtocolError`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    model_serializer,
    model_validator,
)

from pice_edge.errors import PayloadTooLargeError, ProtocolError

PROTOCOL_VERSION: Final = 1
TOPIC_ROOT = f"pice/v{PROTOCOL_VERSION}"

#: Default refusal threshold for one MQTT payload, in bytes. A task carries the question
#: and the whole sketch, so it must fit both with room to spare.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
MAX_QUESTION_CHARS = 16_000
MAX_SKETCH_POINTS = 32
MAX_POINT_CHARS = 500
MAX_CANDIDATE_CHARS = 16_000
MAX_NEW_TOKENS = 4096

# Ids travel inside topic names, so they must not contain MQTT wildcards or separators.
#: Device, request and cloud ids: safe as one MQTT topic level and in logs.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
#: A fleet name travels in a zeroconf TXT record and an instance label, so it must fit one DNS
#: label (RFC 6763 section 4.1.1: 63 bytes).
FLEET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: str) -> bool:
    """Whether ``value`` can be used as a device or request id (and so inside a topic)."""
    return bool(_ID_RE.match(value))


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: Literal[1] = PROTOCOL_VERSION


class Sampling(BaseModel):
    """How an edge should sample its expansion. ``temperature == 0`` means greedy."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    #: Hugging Face repetition penalty the cloud asks for (1.0 = off). ``None``, what senders
    #: older than this field send, leaves the edge's own setting (its device profile's).
    repetition_penalty: float | None = Field(default=None, ge=1.0, le=2.0)

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Receivers forbid unknown fields, so a field added to v1 goes on the wire only when
        # set: an edge older than the field still accepts every task that does not use it.
        data: dict[str, Any] = handler(self)
        if data.get("repetition_penalty") is None:
            data.pop("repetition_penalty", None)
        return data


class ExpandTask(_Message):
    """Cloud -> one edge: expand point ``point_index`` of ``sketch`` for ``question``."""

    request_id: Identifier
    point_index: int = Field(ge=0, lt=MAX_SKETCH_POINTS)
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    sketch: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_POINT_CHARS)]] = Field(
        min_length=1, max_length=MAX_SKETCH_POINTS
    )
    max_new_tokens: int = Field(ge=1, le=MAX_NEW_TOKENS)
    #: Absolute wall-clock time (Unix seconds) after which the cloud no longer wants an answer.
    deadline: float = Field(gt=0)
    sampling: Sampling = Field(default_factory=Sampling)
    #: The cloud replica that sent the task: its candidate and refusal go to that replica's
    #: topics. ``None`` (senders older than this field): the shared ``pice/v1/candidates`` topic.
    reply_to: Identifier | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("reply_to") is None:
            data.pop("reply_to", None)
        return data

    @model_validator(mode="after")
    def _point_in_sketch(self) -> ExpandTask:
        if self.point_index >= len(self.sketch):
            raise ValueError(f"point_index {self.point_index} is outside a sketch of {len(self.sketch)} points")
        return self

    @property
    def point(self) -> str:
        """The text of the point to expand."""
        return self.sketch[self.point_index]


class Candidate(_Message):
    """Edge -> cloud: one expansion of one point."""

    request_id: Identifier
    point_index: int = Field(ge=0, lt=MAX_SKETCH_POINTS)
    device_id: Identifier
    text: str = Field(max_length=MAX_CANDIDATE_CHARS)
    token_count: int = Field(ge=0, le=MAX_NEW_TOKENS)
    #: Mean natural-log probability of the generated tokens under the edge's model (<= 0).
    mean_logprob: float = Field(le=0.0, ge=-1e4)
    #: Seconds from receiving the task to publishing the candidate.
    latency_s: float = Field(ge=0.0, le=86_400.0)
    model_id: str = Field(default="", max_length=200)


RefusalReason = Literal["queue_full", "would_miss_deadline", "stopping"]


class TaskRefusal(_Message):
    """Edge -> the replica that sent a task: this edge will not expand the point (its queue is
    full, it would not finish before the deadline, or it is shutting down), so the sender can
    place it elsewhere at once instead of waiting for the deadline."""

    request_id: Identifier
    point_index: int = Field(ge=0, lt=MAX_SKETCH_POINTS)
    device_id: Identifier
    reason: RefusalReason


class FleetRollout(_Message):
    """Cloud -> all edges, retained: run this model build. Edges that run another build fetch it
    from ``source`` (a cloud's HTTP API, `pice_edge.model_transfer`), verify it and switch
    between batches; an edge reports the build it runs in ``EdgeStatus.model_id``
    (``NAME@BUILD``)."""

    model: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    build: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{12}$")]
    source: str = Field(min_length=1, max_length=500)
    cloud_id: Identifier
    issued_at: float = Field(default_factory=time.time, gt=0)


RolloutPhase = Literal["fetching", "retrying", "switched", "failed", "withdrawn"]


class EdgeRolloutState(_Message):
    """Edge -> all, retained: how this edge's part of the fleet's rollout stands (for operators:
    ``pice-cloud fleet`` shows it). ``retrying``: the source could not be reached, try
    ``attempt + 1`` comes at ``retry_at``; ``failed``: given up, the edge stays on its build
    (``detail`` says why); ``withdrawn``: the rollout was cleared before the edge switched."""

    device_id: Identifier
    model: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    build: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{12}$")]
    phase: RolloutPhase
    #: The build the edge runs now (``NAME@BUILD`` or the runtime's model id).
    running: str = Field(default="", max_length=200)
    detail: str = Field(default="", max_length=1000)
    attempt: int = Field(default=0, ge=0, le=100_000)
    retry_at: float | None = Field(default=None, gt=0)
    sent_at: float = Field(default_factory=time.time, gt=0)


class EdgeStatus(_Message):
    """Edge -> cloud, retained; the last will sends the same with ``online=False``."""

    device_id: Identifier
    online: bool
    profile: str = Field(default="", max_length=100)
    runtime: str = Field(default="", max_length=100)
    model_id: str = Field(default="", max_length=200)
    max_batch: int = Field(default=1, ge=1, le=1024)
    free_slots: int = Field(default=0, ge=0, le=100_000)
    queue_depth: int = Field(default=0, ge=0, le=1_000_000)
    #: Decode rate of one sequence at batch 1, estimated from this device's recent batches
    #: (`pice_edge.timing.per_sequence_rate`; 0 when not yet measured). The cloud's placement and
    #: the node's refusals both predict a task's finish from it with `pice_edge.timing.finish_s`.
    tokens_per_s: float = Field(default=0.0, ge=0.0, le=1e7)
    #: Interval between heartbeats; the cloud expires an edge after a few missed ones.
    heartbeat_s: float = Field(default=2.0, gt=0.0, le=3600.0)
    sent_at: float = Field(default_factory=time.time, gt=0)


class CloudStatus(_Message):
    """Cloud -> all, retained; the last will sends the same with ``online=False``.

    It is also the replica's claim on its ``cloud_id`` (`pice_cloud.replica`): ``instance`` is a
    random token of the process that holds the id, re-published every ``heartbeat_s``, so a
    second process started with the same id sees a live holder and refuses to start instead of
    taking the holder's broker connection. The three fields are additions to v1 (``None`` from
    senders older than them)."""

    cloud_id: Identifier
    online: bool
    api_url: str = Field(default="", max_length=500)
    load: float = Field(default=0.0, ge=0.0, le=1e6)
    sent_at: float = Field(default_factory=time.time, gt=0)
    #: Random token of the process holding ``cloud_id`` (a new one every start).
    instance: Identifier | None = None
    #: When that process started (Unix seconds): of two processes claiming one id at once, the
    #: later one gives way.
    started_at: float | None = Field(default=None, gt=0)
    #: How often a live holder re-publishes this status (seconds).
    heartbeat_s: float | None = Field(default=None, gt=0.0, le=3600.0)

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in ("instance", "started_at", "heartbeat_s"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


# --- topics -----------------------------------------------------------------------------

def edge_status_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/edge/{device_id}/status"


def edge_rollout_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/edge/{device_id}/rollout"


def edge_tasks_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/edge/{device_id}/tasks"


def candidate_topic(request_id: str, device_id: str, cloud_id: str | None = None) -> str:
    """Where ``device_id`` publishes its candidate for a task of ``cloud_id`` (the task's
    ``reply_to``; ``None``: the shared topic of tasks without one)."""
    if cloud_id is None:
        return f"{TOPIC_ROOT}/candidates/{request_id}/{device_id}"
    return f"{TOPIC_ROOT}/cloud/{cloud_id}/candidates/{request_id}/{device_id}"


def refusal_topic(cloud_id: str, request_id: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/cloud/{cloud_id}/refusals/{request_id}/{device_id}"


def cloud_status_topic(cloud_id: str) -> str:
    return f"{TOPIC_ROOT}/cloud/{cloud_id}/status"


def cloud_candidates_filter(cloud_id: str) -> str:
    """Every candidate for the tasks of one cloud replica."""
    return f"{TOPIC_ROOT}/cloud/{cloud_id}/candidates/+/+"


def cloud_refusals_filter(cloud_id: str) -> str:
    """Every refusal of the tasks of one cloud replica."""
    return f"{TOPIC_ROOT}/cloud/{cloud_id}/refusals/+/+"


#: The fleet's model rollout (retained).
FLEET_ROLLOUT_TOPIC = f"{TOPIC_ROOT}/fleet/rollout"
#: Every cloud replica's status.
CLOUD_STATUS_FILTER = f"{TOPIC_ROOT}/cloud/+/status"
EDGE_STATUS_FILTER = f"{TOPIC_ROOT}/edge/+/status"
#: Every edge's rollout state.
EDGE_ROLLOUT_FILTER = f"{TOPIC_ROOT}/edge/+/rollout"
#: Candidates of tasks without ``reply_to`` (tools and senders older than it).
CANDIDATES_FILTER = f"{TOPIC_ROOT}/candidates/+/+"


def runs(model_id: str, model: str, build: str | None = None) -> bool:
    """Whether an edge reporting ``model_id`` (``NAME`` or ``NAME@BUILD``) runs ``model``
    (and, when given, that ``build``)."""
    name, _, have = model_id.partition("@")
    return name == model and (build is None or have == build)


def topic_level(topic: str, index: int) -> str:
    """The ``index``-th level of a topic (negative counts from the end); '' when absent."""
    parts = topic.split("/")
    try:
        return parts[index]
    except IndexError:
        return ""


# --- encoding -----------------------------------------------------------------------------

M = TypeVar("M", bound=_Message)


def encode(message: _Message) -> bytes:
    """Serialise a message to the JSON bytes sent on the wire."""
    return message.model_dump_json().encode()


def decode(model: type[M], payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> M:
    """Parse and validate ``payload`` as ``model``.

    Raises:
        PayloadTooLargeError: ``payload`` is longer than ``max_bytes`` (checked before parsing).
        ProtocolError: not UTF-8 JSON, not an object, or not a valid ``model``.
    """
    if len(payload) > max_bytes:
        raise PayloadTooLargeError(len(payload), max_bytes)
    try:
        data: Any = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{model.__name__}: payload is not UTF-8 JSON ({exc})", kind="json") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"{model.__name__}: payload must be a JSON object", kind="schema")
    version = data.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{model.__name__}: protocol version {version!r} is not supported (this build speaks "
            f"v{PROTOCOL_VERSION}); upgrade the older side",
            kind="version",
        )
    try:
        # JSON mode: strict types, but JSON numbers map to float fields as expected.
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ProtocolError(
            f"{model.__name__}: field '{where}': {first['msg']} ({exc.error_count()} error(s))", kind="schema"
        ) from exc


__all__ = [
    "CANDIDATES_FILTER",
    "CLOUD_STATUS_FILTER",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "EDGE_ROLLOUT_FILTER",
    "EDGE_STATUS_FILTER",
    "FLEET_ROLLOUT_TOPIC",
    "PROTOCOL_VERSION",
    "TOPIC_ROOT",
    "Candidate",
    "CloudStatus",
    "EdgeRolloutState",
    "EdgeStatus",
    "ExpandTask",
    "FleetRollout",
    "RefusalReason",
    "RolloutPhase",
    "Sampling",
    "TaskRefusal",
    "candidate_topic",
    "cloud_candidates_filter",
    "cloud_refusals_filter",
    "cloud_status_topic",
    "decode",
    "edge_rollout_topic",
    "edge_status_topic",
    "edge_tasks_topic",
    "encode",
    "is_valid_id",
    "refusal_topic",
    "runs",
    "topic_level",
]
