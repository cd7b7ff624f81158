#!/usr/bin/env python3
"""Client-side time to first token and total latency through the HTTP API: progressive vs
cloud-only, same server, same questions, one run.

Starts ``pice-cloud serve`` with its defaults (embedded broker, 2 local edges, SmolLM2) on a
free port unless ``--base-url`` names a running server, then streams each question with the
official ``openai`` client in both modes (alternating, so drifts in machine load hit both
alike). TTFT is the time to the first chunk with content. Prints a table, writes JSON.

    PICE_MODELS_DIR=/tmp/pm python tools/latency_api.py --out latency_api.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from openai import OpenAI
from vicuna import VICUNA

QUESTIONS = VICUNA / "question.jsonl"
# Generic, non-code questions (Vicuna-bench ids); 3 asks about programming languages.
DEFAULT_IDS = (1, 2, 4, 5, 6)


def load_questions(path: Path, ids: tuple[int, ...]) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_id = {int(r["question_id"]): r["turns"][0] for r in rows}
    return [(i, by_id[i]) for i in ids]


def start_server(extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "pice_cloud.cli", "serve", "--port", "0", *extra],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        found = re.search(r"serving on (http://\S+/v1)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit(f"pice-cloud serve did not start: {proc.stderr.read()}")


def one(client: OpenAI, question: str, mode: str) -> dict[str, Any]:
    started = time.perf_counter()
    first: float | None = None
    text = []
    info: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    stream = client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": question}], stream=True,
        stream_options={"include_usage": True}, extra_body={"pice": {"mode": mode}},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - started
            text.append(chunk.choices[0].delta.content)
        info = (chunk.model_extra or {}).get("pice") or info
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    total = time.perf_counter() - started
    return {"mode": mode, "ttft_s": round(first if first is not None else total, 3), "total_s": round(total, 3),
            "completion_tokens": usage.get("completion_tokens"), "cloud_tokens": usage.get("cloud_tokens"),
            "edge_tokens": usage.get("edge_tokens"), "points_edge": info.get("points_edge"),
            "points_cloud": info.get("points_cloud"), "chars": len("".join(text))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="a running server (default: start one)")
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--ids", default=",".join(map(str, DEFAULT_IDS)), help="Vicuna-bench question ids")
    parser.add_argument("--out", type=Path, default=Path("latency_api.json"))
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for pice-cloud serve")
    args = parser.parse_args()

    questions = load_questions(args.questions, tuple(int(i) for i in args.ids.split(",")))
    proc = None
    url = args.base_url
    if url is None:
        proc, url = start_server(args.serve_arg)
    results: list[dict[str, Any]] = []
    try:
        client = OpenAI(base_url=url, api_key="pice", max_retries=0, timeout=600)
        for n, (qid, question) in enumerate(questions):
            # Alternate which mode goes first, so neither always runs on a warmer machine.
            modes = ("progressive", "cloud") if n % 2 == 0 else ("cloud", "progressive")
            for mode in modes:
                row = {"question_id": qid, **one(client, question, mode)}
                results.append(row)
                print(f"q{qid} {mode:<11} ttft {row['ttft_s']:7.2f}s total {row['total_s']:7.2f}s", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)

    print(f"\n{'q':>3}  {'mode':<11} {'TTFT s':>8} {'total s':>8} {'tokens':>7} {'edge/cloud pts':>15}")
    for r in results:
        pts = f"{r['points_edge']}/{r['points_cloud']}" if r["mode"] == "progressive" else "-"
        print(f"{r['question_id']:>3}  {r['mode']:<11} {r['ttft_s']:>8.2f} {r['total_s']:>8.2f} "
              f"{r['completion_tokens']!s:>7} {pts:>15}")
    summary = {}
    for mode in ("progressive", "cloud"):
        rows = [r for r in results if r["mode"] == mode]
        summary[mode] = {"ttft_median_s": round(statistics.median(r["ttft_s"] for r in rows), 3),
                         "total_median_s": round(statistics.median(r["total_s"] for r in rows), 3),
                         "completion_tokens_median": statistics.median(r["completion_tokens"] or 0 for r in rows)}
        s = summary[mode]
        print(f"median {mode:<11} TTFT {s['ttft_median_s']:.2f}s total {s['total_median_s']:.2f}s "
              f"tokens {s['completion_tokens_median']}")
    ratio = {k: round(summary["cloud"][k] / summary["progressive"][k], 2)
             for k in ("ttft_median_s", "total_median_s") if summary["progressive"][k]}
    print(f"cloud-only / progressive: TTFT x{ratio.get('ttft_median_s')}, total x{ratio.get('total_median_s')}")
    args.out.write_text(json.dumps({
        "server": url if args.base_url else "pice-cloud serve (defaults) " + " ".join(args.serve_arg),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_end": os.getloadavg()},
        "results": results, "summary": summary, "ratio_cloud_over_progressive": ratio,
    }, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
