#!/usr/bin/env python3
"""Roll a 540 MB model build out to three local edges while requests run; time it, count the
requests served and lost.

The cloud (`start_system` + the real HTTP API on loopback; its LLM simulated, so the requests
are paced by the edges) offers its model store. Three in-process `EdgeNode`s, each with its own
model store, start on build A of ``--name`` (``--from-model``, fetched from the cloud as an edge
would); the cloud then installs build B (``--to-model``) under the same name and announces it
(`pice-cloud fleet --rollout`'s message). Requests run throughout, two at a time. Measured: from
the announcement until every edge reports ``NAME@B`` (each edge's switch time too), requests
answered during that time, requests lost (an exception or a missing point: must be 0), and the
share of points the cloud had to expand.

    python tools/rollout_bench.py --json tools/results/rollout.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def install(store: Path, source: Path, name: str) -> str:
    from pice_edge import build_id, install_model

    path = install_model(source, name, replace=True, root=store)
    build = build_id(path)
    assert build is not None
    return build


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from pice_cloud import load_config, publish_rollout, rollout_message, start_system
    from pice_cloud.llm import SimulatedBackend
    from pice_cloud.server import bind, create_app, running, url_of
    from pice_edge import BrokerSettings, EdgeNode, RolloutPolicy, build_id, fetch_from, resolve_model
    from pice_edge.runtimes import TransformersRuntime

    store = work / "cloud-store"
    source_a, source_b = resolve_model(args.from_model), resolve_model(args.to_model)
    build_a = await asyncio.to_thread(install, store, source_a, args.name)
    size = sum(f.stat().st_size for f in (store / args.name).rglob("*") if f.is_file())
    config = load_config(None, {
        "edges": {"local": 0}, "discovery": {"enabled": False}, "server": {"port": 0, "models_dir": str(store)},
        "service": {"router": "off", "selector": "confidence", "sketch_guard": False, "expansion_guard": False,
                    "ensemble_width": 1, "max_points": 3, "tokens_per_point": args.tokens},
    })
    llm = SimulatedBackend(tokens_per_s=200.0, sketch_points=3)
    sock = bind("127.0.0.1", 0)
    result: dict[str, Any] = {"name": args.name, "bytes": size, "from": args.from_model, "to": args.to_model}
    async with start_system(config, llm=llm) as system:
        app = create_app(system.service, llm, config)
        async with running(app, sock):
            url = url_of(sock)
            service = system.service
            broker = BrokerSettings(url=system.broker_url)

            def loader(path: Path) -> TransformersRuntime:
                return TransformersRuntime(path, threads=1)

            nodes = []
            for i in range(3):
                root = work / f"edge{i}"
                path = await asyncio.to_thread(fetch_from, url, args.name, root=root, progress=False)
                nodes.append(EdgeNode(loader(path), device_id=f"edge-{i}", broker=broker, max_batch=4,
                                      heartbeat_s=1.0, model_build=build_id(path),
                                      rollout=RolloutPolicy(loader=loader, models_root=root)))
            try:
                for node in nodes:
                    await node.start()
                await service.fleet.wait_for(3, 30)
                build_b = await asyncio.to_thread(install, store, source_b, args.name)
                target = f"{args.name}@{build_b}"
                done: list[tuple[float, float, Any]] = []
                lost = 0
                stop = asyncio.Event()

                async def asker(k: int) -> None:
                    nonlocal lost
                    i = 0
                    while not stop.is_set():
                        began = time.monotonic()
                        try:
                            final = await service.ask(f"How can I plan my week better? ({k}-{i})",
                                                      mode="progressive")
                            if final.stats.points_edge + final.stats.points_cloud != 3:
                                lost += 1
                            done.append((began, time.monotonic(), final.stats))
                        except Exception:
                            lost += 1
                        i += 1

                askers = [asyncio.create_task(asker(k)) for k in range(2)]
                await asyncio.sleep(args.warmup)
                switched: dict[str, float] = {}
                announced = time.monotonic()
                await publish_rollout(system.broker_url, rollout_message(args.name, url, store))
                while len(switched) < len(nodes) and time.monotonic() - announced < args.timeout:
                    for node in nodes:
                        if node.model_id == target and node.device_id not in switched:
                            switched[node.device_id] = round(time.monotonic() - announced, 2)
                    await asyncio.sleep(0.1)
                finished = time.monotonic()
                await asyncio.sleep(args.warmup)
                stop.set()
                await asyncio.gather(*askers)
            finally:
                for node in nodes:
                    await node.stop()
    during = [s for began, end, s in done if began < finished and end > announced]
    points = sum(s.points_edge + s.points_cloud for s in during)
    result.update({
        "build_from": build_a, "build_to": build_b, "edges": len(nodes),
        "rollout_s": round(finished - announced, 2), "switched_after_s": switched,
        "all_switched": len(switched) == len(nodes),
        "requests_total": len(done), "requests_during_rollout": len(during), "requests_lost": lost,
        "cloud_point_share_during": round(sum(s.points_cloud for s in during) / points, 4) if points else None,
        "failed_rollouts": sum(n.stats.rollouts_failed for n in nodes),
    })
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="pice-expander", help="the model name the fleet runs")
    parser.add_argument("--from-model", default="smollm2-135m-instruct", help="build A (a model in the store)")
    parser.add_argument("--to-model", default="smollm2-135m-pice-expander",
                        help="build B (a model in the store; e.g. pice-cloud finetune's)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per point")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of requests before and after")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pice-rollout-"))
    try:
        result = asyncio.run(run(args, work))
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), **result}, indent=2) + "\n")
    return 0 if result["requests_lost"] == 0 and result["all_switched"] else 1


if __name__ == "__main__":
    sys.exit(main())
