"""Registry of live edges, fed by their retained status messages and last wills.

An edge is live while its last status said ``online`` and arrived less than
``expiry_heartbeats`` heartbeats ago. Retained statuses replayed by the broker when the cloud
(re)connects are dated by their own ``sent_at``, so a device that died long ago (with no last
will delivered) is not taken for live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pice_edge.errors import ProtocolError
from pice_edge.protocol import EdgeStatus, decode, topic_level
from pice_edge.rejects import Rejections
from pice_edge.transport import Message

log = logging.getLogger(__name__)


@dataclass
class EdgeInfo:
    """What the cloud knows of one edge."""

    status: EdgeStatus
    #: time.monotonic() of the status (or its estimate for a replayed retained message).
    last_seen: float
    #: Tasks sent to this edge whose candidates have not come back yet (cloud-side view,
    #: fresher than the edge's last reported queue depth).
    outstanding: int = 0
    #: Network share of a task's round trip (seconds), measured from candidates.
    link_delay_s: float = 0.0

    @property
    def device_id(self) -> str:
        return self.status.device_id


class Fleet:
    """The cloud's view of the edge fleet."""

    def __init__(self, *, expiry_heartbeats: float = 3.0, rejections: Rejections | None = None,
                 max_payload_bytes: int = 64 * 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.expiry_heartbeats = expiry_heartbeats
        self.rejections = rejections or Rejections()
        self._max_payload = max_payload_bytes
        self._clock = clock
        self._edges: dict[str, EdgeInfo] = {}
        self._changed = asyncio.Event()

    def handle_status(self, message: Message) -> None:
        """Transport handler for ``pice/v1/edge/+/status``."""
        try:
            status = decode(EdgeStatus, message.payload, max_bytes=self._max_payload)
        except ProtocolError as exc:
            if message.payload == b"" and message.retain:
                return  # a cleared retained status
            self.rejections.record("status", exc.kind, str(exc))
            return
        if status.device_id != topic_level(message.topic, -2):
            self.rejections.record("status", "identity", f"status for {status.device_id} on {message.topic}")
            return
        self.update(status, retained=message.retain)

    def update(self, status: EdgeStatus, *, retained: bool = False) -> None:
        """Record a status (also used by zeroconf discovery and tests)."""
        now = self._clock()
        seen = now
        if retained:
            age = max(0.0, time.time() - status.sent_at)
            seen = now - age
        previous = self._edges.get(status.device_id)
        if not status.online:
            if previous is not None:
                log.info("edge %s went offline", status.device_id)
                del self._edges[status.device_id]
                self._changed.set()
            return
        if previous is None:
            log.info("edge %s joined (%s, %s)", status.device_id, status.runtime, status.model_id)
            self._edges[status.device_id] = EdgeInfo(status=status, last_seen=seen)
            self._changed.set()
        else:
            previous.status = status
            previous.last_seen = max(previous.last_seen, seen)

    def _alive(self, info: EdgeInfo, now: float) -> bool:
        return now - info.last_seen <= self.expiry_heartbeats * info.status.heartbeat_s

    def live(self) -> list[EdgeInfo]:
        """Live edges, expired ones dropped; ordered by device id for determinism."""
        now = self._clock()
        for device_id in [d for d, info in self._edges.items() if not self._alive(info, now)]:
            log.info("edge %s expired (no heartbeat)", device_id)
            del self._edges[device_id]
        return [self._edges[d] for d in sorted(self._edges)]

    def get(self, device_id: str) -> EdgeInfo | None:
        return self._edges.get(device_id)

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` edges are live; False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.live()) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
        return True
