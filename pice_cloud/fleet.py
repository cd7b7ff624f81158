"""Registry of edges, fed by their MQTT status messages, last wills and zeroconf.

Two sources, two states:

* **live** (schedulable): the edge's last MQTT status said ``online`` and arrived less than
  ``expiry_heartbeats`` heartbeats ago. Retained statuses replayed by the broker when the cloud
  (re)connects are dated by their own ``sent_at``, so a device that died long ago (with no last
  will delivered) is not taken for live. Only live edges are returned by `Fleet.live` and
  scheduled: a status on the broker proves that the edge is connected to *our* broker and
  subscribed to its task topic.
* **seen** (not schedulable): advertised on zeroconf (``_pice-edge._tcp``) but no live MQTT status
  yet -- typically an edge that is still loading its model or connecting, or one pointed at
  another broker. `Fleet.snapshot` lists it so that an operator sees it; the scheduler does not.
  Zeroconf records are cached for their TTL, so zeroconf alone never proves liveness.

Dispatch accounting is kept here too: `Fleet.task_sent`, `Fleet.candidate_received`,
`Fleet.task_refused` and `Fleet.task_abandoned` keep each edge's outstanding work (fresher than
its last reported queue) and measure the network's share of a task's round trip, which the
scheduler reads through `Fleet.views`. Their one caller is the request that owns the tasks
(`pice_cloud.progressive.ProgressiveRequest`, through its `FleetLedger` interface).

An edge leaves the fleet on its last will (``online=False``) or a missed heartbeat; both also
forget its zeroconf sighting, which comes back only with a new announcement (restart or TXT
update). A zeroconf goodbye (clean shutdown) or record expiry forgets the sighting.

Liveness is judged from the cloud's own connection (`Fleet.disconnected`, `Fleet.reconnected`,
called by the service's connection hooks): a missing heartbeat says nothing while the cloud
itself cannot hear the broker, so

* **while the cloud is disconnected** no edge expires (the points they hold keep waiting) and
  none is scheduled (a task could not reach it now);
* **after it reconnects**, every edge it knew gets a grace to re-announce itself before it
  expires: ``defaults.RECONNECT_EDGE_GRACE_HEARTBEATS`` of its heartbeats plus the longest pause
  between two of its reconnection tries (an edge that lost the broker when we did retries on the
  same back-off, so it may come back one try after us). An edge is scheduled again once a status
  sent after the outage began has arrived; one that really died meanwhile expires after the grace;
* **a task lost in the outage** is noticed without waiting for its deadline: an edge whose status,
  sent after our reconnection, reports an empty queue holds none of the tasks sent to it before
  the outage, so those it did not answer were lost (the task in the broker's crash, or its
  candidate published while the broker had no session of ours: a restart without persistence);
  `Fleet.task_lost` says so and the request moves the point on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from pice_cloud import defaults
from pice_cloud.scheduler import EdgeView
from pice_edge.errors import ProtocolError
from pice_edge.protocol import Candidate, EdgeStatus, TaskRefusal, decode, is_valid_id, topic_level
from pice_edge.rejects import Rejections
from pice_edge.transport import Message

if TYPE_CHECKING:
    from pice_edge.discovery import Discovery, Peer

log = logging.getLogger(__name__)

#: An empty queue proves tasks lost only in a status sent this long after our reconnection: the
#: tasks our client re-sends on reconnecting reach a connected edge well within it.
_RESENT_MARGIN_S = 0.5


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
    #: The edge refused a task since its last status (it is full: another replica's tasks
    #: fill it); the scheduler sees it full until the next status says otherwise.
    saturated: bool = False
    #: Candidates received from it since its last status: tasks that status may still count in
    #: its queue although they are done (the status that says so follows the candidate).
    answered: int = 0
    #: Live at least until then (fleet clock), whatever its last status: the grace it gets to
    #: re-announce itself after the cloud reconnected to the broker.
    grace_until: float = 0.0
    #: Tasks sent to it before this time (fleet clock: the start of an outage of ours) that it
    #: has not answered are lost: its queue was empty after the outage (`Fleet.task_lost`).
    lost_before: float | None = None

    @property
    def device_id(self) -> str:
        return self.status.device_id


@dataclass(frozen=True)
class FleetEntry:
    """One row of `Fleet.snapshot`: a live or a zeroconf-only ("seen") edge."""

    device_id: str
    state: Literal["live", "seen"]
    profile: str
    runtime: str
    model_id: str
    #: None where only zeroconf has been heard (it does not carry these).
    tokens_per_s: float | None
    queue_depth: int | None
    free_slots: int
    max_batch: int
    #: Seconds since the last status (live) or zeroconf announcement (seen).
    age_s: float
    sources: tuple[str, ...]
    addresses: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Sighting:
    peer: Peer
    at: float


class Fleet:
    """The cloud's view of the edge fleet."""

    def __init__(self, *, expiry_heartbeats: float = 3.0, rejections: Rejections | None = None,
                 max_payload_bytes: int = 64 * 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.expiry_heartbeats = expiry_heartbeats
        self.rejections = rejections or Rejections()
        self._max_payload = max_payload_bytes
        self._clock = clock
        self._edges: dict[str, EdgeInfo] = {}
        #: Zeroconf sightings by device id, and service name -> device id (goodbyes carry the name).
        self._sightings: dict[str, _Sighting] = {}
        self._names: dict[str, str] = {}
        self._changed = asyncio.Event()
        #: (request, point, device) -> dispatch time (fleet clock), for link-delay estimates and
        #: to tell the tasks an outage may have lost.
        self._sent_at: dict[tuple[str, int, str], float] = {}
        #: Fleet-clock time the cloud lost the broker; None while it is connected.
        self._offline_since: float | None = None
        #: The latest outage of ours that ended: its start (fleet clock) and the wall-clock time
        #: (``time.time()``, as statuses' ``sent_at``) at which we were back.
        self._outage_start: float | None = None
        self._reconnected_at: float | None = None
        #: Candidates whose round trip was measured, and the sum of what the edges' own time
        #: (queue + generation) leaves of those round trips: the messaging overhead (network,
        #: broker, both ends' event loops), in seconds. ``pice_edge_round_trip_overhead_seconds``.
        self.round_trips = 0
        self.round_trip_overhead_s = 0.0

    def handle_status(self, message: Message) -> None:
        """Transport handler for ``pice/v1/edge/+/status``."""
        if message.payload == b"":
            return  # a cleared retained status, or `pice-edge doctor`'s ACL probe
        try:
            status = decode(EdgeStatus, message.payload, max_bytes=self._max_payload)
        except ProtocolError as exc:
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
            self._sightings.pop(status.device_id, None)
            if previous is not None:
                log.info("edge %s went offline", status.device_id)
                del self._edges[status.device_id]
                self._changed.set()
            return
        if previous is None:
            log.info("edge %s joined (%s, %s)", status.device_id, status.runtime, status.model_id)
            info = EdgeInfo(status=status, last_seen=seen)
            self._note_empty_queue(info, status)
            self._edges[status.device_id] = info
            self._changed.set()
        else:
            previous.status = status
            previous.last_seen = max(previous.last_seen, seen)
            previous.saturated = False
            previous.answered = 0
            self._note_empty_queue(previous, status)

    def _note_empty_queue(self, info: EdgeInfo | None, status: EdgeStatus) -> None:
        # An empty queue reported after our reconnection (with a margin for the tasks our client
        # re-sent on reconnecting, still on their way to the edge): what it held before the
        # outage is done or was never received; a candidate we have not seen is lost.
        if (info is None or self._outage_start is None or self._reconnected_at is None
                or status.queue_depth > 0 or status.sent_at < self._reconnected_at + _RESENT_MARGIN_S):
            return
        start = self._outage_start
        if info.lost_before != start:
            info.lost_before = start
            if any(device == info.device_id and sent < start for (_, _, device), sent in self._sent_at.items()):
                log.warning("edge %s reports an empty queue after the outage: tasks it had not answered are lost "
                            "(the broker lost them or their candidates); their points move on", info.device_id)

    def _alive(self, info: EdgeInfo, now: float) -> bool:
        # Not judged while we are the ones who cannot hear it.
        return self._offline_since is not None or now <= self._expiry(info)

    def _expiry(self, info: EdgeInfo) -> float:
        return max(info.last_seen + self.expiry_heartbeats * info.status.heartbeat_s, info.grace_until)

    # --- the cloud's own connection ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the cloud hears the broker now (as far as `disconnected`/`reconnected` said)."""
        return self._offline_since is None

    def disconnected(self) -> None:
        """The cloud lost the broker: until `reconnected`, no edge expires (it cannot be heard,
        which says nothing about it) and none is scheduled (a task could not reach it)."""
        if self._offline_since is None:
            self._offline_since = self._clock()
            if self._edges:
                log.warning("lost the broker: the %d edge(s) we know are not expired while we cannot hear them",
                            len(self._edges))

    def reconnected(self, *, retry_min_s: float = 0.0, retry_max_s: float = 0.0) -> float:
        """The cloud is back on the broker; returns how long it was away (0 if it was not).

        Every edge it knew stays live for ``defaults.RECONNECT_EDGE_GRACE_HEARTBEATS`` of its
        heartbeats more, plus the longest pause between two reconnection tries of a client that
        lost the broker when we did: paho doubles its delay from ``retry_min_s`` up to
        ``retry_max_s``, so after an outage of ``d`` seconds that pause is at most
        ``min(d + retry_min_s, retry_max_s)`` (such an edge may come back one try after us)."""
        if self._offline_since is None:
            return 0.0
        now = self._clock()
        outage = max(0.0, now - self._offline_since)
        self._outage_start, self._offline_since = self._offline_since, None
        self._reconnected_at = time.time()
        retry = max(0.0, min(outage + retry_min_s, retry_max_s))
        for info in self._edges.values():
            grace = defaults.RECONNECT_EDGE_GRACE_HEARTBEATS * info.status.heartbeat_s + retry
            info.grace_until = max(info.grace_until, now + grace)
        if self._edges:
            log.info("back on the broker after %.1fs: %d edge(s) have %.1fs (+ %g heartbeats) to re-announce "
                     "themselves before any expires", outage, len(self._edges), retry,
                     defaults.RECONNECT_EDGE_GRACE_HEARTBEATS)
        self._changed.set()
        return outage

    def _heard_since_outage(self, info: EdgeInfo) -> bool:
        """A status sent after our latest outage began has arrived: the edge is connected again."""
        return self._outage_start is None or info.last_seen >= self._outage_start

    def now(self) -> float:
        """The time on this fleet's clock (what `is_live` and `expires_at` are measured on)."""
        return self._clock()

    def is_live(self, device_id: str) -> bool:
        """Known, online, and heard from within ``expiry_heartbeats`` heartbeats (a frozen or
        partitioned edge stops being live after that, before any last will arrives) or within
        its grace after an outage of ours; and always while we are disconnected."""
        info = self._edges.get(device_id)
        return info is not None and self._alive(info, self._clock())

    def expires_at(self, device_id: str) -> float | None:
        """When (on this fleet's clock) ``device_id`` stops being live without another status;
        while the cloud is disconnected, a heartbeat from now (look again then)."""
        info = self._edges.get(device_id)
        if info is None:
            return None
        if self._offline_since is not None:
            return self._clock() + info.status.heartbeat_s
        return self._expiry(info)

    def task_lost(self, request_id: str, point: int, device_id: str) -> bool:
        """The task was sent before an outage of ours after which the edge reported an empty
        queue: it will never be answered (see the module's notes)."""
        info = self._edges.get(device_id)
        sent = self._sent_at.get((request_id, point, device_id))
        return info is not None and info.lost_before is not None and sent is not None and sent < info.lost_before

    def lost_before(self, device_id: str) -> float | None:
        """`EdgeInfo.lost_before` of ``device_id`` (None if unknown or nothing was lost)."""
        info = self._edges.get(device_id)
        return None if info is None else info.lost_before

    def live(self) -> list[EdgeInfo]:
        """Live edges, expired ones dropped; ordered by device id for determinism. After an outage
        of ours, only those heard from since it began (connected again, schedulable): one still in
        its grace `is_live` (its points wait for it) but is not listed until it re-announces."""
        now = self._clock()
        for device_id in [d for d, info in self._edges.items() if not self._alive(info, now)]:
            info = self._edges[device_id]
            log.warning("edge %s expired (no status for %.1fs, %g heartbeats%s)", device_id, now - info.last_seen,
                     self.expiry_heartbeats, "; it did not re-announce itself after our reconnection"
                     if info.grace_until and now >= info.grace_until else "")
            del self._edges[device_id]
            self._sightings.pop(device_id, None)
        offline = self._offline_since is not None
        return [self._edges[d] for d in sorted(self._edges) if offline or self._heard_since_outage(self._edges[d])]

    # --- zeroconf ----------------------------------------------------------------------------

    def watch_zeroconf(self, discovery: Discovery, fleet: str) -> None:
        """Add the edges of ``fleet`` that ``discovery`` (started) sees on zeroconf, as "seen"."""
        discovery.watch(lambda name, peer: self.handle_peer(name, peer, fleet=fleet), clouds=False)

    def handle_peer(self, name: str, peer: Peer | None, *, fleet: str) -> None:
        """Zeroconf callback: ``peer`` appeared or changed, or (None) service ``name`` went away."""
        if peer is None:
            device_id = self._names.pop(name, None)
            if device_id is not None and device_id in self._sightings and self._sightings[device_id].peer.name == name:
                del self._sightings[device_id]
                log.info("edge %s withdrew its zeroconf record", device_id)
            return
        if peer.kind != "edge" or peer.fleet != fleet:
            return
        if not peer.compatible or not is_valid_id(peer.id):
            self.rejections.record("zeroconf", "incompatible", f"{name}: protocol {peer.protocol!r}, id {peer.id!r}")
            return
        if peer.id not in self._sightings and peer.id not in self._edges:
            log.info("edge %s seen on zeroconf (not schedulable until its MQTT status arrives)", peer.id)
        self._names[name] = peer.id
        self._sightings[peer.id] = _Sighting(peer=peer, at=self._clock())
        self._changed.set()

    def snapshot(self) -> list[FleetEntry]:
        """Every known edge, live ones (MQTT) and zeroconf-only ones, ordered by device id."""
        now = self._clock()
        rows = {}
        for info in self.live():
            s = info.status
            sighting = self._sightings.get(s.device_id)
            rows[s.device_id] = FleetEntry(
                device_id=s.device_id, state="live", profile=s.profile, runtime=s.runtime, model_id=s.model_id,
                tokens_per_s=s.tokens_per_s, queue_depth=s.queue_depth, free_slots=s.free_slots,
                max_batch=s.max_batch, age_s=round(max(0.0, now - info.last_seen), 2),
                sources=("mqtt", "zeroconf") if sighting else ("mqtt",),
                addresses=sighting.peer.addresses if sighting else (),
            )
        for device_id, sighting in self._sightings.items():
            if device_id in rows:
                continue
            p = sighting.peer
            rows[device_id] = FleetEntry(
                device_id=device_id, state="seen", profile=p.properties.get("profile", ""),
                runtime=p.properties.get("runtime", ""), model_id=p.properties.get("model", ""),
                tokens_per_s=None, queue_depth=None, free_slots=p.int_property("slots"),
                max_batch=max(1, p.int_property("batch")), age_s=round(max(0.0, now - sighting.at), 2),
                sources=("zeroconf",), addresses=p.addresses,
            )
        return [rows[d] for d in sorted(rows)]

    def get(self, device_id: str) -> EdgeInfo | None:
        return self._edges.get(device_id)

    def views(self, accept: Callable[[EdgeStatus], bool] | None = None) -> list[EdgeView]:
        """The scheduler's snapshot of every live edge (whose status ``accept`` accepts) that can
        take a task now: none while the cloud is disconnected, and after an outage only those
        heard from since it began."""
        if self._offline_since is not None:
            return []
        return [
            EdgeView(device_id=e.device_id, max_batch=e.status.max_batch,
                     queue_depth=max(e.status.queue_depth, e.status.max_batch) if e.saturated
                     else max(0, e.status.queue_depth - e.answered),
                     outstanding=e.outstanding, tokens_per_s=e.status.tokens_per_s, link_delay_s=e.link_delay_s,
                     model_id=e.status.model_id)
            for e in self.live() if accept is None or accept(e.status)
        ]

    # --- dispatch accounting -------------------------------------------------------------------

    def task_sent(self, request_id: str, point: int, device_id: str) -> None:
        """A task went to ``device_id``: it counts against the edge until its candidate returns."""
        info = self._edges.get(device_id)
        if info is not None:
            info.outstanding += 1
        self._sent_at[(request_id, point, device_id)] = self._clock()

    def candidate_received(self, candidate: Candidate) -> None:
        """An accepted candidate: the task no longer counts, and its round trip minus the edge's
        own time (queue + generation) is a sample of the link's delay."""
        sent = self._sent_at.pop((candidate.request_id, candidate.point_index, candidate.device_id), None)
        info = self._edges.get(candidate.device_id)
        if info is None:
            return
        if info.outstanding > 0:
            info.outstanding -= 1
        info.answered += 1
        if sent is not None:
            delay = max(0.0, self._clock() - sent - candidate.latency_s)
            self.round_trips += 1
            self.round_trip_overhead_s += delay
            w = defaults.LINK_DELAY_SAMPLE_WEIGHT
            info.link_delay_s = delay if info.link_delay_s == 0 else (1 - w) * info.link_delay_s + w * delay

    def task_refused(self, refusal: TaskRefusal) -> None:
        """The edge refused a task: it no longer counts against the edge, and the edge is full
        until its next status."""
        self._sent_at.pop((refusal.request_id, refusal.point_index, refusal.device_id), None)
        info = self._edges.get(refusal.device_id)
        if info is None:
            return
        if info.outstanding > 0:
            info.outstanding -= 1
        info.saturated = True

    def task_abandoned(self, request_id: str, point: int, device_id: str, *, answered: bool) -> None:
        """The request closed: forget the task; one that never came back (``answered`` False)
        no longer counts against its edge."""
        self._sent_at.pop((request_id, point, device_id), None)
        info = self._edges.get(device_id)
        if not answered and info is not None and info.outstanding > 0:
            info.outstanding -= 1

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
