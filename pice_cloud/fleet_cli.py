"""``pice-cloud fleet``: print the live edge fleet as the cloud sees it; roll a model build out.

Connects to the broker (given, or the one the fleet's cloud advertises on zeroconf), collects
the retained status of every edge plus the zeroconf announcements for ``--wait`` seconds, and
prints one row per edge. Edges only seen on zeroconf are listed with state ``seen``: they are not
scheduled until their MQTT status arrives (see `pice_cloud.fleet`).

Below the table it says how the fleet stands against its rollout (`summarize`): the rollout
announced and how many live edges run it (naming those that do not, with their rollout state:
retrying, failed, withdrawn), or, with no rollout announced, a fleet whose live edges run
different builds of a model as **mixed**. Edges keep the build a rollout gave them after it is
cleared, also across restarts (`pice_edge.rollout`); a fleet left mixed by a cleared rollout
stays mixed until a new rollout (or a rollback) names one build.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pice_cloud.fleet import Fleet, FleetEntry
from pice_cloud.rollout_states import RolloutStates
from pice_edge.discovery import DEFAULT_FLEET, Discovery, check_fleet, parse_interfaces
from pice_edge.errors import ConfigError, ProtocolError
from pice_edge.protocol import (
    EDGE_ROLLOUT_FILTER,
    EDGE_STATUS_FILTER,
    FLEET_ROLLOUT_TOPIC,
    EdgeRolloutState,
    FleetRollout,
    decode,
    encode,
    runs,
)
from pice_edge.transport import BrokerSettings, Message, MqttTransport


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``fleet`` on the ``pice-cloud`` sub-command parser."""
    fleet = sub.add_parser("fleet", help="print the live edge fleet", parents=parents)
    fleet.add_argument("--broker", default=None,
                       help="mqtt://host:port (default: the broker the cloud of --fleet advertises on zeroconf)")
    fleet.add_argument("--fleet", default=DEFAULT_FLEET, help="fleet name on zeroconf (default %(default)s)")
    fleet.add_argument("--interfaces", default="all", help="zeroconf interfaces: 'all' or comma-separated IPs")
    fleet.add_argument("--no-zeroconf", action="store_true", help="MQTT statuses only (needs --broker)")
    from pice_edge.credentials import CLOUD_USERNAME, add_credential_options

    add_credential_options(fleet, default_username=CLOUD_USERNAME)
    fleet.add_argument("--wait", type=float, default=3.0,
                       help="seconds to collect statuses and announcements once connected (default %(default)s; "
                            f"finding the broker on zeroconf may take up to {FIND_CLOUD_S:.0f} s more)")
    fleet.add_argument("--json", action="store_true", help="print the fleet as JSON")
    fleet.add_argument("--rollout", metavar="MODEL", default=None,
                       help="ask every edge to run this model from the cloud's store (its current build): edges "
                            "fetch it from --source, verify it and switch between batches")
    fleet.add_argument("--source", metavar="URL", default=None,
                       help="the cloud's HTTP API that offers the model (pice-cloud serve), for --rollout")
    fleet.add_argument("--models-dir", default=None, help="the cloud's model store (default: PICE_MODELS_DIR "
                                                          "or ~/.cache/pice/models), for --rollout")
    fleet.add_argument("--clear-rollout", action="store_true", help="withdraw the fleet's rollout message")
    # --watch: the cloud's fleet page in the terminal (pice_cloud.fleet_watch).
    fleet.add_argument("--watch", action="store_true",
                       help="redraw the fleet every --interval seconds until Ctrl-C: with --cloud URL the cloud's "
                            "whole view (requests, cloud work, refusals), else the edges and rollout from the broker")
    fleet.add_argument("--cloud", metavar="URL", default=None,
                       help="the cloud's HTTP API (pice-cloud serve), for --watch: reads its /fleet/state")
    fleet.add_argument("--api-key", default=os.environ.get("PICE_API_KEY"),
                       help="the cloud's API key for --cloud (default: $PICE_API_KEY)")
    fleet.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default %(default)s)")
    fleet.add_argument("--watch-count", type=int, default=None, help=argparse.SUPPRESS)  # redraws, for scripts


