#!/usr/bin/env python3
"""Fleet simulator: discrete-event, driven by PICE's own planner (`pice_cloud.progressive.plan_request`).

What a fleet of many edges would do for one cloud, without the fleet. Modelled:

- **the cloud LLM** with continuous batching and chunked prefill: each step decodes one token
  for every sequence in flight and prefills up to ``prefill_chunk`` prompt tokens of the
  sequences admitted since; a step takes ``(1 + batch_cost * (n - 1)) / rate`` seconds for its
  ``n`` decoding sequences plus ``prefill tokens / prefill_rate``. The decode part of a step's GPU
  time is shared among its decoding sequences, the prefill part among the prompts it prefilled
  (by tokens), so each request's GPU-seconds are known, by purpose;
- **the cloud's work per request, as measured** (``--ledger``, a ``tools/bench.py`` JSON, or the
  rows of ``tools/eval_modes.py``): each simulated request replays one measured request's cloud
  work ledger (``pice.cloud_work``; the bench's light-load requests, in turn), its token counts as
  measured (`load_mix` says why they are not scaled): the sketch's prompt prefill and decode, a
  re-sketch and the cloud-only answer after refused sketches where that request had them, the
  cloud's first point, its fallback expansions and their re-samples (as refusals of that many of
  its points' edge candidates), the ensemble's scoring pass; ``auto`` replays the default mode's
  requests, the ones its router answered cloud-only included; ``cloud`` replays cloud-only
  answers. Points the fleet cannot take in time (no free edge, a refusal, a missed deadline) are
  expanded by the cloud on top, at the measured cost of a fallback expansion. The embedding
  model's work (route, sketch_check, selection: MiniLM on the cloud host's CPU) is reported beside
  the GPU's, as measured, not simulated;
- **each edge** as `EdgeNode` with `pice_edge.runtimes.simulated.SimulatedRuntime` runs: a
  batch of up to ``max_batch`` tasks (collected for ``batch_window_s`` after the first), lasting
  as long as its longest sequence at the same step-cost model; a task that must wait and would
  miss its deadline at the edge's measured rate is refused (then the cloud expands the point,
  unless another replica of it is out), as `EdgeNode` does;
- **a progressive request**: its sketch on the cloud, `plan_request` over the edges' views (the
  same code and inputs as the service: outstanding tasks, measured rates, link delay, ensemble
  width), tasks out after half the link delay, candidates back after the other half; a point
  settles when all its replicas answered, or at its deadline (with what arrived, else the cloud
  expands it), as `pice_cloud.progressive.ProgressiveRequest` rules.

Budgets (points, tokens per point, cloud-only answer length, ensemble width, deadlines) are the
service's own defaults (`pice_cloud.config.ServiceConfig`); the edges' batch and queue are
`EdgeNode`'s and their device profile's; each progressive request gets `plan_budget`'s budget
under the load at its start, as the service does (a queued cloud writes shorter sketches: the
measured sketch's decode tokens scale with its points and words; a fleet short of free slots
gets shorter points). Not modelled: re-placing a refused point on another edge (the cloud takes
it), the HTTP and MQTT hosts' CPU,
prefix caching (every prompt is prefilled in full, as the ledger counts it: an engine that reuses
the KV cache of the sketch prompt's fixed instructions and examples, most of that prompt, would
compute less).

Validation (``--validate``): the configuration of a measured ``tools/load_fleet.py`` run (real
Mosquitto, real MQTT edges, simulated models) re-run here; throughput, p50 latency and, where the
run recorded it, the cloud work ledger per request are compared. Projection (default): one cloud
node serving a large model (published figures) with 10/100/1,000 Jetson-class edges from the
device profiles, PICE (auto and progressive) vs cloud-only at the same offered load: throughput,
p50/p95 latency and cloud GPU-seconds per request by purpose, tables, JSON and a plot.

    python tools/simulate.py --validate tools/results/load_fleet.json
    python tools/simulate.py --ledger tools/results/bench.json --json tools/results/simulate.json \\
        --plot tools/results/simulate.png
"""

from __future__ import annotations

import argparse
import functools
import heapq
import inspect
import itertools
import json
import math
import random
import statistics
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load_fleet import percentile  # noqa: E402

from pice_cloud import Budget, CloudView, EdgeView, GenerationOptions, ServiceConfig  # noqa: E402
from pice_cloud.cloud_ledger import EMBEDDING_PURPOSES, PURPOSES  # noqa: E402
from pice_cloud.progressive import PointSampling, plan_request  # noqa: E402
from pice_cloud.scheduler import plan_budget  # noqa: E402
from pice_edge import finish_s, per_sequence_rate  # noqa: E402
from pice_edge.node import EdgeNode  # noqa: E402
from pice_edge.profiles import load_profile  # noqa: E402

#: The service's defaults: every budget the simulator does not take from its flags.
SERVICE = ServiceConfig()
#: `EdgeNode`'s own defaults (batch window, queue length).
_NODE = inspect.signature(EdgeNode.__init__).parameters
EDGE_WINDOW_S: float = _NODE["batch_window_s"].default
EDGE_QUEUE: int = _NODE["max_queue"].default

DEFAULT_LEDGER = ROOT / "tools" / "results" / "bench.json"
#: tools/bench.py's mode names -> the simulator's.
BENCH_MODES = {"cloud": "cloud", "pice": "progressive", "pice-router": "auto"}
#: The cloud LLM's purposes (the rest of the ledger is the embedding model's, on the host's CPU).
LLM_PURPOSES = tuple(p for p in PURPOSES if p not in EMBEDDING_PURPOSES)

#: Only without a ledger: `pice_cloud.llm.simulated.SimulatedBackend`'s sketch, 6 tokens a
#: heading, no prompt (what tools/load_fleet.py's simulated cloud does; a lower bound otherwise).
SIMULATED_SKETCH_TOKENS_PER_HEADING = 6
#: Link delay of a re-run whose measurement did not record its round trips' overhead (seconds):
#: loopback MQTT through an idle Mosquitto.
VALIDATION_LINK_DELAY_S = 0.002
#: `SimulatedBackend` has no batch cap: every call sleeps its own time, side by side.
SIMULATED_BACKEND_MAX_BATCH = 1_000_000

