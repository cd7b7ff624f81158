#!/usr/bin/env python3
"""Fleet simulator: discrete-event, driven by PICE's own planner (`pice_cloud.progressive.plan_request`).

What a fleet of many edges would do for one cloud, without the fleet. Modelled:

- **the cloud LLM** with continuous batching: every sequence in flight decodes one token per
  step, and a step of ``n`` sequences takes ``(1 + batch_cost * (n - 1)) / rate`` seconds; the
  GPU time of each step is shared among its sequences, so each request's GPU-seconds are known;
- **each edge** as `EdgeNode` with `pice_edge.runtimes.simulated.SimulatedRuntime` runs: a
  batch of up to ``max_batch`` tasks (collected for ``batch_window_s`` after the first), lasting
  as long as its longest sequence at the same step-cost model; a task that must wait and would
  miss its deadline at the edge's measured rate is refused (then the cloud expands the point),
  as `EdgeNode` does;
- **a progressive request**: the sketch on the cloud, `plan_request` over the edges' views (the same
  code and inputs as the service: outstanding tasks, measured rates, link delay), tasks out after
  half the link delay, candidates back after the other half, a point past its deadline or
  placed on no edge expanded by the cloud; a **cloud-only request**: its answer on the cloud.

Validation (``--validate``): the configuration of a measured ``tools/load_fleet.py`` run (real
Mosquitto, real MQTT edges, simulated models) re-run here; throughput and p50 latency are
compared. Projection (default): one cloud node serving a large model (published decode figures)
with 10/100/1,000 Jetson-class edges from the device profiles, PICE vs cloud-only at the same
offered load: throughput, p50/p95 latency and cloud GPU-seconds per request, a table, JSON and a plot.

    python tools/simulate.py --validate tools/results/load_fleet.json
    python tools/simulate.py --json tools/results/simulate.json --plot tools/results/simulate.png
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import json
import math
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pice_cloud import CloudView, EdgeView, GenerationOptions, ServiceConfig  # noqa: E402
from pice_cloud.progressive import PointSampling, plan_request  # noqa: E402
from pice_edge import queued_finish_s  # noqa: E402

#: Sketch tokens per heading (the service's sketches: a number, a few words and a newline).
SKETCH_TOKENS_PER_POINT = 6

#: The cloud: Llama-3.3-70B-Instruct FP8 on 2x H100 80GB (tensor parallel 2) with NVIDIA NIM
#: 1.8.0 (TensorRT-LLM), from NVIDIA's published NIM benchmark (docs.nvidia.com/nim/benchmarking/
#: llm/1.0.0/performance, 5,000 input / 500 output tokens): inter-token latency 18.58 ms at
#: concurrency 1 and 59.73 ms at 50, throughput flat (~920 tokens/s) from 100 on. So 53.8 tokens/s
#: for one sequence, and each extra sequence adds 4.5% of a step; 100 sequences at most.
CLOUD_70B: dict[str, Any] = {"name": "Llama-3.3-70B FP8, 2x H100 (NIM 1.8.0)", "rate": 1000 / 18.58,
                             "batch_cost": (59.73 / 18.58 - 1) / 49, "max_batch": 100, "gpus": 2}

#: Edges: SmolLM2-135M (fp16, 0.27 GB of weights) decoding at 35% of the module's memory
#: bandwidth per token (decode reads every weight once per step; 35% is what small-batch decode
#: reaches on these modules in published llama.cpp/TensorRT figures, an assumption stated here),
#: bandwidths from the profiles' datasheets (pice_edge/firmware_configs/). Batching small models is
#: nearly free until compute binds: 5% of a step per extra sequence.
WEIGHT_BYTES = 0.27e9
EFFICIENCY = 0.35
EDGE_PROFILES: dict[str, dict[str, Any]] = {
    "jetson-orin-nano-8gb": {"bandwidth_gbs": 68.0, "max_batch": 8},
    "jetson-orin-nx-16gb": {"bandwidth_gbs": 102.4, "max_batch": 8},
    "jetson-agx-orin-64gb": {"bandwidth_gbs": 204.8, "max_batch": 16},
}


def edge_rate(profile: str) -> float:
    return float(EFFICIENCY * EDGE_PROFILES[profile]["bandwidth_gbs"] * 1e9 / WEIGHT_BYTES)


# --- the event loop -------------------------------------------------------------------------

class Sim:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (self.now + max(0.0, delay), next(self._seq), action))

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            self.now, _, action = heapq.heappop(self._events)
            action()
        self.now = until


@dataclass
class Sequence_:
    tokens: int
    done: Callable[[], None]
    owner: Request | None


class Cloud:
    """Continuous batching: all sequences in flight decode one token per step."""

    def __init__(self, sim: Sim, rate: float, batch_cost: float, max_batch: int) -> None:
        self.sim, self.rate, self.batch_cost, self.max_batch = sim, rate, batch_cost, max_batch
        self.active: list[Sequence_] = []
        self.waiting: list[Sequence_] = []
        self.stepping = False
        self.busy_s = 0.0

    def submit(self, tokens: int, owner: Request | None, done: Callable[[], None]) -> None:
        self.waiting.append(Sequence_(max(1, tokens), done, owner))
        if not self.stepping:
            self._step()

    def _step(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            self.active.append(self.waiting.pop(0))
        if not self.active:
            self.stepping = False
            return
        self.stepping = True
        n = len(self.active)
        seconds = (1 + self.batch_cost * (n - 1)) / self.rate
        self.busy_s += seconds
        for seq in self.active:
            if seq.owner is not None:
                seq.owner.gpu_s += seconds / n

        def end() -> None:
            finished = []
            for seq in self.active:
                seq.tokens -= 1
                if seq.tokens <= 0:
                    finished.append(seq)
            self.active = [s for s in self.active if s.tokens > 0]
            for seq in finished:
                seq.done()
            self._step()

        self.sim.at(seconds, end)

    def view(self) -> CloudView:
        # As `CloudMeter`: generations in flight or waiting (the service counts calls, not requests).
        return CloudView(queue_depth=len(self.active) + len(self.waiting), tokens_per_s=self.rate,
                         max_batch=self.max_batch)


@dataclass
class Task:
    request: Request
    point: int
    tokens: int
    deadline: float


class Edge:
    """`EdgeNode` + `SimulatedRuntime`: batches of up to ``max_batch``, collected for a window."""

    def __init__(self, sim: Sim, device_id: str, rate: float, batch_cost: float, max_batch: int,
                 window_s: float = 0.02, max_queue: int = 256) -> None:
        self.sim, self.device_id, self.max_queue = sim, device_id, max_queue
        self.rate, self.batch_cost, self.max_batch, self.window_s = rate, batch_cost, max_batch, window_s
        self.queue: list[Task] = []
        self.running = 0
        self.collecting = False
        #: As the node measures it (tokens / batch seconds, smoothed); the load tools warm the
        #: edges up one request at a time first, so it starts at the rate of a lone sequence.
        self.tokens_per_s = rate
        self.outstanding = 0  # the cloud's view: sent, not answered

    def would_miss(self, task: Task) -> bool:
        ahead = len(self.queue) + self.running
        if ahead < self.max_batch or self.tokens_per_s <= 0:
            return False
        return self.sim.now + queued_finish_s(ahead, self.max_batch, task.tokens, self.tokens_per_s) > task.deadline

    def receive(self, task: Task) -> bool:
        """False: refused (a full queue, or the node's would-miss-deadline rule)."""
        if len(self.queue) >= self.max_queue or self.would_miss(task):
            return False
        self.queue.append(task)
        if not self.running and not self.collecting:
            self.collecting = True
            self.sim.at(self.window_s, self._start)
        return True

    def _start(self) -> None:
        self.collecting = False
        batch, self.queue = self.queue[:self.max_batch], self.queue[self.max_batch:]
        if not batch:
            return
        self.running = len(batch)
        longest = max(t.tokens for t in batch)
        seconds = longest * (1 + self.batch_cost * (len(batch) - 1)) / self.rate

        def end() -> None:
            rate = sum(t.tokens for t in batch) / seconds
            self.tokens_per_s = rate if self.tokens_per_s == 0 else 0.7 * self.tokens_per_s + 0.3 * rate
            self.running = 0
            for task in batch:
                task.request.edge_done(self, task)
            if self.queue:
                self._start()

        self.sim.at(seconds, end)

    def view(self, link_delay_s: float) -> EdgeView:
        return EdgeView(device_id=self.device_id, max_batch=self.max_batch,
                        queue_depth=len(self.queue) + self.running, outstanding=self.outstanding,
                        tokens_per_s=self.tokens_per_s, link_delay_s=link_delay_s)


@dataclass
class Config:
    cloud_rate: float
    cloud_batch_cost: float
    cloud_max_batch: int
    edges: list[tuple[float, float, int]]  # (rate, batch_cost, max_batch) per edge
    points: int = 5
    tokens_per_point: int = 48
    answer_tokens: int = 240
    link_delay_s: float = 0.01
    window_s: float = 0.02
    gpus: int = 1
    edge_queue: int = 256

    @functools.cached_property
    def service(self) -> ServiceConfig:
        """The service settings the planner runs with (one edge per point, as measured)."""
        return ServiceConfig(max_points=self.points, tokens_per_point=self.tokens_per_point, ensemble_width=1)


@dataclass
class Request:
    system: System
    mode: str
    started: float
    gpu_s: float = 0.0
    finished: float | None = None
    points_cloud: int = 0
    done_points: set[int] = field(default_factory=set)
    #: Points the cloud is expanding (once each; whichever of it and a late edge ends first wins).
    cloud_claimed: set[int] = field(default_factory=set)
    tasks: dict[int, list[Edge]] = field(default_factory=dict)

    def begin(self) -> None:
        cfg, cloud = self.system.config, self.system.cloud
        if self.mode == "cloud":
            cloud.submit(cfg.answer_tokens, self, self.finish)
        else:
            cloud.submit(cfg.points * SKETCH_TOKENS_PER_POINT, self, self.sketched)

    def sketched(self) -> None:
        sys_, cfg = self.system, self.system.config
        views = [e.view(cfg.link_delay_s) for e in sys_.edges]
        plan = plan_request(cfg.points, views, config=cfg.service, tokens_per_point=cfg.tokens_per_point,
                            sampling=PointSampling.of(cfg.service, GenerationOptions()), cloud=sys_.cloud.view())
        for point, (devices, wait) in enumerate(zip(plan.devices, plan.deadlines_s, strict=True)):
            if not devices:
                self.cloud_point(point)
                continue
            deadline = sys_.sim.now + wait
            for device in devices:
                edge = sys_.by_id[device]
                edge.outstanding += 1
                self.tasks.setdefault(point, []).append(edge)
                task = Task(self, point, cfg.tokens_per_point, deadline)
                sys_.sim.at(cfg.link_delay_s / 2, functools.partial(self.deliver, edge, task))
            sys_.sim.at(wait, functools.partial(self.deadline, point))

    def deliver(self, edge: Edge, task: Task) -> None:
        if not edge.receive(task):
            edge.outstanding -= 1
            self.system.sim.at(self.system.config.link_delay_s / 2, lambda: self.cloud_point(task.point))

    def edge_done(self, edge: Edge, task: Task) -> None:
        def back() -> None:
            edge.outstanding -= 1
            self.point_done(task.point)

        self.system.sim.at(self.system.config.link_delay_s / 2, back)

    def deadline(self, point: int) -> None:
        if point not in self.done_points:
            self.cloud_point(point)

    def cloud_point(self, point: int) -> None:
        if point in self.done_points or point in self.cloud_claimed or self.finished is not None:
            return
        self.points_cloud += 1
        self.cloud_claimed.add(point)
        self.system.cloud.submit(self.system.config.tokens_per_point, self, lambda: self.point_done(point))

    def point_done(self, point: int) -> None:
        if point in self.done_points or self.finished is not None:
            return
        self.done_points.add(point)
        if len(self.done_points) == self.system.config.points:
            self.finish()

    def finish(self) -> None:
        if self.finished is None:
            self.finished = self.system.sim.now
            self.system.completed.append(self)


class System:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sim = Sim()
        self.cloud = Cloud(self.sim, config.cloud_rate, config.cloud_batch_cost, config.cloud_max_batch)
        self.edges = [Edge(self.sim, f"e{i}", r, c, b, config.window_s, config.edge_queue)
                      for i, (r, c, b) in enumerate(config.edges)]
        self.by_id = {e.device_id: e for e in self.edges}
        self.completed: list[Request] = []

    def request(self, mode: str) -> Request:
        req = Request(self, mode, self.sim.now)
        req.begin()
        return req


def closed_loop(config: Config, mode: str, concurrency: int, duration: float) -> dict[str, Any]:
    """As ``tools/load_fleet.py`` drives the real system: ``concurrency`` clients, each asking
    again as soon as its answer arrives, until ``duration``; the requests in flight then finish,
    and throughput is completed requests over the whole time."""
    system = System(config)

    def client() -> None:
        req = system.request(mode)
        original = req.finish

        def again() -> None:
            original()
            if system.sim.now < duration:
                client()

        req.finish = again  # type: ignore[method-assign]

    for _ in range(concurrency):
        client()
    system.sim.run(duration + 3600)
    elapsed = max((r.finished or 0.0) for r in system.completed) if system.completed else duration
    return summarise(system, mode, 0.0, elapsed, started_before=duration)


def open_loop(config: Config, mode: str, rate: float, duration: float, warmup: float = 30.0,
              seed: int = 1) -> dict[str, Any]:
    system = System(config)
    rng = random.Random(seed)

    def arrive() -> None:
        system.request(mode)
        if system.sim.now < warmup + duration:
            system.sim.at(rng.expovariate(rate), arrive)

    system.sim.at(0.0, arrive)
    # Let the requests that arrived in the window finish (bounded).
    system.sim.run(warmup + duration + 600)
    return summarise(system, mode, warmup, duration)


def summarise(system: System, mode: str, warmup: float, duration: float,
              started_before: float | None = None) -> dict[str, Any]:
    """Requests that arrived in [warmup, warmup + duration) (or before ``started_before``)."""
    end = warmup + duration if started_before is None else started_before
    done = [r for r in system.completed if r.started >= warmup and r.finished is not None and r.started < end]
    lat = sorted(r.finished - r.started for r in done if r.finished is not None)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan

    points = len(done) * system.config.points if mode != "cloud" else 0
    return {
        "mode": mode, "completed": len(done), "requests_per_s": round(len(done) / duration, 3),
        "latency_p50_s": round(pct(0.5), 3), "latency_p95_s": round(pct(0.95), 3),
        "gpu_s_per_request": round(statistics.fmean(r.gpu_s for r in done) * system.config.gpus, 4) if done else None,
        "cloud_point_share": round(sum(r.points_cloud for r in done) / points, 4) if points else None,
    }


# --- validation and projection ---------------------------------------------------------------

def validate(path: Path) -> dict[str, Any]:
    """Re-run each measured load_fleet row here; compare throughput and p50 latency."""
    report = json.loads(path.read_text())
    s = report["settings"]
    out = []
    for row in report["rows"]:
        if row.get("replicas", 1) != 1:
            continue  # the simulator models one cloud
        config = Config(cloud_rate=s["cloud_rate"], cloud_batch_cost=s["cloud_batch_cost"], cloud_max_batch=256,
                        edge_queue=int(s.get("edge_queue", 256)),
                        edges=[(float(s["edge_rate"]), float(s["edge_batch_cost"]), int(s["edge_batch"]))]
                        * row["edges"],
                        points=s["points"], tokens_per_point=s["tokens"], link_delay_s=0.002)
        measured = row["throughput"]
        simulated = closed_loop(config, "progressive", s["concurrency"], measured["seconds"])
        out.append({
            "edges": row["edges"], "concurrency": s["concurrency"],
            "measured": {k: measured[k] for k in ("requests_per_s", "latency_p50_s", "cloud_point_share")},
            "simulated": {k: simulated[k] for k in ("requests_per_s", "latency_p50_s", "cloud_point_share")},
            "throughput_error": round(simulated["requests_per_s"] / measured["requests_per_s"] - 1, 4),
            "p50_error": round(simulated["latency_p50_s"] / measured["latency_p50_s"] - 1, 4),
        })
    return {"source": str(path), "rows": out}


def project(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    cloud = CLOUD_70B
    for profile in args.profiles.split(","):
        rate = edge_rate(profile)
        spec = EDGE_PROFILES[profile]
        for count in (int(x) for x in args.edges.split(",")):
            config = Config(cloud_rate=cloud["rate"], cloud_batch_cost=cloud["batch_cost"],
                            cloud_max_batch=cloud["max_batch"], gpus=cloud["gpus"],
                            edges=[(rate, 0.05, spec["max_batch"])] * count, points=args.points,
                            tokens_per_point=args.tokens, answer_tokens=args.points * args.tokens,
                            link_delay_s=args.link_delay)
            for load in (float(x) for x in args.rates.split(",")):
                pice = open_loop(config, "progressive", load, args.duration)
                only = open_loop(config, "cloud", load, args.duration)
                rows.append({"profile": profile, "edge_tokens_per_s": round(rate, 1), "edges": count,
                             "offered_per_s": load, "pice": pice, "cloud_only": only})
                print(json.dumps(rows[-1]), flush=True)
    return {"cloud": cloud, "edge_model": {"weights_bytes": WEIGHT_BYTES, "bandwidth_efficiency": EFFICIENCY},
            "rows": rows}


def table(projection: dict[str, Any]) -> str:
    lines = ["| edges (profile) | offered/s | PICE req/s | cloud-only req/s | PICE p50 / p95 s "
             "| cloud-only p50 / p95 s | GPU-s/req PICE | GPU-s/req cloud-only | cloud points |", "|" + "---|" * 9]
    for r in projection["rows"]:
        p, c = r["pice"], r["cloud_only"]
        lines.append(f"| {r['edges']} ({r['profile']}) | {r['offered_per_s']} | {p['requests_per_s']} | "
                     f"{c['requests_per_s']} | {p['latency_p50_s']} / {p['latency_p95_s']} | "
                     f"{c['latency_p50_s']} / {c['latency_p95_s']} | {p['gpu_s_per_request']} | "
                     f"{c['gpu_s_per_request']} | {p['cloud_point_share']:.1%} |")
    return "\n".join(lines)


def plot(projection: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    keys = sorted({(r["profile"], r["edges"]) for r in projection["rows"]}, key=lambda k: (k[0], k[1]))
    for profile, count in keys:
        rows = sorted((r for r in projection["rows"] if (r["profile"], r["edges"]) == (profile, count)),
                      key=lambda r: r["offered_per_s"])
        x = [r["offered_per_s"] for r in rows]
        label = f"PICE, {count} x {profile.removeprefix('jetson-')}"
        axes[0].plot(x, [r["pice"]["requests_per_s"] for r in rows], marker="o", label=label)
        axes[1].plot(x, [r["pice"]["latency_p50_s"] for r in rows], marker="o", label=label)
        axes[2].plot(x, [r["pice"]["gpu_s_per_request"] for r in rows], marker="o", label=label)
    base = sorted({r["offered_per_s"]: r for r in projection["rows"]}.values(), key=lambda r: r["offered_per_s"])
    x = [r["offered_per_s"] for r in base]
    axes[0].plot(x, [r["cloud_only"]["requests_per_s"] for r in base], "k--", label="cloud-only")
    axes[1].plot(x, [r["cloud_only"]["latency_p50_s"] for r in base], "k--", label="cloud-only")
    axes[2].plot(x, [r["cloud_only"]["gpu_s_per_request"] for r in base], "k--", label="cloud-only")
    axes[0].set(xlabel="offered requests/s", ylabel="completed requests/s", title="Throughput")
    axes[1].set(xlabel="offered requests/s", ylabel="p50 latency (s)", title="Latency", yscale="log")
    axes[2].set(xlabel="offered requests/s", ylabel="cloud GPU-s per request", title="Cloud cost")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Simulated: {projection['cloud']['name']} + Jetson edges running SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate", type=Path, default=None, help="a tools/load_fleet.py JSON to re-run")
    parser.add_argument("--profiles", default="jetson-orin-nano-8gb")
    parser.add_argument("--edges", default="10,100,1000")
    parser.add_argument("--rates", default="0.5,2,8,32", help="offered requests/s (Poisson)")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds of arrivals")
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=80, help="tokens per point (the service's default)")
    parser.add_argument("--link-delay", type=float, default=0.04, help="round trip cloud-edge, seconds")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.validate:
        result = validate(args.validate)
        for row in result["rows"]:
            print(json.dumps(row))
    else:
        result = project(args)
        print(table(result))
        if args.plot:
            plot(result, args.plot)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result["command"] = " ".join(sys.argv)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
