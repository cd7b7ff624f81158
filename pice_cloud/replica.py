"""One ``cloud_id``, one process: detecting two cloud replicas started with the same id.

The id is the replica's MQTT client id. Two processes connecting with one client id take the
broker session from each other every time either reconnects (MQTT 3.1.1 says only that the
connection was closed, so each logs "lost MQTT broker", reconnects and takes it back), and each
sees about half of its candidates. Nothing in MQTT 3.1.1 names the cause, so the replicas do:

- **The claim.** The replica's retained status (`CloudStatus` on ``pice/v1/cloud/{id}/status``,
  last will ``online=False``) carries a random ``instance`` token, the process's start time and
  a heartbeat interval, and the holder re-publishes it every ``heartbeat_s`` while connected.
- **Before connecting** under the id, a new process looks at that status from a connection of its
  own (a random client id, so the holder is not disturbed: `probe`). An offline or absent status
  means the id is free. An online one is believed only if its holder re-publishes it within a few
  heartbeats: then the new process refuses to start (`CloudIdClashError`, which names the holder
  and says what to change); otherwise it is a stale record (a holder that died while the broker
  was down, so no last will was sent) and the id is taken.
- **While running** (two processes that passed the check at the same moment, or a replica older
  than the claim that does no check): each (re)connection re-subscribes to the replica's own
  status and the broker sends the retained one, which is the other process's announcement when
  the other took the session in between. Both name the clash in their logs; the one that started
  later (`ReplicaClaim.yields_to`) stops, without publishing "offline" over the holder's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Final

from pice_cloud.errors import CloudError
from pice_edge.errors import ProtocolError
from pice_edge.protocol import CloudStatus, cloud_status_topic, decode, encode
from pice_edge.transport import BrokerSettings, Message, MqttTransport

log = logging.getLogger(__name__)

#: How often a replica re-publishes its retained status while connected (seconds): the proof
#: that its claim on the id is live. A few small retained messages per replica and minute.
HEARTBEAT_S: Final = 2.0
#: A status claiming "online" is believed when its holder re-publishes it within this many of
#: its heartbeats (missed messages and a busy event loop get some slack).
LIVE_WITHIN_HEARTBEATS: Final = 2.5
#: Longest wait for a claimed holder's heartbeat at start (seconds), whatever it announces.
MAX_PROBE_WAIT_S: Final = 15.0


class CloudIdClashError(CloudError):
    """Another live process holds this replica's ``cloud_id``; the message says which and what
    to change. `pice-cloud serve` exits with status 2 (a configuration problem: restarting
    with the same id cannot help)."""


def clash_message(cloud_id: str, holder: CloudStatus, *, when: str) -> str:
    """What the operator reads: who holds the id, why that is a problem, and what to change."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started_at)) if holder.started_at else "?"
    where = holder.api_url or "no HTTP API"
    return (f"cloud_id {cloud_id!r} {when} another running replica (API {where}, instance "
            f"{holder.instance or 'of an older version'}, up since {since}). Two replicas with one cloud_id take "
            "each other's broker connection and lose each other's candidates. Give each replica its own id: set "
            "PICE_CLOUD_ID (or cloud_id in the config file) to a name no other replica uses, or leave it unset for "
            "the default cloud-HOST-PORT. If that replica is gone, the broker marks it offline within 1.5x its "
            "keepalive; start this one again then.")


