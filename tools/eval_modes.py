#!/usr/bin/env python3
"""Answer quality per mode (cloud, progressive, auto) with the configuration a user gets.

One ``pice-cloud serve`` (embedded broker, two local edges, the bundled SmolLM2: no flags but
``--serve-arg``) answers every question once per mode through the official ``openai`` client
(``pice.mode`` per request). Per answer: MiniLM cosine and ROUGE-L (F) against the reference
answer, words, repeated-sentence rate, meta and cut headings, the mode actually served, the
points the edges wrote, the cloud's decoded tokens (``usage.cloud_tokens``: the sketch, cloud
expansions and cloud-only answers), the router's probability (``auto``) and the guards' reasons
when they refused a sketch. After the run, ``/metrics`` gives the sketch and candidate
rejection counts by reason.

Question sets (``--source``):

- ``vicuna``: Vicuna-bench minus coding and math (70 questions), GPT-4o answers as references:
  the issue's measurement set;
- ``alpaca``: alpaca_eval's held-out fifth (150 instructions, every kind, GPT-4-Turbo answers,
  CC BY-NC: measurement only): the mode router's threshold is calibrated on it
  (``tools/calibrate_router.py``), never on Vicuna.

Answers are appended to ``--rows`` as they come (a rerun resumes), then summarised:

    python tools/eval_modes.py --source vicuna --rows tools/results/quality_modes_vicuna.jsonl \\
        --json tools/results/quality_modes.json --md tools/results/quality_examples.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from eval_quality import Scorer, answer_metrics, start_server, stop_server
from vicuna import read_alpaca, read_vicuna

ROOT = Path(__file__).resolve().parent.parent
EXCLUDED = {"coding", "math"}
MODES = ("cloud", "progressive", "auto")


def load(source: str, limit: int, below: float | None = None) -> list[dict[str, Any]]:
    if source == "vicuna":
        rows = [q for q in read_vicuna() if q["category"] not in EXCLUDED and q["reference"]]
    else:
        rows = read_alpaca("calibration")
    if below is not None:
        rows = boundary(rows, below)
    return rows[:limit] if limit else rows


def boundary(rows: list[dict[str, Any]], below: float) -> list[dict[str, Any]]:
    """The questions the mode router scores under ``below`` (lowest first), without the gated
    ones (code, math, translation: cloud-only whatever the threshold). A random sample holds few
    of them, yet they decide how low the threshold may go; ``calibrate_router.py`` weighs every
    answered question by how many of the whole set its probability stratum stands for."""
    from pice_cloud import EmbeddingRouter, cloud_only_reason

    router = EmbeddingRouter.load()
    if router.embedder is None:
        raise SystemExit("--below needs the embedding model: pice-edge models fetch all-minilm-l6-v2")
    free = [q for q in rows if not cloud_only_reason(q["question"])]
    scored = zip(router.predict_many([q["question"] for q in free]), free, strict=True)
    return [q for route, q in sorted(scored, key=lambda rq: rq[0].probability) if route.probability < below]


def ask(client: Any, question: str, mode: str) -> tuple[str, dict[str, Any], dict[str, Any], float]:
    started = time.perf_counter()
    response = client.chat.completions.create(model="pice", messages=[{"role": "user", "content": question}],
                                              extra_body={"pice": {"mode": mode}})
    info = (response.model_extra or {}).get("pice") or {}
    usage = response.usage.model_dump() if response.usage else {}
    return response.choices[0].message.content or "", info, usage, time.perf_counter() - started


def metrics_counts(api_url: str) -> dict[str, dict[str, float]]:
    """``pice_sketch_rejected_total`` and ``pice_candidate_rejected_total`` by reason."""
    base = api_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {"sketch": {}, "candidate": {}}
    for kind in out:
        for match in re.finditer(rf'^pice_{kind}_rejected_total{{reason="([^"]+)"}} (\S+)$', text, re.MULTILINE):
            out[kind][match[1]] = float(match[2])
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return round(statistics.fmean(vals), 4) if vals else None

    headings = sum(len(r["headings"]) for r in rows)
    points = sum(r["points_edge"] + r["points_cloud"] for r in rows)
    return {
        "answers": len(rows),
        "progressive_share": round(sum(r["mode_served"] == "progressive" for r in rows) / len(rows), 4)
        if rows else None,
        "cosine": mean("cosine"), "rouge_l": mean("rouge_l"),
        "words_median": statistics.median(r["words"] for r in rows) if rows else None,
        "repeated_sentence_rate": mean("repeated_sentence_rate"),
        "answers_with_repeats": sum(r["repeated_sentence_rate"] > 0 for r in rows),
        "meta_headings": sum(r["meta_headings"] for r in rows),
        "cut_headings": sum(r["cut_headings"] for r in rows),
        "headings": headings,
        "points_edge_share": round(sum(r["points_edge"] for r in rows) / points, 4) if points else None,
        "cloud_tokens_per_request": round(mean("cloud_tokens") or 0.0, 1),
        "edge_tokens_per_request": round(mean("edge_tokens") or 0.0, 1),
        "latency_median_s": round(statistics.median(r["latency_s"] for r in rows), 2) if rows else None,
        "sketch_rejections": _count(reason for r in rows for reason in r.get("sketch_rejected") or []),
        # The cloud's ledger (`pice.cloud_work`): mean prefill and decode tokens per request, by purpose.
        "cloud_work_per_request": _work(rows),
    }


def _work(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    total: dict[str, dict[str, float]] = {}
    for r in rows:
        for purpose, work in (r.get("cloud_work") or {}).items():
            into = total.setdefault(purpose, {"prefill_tokens": 0.0, "decode_tokens": 0.0, "seconds": 0.0})
            for key in into:
                into[key] += float(work.get(key, 0.0))
    return {purpose: {k: round(v / max(1, len(rows)), 2) for k, v in work.items()} for purpose, work in total.items()}


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return dict(sorted(out.items()))


def table(summary: dict[str, dict[str, Any]]) -> str:
    cols = [("answers", "n"), ("progressive_share", "prog"), ("cosine", "cosine"), ("rouge_l", "ROUGE-L"),
            ("words_median", "words"), ("repeated_sentence_rate", "rep.sent"), ("meta_headings", "meta.hd"),
            ("cut_headings", "cut.hd"), ("points_edge_share", "edge.pts"), ("cloud_tokens_per_request", "cloud.tok"),
            ("edge_tokens_per_request", "edge.tok"), ("latency_median_s", "lat.s")]
    lines = ["| mode | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for mode, s in summary.items():
        lines.append(f"| {mode} | " + " | ".join("" if s.get(k) is None else str(s[k]) for k, _ in cols) + " |")
    return "\n".join(lines)


def examples(rows: list[dict[str, Any]], count: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``count`` (cloud, progressive) answer pairs where progressive was served, spread over
    the question list (not picked for looks)."""
    by_q: dict[Any, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_q.setdefault(r["question_id"], {})[r["mode"]] = r
    pairs = [(m["cloud"], m["progressive"]) for m in by_q.values()
             if "cloud" in m and "progressive" in m and m["progressive"]["mode_served"] == "progressive"]
    if len(pairs) <= count:
        return pairs
    step = len(pairs) / count
    return [pairs[int(i * step)] for i in range(count)]


def markdown(result: dict[str, Any], rows: list[dict[str, Any]], count: int) -> str:
    out = [f"# Answer quality per mode ({result['source']})", "",
           f"{result['questions']} questions, each answered in every mode by one `pice-cloud serve` with the default "
           f"configuration ({result['serve_args'] or 'no flags'}), through the `openai` client; metrics against "
           f"{result['reference']}. Machine: {result['machine']}.", "", table(result["summary"]), "",
           "n: answers; prog: share served progressively; cosine: MiniLM cosine to the reference; words: median; "
           "rep.sent: mean share of an answer's sentences that repeat an earlier one; meta.hd / cut.hd: headings "
           "that are meta (\"Point 3\") or cut off; edge.pts: share of points the edges wrote (the rest the cloud); "
           "cloud.tok / edge.tok: tokens decoded per request; lat.s: median seconds per answer.", "",
           "Sketches refused by the guards, by reason (from each answer's `pice.sketch_rejected`): "
           + "; ".join(f"{m}: {s['sketch_rejections'] or 'none'}" for m, s in result["summary"].items()) + ".",
           *([f"Refusals counted by the server's `/metrics` during the run: {result['rejections']}."]
             if any(result["rejections"].values()) else []),
           *(["", result["note"]] if result.get("note") else []), "", "## Example answers", "",
           "Questions spread over the list where the progressive answer was served progressively; unedited.", ""]
    for n, (cloud, prog) in enumerate(examples(rows, count), 1):
        out += [f"### {n}. {cloud['question']}", "",
                f"**cloud-only** (cosine {cloud['cosine']}, {cloud['words']} words)", "", cloud["answer"], "",
                f"**progressive** (cosine {prog['cosine']}, {prog['words']} words, edge points "
                f"{prog['points_edge']}/{prog['points_edge'] + prog['points_cloud']})", "", prog["answer"], ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("vicuna", "alpaca"), default="vicuna")
    parser.add_argument("--questions", type=int, default=0, help="first N questions (0: all)")
    parser.add_argument("--below", type=float, default=None,
                        help="only questions the mode router scores under this probability, lowest first "
                             "(the calibration's decision boundary)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for pice-cloud serve")
    parser.add_argument("--rows", type=Path, required=True, help="JSONL of answers (appended; a rerun resumes)")
    parser.add_argument("--json", type=Path, default=None, help="summary JSON")
    parser.add_argument("--md", type=Path, default=None, help="markdown: tables and example answers")
    parser.add_argument("--examples", type=int, default=5)
    parser.add_argument("--summarise-only", action="store_true", help="only summarise --rows")
    parser.add_argument("--note", default="", help="a sentence for the markdown (how the run went)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    qs = load(args.source, args.questions, args.below)
    done: set[tuple[Any, str]] = set()
    if args.rows.exists():
        done = {(r["question_id"], r["mode"]) for r in map(json.loads, args.rows.read_text().splitlines()) if r}
    rejections: dict[str, Any] = {"sketch": {}, "candidate": {}}
    if not args.summarise_only and any((q["id"], m) not in done for q in qs for m in modes):
        scorer = Scorer()
        from openai import OpenAI

        proc, url = start_server("", "", "", args.serve_arg)
        try:
            client = OpenAI(base_url=url, api_key="pice", max_retries=0, timeout=900)
            args.rows.parent.mkdir(parents=True, exist_ok=True)
            with args.rows.open("a") as out:
                for n, q in enumerate(qs, 1):
                    for mode in modes:
                        if (q["id"], mode) in done:
                            continue
                        text, info, usage, seconds = ask(client, q["question"], mode)
                        row = {"mode": mode, "question_id": q["id"], "category": q["category"],
                               "question": q["question"], "latency_s": round(seconds, 2),
                               **answer_metrics(scorer, text, q["reference"], info),
                               "cloud_tokens": usage.get("cloud_tokens"), "edge_tokens": usage.get("edge_tokens"),
                               "route_probability": info.get("route_probability"),
                               "sketch_rejected": info.get("sketch_rejected") or [],
                               "cloud_work": info.get("cloud_work") or {}, "answer": text}
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(f"[{n}/{len(qs)}] q{q['id']} {mode:<11} served {row['mode_served']:<11} "
                              f"{seconds:6.1f}s cos {row['cosine']:.3f} words {row['words']:>4} cloud tok "
                              f"{row['cloud_tokens']} edge/cloud pts {row['points_edge']}/{row['points_cloud']}",
                              file=sys.stderr, flush=True)
            rejections = metrics_counts(url)
        finally:
            stop_server(proc)
    wanted = {q["id"] for q in qs}
    rows = [r for r in map(json.loads, args.rows.read_text().splitlines()) if r and r["question_id"] in wanted]
    summary = {m: summarise([r for r in rows if r["mode"] == m]) for m in modes}
    print(table(summary))
    result = {"source": args.source, "questions": len(qs), "serve_args": " ".join(args.serve_arg),
              "reference": "GPT-4o's answers" if args.source == "vicuna" else "GPT-4-Turbo's answers",
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "summary": summary, "rejections": rejections, "note": args.note,
              "command": "python tools/eval_modes.py " + " ".join(sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(result, rows, args.examples) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