# --- the projected cloud ----------------------------------------------------------------------
#: Llama-3.3-70B-Instruct FP8 on 2x H100 80GB (tensor parallel 2) with NVIDIA NIM 1.8.0
#: (TensorRT-LLM), NVIDIA's published NIM benchmark (docs.nvidia.com/nim/benchmarking/llm/1.0.0/
#: performance). 5,000 input / 500 output tokens: inter-token latency (ms) and throughput (tokens/s)
#: by concurrency; time to first token at concurrency 1 (ms): 406.77 with 5,000 input tokens,
#: 47.77 with 500 (the 500 input / 2,000 output table).
NIM_ITL_MS = {1: 18.58, 5: 21.83, 25: 38.75, 50: 59.73, 100: 92.91}
NIM_THROUGHPUT = {1: 51.67, 50: 814.37, 100: 917.26}
NIM_TTFT_MS = {5000: 406.77, 500: 47.77}
#: Prefill speed: the difference of the two first-token times is the prefill of 4,500 tokens
#: (the fixed costs, request handling and the first decode step, cancel): 12,535 tokens/s.
PREFILL_TOKENS_PER_S = (5000 - 500) / ((NIM_TTFT_MS[5000] - NIM_TTFT_MS[500]) / 1000)


def _decode_step_s(concurrency: int) -> float:
    """The decode part of a step at ``concurrency`` in the 5,000/500 run: its inter-token latency
    less the prefill that steps carry there (in steady state a step prefills ``concurrency`` x
    5,000 / 500 prompt tokens: each sequence brings 5,000 for its 500 steps)."""
    return NIM_ITL_MS[concurrency] / 1000 - concurrency * (5000 / 500) / PREFILL_TOKENS_PER_S


#: Decode: 53.8 tokens/s for one sequence; each extra sequence adds 0.14% of a step (the decode
#: part is 18.58 ms alone and 19.84 ms at 50: the engine reads the weights once per step either
#: way). With the prefill charged separately this reproduces the published inter-token latency
#: at 50 and the throughput at 100 within 8% (``check`` in the JSON: `nim_check`); the previous
#: model folded the 5,000-token prompts' prefill into a 4.5% step cost per sequence, so prompts
#: of other lengths were mispriced. The engine runs at most 100 sequences (throughput is flat
#: from 100 on, the first-token time grows), and prefills at most 8,192 tokens a step
#: (TensorRT-LLM's default ``max_num_tokens``; an assumption, the page does not say).
CLOUD_70B: dict[str, Any] = {
    "name": "Llama-3.3-70B FP8, 2x H100 (NIM 1.8.0)", "rate": 1000 / NIM_ITL_MS[1],
    "batch_cost": (_decode_step_s(50) / (NIM_ITL_MS[1] / 1000) - 1) / 49, "max_batch": 100, "gpus": 2,
    "prefill_rate": PREFILL_TOKENS_PER_S, "prefill_chunk": 8192,
    "source": "docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance (Llama-3.3-70b-instruct, NIM 1.8.0, "
              "2 x H100 80G, fp8 TP2)",
}

#: Edges: SmolLM2-135M (fp16, 0.27 GB of weights) decoding at 35% of the module's memory
#: bandwidth per token (decode reads every weight once per step; 35% is what small-batch decode
#: reaches on these modules in published llama.cpp/TensorRT figures, an assumption stated here),
#: bandwidths from the profiles' datasheets (pice_edge/firmware_configs/); batch size from the
#: device profile itself. Batching small models is nearly free until compute binds: 5% of a step
#: per extra sequence.
WEIGHT_BYTES = 0.27e9
EFFICIENCY = 0.35
EDGE_BANDWIDTH_GBS: dict[str, float] = {
    "jetson-orin-nano-8gb": 68.0, "jetson-orin-nx-16gb": 102.4, "jetson-agx-orin-64gb": 204.8,
}
EDGE_BATCH_COST = 0.05


def edge_rate(profile: str) -> float:
    return float(EFFICIENCY * EDGE_BANDWIDTH_GBS[profile] * 1e9 / WEIGHT_BYTES)


def edge_max_batch(profile: str) -> int:
    return load_profile(profile).max_batch


# --- the cloud's work per request: measured (a ledger) or assumed -----------------------------

@dataclass(frozen=True)
class Work:
    """One purpose's cloud work in one request (or per sequence): a `pice_cloud.cloud_ledger.Work`."""

    sequences: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    #: Engine seconds as measured on the bench host (reported for the embedding model only).
    seconds: float = 0.0

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Work:
        prefill, decode = float(data.get("prefill_tokens", 0) or 0), float(data.get("decode_tokens", 0) or 0)
        sequences = float(data.get("sequences") or data.get("calls") or (1 if prefill or decode else 0))
        return cls(sequences, prefill, decode, float(data.get("seconds", 0) or 0))

    def per_sequence(self) -> Work:
        n = max(self.sequences, 1.0)
        return Work(1.0, self.prefill / n, self.decode / n, self.seconds / n)


@dataclass(frozen=True)
class Sample:
    """One measured request: how it was served, its points and its cloud work by purpose."""

    served: str  # "progressive" or "cloud"
    points: int
    work: Mapping[str, Work]

    def get(self, purpose: str) -> Work | None:
        work = self.work.get(purpose)
        return work if work is not None and (work.prefill or work.decode) else None


@dataclass(frozen=True)
class Mix:
    """The requests each simulated mode replays, in turn (``cloud``, ``progressive``, ``auto``)."""

    source: str
    modes: Mapping[str, tuple[Sample, ...]]
    #: A cloud expansion of a point the fleet could not take: pooled from the measured fallback
    #: expansions, else estimated (see `load_mix`).
    fallback: Work
    fallback_source: str
    #: The configuration the ledger was measured at (the bench's environment), if known.
    measured_at: dict[str, Any] | None = None
    note: str = ""

    def describe(self) -> dict[str, Any]:
        means: dict[str, dict[str, dict[str, float]]] = {}
        for mode, samples in self.modes.items():
            purposes = sorted({p for s in samples for p in s.work})
            means[mode] = {p: {"prefill_tokens": round(statistics.fmean(s.work[p].prefill if p in s.work else 0.0
                                                                        for s in samples), 1),
                               "decode_tokens": round(statistics.fmean(s.work[p].decode if p in s.work else 0.0
                                                                       for s in samples), 1)}
                           for p in purposes}
        return {"source": self.source, "requests": {m: len(s) for m, s in self.modes.items()},
                "measured_at": self.measured_at, "per_request": means,
                "fallback_per_expansion": {"prefill_tokens": round(self.fallback.prefill, 1),
                                           "decode_tokens": round(self.fallback.decode, 1),
                                           "source": self.fallback_source},
                "note": self.note}


