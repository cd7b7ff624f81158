#!/usr/bin/env python3
"""Load test: many concurrent streaming requests against a real `pice-cloud serve`.

Starts `pice-cloud serve` (embedded broker, ``--edges`` local edge nodes, a tiny random model
by default so the run measures the serving path, not the model) with a bounded admission
queue, fires ``--requests`` streaming chat completions at once on loopback, and classifies
every request:

- completed: the stream ended with ``data: [DONE]`` and carried no error event;
- refused: 429 or 503 (the admission queue was full), with a Retry-After header;
- lost: anything else (a dropped connection, a stream without [DONE], an error event, a
  timeout). Lost must be 0.

Peak memory is the server process's VmHWM (peak resident set) from /proc. Bounded in count
and time; loopback only.

    python tools/load_test.py --requests 200 --json tools/results/load_test.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: the package beside it

from pice_cloud import free_port  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(client: Any, url: str, i: int, timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, detail) of one streaming request."""
    import httpx

    body = {"model": "pice", "stream": True, "messages": [{"role": "user", "content": f"Question {i}: how to rest?"}],
            "pice": {"mode": "progressive" if i % 2 else "cloud"}}
    started = time.perf_counter()

    async def run() -> tuple[str, str]:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code in (429, 503):
                await resp.aread()
                return ("refused" if resp.headers.get("retry-after") else "lost"), str(resp.status_code)
            if resp.status_code != 200:
                return "lost", f"HTTP {resp.status_code}"
            done = False
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line[:20]:
                    return "lost", line[:200]
            return ("completed", "") if done else ("lost", "no [DONE]")

    try:
        outcome, detail = await asyncio.wait_for(run(), timeout=timeout)
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        outcome, detail = "lost", f"{type(exc).__name__}: {exc}"
    return outcome, time.perf_counter() - started, detail


async def fire(port: int, requests: int, timeout: float) -> list[tuple[str, float, str]]:
    import httpx

    limits = httpx.Limits(max_connections=requests + 10, max_keepalive_connections=requests + 10)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        return list(await asyncio.gather(*(one(client, url, i, timeout) for i in range(requests))))


def wait_healthy(port: int, edges: int, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            if health.get("live_edges", 0) >= edges:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server did not become healthy with {edges} edges within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--edges", type=int, default=3)
    parser.add_argument("--model", default=None, help="model (default: a tiny random model built now)")
    parser.add_argument("--max-concurrent", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300, help="per-request limit in seconds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.requests > 2000:
        parser.error("--requests is bounded at 2000")

    model = args.model
    if model is None:
        from pice_edge import build_random_model

        model = str(build_random_model(Path(tempfile.mkdtemp(prefix="pice-load-")) / "tiny"))
    port = free_port()
    env = {**os.environ, "PICE_SERVER__MAX_CONCURRENT": str(args.max_concurrent),
           "PICE_SERVER__MAX_QUEUE": str(args.max_queue), "PICE_SERVER__QUEUE_TIMEOUT_S": str(args.timeout),
           "PICE_SERVICE__MAX_POINTS": "3", "PICE_SERVICE__TOKENS_PER_POINT": "8",
           "PICE_SERVICE__MAX_ANSWER_TOKENS": "24", "PICE_SERVICE__ROUTER": "off",
           "PICE_DISCOVERY__ENABLED": "false", "OMP_NUM_THREADS": "1",
           # A random model's sketches never pass the guards: keep the progressive path under load.
           "PICE_SERVICE__SKETCH_GUARD": "false", "PICE_SERVICE__EXPANSION_GUARD": "false"}
    log = tempfile.NamedTemporaryFile(prefix="pice-load-server-", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "pice_cloud.cli", "serve", "--port", str(port), "--edges", str(args.edges),
         "--model", model, "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_healthy(port, args.edges)
        started = time.perf_counter()
        results = asyncio.run(fire(port, args.requests, args.timeout))
        wall = time.perf_counter() - started
        rss = peak_rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    counts = Counter(r[0] for r in results)
    lost = [r for r in results if r[0] == "lost"]
    completed_s = sorted(r[1] for r in results if r[0] == "completed")
    report = {
        "requests": args.requests, "edges": args.edges, "max_concurrent": args.max_concurrent,
        "max_queue": args.max_queue, "completed": counts["completed"], "refused": counts["refused"],
        "lost": counts["lost"], "wall_s": round(wall, 2), "server_peak_rss_mb": round(rss, 1),
        "server_alive_after": alive,
        "completed_latency_p50_s": round(completed_s[len(completed_s) // 2], 3) if completed_s else None,
        "completed_latency_max_s": round(completed_s[-1], 3) if completed_s else None,
        "lost_details": [r[2] for r in lost[:10]], "server_log": log.name,
    }
    print(f"{'requests':>9}{'completed':>11}{'refused':>9}{'lost':>6}{'wall s':>8}{'p50 s':>8}{'peak RSS MB':>13}")
    print(f"{args.requests:>9}{report['completed']:>11}{report['refused']:>9}{report['lost']:>6}{wall:>8.1f}"
          f"{report['completed_latency_p50_s'] or 0:>8.2f}{rss:>13.0f}")
    if lost:
        print("lost:", *report["lost_details"], sep="\n  ", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if lost or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
