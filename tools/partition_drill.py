#!/usr/bin/env python3
"""Drill: the broker dies mid-request and comes back on the same port, with real processes.

Mosquitto (with persistence, as deployed, and without: ``--persistence``), two ``pice-edge run``
and ``pice-cloud serve --broker ...`` (random models by default: a tiny one for the cloud and the
edges, ``--model`` to choose). For each outage length (``--outages``, default 3 s and 12 s) and
try (``--tries``, default 3): one progressive request through the HTTP API; once its tasks are on
the edges (seen on the broker) the broker is killed (SIGKILL), and started again on the same port
after the outage. Measured per answer: its time, its points and how many the cloud expanded
itself ("redone": target at most 1), edges the cloud expired (its log), and lost requests (an
error, or a point missing from the answer). Then the memory of an edge across ``--rollouts``
(default 4) model rollouts: its RSS fresh, after each, and settled (a ~120 MB random model unless
``--rss-model``).

    python tools/partition_drill.py --json tools/results/partition_drill.json

Edges keep their default heartbeat (2 s) and the service its defaults, except what random models
need (no sketch or expansion guard, no mode router, the confidence selector). On two cores the
whole drill takes about 5 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pice_cloud.broker import (  # noqa: E402
    ANONYMOUS_CONFIG,
    PERSISTENT_CONFIG,
    MosquittoProcess,
    free_port,
)
from pice_edge.transport import BrokerSettings, Message, MqttTransport  # noqa: E402

QUESTION = "How can I improve my time management skills?"
ROLLOUT_NAME = "drill-expander"
#: What random models need: their sketches and expansions are gibberish the guards would refuse.
CLOUD_ENV = {"PICE_SERVICE__SKETCH_GUARD": "false", "PICE_SERVICE__EXPANSION_GUARD": "false",
             "PICE_SERVICE__ROUTER": "off", "PICE_SERVICE__SELECTOR": "confidence",
             "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}


class Proc:
    """A child process logging to a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 base_env: dict[str, str] | None = None) -> None:
        """``base_env`` (default `CLOUD_ENV`, what random models need) and ``env`` over ours."""
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **(CLOUD_ENV if base_env is None else base_env),
                                              **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def edge_cmd(device_id: str, broker: str, model: Path, heartbeat: float) -> list[str]:
    return [sys.executable, "-m", "pice_edge.cli", "run", "--broker", broker, "--no-zeroconf", "--device-id",
            device_id, "--model", str(model), "--threads", "1", "--heartbeat", str(heartbeat), "--log-level", "info"]


def cloud_cmd(broker: str, port: int, model: Path) -> list[str]:
    return [sys.executable, "-m", "pice_cloud.cli", "serve", "--broker", broker, "--port", str(port),
            "--model", str(model), "--edges", "0", "--threads", "1", "--log-level", "info"]


async def wait_health(url: str, edges: set[str], timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                health = (await http.get("/health")).json()
                if set(health.get("edges", [])) >= edges and health.get("status") == "ok":
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"the cloud at {url} did not see edges {sorted(edges)} within {timeout:g}s")


