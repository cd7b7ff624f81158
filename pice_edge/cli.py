"""``pice-edge``: run an edge node, check the device, find peers, manage models.

    pice-edge run [--broker mqtt://HOST:PORT] [--profile NAME|FILE] [--device-id ID] [--model NAME|PATH]
                  [--username U] [--password-file F] [--ca-file F] [--cert-file F --key-file F]
    pice-edge doctor [--profile NAME|FILE] [--broker URL] [--json]
    pice-edge discover [--fleet NAME] [--json]
    pice-edge profiles
    pice-edge models fetch [NAME] [--force] [--gguf] [--from CLOUD_URL]
    pice-edge models list
    pice-edge models verify [NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pice_edge.credentials import add_credential_options
from pice_edge.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, ConfigError, NotReachableError, PiceError
from pice_edge.logs import log_level_option, setup_logging
from pice_edge.model_store import DEFAULT_MODEL

if TYPE_CHECKING:
    from pice_edge.assembly import EdgeSettings
    from pice_edge.transport import BrokerSettings

T = TypeVar("T")

log = logging.getLogger("pice_edge.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pice-edge", description="PICE edge node", parents=[log_level_option("info")])
    common = [log_level_option()]

    sub = parser.add_subparsers(dest="command", required=True)

    # Options shared by `run` and `doctor`: what the edge runs with. Defaults are None so that a
    # flag given on the command line can be told apart from the profile's value.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--profile", default=None, help="device profile name or YAML file (see `pice-edge profiles`)")
    config.add_argument("--broker", default=None,
                        help="mqtt://host:port; default: the broker the cloud of --fleet advertises on zeroconf")
    config.add_argument("--model", default=None, help=f"model name or Hugging Face folder (default {DEFAULT_MODEL})")
    config.add_argument("--runtime", default=None, help="inference runtime (default: the profile's, or transformers)")
    config.add_argument("--fleet", default="default", help="fleet name to join on zeroconf (default %(default)s)")
    config.add_argument("--interfaces", default="all",
                        help="zeroconf interfaces: 'all' or comma-separated IP addresses (default %(default)s)")

    run = sub.add_parser("run", help="serve expansion tasks from the broker", parents=[*common, config])
    run.add_argument("--device-id", default=socket.gethostname().split(".")[0], help="default: host name")
    run.add_argument("--max-batch", type=int, default=None, help="default: the profile's, or 4")
    run.add_argument("--threads", type=int, default=None, help="CPU threads for the runtime")
    run.add_argument("--heartbeat", type=float, default=2.0, help="status interval in seconds")
    run.add_argument("--no-rollout", action="store_true",
                     help="ignore the fleet's model rollout (pice-cloud fleet --rollout); by default the node "
                          "fetches the announced build from the cloud, verifies it and switches between batches")
    run.add_argument("--no-zeroconf", action="store_true", help="neither advertise nor discover (needs --broker)")
    run.add_argument("--discover-timeout", type=float, default=30.0,
                     help="seconds to look for the cloud when --broker is not given (default %(default)s)")

    doctor = sub.add_parser("doctor", help="check this device, its model and the broker", parents=[*common, config])
    doctor.add_argument("--timeout", type=float, default=3.0, help="seconds per network check (default %(default)s)")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument("--device-id", default=socket.gethostname().split(".")[0],
                        help="the id `run` will use: the broker's ACL must let it publish its status (default: host "
                             "name)")
    add_credential_options(doctor, default_username="the device id")

    discover = sub.add_parser("discover", help="list PICE edges and clouds on the network (zeroconf)",
                              parents=common)
    discover.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default %(default)s)")
    discover.add_argument("--fleet", default=None, help="only this fleet (default: all)")
    discover.add_argument("--interfaces", default="all", help="'all' or comma-separated IP addresses")
    discover.add_argument("--json", action="store_true", help="print the peers as JSON")

    run.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8", "int4"],
                     help="onnxruntime: which ONNX export to load (tools/export_onnx.py); default: the profile's")
    run.add_argument("--providers", default=None,
                     help="onnxruntime: execution providers in order of preference, e.g. tensorrt,cuda,cpu "
                          "(default: the profile's, or tensorrt,cuda,cpu)")
    run.add_argument("--memory-budget-mb", type=float, default=None,
                     help="KV-cache budget of a batch in MiB (default: the profile's memory budget less the weights)")
    add_credential_options(run, default_username="the device id")

    sub.add_parser("profiles", help="list the device profiles", parents=common)

    models = sub.add_parser("models", help="fetch, list and verify models", parents=common)
    msub = models.add_subparsers(dest="models_command", required=True)
    fetch = msub.add_parser("fetch", help="download, verify and convert a model", parents=common)
    fetch.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.add_argument("--gguf", action="store_true",
                       help="keep the original GGUF file instead (for llama.cpp's server) and print its path")
    fetch.add_argument("--from", dest="source", metavar="URL", nargs="?", const=_ZEROCONF, default=None,
                       help="download the model from a cloud's HTTP API (pice-cloud serve), e.g. "
                            "http://cloud:8000: resumable, every file checked, installed atomically; "
                            "--from alone: the API of the fleet's cloud found on zeroconf")
    fetch.add_argument("--fleet", default="default", help="fleet name on zeroconf, for --from without a URL")
    fetch.add_argument("--interfaces", default="all", help="zeroconf interfaces for --from without a URL: 'all' "
                                                           "or comma-separated IP addresses")
    fetch.add_argument("--api-key", default=os.environ.get("PICE_API_KEY"),
                       help="the cloud's API key for --from (default: $PICE_API_KEY)")
    msub.add_parser("list", help="known models and whether they are here")
    verify = msub.add_parser("verify", help="check every file's SHA-256")
    verify.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    return parser


# --- broker credentials and TLS (tools/mosquitto/ makes them) -------------------------------
# The password never travels on the command line (other users see argv): it comes from
# PICE_BROKER_PASSWORD or from a file. Each option also reads an environment variable, for
# systemd units and containers.

def _broker_settings(args: argparse.Namespace, url: str) -> BrokerSettings:
    from pice_edge.credentials import broker_settings

    return broker_settings(args, url, default_username=args.device_id)


def _config(args: argparse.Namespace) -> EdgeSettings:
    """The edge's settings: the flags given over the profile's over the built-in defaults."""
    from pice_edge.assembly import resolve_settings
    from pice_edge.profiles import load_profile

    providers = getattr(args, "providers", None)
    return resolve_settings(
        load_profile(args.profile) if args.profile else None,
        model=args.model, runtime=args.runtime, max_batch=getattr(args, "max_batch", None),
        threads=getattr(args, "threads", None), precision=getattr(args, "precision", None),
        providers=tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else None,
        memory_budget_mb=getattr(args, "memory_budget_mb", None),
    )


async def _until(stop: asyncio.Event, coro: Coroutine[Any, Any, T]) -> T | None:
    """Run ``coro`` unless ``stop`` is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def _run(args: argparse.Namespace) -> int:
    from pice_edge.assembly import assemble_edge
    from pice_edge.discovery import Discovery, EdgeAdvert, check_fleet, parse_interfaces
    from pice_edge.node import EdgeNode
    from pice_edge.protocol import is_valid_id

    cfg = _config(args)
    interfaces = parse_interfaces(args.interfaces)
    fleet = check_fleet(args.fleet)
    if not is_valid_id(args.device_id):
        raise ConfigError(f"--device-id {args.device_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    if args.no_zeroconf and args.broker is None:
        raise ConfigError("--no-zeroconf needs --broker mqtt://HOST:PORT (there is nothing else to find it by)")
    # A malformed URL or unreadable TLS file fails before the model loads.
    broker = _broker_settings(args, args.broker) if args.broker else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    discovery = None if args.no_zeroconf else Discovery(interfaces)
    node: EdgeNode | None = None
    try:
        if discovery is not None:
            await discovery.start()
        if broker is None:
            assert discovery is not None
            log.info("no --broker: looking for the cloud of fleet %r on zeroconf", fleet)
            cloud = await _until(stop, discovery.find_cloud(fleet, args.discover_timeout))
            if cloud is None:
                return 0
            broker = _broker_settings(args, cloud.broker_url())
            log.info("found cloud %s: broker %s", cloud.id, broker.url)
        # Found the broker first (fail fast), then load the model (on a worker thread: this loop
        # keeps answering mDNS queries and signals while the weights load).
        node = await assemble_edge(cfg, device_id=args.device_id, broker=broker, heartbeat_s=args.heartbeat,
                                   follow_rollout=not args.no_rollout, api_key=os.environ.get("PICE_API_KEY"))
        runtime = node.runtime
        await node.start()
        if discovery is not None:
            ad = await discovery.advertise_edge(EdgeAdvert(
                device_id=args.device_id, fleet=fleet, profile=cfg.profile_name, runtime=runtime.name,
                model_id=runtime.model_id, free_slots=cfg.max_batch, max_batch=cfg.max_batch))
            node.status_listeners.append(lambda status: ad.set_free_slots(status.free_slots))
        log.info("edge %s serving %s on %s", args.device_id, runtime.model_id, broker.url)
        await stop.wait()
        log.info("shutting down")
    finally:
        if discovery is not None:
            await discovery.close()  # goodbye packets first: browsers drop this edge at once
        if node is not None:
            await node.stop()
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from pice_edge.discovery import check_fleet, parse_interfaces
    from pice_edge.doctor import DoctorConfig, failed, format_checks, report_json, run_checks

    cfg = _config(args)
    from pice_edge.credentials import credential_fields

    doctor_cfg = DoctorConfig(model=cfg.model, runtime=cfg.runtime, profile=cfg.profile, broker_url=args.broker,
                              fleet=check_fleet(args.fleet), interfaces=parse_interfaces(args.interfaces),
                              timeout_s=args.timeout, device_id=args.device_id,
                              credentials=credential_fields(args, default_username=args.device_id))
    checks = asyncio.run(run_checks(doctor_cfg))
    if args.json:
        print(json.dumps(report_json(checks), indent=2))
    else:
        what = f"profile {cfg.profile.name}" if cfg.profile else "no profile"
        print(f"pice-edge doctor ({what}, runtime {cfg.runtime}, model {cfg.model})\n")
        print(format_checks(checks))
    return 1 if failed(checks) else 0


def _discover(args: argparse.Namespace) -> int:
    from pice_edge.discovery import Discovery, DiscoveryError, Peer, parse_interfaces

    async def browse() -> list[Peer]:
        async with Discovery(parse_interfaces(args.interfaces)) as discovery:
            return await discovery.browse(args.timeout)

    peers = [p for p in asyncio.run(browse()) if args.fleet is None or p.fleet == args.fleet]
    if args.json:
        rows = []
        for peer in peers:
            row = peer.as_dict()
            if peer.kind == "cloud":
                try:
                    row["broker_url"] = peer.broker_url()
                except DiscoveryError as exc:
                    row["broker_url"] = None
                    row["error"] = str(exc)
            rows.append(row)
        print(json.dumps(rows, indent=2))
        return 0
    if not peers:
        print(f"no PICE edges or clouds answered within {args.timeout:.0f}s on interfaces {args.interfaces}",
              file=sys.stderr)
        return 0
    table = [("KIND", "ID", "FLEET", "ADDRESS", "DETAILS")]
    for peer in peers:
        props = peer.properties
        if peer.kind == "cloud":
            try:
                details = f"broker {peer.broker_url()}"
            except DiscoveryError:
                details = f"broker {props.get('broker', '')!r} (invalid)"
            if props.get("api"):
                details += f"  api {props['api']}"
        else:
            details = (f"profile {props.get('profile') or '-'}  runtime {props.get('runtime', '')}  "
                       f"model {props.get('model', '')}  slots {props.get('slots', '?')}/{props.get('batch', '?')}")
        if not peer.compatible:
            details += f"  [protocol v{peer.protocol or '?'}: incompatible]"
        table.append((peer.kind, peer.id, peer.fleet or "-", ",".join(peer.addresses) or "-", details))
    print(_format_table(table))
    return 0


def _format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows)


