"""``pice-cloud fleet``: print the live edge fleet as the cloud sees it; roll a model build out.

Connects to the broker (given, or the one the fleet's cloud advertises on zeroconf), collects
the retained status of every edge plus the zeroconf announcements for ``--wait`` seconds, and
prints one row per edge. Edges only seen on zeroconf are listed with state ``seen``: they are not
scheduled until their MQTT status arrives (see `pice_cloud.fleet`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from pice_cloud.fleet import Fleet, FleetEntry
from pice_edge.discovery import DEFAULT_FLEET, Discovery, check_fleet, parse_interfaces
from pice_edge.errors import ConfigError
from pice_edge.protocol import EDGE_STATUS_FILTER, FLEET_ROLLOUT_TOPIC, FleetRollout, encode
from pice_edge.transport import BrokerSettings, MqttTransport


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
                       help="seconds to collect statuses and announcements (default %(default)s)")
    fleet.add_argument("--json", action="store_true", help="print the fleet as JSON")
    fleet.add_argument("--rollout", metavar="MODEL", default=None,
                       help="ask every edge to run this model from the cloud's store (its current build): edges "
                            "fetch it from --source, verify it and switch between batches")
    fleet.add_argument("--source", metavar="URL", default=None,
                       help="the cloud's HTTP API that offers the model (pice-cloud serve), for --rollout")
    fleet.add_argument("--models-dir", default=None, help="the cloud's model store (default: PICE_MODELS_DIR "
                                                          "or ~/.cache/pice/models), for --rollout")
    fleet.add_argument("--clear-rollout", action="store_true", help="withdraw the fleet's rollout message")


async def collect(broker_url: str | None, *, credentials: dict[str, Any] | None = None,
                  fleet_name: str = DEFAULT_FLEET, interfaces: Any = "all",
                  zeroconf: bool = True, wait_s: float = 3.0) -> tuple[str, list[FleetEntry]]:
    """(broker URL used, fleet snapshot) after listening for ``wait_s`` seconds.

    Raises:
        ConfigError: no broker given and zeroconf disabled.
        DiscoveryError: no broker given and no cloud of the fleet found on zeroconf.
        TransportError: the broker cannot be reached.
    """
    if broker_url is None and not zeroconf:
        raise ConfigError("--no-zeroconf needs --broker mqtt://HOST:PORT")
    fleet = Fleet()
    discovery = Discovery(interfaces) if zeroconf else None
    transport: MqttTransport | None = None
    try:
        if discovery is not None:
            await discovery.start()
            fleet.watch_zeroconf(discovery, fleet_name)
            if broker_url is None:
                broker_url = (await discovery.find_cloud(fleet_name, timeout=max(wait_s, 1.0))).broker_url()
        assert broker_url is not None
        transport = MqttTransport(BrokerSettings(url=broker_url, **(credentials or {})),
                                  client_id=f"pice-fleet-{uuid.uuid4().hex[:8]}",
                                  rejections=fleet.rejections)
        transport.add_subscription(EDGE_STATUS_FILTER, fleet.handle_status)
        # connect() returns once the SUBACK is in, so retained statuses are on their way; the
        # wait lets live heartbeats and zeroconf adverts arrive too.
        await transport.connect(timeout=max(wait_s, 3.0))
        await asyncio.sleep(wait_s)
        return broker_url, fleet.snapshot()
    finally:
        if transport is not None:
            await transport.close()
        if discovery is not None:
            await discovery.close()


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
    broker_url, rows = await collect(args.broker, credentials=credentials, fleet_name=check_fleet(args.fleet),
                                     interfaces=parse_interfaces(args.interfaces), zeroconf=not args.no_zeroconf,
                                     wait_s=args.wait)
    if args.json:
        print(json.dumps({"broker": broker_url, "fleet": args.fleet, "edges": [r.as_dict() for r in rows]}, indent=2))
    elif rows:
        print(format_fleet(rows))
    else:
        print(f"no edges on {broker_url} (fleet {args.fleet!r})")
    return 0