def assumed_mix(points: int, answer_tokens: int, tokens_per_point: int, sketch_tokens: int = SERVICE.sketch_tokens,
                source: str = "assumed") -> Mix:
    """Without a ledger: `SimulatedBackend`'s work (a sketch of 6 tokens a heading, answers and
    expansions to their budgets, no prompt). A lower bound for a real model."""
    sketch = Sample("progressive", points,
                    {"sketch": Work(1, 0.0, min(sketch_tokens, SIMULATED_SKETCH_TOKENS_PER_HEADING * points))})
    answer = Sample("cloud", 0, {"cloud_answer": Work(1, 0.0, answer_tokens)})
    return Mix(source, {"cloud": (answer,), "progressive": (sketch,)}, Work(1, 0.0, tokens_per_point),
               "expansion budget, no prompt (assumed)",
               note="no ledger: a sketch of 6 decode tokens a heading and nothing else (no prompt prefill, "
                    "re-sketches, refused sketches, first point or scoring); run tools/bench.py and pass --ledger")


def _sample(outcome: Mapping[str, Any]) -> Sample:
    work = {p: Work.of(w) for p, w in (outcome.get("cloud_work") or {}).items() if p in PURPOSES}
    points = int(outcome.get("points_edge", 0) or 0) + int(outcome.get("points_cloud", 0) or 0)
    return Sample(str(outcome.get("served") or outcome.get("mode_served") or "progressive"), points, work)


def load_mix(path: Path, tokens_per_point: int) -> Mix | None:
    """The measured requests of a ``tools/bench.py`` JSON: its light-load requests (``light_load``,
    each with its ``cloud_work``), by mode; or of a ``tools/eval_modes.py`` rows file (``.jsonl``,
    one answered question a line, modes cloud/progressive/auto). None when it has none (an older
    bench)."""
    if path.suffix == ".jsonl":
        report: dict[str, Any] = {"light_load": [json.loads(line) for line in path.read_text().splitlines()
                                                 if line.strip()]}
        names = {"cloud": "cloud", "progressive": "progressive", "auto": "auto"}
    else:
        report, names = json.loads(path.read_text()), BENCH_MODES
    modes: dict[str, list[Sample]] = {}
    for outcome in report.get("light_load") or []:
        mode = names.get(str(outcome.get("mode")))
        if mode is None or not outcome.get("ok", True) or not outcome.get("cloud_work"):
            continue
        modes.setdefault(mode, []).append(_sample(outcome))
    if "progressive" not in modes and "auto" not in modes:
        return None
    # A point the fleet could not take costs what the measured fallback expansions cost each;
    # without any, the expansion prompt is estimated as the sketch's prompt plus the sketch (it
    # carries the question and the whole outline) and its decode as the expansion budget.
    fallbacks = [s.work["fallback_expansion"] for samples in modes.values() for s in samples
                 if s.get("fallback_expansion")]
    if fallbacks:
        n = sum(max(w.sequences, 1.0) for w in fallbacks)
        fallback = Work(1.0, sum(w.prefill for w in fallbacks) / n, sum(w.decode for w in fallbacks) / n)
        fallback_source = f"measured ({n:.0f} fallback expansions)"
    else:
        sketches = [s.work["sketch"] for samples in modes.values() for s in samples if s.get("sketch")]
        prompt = statistics.fmean(w.prefill + w.decode for w in sketches) if sketches else 0.0
        fallback, fallback_source = Work(1.0, prompt, tokens_per_point), "estimated: sketch prompt + sketch, budget"
    env = report.get("environment") or {}
    measured_at = {k: env[k] for k in ("model", "max_points", "tokens_per_point", "max_answer_tokens",
                                       "ensemble_width", "edges", "edge_max_batch") if k in env} or None
    note = ("token counts as measured (SmolLM2's tokenizer and outputs), not scaled to the projected model: "
            "the budgets bound the decode (sketch format, tokens per point, answer length) whatever the model, "
            "and the prompts are the same text (Llama 3's 128k-token vocabulary would write them in somewhat "
            "fewer tokens); how often sketches are refused (re-sketches, cloud-only after refusals) is the "
            "measured sketcher's, an upper bound for a 70B model; every measured fallback expansion is replayed "
            "as a refused edge candidate (the edges run the same model), though on the bench host some were "
            "deadlines its slow edges missed: an upper bound as well")
    return Mix(str(path), {m: tuple(s) for m, s in modes.items()}, fallback, fallback_source, measured_at, note)


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


class Owner(Protocol):
    """Whoever the cloud's GPU time is charged to, by purpose."""

    def charge(self, purpose: str, seconds: float) -> None: ...


@dataclass
class Sequence_:
    prefill: float
    tokens: int
    purpose: str
    owner: Owner | None
    done: Callable[[], None]


