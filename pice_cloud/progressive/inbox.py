"""The inbox of one cloud replica: decodes the candidates and refusals its edges send, checks
their identity, and routes each to the request it belongs to.

Every inbound message goes through `Inbox.handle_candidate` or `Inbox.handle_refusal`, which
reject (and count): malformed payloads, ids that do not match the topic (a device publishing as
another), and messages for requests unknown or already answered. The request itself refuses
candidates for unknown points, from unassigned devices, duplicates (QoS 1 re-delivery) and late
ones (`pice_cloud.progressive.request.ProgressiveRequest.on_candidate`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from pice_cloud.progressive.request import Action, ProgressiveRequest
from pice_edge.errors import ProtocolError
from pice_edge.protocol import Candidate, TaskRefusal, decode, topic_level
from pice_edge.rejects import Rejections
from pice_edge.transport import Message

log = logging.getLogger(__name__)

_Addressed = TypeVar("_Addressed", Candidate, TaskRefusal)

#: Request ids remembered after they close, so that a slow edge's candidate arriving after the
#: answer went out is counted as ``late`` rather than as an ``unknown_request`` (a sign of bugs).
_CLOSED_REMEMBERED = 1024

#: Carries out the actions a request returned (`pice_cloud.progressive.driver.RequestDriver.feed`).
Deliver = Callable[[list[Action]], None]


class Inbox:
    """Routes candidates and refusals to the requests in flight."""

    def __init__(self, *, rejections: Rejections | None = None, max_payload_bytes: int = 64 * 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: Malformed or unexpected messages, by topic and reason.
        self.rejections = rejections or Rejections()
        #: Candidates refused by the expansion guards, by reason (valid messages, bad text).
        self.quality = Rejections()
        self._max_payload = max_payload_bytes
        self._clock = clock
        self._open: dict[str, tuple[ProgressiveRequest, Deliver]] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        #: Candidates accepted by their request (valid, assigned, first of their kind).
        self.accepted = 0

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def open(self, request: ProgressiveRequest, deliver: Deliver) -> None:
        """Route ``request``'s messages to it; ``deliver`` carries out what it returns."""
        self._open[request.request_id] = (request, deliver)

    def close(self, request_id: str) -> None:
        if self._open.pop(request_id, None) is not None:
            self._closed[request_id] = None
            if len(self._closed) > _CLOSED_REMEMBERED:
                self._closed.popitem(last=False)

    def edge_gone(self, device_id: str) -> None:
        """``device_id`` left the fleet: every request moves its points on now."""
        now = self._clock()
        for request, deliver in list(self._open.values()):
            deliver(request.on_edge_gone(device_id, now))

    def tasks_lost(self, device_id: str) -> None:
        """The fleet learnt that ``device_id`` lost the tasks it held before an outage: every
        request moves those points on now."""
        self.edge_gone(device_id)

    def disconnected(self) -> None:
        """The replica lost the broker: the points in flight stop their deadline clocks."""
        now = self._clock()
        for request, deliver in list(self._open.values()):
            deliver(request.on_disconnect(now))

    def reconnected(self) -> None:
        """The replica is back on the broker: the points in flight resume their deadlines."""
        now = self._clock()
        for request, deliver in list(self._open.values()):
            deliver(request.on_reconnect(now))

    def handle_candidate(self, message: Message) -> None:
        """Transport handler for a replica's candidate topic."""
        cand = self._decode("candidate", Candidate, message)
        if cand is None:
            return
        route = self._open.get(cand.request_id)
        if route is None:
            known = cand.request_id in self._closed
            self.rejections.record("candidate", "late" if known else "unknown_request",
                                   f"request {cand.request_id} was already answered" if known
                                   else f"no request {cand.request_id} in flight")
            return
        request, deliver = route
        before = request.accepted
        actions = request.on_candidate(cand, self._clock())
        self.accepted += request.accepted - before
        deliver(actions)

    def handle_refusal(self, message: Message) -> None:
        """Transport handler for a replica's refusal topic."""
        refusal = self._decode("refusal", TaskRefusal, message)
        route = None if refusal is None else self._open.get(refusal.request_id)
        if refusal is None or route is None:
            return  # invalid (counted), or for an answered request: nothing to place any more
        request, deliver = route
        log.info("%s/%d: %s refused the task (%s)", refusal.request_id, refusal.point_index, refusal.device_id,
                 refusal.reason)
        deliver(request.on_refusal(refusal, self._clock()))

    def _decode(self, topic: str, model: type[_Addressed], message: Message) -> _Addressed | None:
        """The message, if valid and sent by the device and for the request its topic names."""
        try:
            decoded = decode(model, message.payload, max_bytes=self._max_payload)
        except ProtocolError as exc:
            self.rejections.record(topic, exc.kind, str(exc))
            return None
        if decoded.device_id != topic_level(message.topic, -1) or \
                decoded.request_id != topic_level(message.topic, -2):
            self.rejections.record(topic, "identity", f"{topic} claims {decoded.device_id}/{decoded.request_id} "
                                                      f"but was published on {message.topic}")
            return None
        return decoded
