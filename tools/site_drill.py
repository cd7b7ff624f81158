#!/usr/bin/env python3
"""Drill: a site keeps answering while its uplink to the cloud is cut, with real processes.

On loopback: a central Mosquitto and the cloud (``pice-cloud serve --broker``); a site Mosquitto
bridged to the central one; the site (``pice-cloud site``) and three ``pice-edge run`` on the
site broker. The uplink, the cloud's API and the bridge's connection, runs through `TcpLink`
relays (tools/tcp_link.py). ``--requests`` (default 50) requests go to the site's API from
``--concurrency`` clients (half streamed), while the uplink is cut twice:

1. **the link**: the API and the bridge black-holed (``hang``: connections accepted, nothing
   answered) for ``--outage`` seconds, then restored;
2. **the cloud process**: SIGKILL, started again ``--outage`` seconds later.

Measured: ``lost`` (an error, no answer, or a stream without its end) and ``duplicated`` (more
than one end, or the site's per-route counters not adding up to one route per request); the
time from each cut until new requests went to the site (``detect_s``) and from each repair until
they went to the cloud again (``return_s``), from the site's ``/health`` polled every 0.1 s;
latency and quality (tools/eval_quality.py's MiniLM cosine and ROUGE-L against the GPT-4o
references of Vicuna-bench, non-code questions) by where each answer was served.

Then, the uplink cut: the same ``--alone`` questions answered across the three peers and by the
site device alone (edges stopped): the latency ratio on this host. The cloud and the site are
pinned to ``--cloud-cores``, the edges to ``--edge-cores``, as tools/bench.py pins them.

    python tools/site_drill.py --json tools/results/site_drill.json
    python tools/site_drill.py --model /path/to/tiny --requests 6 --outage 3   # a smoke run

The site's LLM and its edges run ``--site-runtime`` and ``--edge-runtime`` (default onnxruntime, as
on a Jetson, on an ONNX export of ``--model`` made once when missing; ``transformers`` to skip it).
The cloud runs the embedded (transformers) backend, as `pice-cloud serve` does by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from bench import pinned  # noqa: E402
from partition_drill import Proc, stopping  # noqa: E402
from tcp_link import TcpLink  # noqa: E402

from pice_cloud.broker import ANONYMOUS_CONFIG, MosquittoProcess, free_port  # noqa: E402

CLOUD_ID = "drill-cloud"
EDGES = ("site-e1", "site-e2", "site-e3")
#: The bridge of tools/mosquitto/bridge.conf without TLS and credentials (loopback, anonymous).
BRIDGE = """
connection pice-drill-site
address 127.0.0.1:{bridge_port}
remote_clientid pice-bridge-drill
bridge_protocol_version mqttv311
cleansession false
try_private true
restart_timeout 1 5
keepalive_interval 5
topic pice/v1/edge/+/status out 1
topic pice/v1/edge/+/tasks in 1
topic pice/v1/cloud/+/status in 1
topic pice/v1/cloud/+/candidates/# out 1
topic pice/v1/cloud/+/refusals/# out 1
topic pice/v1/candidates/# out 1
"""
QUIET = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
         "PICE_DISCOVERY__ENABLED": "false"}


@dataclass
class Timeline:
    """The site's route over time, from its /health (Unix seconds)."""

    samples: list[tuple[float, str]] = field(default_factory=list)

    def first(self, route: str, after: float) -> float | None:
        return next((t for t, r in self.samples if t >= after and r == route), None)


