"""``pice-cloud``: ask a question on a single host (embedded broker + local edges), or serve the
OpenAI-compatible API.

    pice-cloud ask "QUESTION" [--edges N] [--broker mqtt://HOST:PORT] [--mode auto|progressive|cloud|sot]
    pice-cloud fleet [--broker mqtt://HOST:PORT] [--json]
    pice-cloud serve [--config FILE] [--host H] [--port P] [--broker URL] [--edges N] [--print-config]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict

from pice_edge.errors import PiceError
from pice_edge.logs import log_level_option, setup_logging

log = logging.getLogger("pice_cloud.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pice-cloud", description="PICE cloud service",
                                     parents=[log_level_option("warning")])
    common = [log_level_option()]

    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer one question (single host by default)", parents=common)
    ask.add_argument("question")
    ask.add_argument("--broker", default=None,
                     help="use this external broker (mqtt://host:port) and the edges registered there")
    ask.add_argument("--edges", type=int, default=None,
                     help="local edge nodes to start (default: 2, or 0 with --broker)")
    ask.add_argument("--model", default="smollm2-135m-instruct", help="cloud LLM: model name or HF folder")
    ask.add_argument("--edge-model", default=None, help="edge model (default: same as --model)")
    ask.add_argument("--mode", choices=("auto", "progressive", "cloud", "sot"), default="auto",
                     help="sot: sketch and expansion both in the cloud (Skeleton-of-Thought baseline)")
    ask.add_argument("--max-points", type=int, default=6)
    ask.add_argument("--tokens-per-point", type=int, default=80)
    ask.add_argument("--threads", type=int, default=1,
                     help="torch threads per model worker (cloud and each local edge run in parallel)")
    ask.add_argument("--wait-edges", type=float, default=3.0,
                     help="seconds to wait for edges to register (external broker)")
    ask.add_argument("--router", choices=("embedding", "heuristic", "off"), default="embedding",
                     help="mode router for --mode auto (embedding needs `pice-edge models fetch all-minilm-l6-v2`; "
                          "without it the keyword heuristic is used)")
    ask.add_argument("--ensemble-width", type=int, default=1, help="edges expanding each point (free slots allowing)")
    ask.add_argument("--selector", choices=("learned", "confidence"), default="learned",
                     help="how one of several expansions of a point is chosen")
    ask.add_argument("--json", action="store_true", help="print the answer and its statistics as JSON")

    from pice_cloud import fleet_cli

    fleet_cli.add_parser(sub, common)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (single host by default)",
                           parents=common)
    from pice_cloud.cli_serve import add_serve_arguments

    add_serve_arguments(serve)
    return parser


async def _ask(args: argparse.Namespace) -> int:
    from pice_cloud.assembly import build_router, build_selector
    from pice_cloud.llm.transformers import TransformersBackend
    from pice_cloud.local import local_system
    from pice_cloud.scheduler import Budget
    from pice_cloud.service import AnswerEvent, PointEvent, ServiceSettings, SketchEvent
    from pice_cloud.sketch import describe

    edges = args.edges if args.edges is not None else (0 if args.broker else 2)
    llm = TransformersBackend(args.model, threads=args.threads)
    settings = ServiceSettings(budget=Budget(max_points=args.max_points, tokens_per_point=args.tokens_per_point),
                               ensemble_width=args.ensemble_width)
    router = build_router(args.router) if args.mode == "auto" else None
    out = sys.stdout
    async with local_system(llm, broker_url=args.broker, edges=edges, edge_model=args.edge_model or args.model,
                            edge_threads=args.threads, settings=settings, wait_edges_s=args.wait_edges,
                            router=router) as system:
        system.service.selector = build_selector(args.selector, llm, args.ensemble_width)
        if args.broker and not edges:
            await system.service.fleet.wait_for(1, args.wait_edges)
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
                print(f"[pice] mode={s.mode} total={s.total_s:.2f}s first_point={s.first_token_s:.2f}s "
                      f"sketch={s.sketch_s:.2f}s points edge/cloud={s.points_edge}/{s.points_cloud} "
                      f"tokens edge/cloud={s.edge_tokens}/{s.cloud_tokens}", file=sys.stderr)
            out.flush()
        await llm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "fleet":
            from pice_cloud import fleet_cli

            return asyncio.run(fleet_cli.run(args))
        if args.command == "serve":
            from pice_cloud.cli_serve import run_serve

            return run_serve(args)
        return asyncio.run(_ask(args))
    except PiceError as exc:
        print(f"pice-cloud: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