async def ask(url: str, timeout: float = 180.0) -> dict[str, Any]:
    """One progressive request; its answer's figures, or what went wrong."""
    import httpx

    started = time.monotonic()
    body = {"model": "pice", "messages": [{"role": "user", "content": QUESTION}], "pice": {"mode": "progressive"}}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            response = await http.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return {"lost": True, "error": f"{type(exc).__name__}: {exc}", "answer_s": round(time.monotonic() - started, 2)}
    took = round(time.monotonic() - started, 2)
    if response.status_code != 200:
        return {"lost": True, "error": f"HTTP {response.status_code}: {response.text[:200]}", "answer_s": took}
    data = response.json()
    info = data.get("pice", {})
    text = data["choices"][0]["message"]["content"] or ""
    points = info.get("points_edge", 0) + info.get("points_cloud", 0)
    missing = [i for i in range(1, points + 1) if f"{i}. **" not in text]  # each point's numbered heading
    return {"lost": points == 0 or bool(missing), "answer_s": took, "points": points,
            "redone_by_cloud": info.get("points_cloud", 0), "devices": info.get("devices", [])}


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop ``procs`` on the way out; on an error, show the end of their logs."""
    try:
        yield procs
    except BaseException:
        for proc in procs:
            print(f"--- {proc.log_path.name} ---\n{proc.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            proc.stop()


async def drill(args: argparse.Namespace, model: Path, work: Path, persistent: bool) -> dict[str, Any]:
    """One broker configuration: a baseline answer, then every outage length x try."""
    name = "persistence" if persistent else "no-persistence"
    folder = work / name
    folder.mkdir()
    broker = MosquittoProcess(folder / "broker", PERSISTENT_CONFIG if persistent else ANONYMOUS_CONFIG)
    broker.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    edges = ("drill-e1", "drill-e2")
    env = {"PICE_SERVICE__TOKENS_PER_POINT": str(args.tokens_per_point)}
    spy = MqttTransport(BrokerSettings(url=broker.url, reconnect_min_s=1.0, reconnect_max_s=1.0))
    tasks_out = asyncio.Event()

    def on_task(message: Message) -> None:
        tasks_out.set()

    spy.add_subscription("pice/v1/edge/+/tasks", on_task)
    result: dict[str, Any] = {"broker_persistence": persistent, "tries": []}
    try:
        with stopping([Proc(edge_cmd(e, broker.url, model, args.heartbeat), folder / f"{e}.log") for e in edges]
                      + [Proc(cloud_cmd(broker.url, port, model), folder / "cloud.log", env)]) as procs:
            cloud = procs[-1]
            await spy.connect()
            await wait_health(url, set(edges))
            await ask(url)  # warm-up: the edges measure their speed, the cloud its own
            baseline = await ask(url)
            result["baseline"] = baseline
            print(f"[{name}] no outage: {baseline}", flush=True)
            for seconds in args.outages:
                for attempt in range(1, args.tries + 1):
                    await wait_health(url, set(edges))
                    await asyncio.sleep(args.heartbeat)  # every edge's status is fresh again
                    log_from = len(cloud.log())
                    tasks_out.clear()
                    request = asyncio.create_task(ask(url))
                    out = asyncio.create_task(tasks_out.wait())
                    await asyncio.wait({request, out}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
                    out.cancel()
                    await asyncio.sleep(args.kill_after)
                    killed_mid_request = not request.done()
                    broker.kill()
                    await asyncio.sleep(seconds)
                    broker.start()
                    outcome = await request
                    await asyncio.sleep(0.5)
                    lines = cloud.log()[log_from:].splitlines()
                    row = {"outage_s": seconds, "try": attempt, "killed_mid_request": killed_mid_request, **outcome,
                           "edges_expired": sum(" expired (" in line for line in lines),
                           "session": "kept" if any("kept our session" in line for line in lines) else
                           "lost" if any("had lost our session" in line for line in lines) else "?",
                           "tasks_found_lost": sum("reports an empty queue" in line for line in lines)}
                    result["tries"].append(row)
                    print(f"[{name}] {seconds:g}s outage, try {attempt}: {row}", flush=True)
            result["edges_alive_at_end"] = all(p.proc.poll() is None for p in procs)
    finally:
        await spy.close()
        broker.kill()
    return result


def install_build(store: Path, source: Path, marker: str) -> str:
    """``source`` plus a marker file, installed as a new build of ROLLOUT_NAME in ``store``."""
    from pice_edge import model_store

    staged = store.parent / f"src-{marker.replace(' ', '-')}"
    if not staged.exists():
        shutil.copytree(source, staged)
        (staged / "build.txt").write_text(marker)
    path = model_store.install(staged, ROLLOUT_NAME, replace=True, root=store)
    build = model_store.build_id(path)
    assert build is not None
    return build


async def rss_across_rollouts(args: argparse.Namespace, cloud_model: Path, rss_model: Path,
                              work: Path) -> dict[str, Any]:
    """An edge's RSS fresh, after each of ``args.rollouts`` rollouts, and settled."""
    import psutil

    from pice_cloud.fleet_cli import publish_rollout, rollout_message
    from pice_edge.protocol import EdgeStatus, decode, edge_status_topic

    folder = work / "rss"
    folder.mkdir()
    store, edge_store = folder / "cloud-store", folder / "edge-store"
    broker = MosquittoProcess(folder / "broker", PERSISTENT_CONFIG)
    broker.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    statuses: list[EdgeStatus] = []
    spy = MqttTransport(BrokerSettings(url=broker.url))
    spy.add_subscription(edge_status_topic("drill-rss"),
                         lambda m: statuses.append(decode(EdgeStatus, m.payload)) if m.payload else None)
    env = {"PICE_SERVER__MODELS_DIR": str(store), "PICE_SERVICE__TOKENS_PER_POINT": "16"}
    sizes: list[int] = []
    try:
        cloud = Proc(cloud_cmd(broker.url, port, cloud_model), folder / "cloud.log", env)
        edge = Proc(edge_cmd("drill-rss", broker.url, rss_model, 1.0), folder / "edge.log",
                    {"PICE_MODELS_DIR": str(edge_store)})
        with stopping([cloud, edge]):
            await spy.connect()
            await wait_health(url, {"drill-rss"})
            process = psutil.Process(edge.pid)
            await ask(url)  # weights are mapped lazily: a generation makes them resident
            fresh = process.memory_info().rss
            for n in range(1, args.rollouts + 1):
                build = await asyncio.to_thread(install_build, store, rss_model, f"build {n}")
                await publish_rollout(broker.url, rollout_message(ROLLOUT_NAME, url, store))
                target = f"{ROLLOUT_NAME}@{build}"
                deadline = time.monotonic() + 180
                while not (statuses and statuses[-1].model_id == target):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"rollout {n} did not reach the edge: {edge.log()[-2000:]}")
                    await asyncio.sleep(0.2)
                await wait_health(url, {"drill-rss"})
                await ask(url)
                sizes.append(process.memory_info().rss)
                print(f"[rss] after rollout {n}: {sizes[-1] / 2**20:.0f} MiB (fresh {fresh / 2**20:.0f})", flush=True)
            await publish_rollout(broker.url, None)
            await asyncio.sleep(3)  # the old model is freed on the edge's worker thread
            settled = process.memory_info().rss
    finally:
        await spy.close()
        broker.kill()
    mib = 2**20
    return {"model": str(args.rss_model or "random 'small' preset (~120 MB fp32)"), "rollouts": args.rollouts,
            "fresh_mib": round(fresh / mib, 1), "after_each_mib": [round(s / mib, 1) for s in sizes],
            "settled_mib": round(settled / mib, 1), "settled_vs_fresh": round(settled / fresh, 3),
            "max_vs_fresh": round(max([*sizes, settled]) / fresh, 3)}