def _profiles() -> int:
    from pice_edge.profiles import list_profiles, load_profile

    rows = [("NAME", "RUNTIME", "PRECISION", "BATCH", "MEMORY", "FILE")]
    for name, path in list_profiles().items():
        p = load_profile(path)
        rows.append((name, p.runtime, p.precision, str(p.max_batch), f"{p.memory_budget_mb} MB", str(path)))
    print(_format_table(rows))
    return 0


_ZEROCONF = "zeroconf"


async def _cloud_api_url(fleet: str, interfaces: str) -> str:
    """The HTTP API of the fleet's cloud, from its zeroconf advertisement."""
    from pice_edge.discovery import Discovery, check_fleet, parse_interfaces

    discovery = Discovery(parse_interfaces(interfaces))
    await discovery.start()
    try:
        cloud = await discovery.find_cloud(check_fleet(fleet), timeout=10.0)
    finally:
        await discovery.close()
    api = cloud.properties.get("api", "")
    if not api:
        raise ConfigError(f"the cloud {cloud.id} of fleet {fleet!r} advertises no HTTP API; pass --from URL")
    return api


def _models(args: argparse.Namespace) -> int:
    from pice_edge import model_store

    if args.models_command == "fetch" and args.source:
        from pice_edge.model_transfer import fetch_from

        source = asyncio.run(_cloud_api_url(args.fleet, args.interfaces)) if args.source == _ZEROCONF \
            else args.source
        path = fetch_from(source, args.name, api_key=args.api_key, progress=sys.stderr.isatty())
        print(f"{args.name}: ready in {path}")
    elif args.models_command == "fetch" and args.gguf:
        print(model_store.fetch_gguf(args.name))
    elif args.models_command == "fetch":
        path = model_store.fetch(args.name, force=args.force)
        print(f"{args.name}: ready in {path}")
    elif args.models_command == "list":
        print(json.dumps(model_store.list_models(), indent=2))
    else:
        path = model_store.resolve(args.name)
        model_store.check_manifest(path, full=True)
        print(f"{args.name}: every file in {path} matches its SHA-256")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "discover":
            return _discover(args)
        if args.command == "profiles":
            return _profiles()
        return _models(args)
    except NotReachableError as exc:
        # Not a configuration problem: the broker or the cloud may come up later (a power cut that
        # brings the broker up last). EXIT_UNAVAILABLE tells systemd to restart us.
        print(f"pice-edge: unavailable: {exc} (exit {EXIT_UNAVAILABLE}: try again later)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PiceError as exc:
        print(f"pice-edge: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
