#!/usr/bin/env python3
"""Edge throughput by batch size: a real EdgeNode behind a real (embedded) MQTT broker.

Each configuration runs in a fresh subprocess so that its peak memory (max RSS) is its own.
In each, after one warm-up task, ``--tasks`` expansion tasks of one request are published at
once; the node generates them in batches of up to ``max_batch``. Tokens/s is all generated
tokens over the wall time from publishing to the last candidate: the whole process, MQTT,
queueing, tokenisation and decoding included.

    python tools/bench_edge.py --model smollm2-135m-instruct --batch-sizes 1 4 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

QUESTION = "How can I improve my time management skills?"
SKETCH = [
    "Set clear goals", "Prioritize tasks", "Use a calendar", "Avoid multitasking",
    "Take regular breaks", "Delegate when possible", "Limit distractions", "Review each week",
]


async def _measure(model: str, runtime_name: str, batch: int, threads: int, tasks: int, tokens: int) -> dict[str, Any]:
    from pice_cloud.broker import EmbeddedBroker
    from pice_edge.node import EdgeNode
    from pice_edge.protocol import CANDIDATES_FILTER, Candidate, ExpandTask, decode, edge_tasks_topic, encode
    from pice_edge.runtimes import create_runtime
    from pice_edge.transport import BrokerSettings, Message, MqttTransport

    broker = EmbeddedBroker()
    url = await broker.start()
    settings = BrokerSettings(url=url)
    runtime = create_runtime(runtime_name, model=model, threads=threads)
    node = EdgeNode(runtime, device_id="bench-edge", broker=settings, max_batch=batch, max_queue=1024)
    got: list[Candidate] = []
    done = asyncio.Event()
    want = 0

    def on_candidate(message: Message) -> None:
        got.append(decode(Candidate, message.payload))
        if len(got) >= want:
            done.set()

    cloud = MqttTransport(settings, client_id="bench-cloud")
    cloud.subscribe(CANDIDATES_FILTER, on_candidate)
    await node.start()
    await cloud.connect()

    async def run(request_id: str, count: int) -> float:
        nonlocal want
        got.clear()
        done.clear()
        want = count
        started = time.perf_counter()
        for i in range(count):
            task = ExpandTask(request_id=request_id, point_index=i % len(SKETCH), question=QUESTION, sketch=SKETCH,
                              max_new_tokens=tokens, deadline=time.time() + 3600)
            cloud.publish(edge_tasks_topic("bench-edge"), encode(task))
        await asyncio.wait_for(done.wait(), timeout=3600)
        return time.perf_counter() - started

    try:
        await run("warmup", 1)
        results = []
        # Distinct request ids per round: the node de-duplicates (request, point) pairs.
        for rnd in range(0, tasks, len(SKETCH)):
            count = min(len(SKETCH), tasks - rnd)
            seconds = await run(f"bench{rnd}", count)
            results.append((seconds, sum(c.token_count for c in got), count))
        seconds = sum(r[0] for r in results)
        generated = sum(r[1] for r in results)
        sizes = node.stats.batch_sizes[1:]
    finally:
        await cloud.close()
        await node.stop()
        runtime.close()
        await broker.stop()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "runtime": runtime_name, "model": model, "max_batch": batch, "threads": threads, "tasks": tasks,
        "max_new_tokens": tokens, "tokens": generated, "seconds": round(seconds, 3),
        "tokens_per_s": round(generated / seconds, 2), "mean_batch": round(sum(sizes) / max(1, len(sizes)), 2),
        "peak_rss_mb": round(rss_kb / 1024, 1),
    }


def _child(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    row = asyncio.run(_measure(args.model, args.runtime, args.child_batch, args.threads, args.tasks, args.tokens))
    print(json.dumps(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or Hugging Face folder")
    parser.add_argument("--runtime", default="transformers")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=8, help="tasks measured per configuration")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per task")
    parser.add_argument("--out", type=Path, default=Path("bench_edge.json"))
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_batch:
        _child(args)
        return 0

    rows = []
    for batch in args.batch_sizes:
        cmd = [sys.executable, __file__, "--model", str(args.model), "--runtime", args.runtime,
               "--threads", str(args.threads), "--tasks", str(args.tasks), "--tokens", str(args.tokens),
               "--child-batch", str(batch)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    base = rows[0]["tokens_per_s"]
    header = (f"{'runtime':<13}{'batch':>6}{'threads':>8}{'tokens':>8}{'seconds':>9}{'tok/s':>8}"
              f"{'vs first':>9}{'RSS MB':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['runtime']:<13}{r['max_batch']:>6}{r['threads']:>8}{r['tokens']:>8}{r['seconds']:>9.2f}"
              f"{r['tokens_per_s']:>8.1f}{r['tokens_per_s'] / base:>8.2f}x{r['peak_rss_mb']:>8.0f}")
    report = {"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                          "platform": platform.platform()}, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
