"""``pice-edge``: run an edge node and manage its models.

    pice-edge run --broker mqtt://HOST:PORT [--device-id ID] [--model NAME|PATH]
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
import signal
import socket
import sys

from pice_edge.errors import PiceError
from pice_edge.logs import log_level_option, setup_logging

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
    run.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"],
                     help="onnxruntime: which ONNX export to load (tools/export_onnx.py)")
    run.add_argument("--providers", default="tensorrt,cuda,cpu",
                     help="onnxruntime: execution providers in order of preference (default %(default)s)")
    run.add_argument("--memory-budget-mb", type=float, default=None, help="KV-cache budget of a batch (MiB)")

    models = sub.add_parser("models", help="fetch, list and verify models", parents=common)
    msub = models.add_subparsers(dest="models_command", required=True)
    fetch = msub.add_parser("fetch", help="download, verify and convert a model", parents=common)
    fetch.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    msub.add_parser("list", help="known models and whether they are here")
    verify = msub.add_parser("verify", help="check every file's SHA-256")
    verify.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    return parser


async def _run(args: argparse.Namespace) -> int:
    from pice_edge.node import EdgeNode
    from pice_edge.runtimes import create_runtime
    from pice_edge.transport import BrokerSettings

    extra: dict[str, object] = {}
    if args.runtime == "onnxruntime":
        extra = {"precision": args.precision, "providers": args.providers.split(",")}
    runtime = create_runtime(args.runtime, model=args.model, threads=args.threads, **extra)
    node = EdgeNode(runtime, device_id=args.device_id, broker=BrokerSettings(url=args.broker),
                    max_batch=args.max_batch, heartbeat_s=args.heartbeat, memory_budget_mb=args.memory_budget_mb)
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
