#!/usr/bin/env python3
"""The control plane with hundreds of edges: real Mosquitto, real MQTT connections, simulated
models (`pice_edge.runtimes.simulated`, `pice_cloud.llm.simulated`).

Per fleet size (``--edges 10,100,1000``): a real Mosquitto on a free loopback port; one helper
process hosting that many light `EdgeNode`s, each with its own MQTT connection, heartbeat and
simulated runtime; and the cloud (`start_system` with the simulated LLM, guards off: there is no
text to judge) in this process. Then:

- **light load**: ``--light`` requests one after the other. Orchestration overhead = end-to-end
  latency minus the models' own time (the simulated sketch and point times, which are known
  exactly), and the scheduler's share (``schedule_s``: placing the points and publishing their
  tasks);
- **throughput**: ``--concurrency`` requests in flight for ``--duration`` seconds (closed loop):
  progressive requests per second orchestrated, latency p50/p95, share of points the cloud had
  to expand, MQTT messages per request (tasks, candidates, refusals, counted by a subscriber),
  edge statuses per second, and the cloud's work ledger per request by purpose (``pice.cloud_work``
  means, which ``tools/simulate.py --validate`` compares with its own model);
- **fleet registry memory**: bytes per edge of the cloud's `Fleet` (tracemalloc, N statuses).

Loopback only. Prints a table and writes JSON:

    python tools/load_fleet.py --edges 10,100,1000 --json tools/results/load_fleet.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from pice_cloud.broker import MosquittoProcess

SKETCH_TOKENS_PER_POINT = 6  # what SimulatedBackend charges for a sketch, per heading


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the edge host (a helper process) --------------------------------------------------------

async def host_edges(args: argparse.Namespace) -> None:
    from pice_edge.node import EdgeNode
    from pice_edge.runtimes.simulated import SimulatedRuntime
    from pice_edge.transport import BrokerSettings

    broker = BrokerSettings(url=args.broker)
    nodes = [EdgeNode(SimulatedRuntime(tokens_per_s=args.edge_rate, batch_cost=args.edge_batch_cost),
                      device_id=f"sim-{args.first_edge + i:04d}", broker=broker, max_batch=args.edge_batch,
                      max_queue=args.edge_queue, heartbeat_s=args.heartbeat, profile="simulated")
             for i in range(args.host_edges)]
    for start in range(0, len(nodes), 50):
        await asyncio.gather(*(n.start(connect_timeout=60) for n in nodes[start:start + 50]))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the parent closes our stdin when done
    await stop.wait()
    refused = sum(n.stats.tasks_refused for n in nodes)
    peak = max((n.stats.peak_outstanding for n in nodes), default=0)
    print(json.dumps({"refused": refused, "peak_outstanding": peak}), flush=True)
    for start in range(0, len(nodes), 100):
        await asyncio.gather(*(n.stop() for n in nodes[start:start + 100]), return_exceptions=True)


# --- the measuring side ----------------------------------------------------------------------

def start_broker(workdir: Path) -> MosquittoProcess:
    """A Mosquitto for a thousand clients on a free loopback port (started). Its open-files limit
    is this process's, which `main` raised to the hard limit before anything started."""
    from pice_cloud.broker import ANONYMOUS_CONFIG, MosquittoProcess

    broker = MosquittoProcess(workdir, ANONYMOUS_CONFIG + "max_connections -1\nmax_queued_messages 10000\n"
                                                          "log_dest stderr\nlog_type error\n")
    broker.start()
    return broker


class MessageCounter:
    """Counts PICE's messages through the broker by kind (a subscriber of its own)."""

    FILTERS: ClassVar[dict[str, str]] = {
        "tasks": "pice/v1/edge/+/tasks", "candidates": "pice/v1/cloud/+/candidates/+/+",
        "refusals": "pice/v1/cloud/+/refusals/+/+", "statuses": "pice/v1/edge/+/status",
    }

    def __init__(self, url: str) -> None:
        from pice_edge.transport import BrokerSettings, MqttTransport

        self.counts = dict.fromkeys(self.FILTERS, 0)
        self.transport = MqttTransport(BrokerSettings(url=url), client_id=f"counter-{os.getpid()}")
        for kind, topic in self.FILTERS.items():
            self.transport.add_subscription(topic, functools.partial(self._count, kind))

    def _count(self, kind: str, _message: object) -> None:
        self.counts[kind] += 1

    def read(self) -> dict[str, int]:
        return dict(self.counts)


