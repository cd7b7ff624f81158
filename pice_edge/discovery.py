"""Zeroconf (mDNS/DNS-SD) discovery: edges and the cloud advertise themselves and find each other.

Each edge advertises a ``_pice-edge._tcp.local.`` service; the cloud advertises
``_pice-cloud._tcp.local.`` with its MQTT broker URL (and HTTP API URL). An edge started without
a broker URL browses for the cloud of its *fleet* and connects to that broker. The fleet name
(TXT ``fleet``, default ``"default"``) keeps two deployments on one network (or two test runs on
one host) apart.

TXT properties (keys short, as RFC 6763 section 6.4 recommends):

======== ===== ================================================================
key      who   value
======== ===== ================================================================
pv       both  wire protocol version (`PROTOCOL_VERSION`); others are ignored
id       both  device id / cloud id
fleet    both  fleet name
profile  edge  device profile name
runtime  edge  runtime name
model    edge  model id
slots    edge  free batch slots (updated when they change, at most every 2 s)
batch    edge  max batch
broker   cloud MQTT broker URL (mqtt://host:port)
api      cloud HTTP API URL (may be empty)
role     cloud ``site`` for a site's own service (``pice-cloud site``); absent for a cloud
======== ===== ================================================================

Each ``key=value`` string must fit DNS-SD's 255-byte limit: descriptive values (profile,
runtime, model) are truncated, identifying ones (id, fleet, broker, api) raise `TxtRecordError`.
A service name already taken on the network is renamed by zeroconf (``edge-1`` becomes
``edge-1-2``) and logged: the ``id`` property, not the service name, identifies a device.

Zeroconf is a hint, not the source of truth for liveness: records are cached by every listener
for their TTL (`RECORD_TTL_S`), so a device that loses power stays visible for up to that long.
The cloud schedules only edges whose MQTT status is live (see ``pice_cloud.fleet``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from zeroconf import BadTypeInNameException, IPVersion, ServiceStateChange, Zeroconf
from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from pice_edge.errors import ConfigError, NotReachableError, PiceError
from pice_edge.protocol import FLEET_NAME_PATTERN, PROTOCOL_VERSION
from pice_edge.transport import parse_broker_url

log = logging.getLogger(__name__)

EDGE_SERVICE_TYPE: Final = "_pice-edge._tcp.local."
CLOUD_SERVICE_TYPE: Final = "_pice-cloud._tcp.local."
DEFAULT_FLEET: Final = "default"
#: RFC 6763 section 6.1: each TXT string (``key=value``) has a one-byte length.
MAX_TXT_ENTRY_BYTES: Final = 255
#: RFC 6763 section 4.1.1: a service instance name is one DNS label.
MAX_INSTANCE_LABEL_BYTES: Final = 63
#: TTL of our records, in seconds. zeroconf's default for TXT is 75 minutes; ours carry live
#: data (free slots) and should vanish soon after a device loses power.
RECORD_TTL_S: Final = 120
#: Least time between two TXT updates of one advertisement, in seconds: each update is a
#: multicast announcement to every listener on the network.
SLOTS_UPDATE_MIN_INTERVAL_S: Final = 2.0
#: How long to wait for a peer's SRV/TXT/A answer after it appears, in milliseconds.
RESOLVE_TIMEOUT_MS: Final = 3000

_FLEET_RE = re.compile(FLEET_NAME_PATTERN)
_TRUNCATABLE = frozenset({"profile", "runtime", "model"})

Interfaces = Literal["all"] | Sequence[str]


class DiscoveryError(PiceError):
    """Zeroconf could not start, advertise, or find what was asked for."""


class CloudNotFoundError(DiscoveryError, NotReachableError):
    """No cloud of the fleet answered on zeroconf in time; it may still be starting."""


class TxtRecordError(ConfigError):
    """A TXT property that does not fit DNS-SD's 255-byte limit and cannot be shortened."""


# --- TXT properties ----------------------------------------------------------------------------