def table(runs: list[dict[str, Any]]) -> str:
    head = (f"{'broker':<15}{'outage':>7}{'try':>5}{'answer_s':>10}{'points':>8}{'redone':>8}{'expired':>9}"
            f"{'lost':>6}  session")
    lines = [head, "-" * len(head)]
    for run in runs:
        name = "persistence" if run["broker_persistence"] else "no-persistence"
        base = run["baseline"]
        lines.append(f"{name:<15}{'none':>7}{'':>5}{base.get('answer_s', 0):>10.1f}{base.get('points', 0):>8}"
                     f"{base.get('redone_by_cloud', 0):>8}{'':>9}{int(base.get('lost', False)):>6}")
        for row in run["tries"]:
            lines.append(f"{name:<15}{row['outage_s']:>6g}s{row['try']:>5}{row.get('answer_s', 0):>10.1f}"
                         f"{row.get('points', 0):>8}{row.get('redone_by_cloud', 0):>8}{row['edges_expired']:>9}"
                         f"{int(row['lost']):>6}  {row['session']}")
    return "\n".join(lines)


def summary(run: dict[str, Any]) -> dict[str, Any]:
    tries = run["tries"]
    return {"tries": len(tries), "lost_requests": sum(bool(r["lost"]) for r in tries),
            "max_redone_per_answer": max((r.get("redone_by_cloud", 0) for r in tries), default=0),
            "answers_over_target": sum(r.get("redone_by_cloud", 0) > 1 for r in tries),
            "edges_expired": sum(r["edges_expired"] for r in tries),
            "points": sum(r.get("points", 0) for r in tries),
            "redone": sum(r.get("redone_by_cloud", 0) for r in tries)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder for the cloud and the edges (default: a tiny random one)")
    parser.add_argument("--outages", type=lambda s: [float(x) for x in s.split(",")], default=[3.0, 12.0],
                        help="outage lengths in seconds, comma-separated (default 3,12)")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--persistence", choices=("both", "on", "off"), default="both",
                        help="the broker's persistence (default: both, one after the other)")
    parser.add_argument("--tokens-per-point", type=int, default=1024,
                        help="service.tokens_per_point: long enough that the edges are still working when the "
                             "broker dies (the tiny model writes ~450 tokens/s)")
    parser.add_argument("--kill-after", type=float, default=0.3, help="seconds after the tasks went out")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="the edges' status interval (default theirs)")
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts for the RSS measurement (0: skip it)")
    parser.add_argument("--rss-model", type=Path, default=None,
                        help="model of the edge whose RSS is measured (default: a ~120 MB random model)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from pice_edge.model_store import build_random_model

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pice-partition-"))
    try:
        model = args.model or build_random_model(work / "tiny")
        configs = {"both": (True, False), "on": (True,), "off": (False,)}[args.persistence]
        runs = [asyncio.run(drill(args, model, work, persistent)) for persistent in configs]
        rss = None
        if args.rollouts:
            rss_model = args.rss_model or build_random_model(work / "small", preset="small")
            rss = asyncio.run(rss_across_rollouts(args, model, rss_model, work))
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    print()
    print(table(runs))
    for run in runs:
        print(f"{'persistence' if run['broker_persistence'] else 'no-persistence'}: {summary(run)}")
    if rss is not None:
        print(f"edge RSS across {rss['rollouts']} rollouts: fresh {rss['fresh_mib']} MiB, after each "
              f"{rss['after_each_mib']} MiB, settled {rss['settled_mib']} MiB ({rss['settled_vs_fresh']:.3f}x fresh)")
    result = {"command": " ".join(sys.argv), "model": str(args.model or "tiny random"),
              "tokens_per_point": args.tokens_per_point, "edge_heartbeat_s": args.heartbeat,
              "kill_after_tasks_s": args.kill_after, "elapsed_s": round(time.monotonic() - began, 1),
              "target": "at most 1 point per answer redone by the cloud; no request lost; no live edge expired",
              "runs": [{**run, "summary": summary(run)} for run in runs], "rss": rss}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = all(summary(r)["lost_requests"] == 0 for r in runs) and \
        all(summary(r)["answers_over_target"] == 0 for r in runs if r["broker_persistence"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
