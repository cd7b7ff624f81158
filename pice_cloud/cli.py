"""``pice-cloud``: ask a question on a single host (embedded broker + local edges), or serve the
OpenAI-compatible API.

    pice-cloud ask "QUESTION" [--edges N] [--broker mqtt://HOST:PORT] [--mode auto|progressive|cloud|sot]
    pice-cloud fleet [--broker mqtt://HOST:PORT] [--json]
    pice-cloud serve [--config FILE] [--host H] [--port P] [--broker URL] [--edges N] [--print-config]
    pice-cloud site [--config FILE] [--cloud URL] [--broker URL] [--profile NAME] [--name SITE] [--print-config]
    pice-cloud finetune --role expander|sketcher --data FILE.jsonl [--config FILE] [--name NAME] [--resume]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict
from typing import Any

from pice_edge.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, NotReachableError, PiceError
from pice_edge.logs import log_level_option, setup_logging

log = logging.getLogger("pice_cloud.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pice-cloud", description="PICE cloud service",
                                     parents=[log_level_option("warning")])
    common = [log_level_option()]

    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer one question (single host by default)", parents=common)
    ask.add_argument("question")
    ask.add_argument("--config", default=None, metavar="FILE",
                     help="YAML configuration file (the same one `serve` reads); flags override it")
    ask.add_argument("--broker", default=None,
                     help="use this external broker (mqtt://host:port) and the edges registered there")
    ask.add_argument("--edges", type=int, default=None,
                     help="local edge nodes to start (default: 2, or 0 with --broker)")
    ask.add_argument("--model", default=None, help="cloud LLM: model name or HF folder (llm.model)")
    ask.add_argument("--sketch-model", default=None,
                     help="a second model for the sketches only, e.g. a fine-tuned sketcher (llm.sketch_model)")
    ask.add_argument("--edge-model", default=None, help="edge model (default: same as --model)")
    ask.add_argument("--mode", choices=("auto", "progressive", "cloud", "sot"), default="auto",
                     help="sot: sketch and expansion both in the cloud (Skeleton-of-Thought baseline)")
    ask.add_argument("--max-points", type=int, default=None, help="service.max_points")
    ask.add_argument("--tokens-per-point", type=int, default=None, help="service.tokens_per_point")
    ask.add_argument("--threads", type=int, default=None,
                     help="torch threads per model worker (cloud and each local edge run in parallel)")
    ask.add_argument("--wait-edges", type=float, default=None,
                     help="seconds to wait for edges to register (edges.wait_s)")
    ask.add_argument("--router", choices=("embedding", "heuristic", "off"), default=None,
                     help="mode router for --mode auto (embedding needs `pice-edge models fetch all-minilm-l6-v2`; "
                          "without it the keyword heuristic is used)")
    ask.add_argument("--ensemble-width", type=int, default=None,
                     help="edges expanding each point (free slots allowing)")
    ask.add_argument("--selector", choices=("learned", "confidence"), default=None,
                     help="how one of several expansions of a point is chosen")
    ask.add_argument("--json", action="store_true", help="print the answer and its statistics as JSON")
    from pice_edge.credentials import CLOUD_USERNAME, add_credential_options

    add_credential_options(ask, default_username=CLOUD_USERNAME)

    from pice_cloud import fleet_cli
    from pice_cloud.finetune import cli as finetune_cli

    fleet_cli.add_parser(sub, common)
    finetune_cli.add_parser(sub, common)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (single host by default)",
                           parents=common)
    from pice_cloud.cli_serve import add_serve_arguments

    add_serve_arguments(serve)
    site = sub.add_parser("site", parents=common,
                          help="serve a site: forward to the cloud while it answers, answer on the site when not")
    from pice_cloud.cli_serve import add_site_arguments

    add_site_arguments(site)
    return parser


def _ask_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ask`` flags that were given, nested like the configuration file."""
    mapping = {
        "broker": ("broker", "url"), "edges": ("edges", "local"), "model": ("llm", "model"),
        "sketch_model": ("llm", "sketch_model"),
        "edge_model": ("edges", "model"), "max_points": ("service", "max_points"),
        "tokens_per_point": ("service", "tokens_per_point"), "wait_edges": ("edges", "wait_s"),
        "router": ("service", "router"), "ensemble_width": ("service", "ensemble_width"),
        "selector": ("service", "selector"),
    }
    out: dict[str, Any] = {}
    for flag, (section, key) in mapping.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.threads is not None:
        out.setdefault("llm", {})["threads"] = args.threads
        out.setdefault("edges", {})["threads"] = args.threads
    if args.mode != "auto":
        out.setdefault("service", {})["router"] = "off"  # no MiniLM load for a router that never runs
    # One question from a terminal: nothing to advertise to the network.
    out["discovery"] = {"enabled": False}
    return out


async def _ask(args: argparse.Namespace) -> int:
    from pice_cloud.bootstrap import start_system
    from pice_cloud.cli_serve import load_with_credentials
    from pice_cloud.events import AnswerEvent, PointEvent, SketchEvent
    from pice_cloud.sketch import describe

    config = load_with_credentials(args.config, _ask_overrides(args), args)
    out = sys.stdout
    async with start_system(config) as system:
        if config.broker is not None and not config.local_edges:
            await system.service.fleet.wait_for(1, config.edges.wait_s)
        live = [e.device_id for e in system.service.fleet.live()]
        if not args.json:
            print(f"[pice] broker {system.broker_url}; edges: {', '.join(live) or 'none'}", file=sys.stderr)
        async for event in system.service.answer(args.question, mode=args.mode):
            if args.json:
                if isinstance(event, AnswerEvent):
                    print(json.dumps({"answer": event.text, "stats": asdict(event.stats)}, indent=2))
                continue
            if isinstance(event, SketchEvent):
                out.write(f"Sketch:\n{describe(event.points)}\n\nAnswer:\n")
            elif isinstance(event, PointEvent):
                p = event.point
                where = p.device_id if p.source == "edge" else "cloud"
                out.write(f"{p.index + 1}. **{event.heading}** {p.text}\n   [{where}]\n\n")
            elif isinstance(event, AnswerEvent):
                s = event.stats
                if s.mode == "cloud":
                    out.write(event.text + "\n")
                print(f"[pice] mode={s.mode} total={s.total_s:.2f}s first_content={s.first_token_s:.2f}s "
                      f"first_point={s.first_text_s:.2f}s sketch={s.sketch_s:.2f}s "
                      f"points edge/cloud={s.points_edge}/{s.points_cloud} "
                      f"tokens edge/cloud={s.edge_tokens}/{s.cloud_tokens}", file=sys.stderr)
            out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "fleet":
            from pice_cloud import fleet_cli

            return asyncio.run(fleet_cli.run(args))
        if args.command == "finetune":
            from pice_cloud.finetune import cli as finetune_cli

            return finetune_cli.run(args)
        if args.command in ("serve", "site"):
            from pice_cloud.cli_serve import run_serve

            return run_serve(args)
        return asyncio.run(_ask(args))
    except NotReachableError as exc:
        # Not a configuration problem: the broker or the cloud may come up later (a power cut that
        # brings the broker up last). EXIT_UNAVAILABLE tells systemd to restart us.
        print(f"pice-cloud: unavailable: {exc} (exit {EXIT_UNAVAILABLE}: try again later)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PiceError as exc:
        print(f"pice-cloud: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