class Cloud:
    """Continuous batching with chunked prefill: each step decodes one token of every sequence
    whose prompt is in, and prefills up to ``prefill_chunk`` prompt tokens of the others (in
    order of arrival)."""

    def __init__(self, sim: Sim, rate: float, batch_cost: float, max_batch: int, *,
                 prefill_rate: float = math.inf, prefill_chunk: int = 8192) -> None:
        self.sim, self.rate, self.batch_cost, self.max_batch = sim, rate, batch_cost, max_batch
        self.prefill_rate, self.prefill_chunk = prefill_rate, prefill_chunk
        self.active: list[Sequence_] = []
        self.waiting: list[Sequence_] = []
        self.stepping = False
        self.busy_s = 0.0

    def submit(self, prefill: float, tokens: int, owner: Owner | None, done: Callable[[], None],
               purpose: str = "cloud_answer") -> None:
        if prefill <= 0 and tokens <= 0:
            self.sim.at(0.0, done)
            return
        self.waiting.append(Sequence_(max(0.0, prefill), max(0, tokens), purpose, owner, done))
        if not self.stepping:
            self._step()

    def _step(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            self.active.append(self.waiting.pop(0))
        if not self.active:
            self.stepping = False
            return
        self.stepping = True
        decoding = [s for s in self.active if s.prefill <= 0]
        budget, prefilled = float(self.prefill_chunk), []
        for seq in self.active:
            if seq.prefill > 0 and budget > 0:
                take = min(seq.prefill, budget)
                prefilled.append((seq, take))
                budget -= take
        decode_s = (1 + self.batch_cost * (len(decoding) - 1)) / self.rate if decoding else 0.0
        prefill_tokens = sum(take for _, take in prefilled)
        prefill_s = prefill_tokens / self.prefill_rate if math.isfinite(self.prefill_rate) else 0.0
        seconds = decode_s + prefill_s
        self.busy_s += seconds
        for seq in decoding:
            if seq.owner is not None:
                seq.owner.charge(seq.purpose, decode_s / len(decoding))
        for seq, take in prefilled:
            if seq.owner is not None and prefill_tokens:
                seq.owner.charge(seq.purpose, prefill_s * take / prefill_tokens)

        def end() -> None:
            for seq, take in prefilled:
                seq.prefill -= take
            for seq in decoding:
                seq.tokens -= 1
            finished = [s for s in self.active if s.prefill <= 0 and s.tokens <= 0]
            self.active = [s for s in self.active if s.prefill > 0 or s.tokens > 0]
            for seq in finished:
                seq.done()
            self._step()

        self.sim.at(seconds, end)

    def view(self) -> CloudView:
        # As `CloudMeter`: generations in flight or waiting (the service counts calls, not requests).
        return CloudView(queue_depth=len(self.active) + len(self.waiting), tokens_per_s=self.rate,
                         max_batch=self.max_batch)


def _closed_loop_tokens_per_s(cloud: dict[str, Any], concurrency: int, prefill: int, decode: int,
                              seconds: float, warmup: float) -> float:
    """Decode tokens a second of ``concurrency`` clients each sending the next request when its
    answer ends, counted over [warmup, warmup + seconds)."""
    sim = Sim()
    engine = Cloud(sim, cloud["rate"], cloud["batch_cost"], cloud["max_batch"], prefill_rate=cloud["prefill_rate"],
                   prefill_chunk=cloud["prefill_chunk"])
    decoded = 0

    def client() -> None:
        def again() -> None:
            nonlocal decoded
            if sim.now >= warmup:
                decoded += decode
            client()

        engine.submit(prefill, decode, None, again)

    for _ in range(concurrency):
        client()
    sim.run(warmup + seconds)
    return decoded / seconds


def nim_check(cloud: dict[str, Any] = CLOUD_70B, seconds: float = 1800.0) -> list[dict[str, float]]:
    """This cloud model re-running NVIDIA's 5,000-input / 500-output benchmark (closed loop at
    each concurrency): modelled throughput against the published one."""
    out = []
    for concurrency, published in NIM_THROUGHPUT.items():
        modelled = _closed_loop_tokens_per_s(cloud, concurrency, 5000, 500, seconds, warmup=120.0)
        out.append({"concurrency": concurrency, "published_tokens_per_s": published,
                    "modelled_tokens_per_s": round(modelled, 1), "error": round(modelled / published - 1, 3)})
    return out


@dataclass
class Task:
    request: Request
    point: int
    tokens: int
    deadline: float


class Edge:
    """`EdgeNode` + `SimulatedRuntime`: batches of up to ``max_batch``, collected for a window."""

    def __init__(self, sim: Sim, device_id: str, rate: float, batch_cost: float, max_batch: int,
                 window_s: float = EDGE_WINDOW_S, max_queue: int = EDGE_QUEUE) -> None:
        self.sim, self.device_id, self.max_queue = sim, device_id, max_queue
        self.rate, self.batch_cost, self.max_batch, self.window_s = rate, batch_cost, max_batch, window_s
        self.queue: list[Task] = []
        self.running = 0
        self.collecting = False
        #: As the node measures it (`per_sequence_rate`, smoothed); the load tools warm the
        #: edges up one request at a time first, so it starts at the rate of a lone sequence.
        self.tokens_per_s = rate
        self.outstanding = 0  # the cloud's view: sent, not answered

    def would_miss(self, task: Task) -> bool:
        ahead = len(self.queue) + self.running
        if ahead < self.max_batch or self.tokens_per_s <= 0:
            return False
        return self.sim.now + finish_s(ahead, self.max_batch, task.tokens, self.tokens_per_s) > task.deadline

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
            rate = per_sequence_rate(len(batch), sum(t.tokens for t in batch), seconds)
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
    points: int = SERVICE.max_points
    tokens_per_point: int = SERVICE.tokens_per_point
    answer_tokens: int = SERVICE.max_answer_tokens
    ensemble_width: int = SERVICE.ensemble_width
    link_delay_s: float = 0.01
    window_s: float = EDGE_WINDOW_S
    gpus: int = 1
    edge_queue: int = EDGE_QUEUE
    #: Prompt tokens a second (inf: prefill takes no time, as `SimulatedBackend`).
    prefill_rate: float = math.inf
    prefill_chunk: int = 8192
    #: What each request's cloud work is; None: `assumed_mix` at these budgets.
    mix: Mix | None = None
    #: `plan_budget` under load, as the service's ``adaptive_budget`` (on by default).
    adaptive_budget: bool = SERVICE.adaptive_budget

    @functools.cached_property
    def service(self) -> ServiceConfig:
        """The service settings the planner runs with: the defaults, with these budgets."""
        return ServiceConfig(max_points=self.points, tokens_per_point=self.tokens_per_point,
                             max_answer_tokens=self.answer_tokens, ensemble_width=self.ensemble_width,
                             adaptive_budget=self.adaptive_budget)

    @property
    def full_batch_s(self) -> tuple[float, float]:
        """Engine seconds of one decode token and one prompt token when the engine runs a full
        batch: what a token costs a cloud kept busy (a lone sequence pays a whole step)."""
        batch = self.cloud_max_batch
        decode = (1 + self.cloud_batch_cost * (batch - 1)) / self.cloud_rate / batch
        return decode, (1 / self.prefill_rate if math.isfinite(self.prefill_rate) else 0.0)

    @functools.cached_property
    def workload(self) -> Mix:
        return self.mix if self.mix is not None else assumed_mix(self.points, self.answer_tokens,
                                                                 self.tokens_per_point)


def shortened(work: Work, base: Budget, budget: Budget) -> Work:
    """A measured sketch's work at a shorter budget (`plan_budget` under load): its decode
    scales as `plan_budget`'s cost model, points x (words x 1.4 + 2) tokens; its prompt stays."""
    def size(b: Budget) -> float:
        return b.max_points * (b.max_words * 1.4 + 2)

    scale = min(1.0, size(budget) / size(base))
    return work if scale >= 1.0 else Work(work.sequences, work.prefill, work.decode * scale, work.seconds)


@dataclass(eq=False)
class Request:
    system: System
    mode: str
    started: float
    sample: Sample
    finished: float | None = None
    #: When the sketch was done (progressive answers).
    sketched_at: float | None = None
    served: str = "progressive"
    n_points: int = 0
    points_cloud: int = 0
    done_points: set[int] = field(default_factory=set)
    #: Points the cloud is expanding (once each; whichever of it and a late edge ends first wins).
    cloud_claimed: set[int] = field(default_factory=set)
    #: Per point: replicas still out, and candidates that came back.
    expected: dict[int, int] = field(default_factory=dict)
    arrived: dict[int, int] = field(default_factory=dict)
    #: Points whose edge candidates the measured request refused (the cloud expands them).
    refused: set[int] = field(default_factory=set)
    resamples: int = 0
    #: The cloud's GPU-seconds spent on this request, by purpose.
    gpu: dict[str, float] = field(default_factory=dict)
    #: The cloud work modelled for this request, by purpose: [prefill tokens, decode tokens].
    tokens: dict[str, list[float]] = field(default_factory=dict)
    #: The sketch and expansion budget `plan_budget` gave it at its start (progressive).
    budget: Budget | None = None

    def charge(self, purpose: str, seconds: float) -> None:
        self.gpu[purpose] = self.gpu.get(purpose, 0.0) + seconds

    def run(self, purpose: str, work: Work, then: Callable[[], None]) -> None:
        decode = round(work.decode)
        count = self.tokens.setdefault(purpose, [0.0, 0.0])
        count[0] += work.prefill
        count[1] += decode
        self.system.cloud.submit(work.prefill, decode, self, then, purpose)

    def chain(self, steps: list[tuple[str, Work]], then: Callable[[], None]) -> None:
        if not steps:
            then()
            return
        purpose, work = steps[0]
        self.run(purpose, work, lambda: self.chain(steps[1:], then))

    def begin(self) -> None:
        cfg, s = self.system.config, self.sample
        answer = s.get("cloud_answer") or Work(1, 0.0, cfg.answer_tokens)
        if self.mode == "cloud" or (s.served == "cloud" and not s.get("sketch")):
            # Cloud-only: the mode, or auto's router chose it.
            self.served = "cloud"
            self.chain([("cloud_answer", answer)], self.finish)
            return
        # As the service: the budget under the load at the request's start (shorter sketches
        # when the cloud is queued, shorter points when the fleet lacks free slots).
        base = Budget.from_config(cfg.service)
        views = [e.view(cfg.link_delay_s) for e in self.system.edges]
        self.budget = plan_budget(base, self.system.cloud.view(), views) if cfg.service.adaptive_budget else base
        steps = [(p, shortened(w, base, self.budget)) for p in ("sketch", "resketch") if (w := s.get(p)) is not None]
        if s.served == "cloud":
            # The guards refused the sketches: the cloud answers alone.
            self.served = "cloud"
            self.chain([*steps, ("cloud_answer", answer)], self.finish)
            return
        self.chain(steps, self.sketched)

    def sketched(self) -> None:
        sys_, cfg, s = self.system, self.system.config, self.sample
        self.sketched_at = sys_.sim.now
        budget = self.budget or Budget.from_config(cfg.service)
        self.n_points = n = max(1, min(s.points or cfg.points, budget.max_points))
        first = s.get("first_point")
        views = [e.view(cfg.link_delay_s) for e in sys_.edges]
        tokens = budget.point_tokens(n)  # as the service: a short sketch's points are longer
        plan = plan_request(n, views, config=cfg.service, tokens_per_point=tokens,
                            sampling=PointSampling.of(cfg.service, GenerationOptions()), cloud=sys_.cloud.view(),
                            first_in_cloud=first is not None)
        # The measured request's fallback expansions: that many of its edge-placed points had
        # their candidates refused (the last ones; which ones does not change the cost).
        placed = [i for i in range(n) if i not in plan.self_served]
        fallback = s.get("fallback_expansion")
        refused = min(len(placed), round(fallback.sequences)) if fallback else 0
        self.refused = set(placed[len(placed) - refused:])
        resample = s.get("fallback_resample")
        self.resamples = round(resample.sequences) if resample else 0
        for index in sorted(plan.self_served):
            assert first is not None
            self.run("first_point", first, functools.partial(self.point_done, index))
        for point, (devices, wait) in enumerate(zip(plan.devices, plan.deadlines_s, strict=True)):
            if point in plan.self_served:
                continue
            if not devices:
                self.cloud_point(point)
                continue
            deadline = sys_.sim.now + wait
            self.expected[point] = len(devices)
            for device in devices:
                edge = sys_.by_id[device]
                edge.outstanding += 1
                task = Task(self, point, tokens, deadline)
                sys_.sim.at(cfg.link_delay_s / 2, functools.partial(self.deliver, edge, task))
            sys_.sim.at(wait, functools.partial(self.deadline, point))

    def deliver(self, edge: Edge, task: Task) -> None:
        if not edge.receive(task):
            edge.outstanding -= 1

            def refused() -> None:
                self.expected[task.point] -= 1
                if self.expected[task.point] <= 0:
                    self.settle(task.point)

            self.system.sim.at(self.system.config.link_delay_s / 2, refused)

    def edge_done(self, edge: Edge, task: Task) -> None:
        def back() -> None:
            edge.outstanding -= 1
            self.expected[task.point] -= 1
            self.arrived[task.point] = self.arrived.get(task.point, 0) + 1
            if self.expected[task.point] <= 0:
                self.settle(task.point)

        self.system.sim.at(self.system.config.link_delay_s / 2, back)

    def deadline(self, point: int) -> None:
        self.settle(point)

    def settle(self, point: int) -> None:
        """All replicas answered (or refused), or the deadline passed: keep a candidate, or
        have the cloud expand the point (none arrived, or the measured request refused them)."""
        if point in self.done_points:
            return
        if self.arrived.get(point, 0) and point not in self.refused:
            self.point_done(point)
        else:
            self.cloud_point(point)

    def cloud_point(self, point: int) -> None:
        if point in self.done_points or point in self.cloud_claimed or self.finished is not None:
            return
        self.points_cloud += 1
        self.cloud_claimed.add(point)
        measured = self.sample.get("fallback_expansion")
        steps = [("fallback_expansion", measured.per_sequence() if measured else self.system.config.workload.fallback)]
        if self.resamples > 0:
            # The measured request re-sampled that many of the cloud's own expansions.
            self.resamples -= 1
            resample = self.sample.get("fallback_resample")
            assert resample is not None
            steps.append(("fallback_resample", resample.per_sequence()))
        self.chain(steps, lambda: self.point_done(point))

    def point_done(self, point: int) -> None:
        if point in self.done_points or self.finished is not None:
            return
        self.done_points.add(point)
        if len(self.done_points) == self.n_points:
            scoring = self.sample.get("scoring")
            # The ensemble's scoring pass (prefill only) before the answer is complete.
            self.chain([("scoring", scoring)] if scoring is not None else [], self.finish)

    def finish(self) -> None:
        if self.finished is None:
            self.finished = self.system.sim.now
            self.system.completed.append(self)


class System:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sim = Sim()
        self.cloud = Cloud(self.sim, config.cloud_rate, config.cloud_batch_cost, config.cloud_max_batch,
                           prefill_rate=config.prefill_rate, prefill_chunk=config.prefill_chunk)
        self.edges = [Edge(self.sim, f"e{i}", r, c, b, config.window_s, config.edge_queue)
                      for i, (r, c, b) in enumerate(config.edges)]
        self.by_id = {e.device_id: e for e in self.edges}
        self.completed: list[Request] = []
        self._turn: dict[str, itertools.count[int]] = {}

    def samples(self, mode: str) -> tuple[Sample, ...]:
        modes = self.config.workload.modes
        if mode not in modes:
            raise ValueError(f"the ledger has no {mode!r} requests (it has {sorted(modes)})")
        return modes[mode]

    def request(self, mode: str) -> Request:
        samples = self.samples(mode)
        turn = next(self._turn.setdefault(mode, itertools.count()))
        req = Request(self, mode, self.sim.now, samples[turn % len(samples)])
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
    sketches = [r.sketched_at - r.started for r in done if r.sketched_at is not None]

    def pct(q: float) -> float:
        return percentile(lat, q)

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else math.nan

    gpus = system.config.gpus
    points = sum(r.n_points for r in done if r.served == "progressive")
    purposes = [p for p in LLM_PURPOSES if any(p in r.gpu or p in r.tokens for r in done)]
    embedding = [p for p in PURPOSES if p in EMBEDDING_PURPOSES and any(p in r.sample.work for r in done)]
    work = {p: (mean([r.tokens.get(p, [0.0, 0.0])[0] for r in done]), mean([r.tokens.get(p, [0.0, 0.0])[1]
                                                                              for r in done])) for p in purposes}
    decode_s, prefill_s = system.config.full_batch_s
    full = {p: (prefill * prefill_s + decode * decode_s) * gpus for p, (prefill, decode) in work.items()}
    # Open loop: requests finished within the window (a saturated cloud finishes fewer than
    # arrive); closed loop: as tools/load_fleet.py counts, those started before the end.
    finished = len(done) if started_before is not None else sum(
        warmup <= (r.finished or -1.0) < warmup + duration for r in system.completed)
    return {
        "mode": mode, "completed": len(done), "requests_per_s": round(finished / duration, 3),
        "latency_p50_s": round(pct(0.5), 3), "latency_p95_s": round(pct(0.95), 3),
        # Where the time goes: waiting for the sketch, then for the points.
        "sketch_p50_s": round(percentile(sketches, 0.5), 3) if sketches else None,
        "sketch_p95_s": round(percentile(sketches, 0.95), 3) if sketches else None,
        # The engine's busy time shared among the sequences of each step, at this load.
        "gpu_s_per_request": round(mean([sum(r.gpu.values()) for r in done]) * gpus, 4) if done else None,
        "gpu_s_by_purpose": {p: round(mean([r.gpu.get(p, 0.0) for r in done]) * gpus, 4) for p in purposes},
        # Each token at a full batch's cost: what a request takes of a cloud kept busy, and so
        # how many requests a second one cloud node can serve in this mode.
        "full_batch_gpu_s_per_request": round(sum(full.values()), 4) if done else None,
        "full_batch_gpu_s_by_purpose": {p: round(v, 4) for p, v in full.items()},
        "capacity_requests_per_s": round(gpus / sum(full.values()), 2) if done and sum(full.values()) else None,
        "cloud_work_per_request": {p: {"prefill_tokens": round(prefill, 1), "decode_tokens": round(decode, 1)}
                                   for p, (prefill, decode) in work.items()},
        # The embedding model's work, as measured on the bench host's CPU (not simulated).
        "embedding_cpu_s_per_request": {
            p: round(mean([r.sample.work[p].seconds if p in r.sample.work else 0.0 for r in done]), 4)
            for p in embedding},
        "share_progressive": round(sum(r.served == "progressive" for r in done) / len(done), 3) if done else None,
        "cloud_point_share": round(sum(r.points_cloud for r in done if r.served == "progressive") / points, 4)
        if points else None,
    }


# --- validation and projection ---------------------------------------------------------------

def _ledger_means(ledger: Mapping[str, Any] | None) -> dict[str, Work]:
    return {p: Work.of(w) for p, w in (ledger or {}).items() if p in LLM_PURPOSES}


def validation_mix(settings: Mapping[str, Any], row: Mapping[str, Any], path: Path) -> Mix:
    """The load_fleet run's own cloud work as input: its sketch per request as measured one at a
    time (the light phase, where no point went to the cloud), and the cost of one fallback
    expansion as measured under load. How many points went to the cloud is the simulator's
    output, compared below. Without a ledger (an older run): `SimulatedBackend`'s."""
    points, tokens = int(settings["points"]), int(settings["tokens"])
    light = _ledger_means((row.get("light") or {}).get("cloud_work_per_request"))
    loaded = _ledger_means((row.get("throughput") or {}).get("cloud_work_per_request"))
    if "sketch" not in light:
        return assumed_mix(points, SERVICE.max_answer_tokens, tokens, source=f"{path} (no ledger: assumed)")
    sketch = light["sketch"]
    fallback = loaded["fallback_expansion"].per_sequence() if "fallback_expansion" in loaded else Work(
        1.0, sketch.prefill + sketch.decode, tokens)
    sample = Sample("progressive", points, {"sketch": Work(1.0, sketch.prefill, sketch.decode)})
    return Mix(f"{path} (its own ledger)", {"progressive": (sample,)}, fallback, "the run's fallback expansions")


def validate(path: Path) -> dict[str, Any]:
    """Re-run each measured load_fleet row here; compare throughput, p50 latency and the cloud
    work per request by purpose (when the run recorded its ledger)."""
    report = json.loads(path.read_text())
    s = report["settings"]
    if "duration" not in s:
        raise SystemExit(f"{path}: settings.duration is missing (how long its clients asked); "
                         "re-run tools/load_fleet.py to record it")
    out = []
    for row in report["rows"]:
        if row.get("replicas", 1) != 1:
            continue  # the simulator models one cloud
        # The simulated cloud (`SimulatedBackend`) spends no time on prompts (prefill is free
        # here) and runs every call at once: no batch cap (``llm.max_batch`` is only the
        # scheduler's load estimate, which the planner here does not read).
        config = Config(cloud_rate=s["cloud_rate"], cloud_batch_cost=s["cloud_batch_cost"],
                        cloud_max_batch=SIMULATED_BACKEND_MAX_BATCH,
                        edge_queue=int(s.get("edge_queue", EDGE_QUEUE)),
                        edges=[(float(s["edge_rate"]), float(s["edge_batch_cost"]), int(s["edge_batch"]))]
                        * row["edges"], points=s["points"], tokens_per_point=s["tokens"],
                        ensemble_width=int(s.get("ensemble_width", 1)),
                        # load_fleet runs the service with a fixed budget (older runs did not say so).
                        adaptive_budget=bool(s.get("adaptive_budget", False)),
                        link_delay_s=row["throughput"].get("round_trip_overhead_s") or VALIDATION_LINK_DELAY_S,
                        mix=validation_mix(s, row, path))
        measured = row["throughput"]
        # The measured run's clients stopped asking at its ``duration``; its ``seconds`` also hold
        # the drain of the requests then in flight, as the simulated run's elapsed time does.
        simulated = closed_loop(config, "progressive", s["concurrency"], float(s["duration"]))
        check: dict[str, Any] = {
            "edges": row["edges"], "concurrency": s["concurrency"], "link_delay_s": config.link_delay_s,
            # How busy the measuring host was (cores, of its count): near the count, the measured
            # run was bound by the host (its event loops and broker), which the simulator is not.
            "host_cores_busy": round(sum(v for k, v in (measured.get("cores_busy") or {}).items() if k != "of"), 2),
            "measured": {k: measured[k] for k in ("requests_per_s", "latency_p50_s", "cloud_point_share")},
            "simulated": {k: simulated[k] for k in ("requests_per_s", "latency_p50_s", "cloud_point_share")},
            "throughput_error": round(simulated["requests_per_s"] / measured["requests_per_s"] - 1, 4),
            "p50_error": round(simulated["latency_p50_s"] / measured["latency_p50_s"] - 1, 4),
        }
        ledger = _ledger_means(measured.get("cloud_work_per_request"))
        if ledger:
            modelled = simulated["cloud_work_per_request"]
            work: dict[str, Any] = {}
            for purpose in sorted(set(ledger) | set(modelled)):
                m = ledger.get(purpose, Work())
                sim = modelled.get(purpose, {"prefill_tokens": 0.0, "decode_tokens": 0.0})
                work[purpose] = {"measured": {"prefill_tokens": round(m.prefill, 1),
                                              "decode_tokens": round(m.decode, 1)},
                                 "simulated": sim}
            total_m = sum(w.decode for w in ledger.values())
            total_s = sum(w["decode_tokens"] for w in modelled.values())
            check["cloud_work"] = work
            check["cloud_decode_error"] = round(total_s / total_m - 1, 4) if total_m else None
            pre_m = sum(w.prefill for w in ledger.values())
            pre_s = sum(w["prefill_tokens"] for w in modelled.values())
            check["cloud_prefill_error"] = round(pre_s / pre_m - 1, 4) if pre_m else None
        out.append(check)
    return {"source": str(path), "rows": out}


def project(args: argparse.Namespace, mix: Mix) -> dict[str, Any]:
    rows = []
    cloud = CLOUD_70B
    modes = [m for m in ("progressive", "auto") if m in mix.modes]
    for profile in args.profiles.split(","):
        rate, batch = edge_rate(profile), edge_max_batch(profile)
        for count in (int(x) for x in args.edges.split(",")):
            config = Config(cloud_rate=cloud["rate"], cloud_batch_cost=cloud["batch_cost"],
                            cloud_max_batch=cloud["max_batch"], gpus=cloud["gpus"],
                            prefill_rate=cloud["prefill_rate"], prefill_chunk=cloud["prefill_chunk"],
                            edges=[(rate, EDGE_BATCH_COST, batch)] * count, points=args.points,
                            tokens_per_point=args.tokens, answer_tokens=args.answer_tokens,
                            ensemble_width=args.ensemble_width, link_delay_s=args.link_delay, mix=mix)
            for load in (float(x) for x in args.rates.split(",")):
                row: dict[str, Any] = {"profile": profile, "edge_tokens_per_s": round(rate, 1), "edge_max_batch": batch,
                                       "edges": count, "offered_per_s": load}
                for mode in modes:
                    row["pice" if mode == "progressive" else mode] = open_loop(config, mode, load, args.duration)
                row["cloud_only"] = open_loop(config, "cloud", load, args.duration)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"cloud": {**cloud, "check": nim_check(cloud)},
            "edge_model": {"weights_bytes": WEIGHT_BYTES, "bandwidth_efficiency": EFFICIENCY},
            "service": {"max_points": args.points, "tokens_per_point": args.tokens,
                        "max_answer_tokens": args.answer_tokens, "ensemble_width": args.ensemble_width,
                        "deadline_floor_s": SERVICE.deadline_floor_s, "deadline_factor": SERVICE.deadline_factor,
                        "deadline_cap_s": SERVICE.deadline_cap_s},
            "ledger": mix.describe(), "rows": rows}