async def poll_route(url: str, timeline: Timeline, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                timeline.samples.append((time.time(), (await http.get(url + "/health")).json()["site"]["route"]))
            await asyncio.sleep(0.1)


async def wait_for(check: Any, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if await check():
                return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{what} within {timeout:g}s")


async def health(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        return dict((await http.get(url + "/health")).json())


async def ask(url: str, question: str, stream: bool, max_tokens: int | None, timeout: float = 600,
              mode: str | None = None) -> dict[str, Any]:
    """One request through the site (``mode``: the ``pice.mode`` asked, default auto); what the
    client saw."""
    body: dict[str, Any] = {"model": "pice", "messages": [{"role": "user", "content": question}], "stream": stream,
                            **({"max_tokens": max_tokens} if max_tokens else {}),
                            **({"pice": {"mode": mode}} if mode else {})}
    started = time.time()
    row: dict[str, Any] = {"stream": stream, "sent_at": started}
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            if not stream:
                response = await http.post(url + "/v1/chat/completions", json=body)
                if response.status_code != 200:
                    return {**row, "error": f"HTTP {response.status_code}: {response.text[:300]}", "ends": 0}
                data = response.json()
                text, pice, ends = data["choices"][0]["message"]["content"] or "", data.get("pice", {}), 1
            else:
                text, pice, ends, done = "", {}, 0, 0
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        return {**row, "error": f"HTTP {response.status_code}: {response.text[:300]}", "ends": 0}
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data_text = line[5:].strip()
                        if data_text == "[DONE]":
                            done += 1
                            continue
                        event = json.loads(data_text)
                        if "error" in event:
                            return {**row, "error": f"error event: {event['error']}", "ends": ends}
                        for choice in event.get("choices", []):
                            text += (choice.get("delta") or {}).get("content") or ""
                            ends += bool(choice.get("finish_reason"))
                        pice = event.get("pice", pice)
    except httpx.HTTPError as exc:
        return {**row, "error": f"{type(exc).__name__}: {exc}", "ends": 0}
    if not stream:
        done = 1
    return {**row, "latency_s": round(time.time() - started, 3), "text": text, "ends": ends, "done": done,
            "served_by": pice.get("served_by", "?"), "mode": pice.get("mode"),
            "points_edge": pice.get("points_edge", 0), "points_cloud": pice.get("points_cloud", 0)}


def site_counts(metrics: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("pice_site_requests_total{"):
            route = line.split('route="', 1)[1].split('"', 1)[0]
            out[route] = float(line.rsplit(" ", 1)[1])
    return out


def ensure_onnx_export(model: str) -> None:
    """An fp32 ONNX export of ``model`` where the onnxruntime runtime looks for it (made once,
    as tools/export_onnx.py makes it)."""
    from pice_edge.model_store import resolve
    from pice_edge.runtimes.onnx_export import default_output, export, onnx_file

    source = resolve(model)
    if onnx_file(default_output(source), "fp32").is_file():
        return
    print(f"[drill] exporting {source} to ONNX at {default_output(source)} (once)", file=sys.stderr, flush=True)
    export(source, precisions=("fp32",))


async def drill(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from eval_quality import questions as vicuna_questions

    py = sys.executable
    model = str(args.model)
    if "onnxruntime" in (args.site_runtime, args.edge_runtime):
        ensure_onnx_export(model)
    central = MosquittoProcess(work / "central")
    central.start()
    bridge = await TcpLink(central.port).start()
    site_broker = MosquittoProcess(work / "site-broker", ANONYMOUS_CONFIG + BRIDGE, values={"bridge_port": bridge.port})
    site_broker.start()
    cloud_port, site_port = free_port(), free_port()
    api = await TcpLink(cloud_port).start()
    site_url = f"http://127.0.0.1:{site_port}"
    env = {**QUIET, **({} if args.guards else {"PICE_SERVICE__SKETCH_GUARD": "false",
                                                  "PICE_SERVICE__EXPANSION_GUARD": "false",
                                                  "PICE_SERVICE__ROUTER": "off",
                                                  "PICE_SERVICE__SELECTOR": "confidence"})}
    cloud_cmd = pinned([py, "-m", "pice_cloud.cli", "serve", "--broker", central.url, "--port", str(cloud_port),
                        "--model", model, "--edges", "0", "--log-level", "info"], args.cloud_cores)
    site_cmd = pinned([py, "-m", "pice_cloud.cli", "site", "--broker", site_broker.url, "--port", str(site_port),
                       "--cloud", f"http://127.0.0.1:{api.port}/v1", "--cloud-id", CLOUD_ID, "--name", "drill",
                       "--llm", "edge", "--model", model, "--log-level", "info"], args.cloud_cores)
    site_env = {**env, "PICE_LLM__RUNTIME": args.site_runtime, "PICE_LLM__THREADS": "1",
                "PICE_SITE__PROBE_INTERVAL_S": str(args.probe_interval), "PICE_SERVICE__ROUTER": "heuristic"
                if args.guards else "off"}
    qs = [q["question"] for q in vicuna_questions(args.questions)] if args.questions else []
    if not qs:
        qs = ["How can I improve my time management skills?"]
    references = {q["question"]: q["reference"] for q in vicuna_questions(args.questions)} if args.questions else {}
    cloud = Proc(cloud_cmd, work / "cloud.log", {**env, "PICE_CLOUD_ID": CLOUD_ID}, base_env={})
    edges = [Proc(pinned([py, "-m", "pice_edge.cli", "run", "--broker", site_broker.url, "--no-zeroconf",
                          "--device-id", e, "--model", model, "--runtime", args.edge_runtime, "--threads", "1",
                          "--log-level", "info"],
                         args.edge_cores), work / f"{e}.log", QUIET, base_env={}) for e in EDGES]
    site = Proc(site_cmd, work / "site.log", site_env, base_env={})
    timeline, stop_polling = Timeline(), asyncio.Event()
    result: dict[str, Any] = {"requests": [], "cuts": []}
    try:
        with stopping([*edges, site]):
            procs = [cloud]
            try:
                await wait_for(lambda: _route_is(site_url, "cloud"), "the site did not reach the cloud")
                await wait_for(lambda: _peers(site_url, len(EDGES)), "the site did not see its edges")
                poller = asyncio.create_task(poll_route(site_url, timeline, stop_polling))
                # Warm-up (not counted): the edges measure their speed, the models their caches.
                await ask(site_url, qs[0], False, args.max_tokens)
                result["requests"] = await traffic(args, site_url, qs, cloud, procs, result["cuts"], api, bridge,
                                                   cloud_cmd, work, env)
                result["site_counts"] = site_counts(await _get(site_url + "/metrics"))
                # The way back after the last cut (a restarted cloud loads its model first).
                await wait_for(lambda: _route_is(site_url, "cloud"), "the site did not return to the cloud", 600)
                if args.alone:
                    result["alone"] = await alone(args, site_url, qs, edges, api, bridge)
                stop_polling.set()
                await poller
            finally:
                for proc in procs:
                    proc.stop()
    finally:
        stop_polling.set()
        await api.close()
        await bridge.close()
        site_broker.kill()
        central.kill()
    for cut in result["cuts"]:
        # Detected: the first time the route was "site" after the cut (possibly after the repair,
        # when the outage is shorter than the probes take). Returned: the first "cloud" after
        # both the repair and the detection.
        detected = timeline.first("site", cut["cut_at"])
        cut["detect_s"] = None if detected is None else round(detected - cut["cut_at"], 2)
        cut["detected_during_outage"] = detected is not None and detected <= cut["repaired_at"]
        returned = None if detected is None else timeline.first("cloud", max(detected, cut["repaired_at"]))
        cut["return_s"] = None if returned is None else round(returned - cut["repaired_at"], 2)
    if references:
        score(result["requests"], references)
        if "alone" in result:
            score(result["alone"]["rows"], references)
    return summarise(result)


async def _get(url: str) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(url)).text


async def _route_is(url: str, route: str) -> bool:
    return bool((await health(url))["site"]["route"] == route)


async def _peers(url: str, count: int) -> bool:
    return bool((await health(url))["site"]["peers"] >= count)


async def traffic(args: argparse.Namespace, site_url: str, qs: list[str], cloud: Proc, procs: list[Proc],
                  cuts: list[dict[str, Any]], api: TcpLink, bridge: TcpLink, cloud_cmd: list[str], work: Path,
                  env: dict[str, str]) -> list[dict[str, Any]]:
    """``--requests`` requests from ``--concurrency`` clients; the two cuts at a third and two
    thirds of the way."""
    rows: list[dict[str, Any]] = []
    next_index = 0
    lock = asyncio.Lock()

    async def client() -> None:
        nonlocal next_index
        while True:
            async with lock:
                if next_index >= args.requests:
                    return
                i = next_index
                next_index += 1
            row = await ask(site_url, qs[i % len(qs)], stream=i % 2 == 1, max_tokens=args.max_tokens)
            row["index"], row["question"] = i, qs[i % len(qs)]
            rows.append(row)
            print(f"[drill] #{i:2d} {row.get('served_by', 'LOST')} {row.get('latency_s', '-')}s "
                  f"{row.get('error', '')}", file=sys.stderr, flush=True)

    async def cutter() -> None:
        for kind, at in (("link", args.requests // 3), ("cloud-process", 2 * args.requests // 3)):
            while len(rows) < at:  # noqa: ASYNC110 - rows grow from the clients; a poll is simplest
                await asyncio.sleep(0.1)
            cut: dict[str, Any] = {"kind": kind, "cut_at": time.time(), "after_requests": len(rows)}
            if kind == "link":
                await asyncio.gather(api.set("hang"), bridge.set("hang"))
            else:
                cloud.proc.kill()
                cloud.proc.wait()
            print(f"[drill] cut: {kind} for {args.outage:g}s", file=sys.stderr, flush=True)
            await asyncio.sleep(args.outage)
            if kind == "link":
                await asyncio.gather(api.set("pass"), bridge.set("pass"))
            else:
                procs.append(Proc(cloud_cmd, work / "cloud.log", {**env, "PICE_CLOUD_ID": CLOUD_ID}, base_env={}))
            cut["repaired_at"] = time.time()
            cuts.append(cut)
            print(f"[drill] repaired: {kind}", file=sys.stderr, flush=True)

    await asyncio.gather(cutter(), *(client() for _ in range(args.concurrency)))
    return sorted(rows, key=lambda r: r["index"])


async def alone(args: argparse.Namespace, site_url: str, qs: list[str], edges: list[Proc], api: TcpLink,
                bridge: TcpLink) -> dict[str, Any]:
    """The uplink cut: ``--alone`` questions across the peers, then by the site device alone."""
    await asyncio.gather(api.set("refuse"), bridge.set("refuse"))
    await wait_for(lambda: _route_is(site_url, "site"), "the site did not notice the cut", 60)
    rows: list[dict[str, Any]] = []
    for setting in ("peers", "alone"):
        if setting == "alone":
            for edge in edges:
                edge.stop()
            await wait_for(lambda: _no_peers(site_url), "the site still sees peers", 60)
        for i in range(args.alone):
            # Across the peers: progressive asked outright (auto might answer on the device alone).
            row = await ask(site_url, qs[i % len(qs)], stream=False, max_tokens=args.max_tokens,
                            mode="progressive" if setting == "peers" else None)
            row["setting"], row["question"] = setting, qs[i % len(qs)]
            rows.append(row)
            print(f"[drill] {setting}: {row.get('served_by', 'LOST')} {row.get('latency_s', '-')}s",
                  file=sys.stderr, flush=True)
    return {"rows": rows}


async def _no_peers(url: str) -> bool:
    return bool((await health(url))["site"]["peers"] == 0)


def score(rows: list[dict[str, Any]], references: dict[str, str]) -> None:
    """MiniLM cosine and ROUGE-L against the reference answer (tools/eval_quality.py's Scorer)."""
    from eval_quality import Scorer

    scorer = Scorer()
    for row in rows:
        reference = references.get(row.get("question", ""))
        if row.get("text") and reference:
            row["cosine"] = round(scorer.cosine(row["text"], reference), 4)
            row["rouge_l"] = round(scorer.rouge_l(row["text"], reference), 4)


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [r["latency_s"] for r in rows if "latency_s" in r]
    cos = [r["cosine"] for r in rows if "cosine" in r]
    rouge = [r["rouge_l"] for r in rows if "rouge_l" in r]
    return {"n": len(rows), "latency_median_s": round(median(lat), 2) if lat else None,
            "latency_mean_s": round(mean(lat), 2) if lat else None,
            "cosine": round(mean(cos), 4) if cos else None, "rouge_l": round(mean(rouge), 4) if rouge else None}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["requests"]
    # Lost: an error, no text, or a stream without its end (finish reason and [DONE]).
    lost = [r["index"] for r in rows if r.get("error") or not r.get("text") or r.get("ends", 0) < 1
            or r.get("done", 0) < 1]
    # Duplicated: the client got more than one end, or the site routed more requests than it got.
    duplicated = [r["index"] for r in rows if r.get("ends", 0) > 1 or r.get("done", 0) > 1]
    counted = sum(result.get("site_counts", {}).values())
    # The warm-up request went through the site too.
    if counted and counted != len(rows) + 1:
        duplicated.append(-1)
    by_route = {route: _stats([r for r in rows if r.get("served_by") == route])
                for route in sorted({r.get("served_by", "?") for r in rows if not r.get("error")})}
    out = {"requests": len(rows), "lost": len(lost), "lost_indices": lost, "duplicated": len(duplicated),
           "duplicated_indices": duplicated, "site_counts": result.get("site_counts", {}), "cuts": result["cuts"],
           "by_served_by": by_route, "rows": [{k: v for k, v in r.items() if k != "text"} for r in rows]}
    if "alone" in result:
        arows = result["alone"]["rows"]
        peers, solo = (_stats([r for r in arows if r["setting"] == s]) for s in ("peers", "alone"))
        ratio = (round(solo["latency_mean_s"] / peers["latency_mean_s"], 2)
                 if peers["latency_mean_s"] and solo["latency_mean_s"] else None)
        out["alone"] = {"peers": peers, "device_alone": solo, "latency_ratio_alone_over_peers": ratio,
                        "served_by": {s: sorted({r.get("served_by", "?") for r in arows if r["setting"] == s})
                                      for s in ("peers", "alone")}}
    return out


def table(summary: dict[str, Any]) -> str:
    lines = [f"requests {summary['requests']}: lost {summary['lost']}, duplicated {summary['duplicated']}; "
             f"site counters {summary['site_counts']}", "",
             "| cut | outage s | cut -> route site (detect) | repair -> route cloud (return) |", "|---|---|---|---|"]
    for cut in summary["cuts"]:
        lines.append(f"| {cut['kind']} | {round(cut['repaired_at'] - cut['cut_at'], 1)} | {cut['detect_s']} s | "
                     f"{cut['return_s']} s |")
    lines += ["", "| served by | answers | median latency s | mean latency s | cosine | ROUGE-L |",
              "|---|---|---|---|---|---|"]
    for route, s in summary["by_served_by"].items():
        lines.append(f"| {route} | {s['n']} | {s['latency_median_s']} | {s['latency_mean_s']} | {s['cosine']} | "
                     f"{s['rouge_l']} |")
    if "alone" in summary:
        a = summary["alone"]
        lines += ["", "| uplink cut | answers | mean latency s | cosine | ROUGE-L |", "|---|---|---|---|---|",
                  f"| across 3 peers ({', '.join(a['served_by']['peers'])}) | {a['peers']['n']} | "
                  f"{a['peers']['latency_mean_s']} | {a['peers']['cosine']} | {a['peers']['rouge_l']} |",
                  f"| device alone ({', '.join(a['served_by']['alone'])}) | {a['device_alone']['n']} | "
                  f"{a['device_alone']['latency_mean_s']} | {a['device_alone']['cosine']} | "
                  f"{a['device_alone']['rouge_l']} |",
                  f"\nlatency ratio, device alone / across peers: {a['latency_ratio_alone_over_peers']}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="every model (name or folder)")
    parser.add_argument("--site-runtime", default="onnxruntime", choices=["onnxruntime", "transformers"])
    parser.add_argument("--edge-runtime", default="onnxruntime", choices=["onnxruntime", "transformers"],
                        help="the site's edges' runtime (a Jetson's is onnxruntime)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--outage", type=float, default=20.0, help="seconds each cut lasts")
    parser.add_argument("--alone", type=int, default=5, help="questions for peers vs device alone (0: skip)")
    parser.add_argument("--questions", type=int, default=25, help="Vicuna non-code questions (0: one fixed question)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--probe-interval", type=float, default=1.0)
    parser.add_argument("--no-guards", dest="guards", action="store_false",
                        help="guards and router off (random models write what they would refuse)")
    parser.add_argument("--cloud-cores", default="0")
    parser.add_argument("--edge-cores", default="1")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pice-site-drill-") as tmp:
        summary = asyncio.run(drill(args, Path(tmp)))
    summary["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["lost"] == 0 and summary["duplicated"] == 0 else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the drill's processes like Ctrl-C does


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