@dataclass
class FleetView:
    """What `collect_view` heard: the edges, the fleet's rollout, and each edge's rollout state."""

    broker_url: str
    rows: list[FleetEntry]
    #: The rollout announced (retained), or None.
    rollout: FleetRollout | None = None
    #: Each edge's latest `EdgeRolloutState`, by device id.
    rollout_states: dict[str, EdgeRolloutState] = field(default_factory=dict)


class _RolloutListener:
    """Collects the fleet's rollout message and the edges' rollout states (invalid ones ignored:
    this is a read-only view)."""

    def __init__(self) -> None:
        self.rollout: FleetRollout | None = None
        self._states = RolloutStates()
        self.on_state = self._states.handle

    @property
    def states(self) -> dict[str, EdgeRolloutState]:
        return self._states.states

    def on_rollout(self, message: Message) -> None:
        try:
            self.rollout = decode(FleetRollout, message.payload) if message.payload else None
        except ProtocolError:
            self.rollout = None


# Finding the broker is not part of --wait (the listening time): a cloud's zeroconf answer can take a few
# seconds on a busy host, and find_cloud returns as soon as it comes.
FIND_CLOUD_S = 10.0


@contextlib.asynccontextmanager
async def listening(broker_url: str | None, *, credentials: dict[str, Any] | None = None,
                    fleet_name: str = DEFAULT_FLEET, interfaces: Any = "all", zeroconf: bool = True,
                    timeout: float = 3.0) -> AsyncIterator[tuple[str, Fleet, _RolloutListener, MqttTransport]]:
    """A read-only connection to the fleet's broker (given, or the fleet's cloud's on zeroconf):
    (broker URL, the fleet's edges, the rollout and the edges' rollout states, the connection),
    kept up for the block.

    Raises:
        ConfigError: no broker given and zeroconf disabled.
        DiscoveryError: no broker given and no cloud of the fleet found on zeroconf.
        TransportError: the broker cannot be reached.
    """
    if broker_url is None and not zeroconf:
        raise ConfigError("--no-zeroconf needs --broker mqtt://HOST:PORT")
    fleet = Fleet()
    listener = _RolloutListener()
    discovery = Discovery(interfaces) if zeroconf else None
    transport: MqttTransport | None = None
    try:
        if discovery is not None:
            await discovery.start()
            fleet.watch_zeroconf(discovery, fleet_name)
            if broker_url is None:
                broker_url = (await discovery.find_cloud(fleet_name, timeout=max(timeout, FIND_CLOUD_S))).broker_url()
        assert broker_url is not None
        transport = MqttTransport(BrokerSettings(url=broker_url, **(credentials or {})),
                                  client_id=f"pice-fleet-{uuid.uuid4().hex[:8]}",
                                  rejections=fleet.rejections)
        transport.add_subscription(EDGE_STATUS_FILTER, fleet.handle_status)
        transport.add_subscription(FLEET_ROLLOUT_TOPIC, listener.on_rollout)
        transport.add_subscription(EDGE_ROLLOUT_FILTER, listener.on_state)
        # connect() returns once the SUBACK is in, so retained statuses are on their way.
        await transport.connect(timeout=max(timeout, 3.0))
        yield broker_url, fleet, listener, transport
    finally:
        if transport is not None:
            await transport.close()
        if discovery is not None:
            await discovery.close()