def txt_properties(props: dict[str, str]) -> dict[str, str]:
    """Check every ``key=value`` against the 255-byte limit, truncating descriptive values.

    Raises:
        TxtRecordError: an identifying value (id, fleet, broker, api) is too long.
    """
    out: dict[str, str] = {}
    for key, value in props.items():
        entry = f"{key}={value}".encode()
        if len(entry) > MAX_TXT_ENTRY_BYTES:
            if key not in _TRUNCATABLE:
                raise TxtRecordError(
                    f"zeroconf TXT property {key!r} is {len(entry)} bytes as 'key=value'; DNS-SD allows "
                    f"{MAX_TXT_ENTRY_BYTES} (RFC 6763 6.1): shorten the {key} value"
                )
            room = MAX_TXT_ENTRY_BYTES - len(key) - 1
            value = value.encode()[:room].decode("utf-8", errors="ignore")
            log.debug("zeroconf TXT property %r truncated to %d bytes", key, room)
        out[key] = value
    return out


def _label(text: str) -> str:
    """``text`` cut to one DNS label (63 bytes)."""
    return text.encode()[:MAX_INSTANCE_LABEL_BYTES].decode("utf-8", errors="ignore")


def check_fleet(name: str) -> str:
    """Validate a fleet name (1-63 characters of A-Z a-z 0-9 . _ -)."""
    if not _FLEET_RE.match(name):
        raise ConfigError(f"fleet name {name!r} must be 1-63 characters of A-Z a-z 0-9 . _ -")
    return name


# --- what is advertised -----------------------------------------------------------------------

@dataclass(frozen=True)
class EdgeAdvert:
    """What an edge announces about itself."""

    device_id: str
    fleet: str = DEFAULT_FLEET
    profile: str = ""
    runtime: str = ""
    model_id: str = ""
    free_slots: int = 0
    max_batch: int = 1

    def properties(self) -> dict[str, str]:
        return txt_properties({
            "pv": str(PROTOCOL_VERSION), "id": self.device_id, "fleet": self.fleet, "profile": self.profile,
            "runtime": self.runtime, "model": self.model_id, "slots": str(self.free_slots),
            "batch": str(self.max_batch),
        })


@dataclass(frozen=True)
class CloudAdvert:
    """What the cloud announces: where its broker (and API) are."""

    cloud_id: str
    broker_url: str
    fleet: str = DEFAULT_FLEET
    api_url: str = ""
    #: "site" for a site's own service: a site never takes another site for its cloud.
    role: str = ""

    def properties(self) -> dict[str, str]:
        return txt_properties({
            "pv": str(PROTOCOL_VERSION), "id": self.cloud_id, "fleet": self.fleet, "broker": self.broker_url,
            "api": self.api_url, **({"role": self.role} if self.role else {}),
        })


# --- what is found ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """A PICE service found on the network."""

    kind: Literal["edge", "cloud"]
    #: The zeroconf service instance name (may differ from ``id`` after a name clash).
    name: str
    id: str
    fleet: str
    protocol: str
    addresses: tuple[str, ...]
    port: int
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def compatible(self) -> bool:
        """Whether it speaks our wire protocol version."""
        return self.protocol == str(PROTOCOL_VERSION)

    def int_property(self, key: str) -> int:
        try:
            return max(0, int(self.properties.get(key, "0")))
        except ValueError:
            return 0

    def broker_url(self) -> str:
        """The cloud's broker URL as this host should use it.

        A cloud that advertises ``mqtt://0.0.0.0:1883`` or a loopback host means "my own
        address": it is replaced by the address the advertisement came from (kept as is when
        that is loopback too, i.e. the cloud runs on this host).

        Raises:
            DiscoveryError: not a cloud, or its broker URL is malformed.
        """
        url = self.properties.get("broker", "")
        try:
            parse_broker_url(url)
        except ValueError as exc:
            raise DiscoveryError(f"cloud {self.id!r} advertises an invalid broker URL: {exc}") from exc
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            ip = ipaddress.ip_address(host)
            unspecified, loopback = ip.is_unspecified, ip.is_loopback
        except ValueError:
            unspecified, loopback = False, host == "localhost"
        routable = [a for a in self.addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
        replacement = routable[0] if routable and (unspecified or loopback) else None
        if unspecified and replacement is None:
            replacement = self.addresses[0] if self.addresses else "127.0.0.1"
        if replacement is not None:
            netloc = f"[{replacement}]" if ":" in replacement else replacement
            if parts.port:
                netloc += f":{parts.port}"
            if "@" in parts.netloc:
                netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return url

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "id": self.id, "fleet": self.fleet,
                "protocol": self.protocol, "compatible": self.compatible, "addresses": list(self.addresses),
                "port": self.port, "properties": dict(self.properties)}