def registry_bytes_per_edge(count: int) -> float:
    from pice_cloud.fleet import Fleet
    from pice_edge.protocol import EdgeStatus

    statuses = [EdgeStatus(device_id=f"sim-{i:04d}", online=True, profile="simulated", runtime="simulated",
                           model_id="simulated", max_batch=4, free_slots=4) for i in range(count)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    fleet = Fleet()
    for status in statuses:
        fleet.update(status)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # Each status object is the registry's copy of what arrived on the wire: count it too.
    per_status = sum(sys.getsizeof(getattr(s, f)) for s in statuses[:1] for f in type(s).model_fields) \
        + sys.getsizeof(statuses[0])
    del fleet
    return grown / count + per_status


def ledger_means(stats: list[Any]) -> dict[str, dict[str, float]]:
    """The requests' cloud work ledgers (``pice.cloud_work``: `AnswerStats.cloud_work`), as
    means per request by purpose (a purpose a request did not run counts as zero for it)."""
    sums: dict[str, dict[str, float]] = {}
    for s in stats:
        for purpose, work in s.cloud_work.as_dict().items():
            row = sums.setdefault(purpose, dict.fromkeys(work, 0.0))
            for key, value in work.items():
                row[key] = row.get(key, 0.0) + float(value)
    n = len(stats) or 1
    return {purpose: {key: round(value / n, 4) for key, value in row.items()} for purpose, row in sums.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


#: Edges per helper process: paho-mqtt's network loop uses select(), which cannot watch file
#: descriptors past 1024, and each edge holds a few.
EDGES_PER_HOST = 200


def start_edge_hosts(count: int, args: argparse.Namespace, broker: MosquittoProcess) -> list[subprocess.Popen[str]]:
    hosts = []
    for first in range(0, count, EDGES_PER_HOST):
        hosts.append(subprocess.Popen(
            [sys.executable, __file__, "--host-edges", str(min(EDGES_PER_HOST, count - first)), "--first-edge",
             str(first), "--broker", broker.url, "--edge-rate", str(args.edge_rate), "--edge-batch",
             str(args.edge_batch), "--edge-batch-cost", str(args.edge_batch_cost), "--heartbeat", str(args.heartbeat),
             "--edge-queue", str(args.edge_queue)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=raise_fd_limit))
    return hosts


def stop_edge_hosts(hosts: list[subprocess.Popen[str]]) -> dict[str, Any]:
    """The hosts' counters, summed (refusals) and maxed (peak tasks held by one edge)."""
    reports: list[dict[str, Any]] = []
    for host in hosts:
        try:
            out, _ = host.communicate(input="", timeout=120)  # closing its stdin tells it to stop
        except subprocess.TimeoutExpired:
            host.kill()
            continue
        with contextlib.suppress(ValueError, IndexError):
            reports.append(json.loads(out.strip().splitlines()[-1]))
    return {"hosts": len(hosts), "reported": len(reports), "refused": sum(r["refused"] for r in reports),
            "peak_outstanding": max((r["peak_outstanding"] for r in reports), default=None)}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux ``/proc``; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def measure(count: int, args: argparse.Namespace, broker: MosquittoProcess,
                  hosts: list[subprocess.Popen[str]]) -> dict[str, Any]:
    from pice_cloud.bootstrap import start_system
    from pice_cloud.config import load_config
    from pice_cloud.llm.simulated import SimulatedBackend

    result: dict[str, Any] = {"edges": count, "replicas": args.replicas}
    started = time.perf_counter()
    for host in hosts:
        assert host.stdout is not None
        line = await asyncio.to_thread(host.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"an edge host failed: {line!r}")
    result["edges_connect_s"] = round(time.perf_counter() - started, 1)
    def replica(k: int) -> Any:
        # Each replica has its own simulated accelerator (replicas scale the cloud out).
        llm = SimulatedBackend(tokens_per_s=args.cloud_rate, batch_cost=args.cloud_batch_cost,
                               sketch_points=args.points)
        config = load_config(None, {
            "broker": {"url": broker.url}, "cloud_id": f"load-cloud-{k}",
            "edges": {"local": 0}, "discovery": {"enabled": False},
            "llm": {"max_batch": 256},
            "service": {"router": "off", "selector": "confidence", "sketch_guard": False, "expansion_guard": False,
                        "ensemble_width": args.ensemble_width, "max_points": args.points,
                        "tokens_per_point": args.tokens, "adaptive_budget": False},
        })
        return start_system(config, llm=llm)

    counters = MessageCounter(broker.url)
    await counters.transport.connect()
    async with contextlib.AsyncExitStack() as stack:
        services = [(await stack.enter_async_context(replica(k))).service for k in range(args.replicas)]
        for service in services:
            if not await service.fleet.wait_for(count, 120):
                raise RuntimeError(f"only {len(service.fleet.live())} of {count} edges registered")
        service = services[0]
        await asyncio.sleep(2 * args.heartbeat)  # every edge's tokens_per_s is irrelevant; let statuses settle

        # Light load: one request at a time.
        sketch_model = args.points * SKETCH_TOKENS_PER_POINT / args.cloud_rate
        point_model = args.tokens / args.edge_rate
        light = []
        for i in range(args.light):
            final = await service.ask(f"Light question {i}?", mode="progressive")
            light.append(final.stats)
        totals = [s.total_s for s in light]
        overheads = [s.total_s - sketch_model - point_model for s in light]
        result["light"] = {
            "requests": len(light), "model_s": round(sketch_model + point_model, 3),
            "latency_p50_s": round(statistics.median(totals), 3),
            "overhead_p50_s": round(statistics.median(overheads), 4),
            "overhead_share": round(statistics.median(overheads) / statistics.median(totals), 4),
            "schedule_p50_ms": round(1000 * statistics.median(s.schedule_s for s in light), 3),
            "points_cloud": sum(s.points_cloud for s in light),
            "cloud_work_per_request": ledger_means(light),
        }

        # Throughput: a closed loop of `concurrency` requests for `duration` seconds.
        before = counters.read()
        done: list[Any] = []
        errors = 0
        stop_at = time.perf_counter() + args.duration

        async def client(k: int) -> None:
            nonlocal errors
            i = 0
            while time.perf_counter() < stop_at:
                try:
                    # An HTTP load balancer in front of the replicas: round robin.
                    target = services[(k + i) % len(services)]
                    done.append((await target.ask(f"Question {k}-{i}?", mode="progressive")).stats)
                except Exception:
                    errors += 1
                i += 1

        trips_before = [(svc.fleet.round_trips, svc.fleet.round_trip_overhead_s) for svc in services]
        began = time.perf_counter()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        hosts_before = sum(process_cpu_s(h.pid) for h in hosts)
        broker_before = process_cpu_s(broker.proc.pid) if broker.proc is not None else 0.0
        await asyncio.gather(*(client(k) for k in range(args.concurrency)))
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        hosts_after = sum(process_cpu_s(h.pid) for h in hosts)
        broker_after = process_cpu_s(broker.proc.pid) if broker.proc is not None else 0.0
        elapsed = time.perf_counter() - began
        # This process: the cloud (service, scheduler, MQTT client, simulated LLM) plus the load
        # generator and the message counter, so an upper bound of the cloud's own CPU time.
        cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        after = counters.read()
        trips = sum(svc.fleet.round_trips - n for svc, (n, _) in zip(services, trips_before, strict=True))
        overhead = sum(svc.fleet.round_trip_overhead_s - t for svc, (_, t) in zip(services, trips_before, strict=True))
        sent = {kind: after[kind] - before[kind] for kind in after}
        points = sum(s.points_edge + s.points_cloud for s in done)
        result["throughput"] = {
            "concurrency": args.concurrency, "seconds": round(elapsed, 1), "completed": len(done),
            "errors": errors, "requests_per_s": round(len(done) / elapsed, 2),
            "latency_p50_s": round(percentile([s.total_s for s in done], 0.5), 3),
            "latency_p95_s": round(percentile([s.total_s for s in done], 0.95), 3),
            # Where the time goes: waiting for the sketch (the cloud), then for the points.
            "sketch_p50_s": round(percentile([s.sketch_s for s in done], 0.5), 3),
            "sketch_p95_s": round(percentile([s.sketch_s for s in done], 0.95), 3),
            "cloud_point_share": round(sum(s.points_cloud for s in done) / points, 4) if points else None,
            "schedule_p50_ms": round(1000 * percentile([s.schedule_s for s in done], 0.5), 3),
            "messages_per_request": {kind: round(sent[kind] / len(done), 2) for kind in ("tasks", "candidates",
                                                                                         "refusals")}
            if done else None,
            "statuses_per_s": round(sent["statuses"] / elapsed, 1),
            # A task's round trip less the edge's own time, on average: broker, MQTT and both
            # ends' event loops under this load (the simulator's link delay when it re-runs it).
            "round_trip_overhead_s": round(overhead / trips, 4) if trips else None,
            "cloud_cpu_ms_per_request": round(1000 * cpu_s / len(done), 2) if done else None,
            "requests_per_cloud_core_s": round(len(done) / cpu_s, 1) if cpu_s else None,
            # Cores busy on average: this process (cloud and load generator) and the edges' hosts.
            # Near the host's core count, the measurement is bound by this machine, not the design.
            "cores_busy": {"cloud": round(cpu_s / elapsed, 2),
                           "edge_hosts": round((hosts_after - hosts_before) / elapsed, 2),
                           "broker": round((broker_after - broker_before) / elapsed, 2), "of": os.cpu_count()},
            "unknown_or_unassigned": sum(n for svc in services for (_, kind), n in
                                         svc.transport.rejections.snapshot().items()
                                         if kind in {"unknown_request", "unassigned", "identity"}),
            # What the cloud LLM computed per request, by purpose (its ledger: the simulated
            # model's tokens; tools/simulate.py --validate compares its own with it).
            "cloud_work_per_request": ledger_means(done),
        }
    await counters.transport.close()
    result["registry_bytes_per_edge"] = round(registry_bytes_per_edge(count))
    return result


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| edges | replicas | light p50 s | overhead | schedule p50 ms | req/s | p50 / p95 s | cloud points "
            "| tasks / candidates / refusals per req | statuses/s | cloud CPU ms/req (req/s per core) "
            "| peak / capacity per edge | lost | registry B/edge |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lt, tp, host = r["light"], r["throughput"], r.get("edge_host") or {}
        messages = " / ".join(str(v) for v in (tp["messages_per_request"] or {}).values())
        cells = [r["edges"], r["replicas"], lt["latency_p50_s"], f"{lt['overhead_share']:.1%}", tp["schedule_p50_ms"],
                 tp["requests_per_s"], f"{tp['latency_p50_s']} / {tp['latency_p95_s']}",
                 f"{tp['cloud_point_share']:.1%}", messages, tp["statuses_per_s"],
                 f"{tp['cloud_cpu_ms_per_request']} ({tp['requests_per_cloud_core_s']})",
                 f"{host.get('peak_outstanding', '?')} / {r['capacity']}", tp["errors"], r["registry_bytes_per_edge"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--light", type=int, default=10, help="requests one at a time (overhead)")
    parser.add_argument("--concurrency", type=int, default=200, help="requests in flight (throughput)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of the throughput phase")
    # Budgets and edge sizes are the service's and pice-edge run's own defaults: the figures are
    # those of the configuration users get.
    from pice_cloud import ServiceConfig
    from pice_edge.node import EdgeNode

    service, node = ServiceConfig(), inspect.signature(EdgeNode).parameters
    parser.add_argument("--points", type=int, default=service.max_points, help="headings per sketch (the service's)")
    parser.add_argument("--tokens", type=int, default=service.tokens_per_point, help="tokens per point (the service's)")
    parser.add_argument("--ensemble-width", type=int, default=service.ensemble_width, help="(the service's)")
    parser.add_argument("--edge-rate", type=float, default=25.0, help="simulated edge tokens/s per sequence")
    parser.add_argument("--edge-batch", type=int, default=node["max_batch"].default,
                        help="edge max_batch (its default)")
    parser.add_argument("--edge-batch-cost", type=float, default=0.1)
    parser.add_argument("--edge-queue", type=int, default=node["max_queue"].default,
                        help="edge max_queue (its default): an edge holds at most edge-batch + edge-queue tasks")
    parser.add_argument("--replicas", default="1", help="cloud replicas sharing the broker and the fleet, "
                                                        "comma-separated (one run each)")
    parser.add_argument("--cloud-rate", type=float, default=40.0, help="simulated cloud tokens/s per sequence")
    parser.add_argument("--cloud-batch-cost", type=float, default=0.005)
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--host-edges", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first-edge", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--broker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_fd_limit()
    if args.host_edges:
        import logging

        # A thousand nodes would each log their first refusal.
        logging.basicConfig(level=logging.ERROR)
        asyncio.run(host_edges(args))
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(x) for x in args.edges.split(",")):
            for replicas in (int(x) for x in args.replicas.split(",")):
                run = argparse.Namespace(**{**vars(args), "replicas": replicas})
                broker = start_broker(Path(tmp))
                hosts = start_edge_hosts(count, run, broker)
                try:
                    row = asyncio.run(measure(count, run, broker, hosts))
                finally:
                    row_host = stop_edge_hosts(hosts)
                    broker.stop()
                row["edge_host"] = row_host
                row["capacity"] = args.edge_batch + args.edge_queue
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))
    if args.json:
        report = {"command": " ".join(sys.argv), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                  "settings": {**{k: v for k, v in vars(args).items()
                                  if k not in {"json", "host_edges", "first_edge", "broker"}},
                               # The simulated cloud writes every sketch at full length: the
                               # budget does not adapt to load here (see `cloud`).
                               "adaptive_budget": False},
                  "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
