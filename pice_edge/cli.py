"""``pice-edge``: run an edge node and manage its models.

    pice-edge run --broker mqtt://HOST:PORT [--device-id ID] [--model NAME|PATH]
                  [--username U] [--password-file F] [--ca-file F] [--cert-file F --key-file F]
    pice-edge models fetch [NAME] [--force]
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
from typing import TYPE_CHECKING

from pice_edge.errors import PiceError
from pice_edge.logs import log_level_option, setup_logging

if TYPE_CHECKING:
    from pice_edge.transport import BrokerSettings

log = logging.getLogger("pice_edge.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pice-edge", description="PICE edge node", parents=[log_level_option("info")])
    common = [log_level_option()]

    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve expansion tasks from the broker", parents=common)
    run.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port (default %(default)s)")
    run.add_argument("--device-id", default=socket.gethostname().split(".")[0], help="default: host name")
    run.add_argument("--model", default="smollm2-135m-instruct", help="model name or Hugging Face folder")
    run.add_argument("--runtime", default="transformers")
    run.add_argument("--max-batch", type=int, default=4)
    run.add_argument("--threads", type=int, default=None, help="CPU threads for the runtime")
    run.add_argument("--heartbeat", type=float, default=2.0, help="status interval in seconds")
    _broker_auth_options(run)

    models = sub.add_parser("models", help="fetch, list and verify models", parents=common)
    msub = models.add_subparsers(dest="models_command", required=True)
    fetch = msub.add_parser("fetch", help="download, verify and convert a model", parents=common)
    fetch.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    msub.add_parser("list", help="known models and whether they are here")
    verify = msub.add_parser("verify", help="check every file's SHA-256")
    verify.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    return parser


# --- broker credentials and TLS (tools/mosquitto/ makes them) -------------------------------
# The password never travels on the command line (other users see argv): it comes from
# PICE_BROKER_PASSWORD or from a file. Each option also reads an environment variable, for
# systemd units and containers.

def _broker_auth_options(run: argparse.ArgumentParser) -> None:
    env = os.environ.get
    run.add_argument("--username", default=env("PICE_BROKER_USERNAME"),
                     help="broker account (default $PICE_BROKER_USERNAME, else the device id when a password is set)")
    run.add_argument("--password-file", default=env("PICE_BROKER_PASSWORD_FILE"),
                     help="file holding the broker password (default $PICE_BROKER_PASSWORD_FILE; "
                          "or put the password itself in $PICE_BROKER_PASSWORD)")
    run.add_argument("--ca-file", default=env("PICE_BROKER_CA_FILE"),
                     help="CA certificate that signed the broker's (TLS; default $PICE_BROKER_CA_FILE)")
    run.add_argument("--cert-file", default=env("PICE_BROKER_CERT_FILE"),
                     help="this device's client certificate (mutual TLS; default $PICE_BROKER_CERT_FILE)")
    run.add_argument("--key-file", default=env("PICE_BROKER_KEY_FILE"),
                     help="this device's client key (mutual TLS; default $PICE_BROKER_KEY_FILE)")


def _broker_settings(args: argparse.Namespace) -> BrokerSettings:
    from pydantic import SecretStr, ValidationError

    from pice_edge.errors import ConfigError
    from pice_edge.transport import BrokerSettings

    password = os.environ.get("PICE_BROKER_PASSWORD")
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the broker password file {args.password_file}: {exc.strerror}") from exc
    username = args.username or (args.device_id if password else None)
    try:
        return BrokerSettings(url=args.broker, username=username, password=SecretStr(password) if password else None,
                              ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"broker settings: {first['msg']} (check --broker and the TLS options)") from None


async def _run(args: argparse.Namespace) -> int:
    from pice_edge.node import EdgeNode
    from pice_edge.runtimes import create_runtime

    broker = _broker_settings(args)
    runtime = create_runtime(args.runtime, model=args.model, threads=args.threads)
    node = EdgeNode(runtime, device_id=args.device_id, broker=broker,
                    max_batch=args.max_batch, heartbeat_s=args.heartbeat)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await node.start()
    log.info("edge %s serving %s on %s", args.device_id, runtime.model_id, args.broker)
    await stop.wait()
    log.info("shutting down")
    await node.stop()
    return 0


def _models(args: argparse.Namespace) -> int:
    from pice_edge import model_store

    if args.models_command == "fetch":
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
        return _models(args)
    except PiceError as exc:
        print(f"pice-edge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