#: The columns of a mode in the tables: key in a row, label.
MODE_COLUMNS = (("auto", "auto"), ("pice", "progressive"), ("cloud_only", "cloud-only"))


def table(projection: dict[str, Any]) -> str:
    modes = [(k, label) for k, label in MODE_COLUMNS if any(k in r for r in projection["rows"])]
    head = ["edges (profile)", "offered/s"]
    head += [f"{label} req/s, p50 / p95 s" for _, label in modes]
    head += [f"GPU-s/req {label} (this load / full batch)" for _, label in modes]
    head += [f"cloud points {label}" for k, label in modes if k != "cloud_only"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in projection["rows"]:
        cells = [f"{r['edges']} ({r['profile']})", str(r["offered_per_s"])]
        cells += [f"{r[k]['requests_per_s']}, {r[k]['latency_p50_s']} / {r[k]['latency_p95_s']}" if k in r else "—"
                  for k, _ in modes]
        cells += [f"{r[k]['gpu_s_per_request']} / {r[k]['full_batch_gpu_s_per_request']}" if k in r else "—"
                  for k, _ in modes]
        cells += [f"{r[k]['cloud_point_share']:.1%}" if k in r and r[k]["cloud_point_share"] is not None else "—"
                  for k, _ in modes if k != "cloud_only"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def purpose_table(projection: dict[str, Any], edges: int | None = None) -> str:
    """Cloud GPU-seconds per request by purpose (each token at a full batch's cost), the total at
    the offered load, one node's capacity, the cloud's prompt/decode tokens and the embedding
    model's measured CPU time, per mode and offered load, at one fleet size (default: the largest)."""
    rows = projection["rows"]
    if not rows:
        return ""
    edges = edges if edges is not None else max(r["edges"] for r in rows)
    chosen = [r for r in rows if r["edges"] == edges]
    present = [(r, k, label) for r in chosen for k, label in MODE_COLUMNS if k in r]
    purposes = [p for p in LLM_PURPOSES if any(p in r[k]["full_batch_gpu_s_by_purpose"] for r, k, _ in present)]
    embedding = [p for p in PURPOSES if p in EMBEDDING_PURPOSES
                 and any(p in r[k]["embedding_cpu_s_per_request"] for r, k, _ in present)]
    head = ["offered/s", "mode", *purposes, "GPU-s full batch", "GPU-s this load", "node capacity req/s",
            "prefill / decode tokens", *(f"{p} CPU-s" for p in embedding)]
    lines = [f"Cloud GPU-seconds per request by purpose (tokens at a full batch's cost), {edges} edges "
             f"({chosen[0]['profile']}); embedding model CPU-seconds as measured:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, key, label in present:
        m = r[key]
        work = m["cloud_work_per_request"]
        by = m["full_batch_gpu_s_by_purpose"]
        cells = [str(r["offered_per_s"]), label, *(f"{by[p]:.4f}" if p in by else "—" for p in purposes),
                 str(m["full_batch_gpu_s_per_request"]), str(m["gpu_s_per_request"]), str(m["capacity_requests_per_s"]),
                 f"{sum(w['prefill_tokens'] for w in work.values()):.0f} / "
                 f"{sum(w['decode_tokens'] for w in work.values()):.0f}",
                 *(f"{m['embedding_cpu_s_per_request'].get(p, 0.0):.3f}" for p in embedding)]
        lines.append("| " + " | ".join(cells) + " |")
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
        for key, label in MODE_COLUMNS[:2]:
            if key not in rows[0]:
                continue
            name = f"{label}, {count} x {profile.removeprefix('jetson-')}"
            axes[0].plot(x, [r[key]["requests_per_s"] for r in rows], marker="o", label=name)
            axes[1].plot(x, [r[key]["latency_p50_s"] for r in rows], marker="o", label=name)
            axes[2].plot(x, [r[key]["gpu_s_per_request"] for r in rows], marker="o", label=name)
    base = sorted({r["offered_per_s"]: r for r in projection["rows"]}.values(), key=lambda r: r["offered_per_s"])
    x = [r["offered_per_s"] for r in base]
    axes[0].plot(x, [r["cloud_only"]["requests_per_s"] for r in base], "k--", label="cloud-only")
    axes[1].plot(x, [r["cloud_only"]["latency_p50_s"] for r in base], "k--", label="cloud-only")
    axes[2].plot(x, [r["cloud_only"]["gpu_s_per_request"] for r in base], "k--", label="cloud-only")
    axes[0].set(xlabel="offered requests/s", ylabel="completed requests/s", title="Throughput")
    axes[1].set(xlabel="offered requests/s", ylabel="p50 latency (s)", title="Latency", yscale="log")
    axes[2].set(xlabel="offered requests/s", ylabel="cloud GPU-s per request", title="Cloud cost (prefill + decode)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Simulated: {projection['cloud']['name']} + Jetson edges running SmolLM2-135M; "
                 f"cloud work per request from {Path(projection['ledger']['source']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate", type=Path, default=None, help="a tools/load_fleet.py JSON to re-run")
    parser.add_argument("--ledger", type=Path, default=None,
                        help="a tools/bench.py JSON whose light-load requests' cloud work ledgers each simulated "
                             "request replays, or a tools/eval_modes.py --rows JSONL "
                             f"(default: {DEFAULT_LEDGER.relative_to(ROOT)} when it has them)")
    parser.add_argument("--profiles", default="jetson-orin-nano-8gb")
    parser.add_argument("--edges", default="10,100,1000")
    parser.add_argument("--rates", default="0.5,2,8,32", help="offered requests/s (Poisson)")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds of arrivals")
    parser.add_argument("--points", type=int, default=SERVICE.max_points, help="most points a sketch (the service's)")
    parser.add_argument("--tokens", type=int, default=SERVICE.tokens_per_point,
                        help="tokens per point (the service's)")
    parser.add_argument("--answer-tokens", type=int, default=SERVICE.max_answer_tokens,
                        help="longest cloud-only answer, without a ledger (the service's)")
    parser.add_argument("--ensemble-width", type=int, default=SERVICE.ensemble_width, help="(the service's)")
    parser.add_argument("--link-delay", type=float, default=0.04, help="round trip cloud-edge, seconds")
    parser.add_argument("--detail-edges", type=int, default=None,
                        help="fleet size of the by-purpose table (default: the largest)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.validate:
        result = validate(args.validate)
        for row in result["rows"]:
            print(json.dumps(row))
    else:
        path = args.ledger or (DEFAULT_LEDGER if DEFAULT_LEDGER.exists() else None)
        mix = load_mix(path, args.tokens) if path is not None else None
        if mix is None:
            if args.ledger is not None:
                parser.error(f"{args.ledger} has no light-load requests with a cloud work ledger "
                             "(tools/bench.py writes them under light_load)")
            mix = assumed_mix(args.points, args.answer_tokens, args.tokens)
            print(f"warning: {mix.note}", file=sys.stderr)
        elif mix.measured_at:
            differs = {k: (mix.measured_at[k], v) for k, v in (("max_points", args.points),
                                                               ("tokens_per_point", args.tokens),
                                                               ("ensemble_width", args.ensemble_width))
                       if k in mix.measured_at and mix.measured_at[k] != v}
            if differs:
                print(f"warning: the ledger was measured at other budgets than simulated here "
                      f"(measured, simulated): {differs}", file=sys.stderr)
        result = project(args, mix)
        print(table(result))
        print()
        print(purpose_table(result, args.detail_edges))
        if args.plot:
            plot(result, args.plot)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result["command"] = " ".join(sys.argv)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