class ReplicaClaim:
    """This process's claim on its ``cloud_id``: the statuses it publishes and the watch on the
    replica's status topic that notices another process holding the same id."""

    def __init__(self, cloud_id: str, *, api_url: str = "", heartbeat_s: float = HEARTBEAT_S) -> None:
        self.cloud_id = cloud_id
        self.api_url = api_url
        self.heartbeat_s = heartbeat_s
        #: A fresh random token per process.
        self.instance = uuid.uuid4().hex[:16]
        self.started_at = time.time()
        self.topic = cloud_status_topic(cloud_id)
        #: Set when this process gave way to another holder of the id (it must stop).
        self.lost: CloudIdClashError | None = None
        self.lost_event = asyncio.Event()
        #: Clashes seen (this process kept the id or gave it up), for logs and tests.
        self.clashes = 0
        # The stale record `probe` judged dead: seen again as the retained status on our first
        # subscription, it is not another holder.
        self._stale: tuple[str | None, float] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    def status(self, online: bool) -> CloudStatus:
        """This process's status (its claim while ``online``)."""
        return CloudStatus(cloud_id=self.cloud_id, online=online, api_url=self.api_url, instance=self.instance,
                           started_at=self.started_at, heartbeat_s=self.heartbeat_s)

    def yields_to(self, other: CloudStatus) -> bool:
        """Whether this process gives the id up to ``other``: the later start gives way (the one
        already serving keeps it); a holder that does not say when it started is older than the
        claim and never gives way, so this process does."""
        if other.started_at is None:
            return True
        return (self.started_at, self.instance) > (other.started_at, other.instance or "")

    def watch(self, message: Message) -> None:
        """Handler of the replicas' status topics (run on the event loop; never raises): only
        this replica's own topic counts here."""
        if message.topic != self.topic:
            return
        try:
            status = decode(CloudStatus, message.payload)
        except ProtocolError as exc:
            log.debug("ignoring an invalid status on %s: %s", message.topic, exc)
            return
        if status.cloud_id != self.cloud_id or not status.online or status.instance == self.instance:
            return
        if self._stale is not None and (status.instance, status.sent_at) == self._stale:
            return  # the dead holder's record the probe already judged
        self.clashes += 1
        if self.lost is not None:
            return
        if not self.yields_to(status):
            log.error("%s; that replica started later and gives way (this one keeps the id)",
                      clash_message(self.cloud_id, status, when="is also claimed by"))
            return
        self.lost = CloudIdClashError(clash_message(self.cloud_id, status, when="is held by"))
        log.error("%s This replica started later: it stops.", self.lost)
        self.lost_event.set()

    def start_heartbeat(self, transport: MqttTransport) -> None:
        """Re-publish the claim every ``heartbeat_s`` while connected (until `stop_heartbeat`)."""
        async def beat() -> None:
            while self.lost is None:
                await asyncio.sleep(self.heartbeat_s)
                if transport.connected and self.lost is None:
                    with contextlib.suppress(Exception):
                        transport.publish(self.topic, encode(self.status(True)), retain=True)

        self._heartbeat = asyncio.create_task(beat(), name=f"claim-{self.cloud_id}")

    async def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None

    async def probe(self, settings: BrokerSettings, *, timeout: float = 10.0) -> None:
        """Check, from a connection of its own, that no live process holds the id.

        Raises:
            CloudIdClashError: a live holder re-published its claim while we watched.
            TransportError: the broker could not be reached (`BrokerUnreachableError`) or refused us.
        """
        seen: asyncio.Queue[tuple[CloudStatus, bool]] = asyncio.Queue()

        def on_status(message: Message) -> None:
            with contextlib.suppress(ProtocolError):
                status = decode(CloudStatus, message.payload)
                if status.cloud_id == self.cloud_id:
                    seen.put_nowait((status, message.retain))

        prober = MqttTransport(settings, client_id=f"pice-probe-{uuid.uuid4().hex[:12]}")
        prober.add_subscription(self.topic, on_status)
        try:
            await prober.connect(timeout)
            # A second subscription as a barrier: the broker sends a subscription's retained
            # message right after its SUBACK, so once this SUBACK is back, the status (if any)
            # has been delivered. The topic is one nobody publishes on (a random request id).
            await prober.subscribe(f"pice/v1/cloud/{self.cloud_id}/candidates/probe-{self.instance}/none",
                                   lambda message: None)
            retained = None
            while not seen.empty():
                retained, _ = seen.get_nowait()
            if retained is None or not retained.online:
                return
            beat = retained.heartbeat_s or HEARTBEAT_S
            wait = min(MAX_PROBE_WAIT_S, LIVE_WITHIN_HEARTBEATS * beat)
            log.info("cloud_id %s is claimed by instance %s; waiting up to %.1fs for its heartbeat", self.cloud_id,
                     retained.instance, wait)
            deadline = asyncio.get_running_loop().time() + wait
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    status, was_retained = await asyncio.wait_for(seen.get(), left)
                except asyncio.TimeoutError:
                    break
                if was_retained:
                    continue
                if status.online:
                    raise CloudIdClashError(clash_message(self.cloud_id, status, when="is held by"))
                return  # it went offline while we watched: the id is free now
            log.warning("cloud_id %s: the broker's status says instance %s is online, but it sent no heartbeat for "
                        "%.1fs (it ended while the broker was down?): taking the id", self.cloud_id,
                        retained.instance, wait)
            self._stale = (retained.instance, retained.sent_at)
        finally:
            await prober.close()


class LiveReplicas:
    """The cloud replicas that share this broker (and so the fleet), this one included, from
    their retained statuses on ``pice/v1/cloud/+/status``.

    A replica counts while it says it is online and re-publishes its status within
    `LIVE_WITHIN_HEARTBEATS` of its heartbeats: one that stopped says "offline" (itself, or its
    last will), and one that died while the broker was down just stops re-publishing. The
    scheduler shares the edges' free slots among the replicas (`pice_cloud.scheduler.ensemble_width`):
    each places from the edges' last heartbeats, so without a share every replica would widen its
    ensembles into slots another has just filled.
    """

    def __init__(self, cloud_id: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cloud_id = cloud_id
        self._clock = clock
        #: Other replicas: cloud_id -> (when last heard, on ``clock``; their heartbeat, seconds).
        self._others: dict[str, tuple[float, float]] = {}
        self._last_count = 1

    def watch(self, message: Message) -> None:
        """Handler of ``pice/v1/cloud/+/status`` (run on the event loop; never raises)."""
        try:
            status = decode(CloudStatus, message.payload)
        except ProtocolError as exc:
            log.debug("ignoring an invalid status on %s: %s", message.topic, exc)
            return
        if status.cloud_id == self.cloud_id or message.topic != cloud_status_topic(status.cloud_id):
            return  # our own, or a status published under another replica's name
        if status.online:
            self._others[status.cloud_id] = (self._clock(), status.heartbeat_s or HEARTBEAT_S)
        else:
            self._others.pop(status.cloud_id, None)
        self.count()

    def count(self) -> int:
        """Live replicas, this one included (at least 1)."""
        now = self._clock()
        for cloud_id, (heard, heartbeat_s) in list(self._others.items()):
            if now - heard > LIVE_WITHIN_HEARTBEATS * heartbeat_s:
                del self._others[cloud_id]
        count = 1 + len(self._others)
        if count != self._last_count:
            log.info("%d cloud replicas share this broker's edges (%s)", count,
                     ", ".join(sorted([self.cloud_id, *self._others])))
            self._last_count = count
        return count