def _peer_from_info(kind: Literal["edge", "cloud"], info: AsyncServiceInfo) -> Peer:
    props: dict[str, str] = {}
    for key, value in (info.properties or {}).items():
        try:
            props[key.decode()] = value.decode() if value is not None else ""
        except UnicodeDecodeError:
            continue  # network input: skip what is not text
    instance = info.name[: -len(info.type) - 1] if info.name.endswith(info.type) else info.name
    return Peer(
        kind=kind, name=info.name, id=props.get("id", instance), fleet=props.get("fleet", ""),
        protocol=props.get("pv", ""), addresses=tuple(info.parsed_scoped_addresses()), port=info.port or 0,
        properties=props,
    )


# --- interfaces -------------------------------------------------------------------------------

def parse_interfaces(text: str) -> Interfaces:
    """``"all"`` or a comma-separated list of IP addresses (the CLI's ``--interfaces``)."""
    text = text.strip()
    if text in ("", "all"):
        return "all"
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(
                f"--interfaces: {address!r} is not an IP address; give 'all' or addresses like 127.0.0.1,192.168.1.20"
            ) from None
    return addresses


def _advertised_addresses(interfaces: Interfaces) -> list[str]:
    """The addresses to put in our A/AAAA records."""
    if interfaces != "all":
        return list(interfaces)
    import ifaddr  # zeroconf's own dependency

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return found or ["127.0.0.1"]


# --- the service --------------------------------------------------------------------------------

class Advertisement:
    """One registered service; `set_free_slots` updates its TXT record (rate-limited)."""

    def __init__(self, discovery: Discovery, info: AsyncServiceInfo, advert: EdgeAdvert | CloudAdvert) -> None:
        self._discovery = discovery
        self._info = info
        self.advert = advert
        self._last_update = 0.0
        self._pending: asyncio.Task[None] | None = None
        self._withdrawn = False

    @property
    def name(self) -> str:
        """The registered service name (after any rename on a clash)."""
        return self._info.name

    def set_free_slots(self, free_slots: int) -> None:
        """Record the edge's free slots; the TXT record follows within `SLOTS_UPDATE_MIN_INTERVAL_S`.

        Cheap to call on every status heartbeat: nothing is sent when the value did not change,
        and bursts of changes are coalesced into one announcement.
        """
        if not isinstance(self.advert, EdgeAdvert) or self._withdrawn:
            return
        if self.advert.free_slots == free_slots:
            return
        self.advert = dataclasses.replace(self.advert, free_slots=free_slots)
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._send_update())

    async def _send_update(self) -> None:
        wait = self._last_update + SLOTS_UPDATE_MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._withdrawn:
            return
        self._last_update = time.monotonic()
        self._info = self._discovery._info(self._info.type, self._info.name, self.advert)
        try:
            await self._discovery.zeroconf.async_update_service(self._info)
        except ZeroconfError as exc:
            log.warning("could not update zeroconf record %s: %s", self.name, exc)

    async def withdraw(self) -> None:
        """Unregister (sends a goodbye, so browsers drop it at once)."""
        if self._withdrawn:
            return
        self._withdrawn = True
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pending
        with contextlib.suppress(ZeroconfError):
            await self._discovery.zeroconf.async_unregister_service(self._info)


