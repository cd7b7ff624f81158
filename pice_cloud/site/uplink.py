"""Whether the site's cloud answers: the site's one switch between forwarding and answering here.

Three signs are watched, and any one of them failing takes the site off the cloud:

- **Probes**: ``GET {cloud}/health`` every ``probe_interval_s``; a probe refused, unanswered for
  ``probe_timeout_s`` (a hung cloud accepts and never answers), or answered with an error counts
  as failed. ``fail_after`` failures in a row switch to the site.
- **Forwarded requests**: a request that finds the cloud gone (connection refused or reset, closed
  mid-answer, a 502/504 or a 503 ``shutting_down``: `report_failure`) switches at once: the next
  request must not wait for the probes to notice. A slow or busy cloud (a timeout, a 429, a 503
  queue timeout) does not: that request is answered on the site and the probes judge.
- **The cloud's MQTT status** over the bridged site broker (``site.cloud_id``, or the one other
  cloud whose status crosses the bridge): ``online=False`` (its last will) switches at once, and
  so does silence for `SILENT_HEARTBEATS` of its heartbeats (the bridge is cut; MQTT keeps the
  stale retained status, so only the missing heartbeats tell).

The way back is one: ``recover_after`` answered probes in a row (and, when a status is followed,
a fresh heartbeat) switch new requests to the cloud again; answers already running on the site
finish there. Each switch is logged, counted and timed (`Uplink.switches`).

The cloud's URL is ``site.cloud_url``, else the ``api_url`` in its MQTT status, else its zeroconf
record's ``api`` property (never a site's own record, an unspecified address or the site's own
URL; the site's ``cloud_api_key`` goes only to a configured URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx

from pice_cloud.config import SiteConfig
from pice_edge.errors import ProtocolError
from pice_edge.protocol import CLOUD_STATUS_FILTER, CloudStatus, decode
from pice_edge.transport import Message, MqttTransport

log = logging.getLogger(__name__)

#: Where new requests go: forwarded to the cloud, or answered on the site.
Route = Literal["cloud", "site"]
#: A followed cloud's status is silent (the bridge is cut) after this many of its heartbeats.
SILENT_HEARTBEATS: Final = 3.0
#: Heartbeat interval assumed for a cloud status that does not say (older senders).
DEFAULT_HEARTBEAT_S: Final = 2.0


@dataclass(frozen=True)
class Switch:
    """One change of route: when (Unix seconds), to where, and why."""

    at: float
    to: Route
    reason: str


def api_base(url: str) -> str:
    """The cloud's base URL without a trailing ``/v1`` (routes are appended to it)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class Uplink:
    """The site's view of its cloud (see the module docstring); `route` says where a new request
    goes. Start it with `start`, stop it with `close`.

    Args:
        config: the ``site`` section.
        own_id: the site's own cloud_id (its own status is not the cloud's).
        own_url: the site's own API URL (never taken for the cloud's).
        transport: the site's MQTT connection (to follow the cloud's status); None: probes only.
        client: the HTTP client for probes (and forwarding); the caller owns it.
        on_switch: called with each `Switch` (metrics).
    """

    def __init__(self, config: SiteConfig, *, own_id: str, client: httpx.AsyncClient, own_url: str | None = None,
                 transport: MqttTransport | None = None, on_switch: Callable[[Switch], None] | None = None) -> None:
        self.config = config
        self.own_id = own_id
        self._own_url = api_base(own_url) if own_url else None
        self._closed = False
        self.client = client
        self.transport = transport
        self._on_switch = on_switch
        self._url_configured = api_base(config.cloud_url) if config.cloud_url else None
        self._url_learned: str | None = None
        #: Starts on the site: the cloud is trusted once it has answered ``recover_after`` probes.
        self.route: Route = "site"
        self.switches: list[Switch] = [Switch(time.time(), "site", "starting")]
        #: Set while requests go to the site; forwarded requests wait on it to give up early.
        self.down = asyncio.Event()
        self.down.set()
        self._fails = 0
        self._oks = 0
        self.last_probe: dict[str, Any] = {}
        #: The followed cloud's id and its latest status (monotonic time it arrived).
        self.cloud_id: str | None = config.cloud_id
        self._status: CloudStatus | None = None
        self._status_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # --- where the cloud is -----------------------------------------------------------------

    @property
    def cloud_url(self) -> str | None:
        """The cloud's base URL (no ``/v1``), or None while it is unknown."""
        return self._url_configured or self._url_learned

    @property
    def url_configured(self) -> bool:
        """Whether the cloud's URL is the configured one (``site.cloud_url``), not a learned one."""
        return self._url_configured is not None

    def learn(self, cloud_id: str, api_url: str) -> None:
        """A cloud found by zeroconf or MQTT status: followed when none is configured."""
        if self._closed or cloud_id == self.own_id or not api_url:
            return
        if self.config.cloud_id is not None and cloud_id != self.config.cloud_id:
            return
        url = api_base(api_url)
        host = urlsplit(url).hostname or ""
        if host in ("", "0.0.0.0", "::") or url == self._own_url:
            log.debug("site: ignoring cloud %s's address %s (unspecified, or our own)", cloud_id, url)
            return
        if self.cloud_id is None:
            self.cloud_id = cloud_id
            log.info("site: following cloud %s", cloud_id)
        if cloud_id == self.cloud_id and self._url_learned != url:
            moved = self._url_learned is not None
            self._url_learned = url
            log.info("site: cloud %s at %s", cloud_id, url)
            if moved and self._url_configured is None:
                # Trust the new address only once it has answered the probes.
                self._switch("site", f"cloud {cloud_id} moved to {url}")

    def _on_status(self, message: Message) -> None:
        try:
            status = decode(CloudStatus, message.payload)
        except ProtocolError as exc:
            log.debug("site: ignoring a malformed cloud status on %s: %s", message.topic, exc)
            return
        if status.cloud_id == self.own_id:
            return
        if status.online:
            self.learn(status.cloud_id, status.api_url)
        if status.cloud_id != self.cloud_id:
            return
        self._status = status
        if not message.retain:
            # A retained status is the broker's memory, not a sign of life: only a live
            # publication (a heartbeat) counts as one.
            self._status_at = time.monotonic()
        if not status.online and self.route == "cloud":
            self._switch("site", f"cloud {status.cloud_id} went offline (its MQTT status)")

    def _status_problem(self) -> str | None:
        """Why the followed cloud's MQTT status says it is gone; None when it is live (or none is
        followed: a site without a bridge relies on the probes)."""
        if self.transport is None or self.cloud_id is None:
            return None
        if self._status is None:
            return None if self.config.cloud_id is None else f"no status from cloud {self.cloud_id} on the site broker"
        if not self._status.online:
            return f"cloud {self.cloud_id} is offline (its MQTT status)"
        beat = self._status.heartbeat_s
        if beat is None:
            return None  # an older cloud re-publishes only on change: silence proves nothing
        silent = time.monotonic() - self._status_at
        if silent > SILENT_HEARTBEATS * beat:
            return f"no heartbeat from cloud {self.cloud_id} for {silent:.1f}s (bridge cut?)"
        return None

    # --- the switch ----------------------------------------------------------------------------

    def _switch(self, to: Route, reason: str) -> None:
        if to == self.route:
            return
        self.route = to
        self._fails = self._oks = 0
        switch = Switch(time.time(), to, reason)
        self.switches.append(switch)
        if to == "site":
            self.down.set()
            log.warning("site: answering on the site: %s", reason)
        else:
            self.down.clear()
            log.warning("site: forwarding to the cloud again (%s)", reason)
        if self._on_switch is not None:
            self._on_switch(switch)

    def report_failure(self, reason: str) -> None:
        """A forwarded request failed for the cloud's sake (refused, dropped, timed out)."""
        self._switch("site", reason)

    @property
    def since(self) -> float:
        """When the current route was taken (Unix seconds)."""
        return self.switches[-1].at

    # --- probing ---------------------------------------------------------------------------------

    async def probe(self) -> str | None:
        """One probe of the cloud; returns why it failed, or None when the cloud answered."""
        url = self.cloud_url
        if url is None:
            return "the cloud's address is not known yet (set site.cloud_url, or bridge its status)"
        started = time.monotonic()
        try:
            response = await self.client.get(url + "/health", timeout=self.config.probe_timeout_s)
        except httpx.TimeoutException:
            return f"{url}/health did not answer within {self.config.probe_timeout_s:g}s"
        except httpx.HTTPError as exc:
            return f"{url}/health: {type(exc).__name__}: {exc}"
        finally:
            self.last_probe = {"at": time.time(), "seconds": round(time.monotonic() - started, 4)}
        if response.status_code != 200:
            return f"{url}/health answered {response.status_code}"
        with contextlib.suppress(ValueError):
            body = response.json()
            if isinstance(body, dict) and body.get("status") == "shutting_down":
                return "the cloud is shutting down"
        return self._status_problem()

    async def check(self) -> None:
        """Probe once and move the route by the hysteresis rules."""
        switches = len(self.switches)
        problem = await self.probe()
        self.last_probe["problem"] = problem
        if len(self.switches) != switches:
            # The route moved while this probe was out (a forwarded request found the cloud
            # going, its status went offline): an answer sent before that proves nothing now.
            return
        if problem is None:
            self._fails = 0
            self._oks += 1
            if self.route == "site" and self._oks >= self.config.recover_after:
                self._switch("cloud", f"{self._oks} probes answered")
        else:
            self._oks = 0
            self._fails += 1
            if self.route == "cloud" and self._fails >= self.config.fail_after:
                self._switch("site", problem)
            elif self.route == "site":
                log.debug("site: cloud still unavailable: %s", problem)

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a probe must never end the loop
                log.exception("site: probe failed unexpectedly")
            await asyncio.sleep(self.config.probe_interval_s)

    async def start(self) -> None:
        if self.transport is not None:
            self.transport.add_subscription(CLOUD_STATUS_FILTER, self._on_status)
        self._task = asyncio.create_task(self._run(), name="pice-site-uplink")

    async def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.unsubscribe(CLOUD_STATUS_FILTER, self._on_status)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def describe(self) -> dict[str, Any]:
        """The uplink's state for ``/health``."""
        return {"route": self.route, "since": self.since, "cloud_url": self.cloud_url, "cloud_id": self.cloud_id,
                "switches": len(self.switches) - 1, "last_switch_reason": self.switches[-1].reason,
                "last_probe": self.last_probe}