async def collect(broker_url: str | None, *, credentials: dict[str, Any] | None = None,
                  fleet_name: str = DEFAULT_FLEET, interfaces: Any = "all",
                  zeroconf: bool = True, wait_s: float = 3.0) -> tuple[str, list[FleetEntry]]:
    """(broker URL used, fleet snapshot) after listening for ``wait_s`` seconds (`collect_view`)."""
    view = await collect_view(broker_url, credentials=credentials, fleet_name=fleet_name, interfaces=interfaces,
                              zeroconf=zeroconf, wait_s=wait_s)
    return view.broker_url, view.rows


async def collect_view(broker_url: str | None, *, credentials: dict[str, Any] | None = None,
                       fleet_name: str = DEFAULT_FLEET, interfaces: Any = "all",
                       zeroconf: bool = True, wait_s: float = 3.0) -> FleetView:
    """The fleet, its rollout and the edges' rollout states after listening for ``wait_s`` seconds
    (raises as `listening`)."""
    async with listening(broker_url, credentials=credentials, fleet_name=fleet_name, interfaces=interfaces,
                         zeroconf=zeroconf, timeout=wait_s) as (url, fleet, listener, _):
        # Lets live heartbeats and zeroconf adverts arrive after the retained statuses.
        await asyncio.sleep(wait_s)
        return FleetView(url, fleet.snapshot(), listener.rollout, dict(listener.states))


