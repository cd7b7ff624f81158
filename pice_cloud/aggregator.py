"""Collects candidates per point, validates and de-duplicates them.

A point with exactly one usable candidate once all its edges answered is settled here, at
once; a point with several is left to the service, which runs the (async, batched) ensemble
selector of `pice_cloud.ensemble` over it.

Every inbound candidate goes through `Aggregator.handle_candidate`, which rejects (and counts):
malformed payloads, ids that do not match the topic (a device publishing as another),
unknown requests or points, devices the point was not assigned to, duplicates (QoS 1
re-delivery) and late candidates for a point already settled (or a request already answered).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pice_edge.errors import ProtocolError
from pice_edge.protocol import Candidate, TaskRefusal, decode, topic_level
from pice_edge.rejects import Rejections
from pice_edge.transport import Message

log = logging.getLogger(__name__)

#: Request ids remembered after they close, so that a slow edge's candidate arriving after the
#: answer went out is counted as ``late`` rather than as an ``unknown_request`` (a sign of bugs).
_CLOSED_REMEMBERED = 1024

Source = Literal["edge", "cloud"]


@dataclass(frozen=True)
class ChosenPoint:
    """The text that goes into the answer for one point."""

    index: int
    text: str
    source: Source
    device_id: str | None = None
    tokens: int = 0
    #: How many usable candidates the choice was made among.
    candidates: int = 0


    @classmethod
    def from_candidate(cls, cand: Candidate, among: int = 1) -> ChosenPoint:
        return cls(cand.point_index, cand.text, "edge", cand.device_id, cand.token_count, among)


@dataclass
class PointState:
    index: int
    expected: frozenset[str]
    received: dict[str, Candidate] = field(default_factory=dict)
    #: Device -> why its candidate may not go into the answer (the expansion guards).
    rejected: dict[str, str] = field(default_factory=dict)
    #: Devices that refused the task (`TaskRefusal`): they will not answer.
    refused: set[str] = field(default_factory=set)
    future: asyncio.Future[ChosenPoint] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def settled(self) -> bool:
        return self.future.done()

    @property
    def ready(self) -> bool:
        """Every assigned edge has answered (or refused)."""
        return bool(self.expected) and self.expected.issubset(self.received.keys() | self.refused)

    def outstanding(self) -> frozenset[str]:
        """Assigned edges that have neither answered nor refused."""
        return self.expected - self.received.keys() - self.refused

    def usable(self) -> list[Candidate]:
        """Non-empty candidates the guards accepted, in a stable order (by device id)."""
        return sorted((c for c in self.received.values() if c.text.strip() and c.device_id not in self.rejected),
                      key=lambda c: c.device_id)


class PendingRequest:
    """Points of one request in flight."""

    def __init__(self, request_id: str, assignments: Sequence[Sequence[str]],
                 check: CandidateCheck | None = None, self_served: Iterable[int] = ()) -> None:
        self.request_id = request_id
        #: Points the service expands itself (the cloud streams the first one): the settler
        #: leaves them alone.
        self.self_served = frozenset(self_served)
        #: The expansion guard: why a candidate must not be used (None: it may).
        self.check = check
        self.points = [PointState(i, frozenset(devs)) for i, devs in enumerate(assignments)]
        #: Set when a point has heard from all its edges but was not settled here (several
        #: candidates to choose from, or none usable), so the service acts before the deadline.
        self.wakeup = asyncio.Event()
        #: time.monotonic() of the cloud's last reconnection to the broker while this request was
        #: in flight: candidates may have been lost, so outstanding points get a short grace only.
        self.reconnected_at: float | None = None

    def settle(self, chosen: ChosenPoint) -> bool:
        """Fix the text of a point; False if it was settled already."""
        state = self.points[chosen.index]
        if state.settled:
            return False
        state.future.set_result(chosen)
        return True

    def settle_single(self, index: int) -> bool:
        """Settle a point that has exactly one usable candidate; False otherwise."""
        state = self.points[index]
        usable = state.usable()
        if state.settled or len(usable) != 1:
            return False
        return self.settle(ChosenPoint.from_candidate(usable[0]))

    def other_candidates(self, index: int) -> list[str]:
        """The usable candidates of every point but ``index`` (what an edge's candidate is
        checked against, and the ensemble's cross-point features)."""
        return [c.text for state in self.points if state.index != index for c in state.usable()]

    def other_texts(self, index: int) -> list[str]:
        """What the other points say so far: their settled text, else their usable candidates."""
        texts: list[str] = []
        for state in self.points:
            if state.index == index:
                continue
            if state.settled and not state.future.cancelled():
                texts.append(state.future.result().text)
            else:
                texts += [c.text for c in state.usable()]
        return texts

    def cancel(self) -> None:
        for state in self.points:
            if not state.settled:
                state.future.cancel()


class Aggregator:
    """Routes candidates to pending requests."""

    def __init__(self, *, rejections: Rejections | None = None, max_payload_bytes: int = 64 * 1024) -> None:
        self.rejections = rejections or Rejections()
        #: Candidates refused by the expansion guards, by reason (valid messages, bad text).
        self.quality = Rejections()
        self._max_payload = max_payload_bytes
        self._pending: dict[str, PendingRequest] = {}
        self._on_candidate: list[_CandidateListener] = []
        self._closed: OrderedDict[str, None] = OrderedDict()
        self.accepted = 0

    def open(self, request_id: str, assignments: Sequence[Sequence[str]],
             check: CandidateCheck | None = None, self_served: Iterable[int] = ()) -> PendingRequest:
        pending = PendingRequest(request_id, assignments, check, self_served)
        self._pending[request_id] = pending
        return pending

    def close(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.cancel()
            self._closed[request_id] = None
            if len(self._closed) > _CLOSED_REMEMBERED:
                self._closed.popitem(last=False)

    def add_listener(self, listener: _CandidateListener) -> None:
        """Called with each accepted candidate (the service uses it to track edge load)."""
        self._on_candidate.append(listener)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def handle_refusal(self, message: Message) -> TaskRefusal | None:
        """Transport handler for a replica's refusal topic: the refusal, when it is for a point
        in flight that was assigned to the refusing edge (the settler then places the point
        elsewhere), else None (counted)."""
        try:
            refusal = decode(TaskRefusal, message.payload, max_bytes=self._max_payload)
        except ProtocolError as exc:
            self.rejections.record("refusal", exc.kind, str(exc))
            return None
        if refusal.device_id != topic_level(message.topic, -1) or refusal.request_id != topic_level(message.topic, -2):
            self.rejections.record("refusal", "identity", f"refusal claims {refusal.device_id}/{refusal.request_id} "
                                                          f"but was published on {message.topic}")
            return None
        pending = self._pending.get(refusal.request_id)
        if pending is None or refusal.point_index >= len(pending.points):
            # An answered request: nothing to place any more.
            return None
        state = pending.points[refusal.point_index]
        if refusal.device_id in state.refused:
            self.rejections.record("refusal", "duplicate", f"{refusal.device_id} already refused this point")
            return None  # a QoS 1 re-delivery: the task was counted off once already
        if refusal.device_id not in state.expected or refusal.device_id in state.received:
            self.rejections.record("refusal", "unassigned", f"{refusal.device_id} holds no task "
                                                            f"{refusal.request_id}/{refusal.point_index}")
            return None
        state.refused.add(refusal.device_id)
        log.info("%s/%d: %s refused the task (%s)", refusal.request_id, refusal.point_index, refusal.device_id,
                 refusal.reason)
        if not state.settled and not (state.ready and pending.settle_single(refusal.point_index)):
            pending.wakeup.set()
        return refusal

    def handle_candidate(self, message: Message) -> None:
        """Transport handler for a replica's candidate topic."""
        try:
            cand = decode(Candidate, message.payload, max_bytes=self._max_payload)
        except ProtocolError as exc:
            self.rejections.record("candidate", exc.kind, str(exc))
            return
        topic_request, topic_device = topic_level(message.topic, -2), topic_level(message.topic, -1)
        if cand.device_id != topic_device or cand.request_id != topic_request:
            self.rejections.record(
                "candidate", "identity",
                f"candidate claims {cand.device_id}/{cand.request_id} but was published on {message.topic}",
            )
            return
        pending = self._pending.get(cand.request_id)
        if pending is None:
            if cand.request_id in self._closed:
                self.rejections.record("candidate", "late", f"request {cand.request_id} was already answered")
                return
            self.rejections.record("candidate", "unknown_request", f"no request {cand.request_id} in flight")
            return
        if cand.point_index >= len(pending.points):
            self.rejections.record("candidate", "unknown_point", f"{cand.request_id} has no point {cand.point_index}")
            return
        state = pending.points[cand.point_index]
        if cand.device_id not in state.expected:
            self.rejections.record("candidate", "unassigned", f"{cand.device_id} was not asked for this point")
            return
        if cand.device_id in state.received:
            self.rejections.record("candidate", "duplicate", f"{cand.device_id} already answered this point")
            return
        state.received[cand.device_id] = cand
        self.accepted += 1
        if pending.check is not None and cand.text.strip():
            others = pending.other_candidates(state.index)
            reason = pending.check(cand.point_index, cand.text, others)
            if reason is not None:
                state.rejected[cand.device_id] = reason
                self.quality.record("candidate", reason, f"{cand.request_id}/{cand.point_index} from "
                                                         f"{cand.device_id}")
        for listener in self._on_candidate:
            listener(cand)
        if state.settled:
            self.rejections.record("candidate", "late", "point already settled")
            return
        if state.ready and not pending.settle_single(cand.point_index):
            log.debug("%s/%d: all edges answered; choosing among candidates", cand.request_id, cand.point_index)
            pending.wakeup.set()


class CandidateCheck(Protocol):
    """The expansion guard of one request: why ``text``, an expansion of point ``point_index``
    (an edge's candidate or the cloud's own), must not be used, given the texts of the request's
    other points, or None."""

    def __call__(self, point_index: int, text: str, other_texts: Sequence[str]) -> str | None: ...


class _CandidateListener(Protocol):
    def __call__(self, candidate: Candidate) -> None: ...