PeerCallback = Callable[[str, "Peer | None"], None]


class Discovery:
    """Zeroconf for PICE: advertise this device or cloud, browse the others.

    Args:
        interfaces: ``"all"`` (default) or IP addresses of the interfaces to use. Tests pass
            ``["127.0.0.1"]`` so that nothing is multicast beyond this host.
    """

    def __init__(self, interfaces: Interfaces = "all") -> None:
        self.interfaces: Interfaces = interfaces if interfaces == "all" else list(interfaces)
        self._aiozc: AsyncZeroconf | None = None
        self._ads: list[Advertisement] = []
        self._browsers: list[AsyncServiceBrowser] = []
        self._resolving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open the mDNS sockets.

        Raises:
            DiscoveryError: the interfaces cannot be used (bad address, no multicast...).
        """
        if self._aiozc is not None:
            return
        try:
            if self.interfaces == "all":
                self._aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only)
            else:
                self._aiozc = AsyncZeroconf(interfaces=list(self.interfaces))
        except (OSError, ZeroconfError, ValueError) as exc:
            raise DiscoveryError(
                f"cannot start zeroconf on interfaces {self.interfaces}: {exc}; pick others with --interfaces "
                "or pass --broker to skip discovery"
            ) from exc

    async def close(self) -> None:
        """Withdraw every advertisement, stop browsing, close the sockets."""
        for ad in self._ads:
            await ad.withdraw()
        self._ads.clear()
        for browser in self._browsers:
            with contextlib.suppress(Exception):
                await browser.async_cancel()
        self._browsers.clear()
        for task in list(self._resolving):
            task.cancel()
        await asyncio.gather(*self._resolving, return_exceptions=True)
        if self._aiozc is not None:
            await self._aiozc.async_close()
            self._aiozc = None

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def zeroconf(self) -> AsyncZeroconf:
        if self._aiozc is None:
            raise DiscoveryError("discovery is not started; call start() first")
        return self._aiozc

    # --- advertising ---------------------------------------------------------------------

    def _info(self, type_: str, name: str, advert: EdgeAdvert | CloudAdvert) -> AsyncServiceInfo:
        ident = advert.device_id if isinstance(advert, EdgeAdvert) else advert.cloud_id
        host_label = _label(re.sub(r"[^A-Za-z0-9-]", "-", f"pice-{ident}"))
        port = 0
        if isinstance(advert, CloudAdvert):
            port = parse_broker_url(advert.broker_url)[2]
        return AsyncServiceInfo(
            type_, name, port=port, properties=advert.properties(), server=f"{host_label}.local.",
            parsed_addresses=_advertised_addresses(self.interfaces), host_ttl=RECORD_TTL_S, other_ttl=RECORD_TTL_S,
        )

    async def _register(self, type_: str, ident: str, advert: EdgeAdvert | CloudAdvert) -> Advertisement:
        wanted = f"{_label(ident)}.{type_}"
        info = self._info(type_, wanted, advert)
        try:
            await (await self.zeroconf.async_register_service(info, allow_name_change=True))
        except (ZeroconfError, BadTypeInNameException, ValueError) as exc:
            raise DiscoveryError(f"cannot advertise {wanted} with zeroconf: {exc}") from exc
        if info.name != wanted:
            log.warning("zeroconf name %s is taken (another device with id %r?); advertised as %s instead",
                        wanted, ident, info.name)
        ad = Advertisement(self, info, advert)
        self._ads.append(ad)
        log.info("advertising %s on %s", info.name, self.interfaces)
        return ad

    async def advertise_edge(self, advert: EdgeAdvert) -> Advertisement:
        """Register this edge. Raises `TxtRecordError` or `DiscoveryError`."""
        check_fleet(advert.fleet)
        return await self._register(EDGE_SERVICE_TYPE, advert.device_id, advert)

    async def advertise_cloud(self, advert: CloudAdvert) -> Advertisement:
        """Register the cloud and its broker. Raises `TxtRecordError` or `DiscoveryError`."""
        check_fleet(advert.fleet)
        try:
            parse_broker_url(advert.broker_url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return await self._register(CLOUD_SERVICE_TYPE, advert.cloud_id, advert)

    # --- browsing ------------------------------------------------------------------------

    def watch(self, on_change: PeerCallback, *, edges: bool = True, clouds: bool = True) -> None:
        """Call ``on_change(name, peer)`` when a service appears or changes, and
        ``on_change(name, None)`` when it goes away (goodbye or TTL expiry). Runs until `close`."""
        types = [t for t, want in ((EDGE_SERVICE_TYPE, edges), (CLOUD_SERVICE_TYPE, clouds)) if want]
        loop = asyncio.get_running_loop()

        def handler(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            if state_change is ServiceStateChange.Removed:
                on_change(name, None)
                return
            task = loop.create_task(self._resolve(service_type, name, on_change))
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)

        self._browsers.append(AsyncServiceBrowser(self.zeroconf.zeroconf, types, handlers=[handler]))

    async def _resolve(self, service_type: str, name: str, on_change: PeerCallback) -> None:
        info = AsyncServiceInfo(service_type, name)
        try:
            found = await info.async_request(self.zeroconf.zeroconf, RESOLVE_TIMEOUT_MS)
        except (ZeroconfError, OSError) as exc:
            log.debug("cannot resolve %s: %s", name, exc)
            return
        if not found:
            log.debug("no answer resolving %s", name)
            return
        kind: Literal["edge", "cloud"] = "edge" if service_type == EDGE_SERVICE_TYPE else "cloud"
        try:
            on_change(name, _peer_from_info(kind, info))
        except Exception:
            log.exception("discovery callback failed for %s", name)

    async def browse(self, timeout: float = 3.0) -> list[Peer]:
        """Every PICE peer that answers within ``timeout`` seconds (edges and clouds)."""
        peers: dict[str, Peer] = {}

        def collect(name: str, peer: Peer | None) -> None:
            if peer is None:
                peers.pop(name, None)
            else:
                peers[name] = peer

        self.watch(collect)
        await asyncio.sleep(timeout)
        return sorted(peers.values(), key=lambda p: (p.kind, p.fleet, p.id))

    async def find_cloud(self, fleet: str = DEFAULT_FLEET, timeout: float = 30.0) -> Peer:
        """The first cloud of ``fleet`` that speaks our protocol.

        Raises:
            DiscoveryError: none answered within ``timeout`` seconds; the message says what to do.
        """
        found: asyncio.Future[Peer] = asyncio.get_running_loop().create_future()
        others: list[str] = []

        def on_cloud(name: str, peer: Peer | None) -> None:
            if peer is None or found.done():
                return
            if peer.fleet != fleet:
                others.append(f"{peer.id} (fleet {peer.fleet!r})")
            elif not peer.compatible:
                others.append(f"{peer.id} (protocol v{peer.protocol}, this edge speaks v{PROTOCOL_VERSION})")
            else:
                found.set_result(peer)

        self.watch(on_cloud, edges=False)
        try:
            return await asyncio.wait_for(found, timeout)
        except asyncio.TimeoutError:
            seen = f"; found only: {', '.join(others)}" if others else ""
            raise CloudNotFoundError(
                f"no PICE cloud of fleet {fleet!r} answered on zeroconf (interfaces {self.interfaces}) within "
                f"{timeout:.0f}s{seen}; start the cloud, or pass --broker mqtt://HOST:PORT"
            ) from None


__all__ = [
    "CLOUD_SERVICE_TYPE",
    "DEFAULT_FLEET",
    "EDGE_SERVICE_TYPE",
    "MAX_TXT_ENTRY_BYTES",
    "RECORD_TTL_S",
    "Advertisement",
    "CloudAdvert",
    "CloudNotFoundError",
    "Discovery",
    "DiscoveryError",
    "EdgeAdvert",
    "Peer",
    "TxtRecordError",
    "check_fleet",
    "parse_interfaces",
    "txt_properties",
]