def _fmt(value: float | int | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def format_fleet(rows: list[FleetEntry]) -> str:
    """The fleet as an aligned text table."""
    table = [("DEVICE", "STATE", "PROFILE", "RUNTIME", "MODEL", "TOK/S", "QUEUE", "FREE", "AGE", "SOURCES")]
    for r in rows:
        table.append((r.device_id, r.state, r.profile or "-", r.runtime or "-", r.model_id or "-",
                      _fmt(r.tokens_per_s, ".1f"), _fmt(r.queue_depth), f"{r.free_slots}/{r.max_batch}",
                      f"{r.age_s:.1f}s", "+".join(r.sources)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)


def builds_of(rows: list[FleetEntry]) -> dict[str, list[str]]:
    """The live edges by the model build they report (``NAME@BUILD``, or a bare model id)."""
    builds: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row.state == "live":
            builds[row.model_id or "-"].append(row.device_id)
    return dict(sorted(builds.items()))


def is_mixed(rows: list[FleetEntry]) -> bool:
    """Whether live edges run different builds of one model (NAME@A beside NAME@B): the state a
    rollout in progress, an edge that failed one, or an edge with ``--no-rollout`` leaves."""
    by_name: dict[str, set[str]] = defaultdict(set)
    for model_id in builds_of(rows):
        name, _, build = model_id.partition("@")
        by_name[name].add(build)
    return any(len(builds) > 1 for builds in by_name.values())


def _describe_state(state: EdgeRolloutState, now: float) -> str:
    if state.phase == "retrying" and state.retry_at is not None:
        return (f"retrying (attempt {state.attempt}, next in {max(0.0, state.retry_at - now):.0f}s): "
                f"{state.detail}")
    return f"{state.phase}: {state.detail}" if state.detail else state.phase


def summarize(view: FleetView, *, now: float | None = None) -> list[str]:
    """Lines under the table: how the live fleet stands against its rollout, or that it is mixed."""
    now = time.time() if now is None else now
    live = [r for r in view.rows if r.state == "live"]
    builds = builds_of(view.rows)
    lines: list[str] = []
    rollout = view.rollout
    if rollout is not None:
        target = f"{rollout.model}@{rollout.build}"
        behind = [r for r in live if not runs(r.model_id, rollout.model, rollout.build)]
        lines.append(f"rollout {target} (from {rollout.source}): {len(live) - len(behind)} of {len(live)} live edges "
                     "run it" + ("" if behind else "; done"))
        for row in behind:
            state = view.rollout_states.get(row.device_id)
            doing = (_describe_state(state, now) if state is not None and (state.model, state.build)
                     == (rollout.model, rollout.build) else "not following (pice-edge run --no-rollout?) or not "
                     "started yet")
            lines.append(f"  {row.device_id}: runs {row.model_id or '-'}; {doing}")
    if is_mixed(view.rows):
        parts = "; ".join(f"{build} on {', '.join(devices)}" for build, devices in builds.items())
        lines.append(f"mixed fleet: {len(builds)} builds among {len(live)} live edges: {parts}")
        if rollout is None:
            lines.append("  no rollout is announced (cleared?): edges keep their builds, restarts too; "
                         "`pice-cloud fleet --rollout NAME --source URL` brings them to one")
    return lines


def rollout_message(model: str, source: str, models_root: Path | None = None) -> FleetRollout:
    """The rollout of ``model``'s current build in the cloud's model store.

    Raises:
        ConfigError: the model is not in the store, or has no manifest.
    """
    from pice_edge.model_store import build_id, models_dir

    folder = (models_root.expanduser() if models_root else models_dir()) / model
    build = build_id(folder)
    if build is None:
        raise ConfigError(f"{model!r} is not in the model store {folder.parent} (no manifest): fetch or install it "
                          "there first")
    return FleetRollout(model=model, build=build, source=source, cloud_id=f"pice-fleet-{uuid.uuid4().hex[:8]}")


async def publish_rollout(broker_url: str, rollout: FleetRollout | None, *,
                          credentials: dict[str, Any] | None = None) -> None:
    """Publish (retained) or, with ``None``, withdraw the fleet's rollout message."""
    transport = MqttTransport(BrokerSettings(url=broker_url, **(credentials or {})),
                              client_id=f"pice-fleet-{uuid.uuid4().hex[:8]}")
    await transport.connect()
    try:
        payload = encode(rollout) if rollout is not None else b""
        if not await transport.publish_and_wait(FLEET_ROLLOUT_TOPIC, payload, retain=True, timeout=10):
            raise ConfigError(f"the broker did not confirm the rollout message on {FLEET_ROLLOUT_TOPIC} (ACL?)")
    finally:
        await transport.close()


async def run(args: argparse.Namespace) -> int:
    """The ``pice-cloud fleet`` command."""
    from pice_edge.credentials import CLOUD_USERNAME, credential_fields

    credentials = credential_fields(args, default_username=CLOUD_USERNAME)
    if args.watch:
        from pice_cloud.fleet_watch import run_watch

        return await run_watch(args, credentials)
    if args.rollout or args.clear_rollout:
        if args.broker is None:
            raise ConfigError("--rollout and --clear-rollout need --broker mqtt://HOST:PORT")
        if args.rollout and not args.source:
            raise ConfigError("--rollout needs --source http://CLOUD:PORT (where edges fetch the model)")
        root = Path(args.models_dir) if args.models_dir else None
        message = await asyncio.to_thread(rollout_message, args.rollout, args.source, root) if args.rollout else None
        await publish_rollout(args.broker, message, credentials=credentials)
        print(f"rollout: {message.model}@{message.build} from {message.source}" if message else "rollout withdrawn")
        return 0
    view = await collect_view(args.broker, credentials=credentials, fleet_name=check_fleet(args.fleet),
                              interfaces=parse_interfaces(args.interfaces), zeroconf=not args.no_zeroconf,
                              wait_s=args.wait)
    rows = view.rows
    if args.json:
        print(json.dumps({"broker": view.broker_url, "fleet": args.fleet, "edges": [r.as_dict() for r in rows],
                          "builds": builds_of(rows), "mixed": is_mixed(rows),
                          "rollout": view.rollout.model_dump(mode="json") if view.rollout else None,
                          "rollout_states": {d: s.model_dump(mode="json") for d, s in view.rollout_states.items()},
                          "summary": summarize(view)}, indent=2))
        return 0
    if rows:
        print(format_fleet(rows))
    else:
        print(f"no edges on {view.broker_url} (fleet {args.fleet!r})")
    for line in summarize(view):
        print(line)
    return 0
