#!/usr/bin/env python3
"""Answer quality of fine-tuned expanders and sketchers against the base model (issue 10, "Measured").

Two measurements, one run:

1. **Through the real API**, per configuration (``--modes``), on Vicuna-bench questions minus
   coding and math: ``pice-cloud serve`` runs as a subprocess (embedded broker, two local edges)
   and the official ``openai`` client asks each question with ``pice.mode = progressive``.

   ========  ===================  ==================
   mode      sketches             edges (expander)
   ========  ===================  ==================
   base      ``--base``           ``--base``
   expander  ``--base``           ``--expander``
   sketcher  ``--sketcher``       ``--base``
   both      ``--sketcher``       ``--expander``
   ========  ===================  ==================

   The fine-tuned sketcher writes the sketches only (``--sketch-model``, ``llm.sketch_model``);
   cloud-only answers (a sketch the guards refused twice) and fallback expansions come from the
   base model in every mode.

   ``base`` and ``expander`` share the cloud model, so they get the same (greedy) sketches; the
   report says how many sketches actually matched. Per answer: MiniLM cosine to the GPT-4o answer,
   ROUGE-L (F), words, repeated-sentence rate (`pice_cloud.guards.repeated_sentence_rate`: share of
   sentences that repeat an earlier one), meta-heading and cut-heading rates of the headings
   (`pice_cloud.guards.is_meta_heading` / `is_cut_heading`: "The first point", "Point 3", "The
   island of Maui is famous"), the share of points the edges wrote (the response's ``pice``
   extension; the rest fell back to the cloud), and a point-level cosine: each point's text
   against its closest paragraph or list item of the GPT-4o answer.

2. **Sketch level** (``--sketches N``): the raw sketches of the base and the fine-tuned sketcher for
   N Vicuna questions (coding and math excluded), before any serving guard sees them — the
   served answers above only show headings that passed the guards. Per model: points per
   sketch, words per heading, meta-heading and cut-heading rates, the share of sketches the
   serving guards (`pice_cloud.guards.check_sketch`, without embeddings) accept and why the
   others fail, and DESIGN.md's "well-formed" (3+ distinct headings of at most ``max_words``
   words, no sentence).

3. **Point level on held-out alpaca_eval** (``--points N``): the instructions the expander never
   trained on (the same seeded split as training, read from its report), each point of their
   outline expanded by the base and the fine-tuned expander with the edge's exact prompt and
   clean-up; MiniLM cosine and ROUGE-L against GPT-4-Turbo's own text for that point.

    python tools/eval_quality.py --questions 12 --sketches 70 --points 100 \\
        --json tools/results/quality_finetune.json --md tools/results/quality_finetune.md

The alpaca_eval answers are CC BY-NC 4.0 (training and measurement only); Vicuna-bench and its
GPT-4o answers come from lm-sys/FastChat (Apache-2.0).
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

from vicuna import DATA_DIR, read_vicuna

ROOT = Path(__file__).resolve().parent.parent
BASE = "smollm2-135m-instruct"
EXPANDER = "smollm2-135m-pice-expander"
SKETCHER = "smollm2-135m-pice-sketcher"
#: Vicuna-bench categories where a sketch does not fit the question (and which the issue excludes).
EXCLUDED = {"coding", "math"}


def configurations(base: str, expander: str, sketcher: str) -> dict[str, tuple[str, str, str]]:
    """mode -> (cloud model, sketch model, edge model). The fine-tuned sketcher writes the sketches
    only (``llm.sketch_model``): cloud-only answers and fallback expansions stay on the base model,
    as a deployment would run it."""
    return {"base": (base, base, base), "expander": (base, base, expander), "sketcher": (base, sketcher, base),
            "both": (base, sketcher, expander)}


def questions(count: int) -> list[dict[str, Any]]:
    """The first ``count`` Vicuna-bench questions outside coding and math, with GPT-4o answers."""
    rows = [q for q in read_vicuna() if q["category"] not in EXCLUDED and q["reference"]]
    return rows[:count]


def start_server(cloud_model: str, sketch_model: str, edge_model: str,
                 extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    """``pice-cloud serve`` on a free port with these models (empty: the defaults); (process, base
    URL of the API)."""
    cmd = [sys.executable, "-m", "pice_cloud.cli", "serve", "--port", "0",
           *(["--model", cloud_model] if cloud_model else []),
           *(["--sketch-model", sketch_model] if sketch_model and sketch_model != cloud_model else []),
           *(["--edge-model", edge_model] if edge_model else []),
           *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        found = re.search(r"serving on (http://\S+/v1)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit(f"pice-cloud serve did not start ({' '.join(cmd)}): {proc.stderr.read()[-2000:]}")


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def split_answer(text: str) -> list[tuple[str, str]]:
    """(heading, text) of each point of a progressive answer ("1. **Heading** text" paragraphs,
    `pice_edge.text.parse_points`), the text's whitespace collapsed."""
    from pice_edge import parse_points

    return [(point.heading, " ".join(point.text.split())) for point in parse_points(text)]


def reference_chunks(reference: str) -> list[str]:
    """The GPT-4o answer's paragraphs and list items, the units a point is compared with."""
    from pice_edge import list_item, paragraphs

    chunks = []
    for block in paragraphs(reference):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        items = [ln for ln in lines if list_item(ln)]
        chunks += [re.sub(r"[*#`]", "", ln).strip() for ln in items] if len(items) >= 2 else [" ".join(lines)]
    return [c for c in chunks if len(c.split()) >= 3] or [reference]


class Scorer:
    """MiniLM cosine (pice_cloud.embeddings.Embedder) and ROUGE-L F."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        from pice_cloud import Embedder

        self.embedder = Embedder()
        self.rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def cosine(self, a: str, b: str) -> float:
        return float(self.embedder.similarity([a], [b])[0, 0])

    def best_cosines(self, texts: list[str], pool: list[str]) -> list[float]:
        if not texts:
            return []
        return [float(x) for x in self.embedder.similarity(texts, pool).max(dim=1).values]

    def rouge_l(self, prediction: str, reference: str) -> float:
        return float(self.rouge.score(reference, prediction)["rougeL"].fmeasure)


def ask(client: Any, question: str, max_tokens: int | None) -> tuple[str, dict[str, Any], float]:
    started = time.perf_counter()
    extra: dict[str, Any] = {"pice": {"mode": "progressive"}}
    response = client.chat.completions.create(model="pice", messages=[{"role": "user", "content": question}],
                                              extra_body=extra, **({"max_tokens": max_tokens} if max_tokens else {}))
    info = (response.model_extra or {}).get("pice") or {}
    return response.choices[0].message.content or "", info, time.perf_counter() - started


def answer_metrics(scorer: Scorer, text: str, reference: str, info: dict[str, Any]) -> dict[str, Any]:
    from pice_cloud import is_cut_heading, is_meta_heading, repeated_sentence_rate

    points = split_answer(text)
    headings = [h for h, _ in points]
    point_texts = [t for _, t in points if t]
    edge, cloud = info.get("points_edge") or 0, info.get("points_cloud") or 0
    return {
        "mode_served": info.get("mode"),
        "cosine": round(scorer.cosine(text, reference), 4),
        "rouge_l": round(scorer.rouge_l(text, reference), 4),
        "words": len(text.split()),
        "repeated_sentence_rate": round(repeated_sentence_rate(text), 4),
        "headings": headings,
        "meta_headings": sum(is_meta_heading(h) for h in headings),
        "cut_headings": sum(is_cut_heading(h) for h in headings),
        "points_edge": edge, "points_cloud": cloud,
        "point_cosines": [round(c, 4) for c in scorer.best_cosines(point_texts, reference_chunks(reference))],
    }


def run_mode(mode: str, cloud: str, sketch: str, edge: str, qs: list[dict[str, Any]], scorer: Scorer,
             args: argparse.Namespace) -> list[dict[str, Any]]:
    from openai import OpenAI

    print(f"[{mode}] starting serve: cloud {cloud}, sketches {sketch}, edges {edge}", file=sys.stderr, flush=True)
    proc, url = start_server(cloud, sketch, edge, args.serve_arg)
    rows = []
    try:
        client = OpenAI(base_url=url, api_key="pice", max_retries=0, timeout=900)
        for q in qs:
            text, info, seconds = ask(client, q["question"], args.max_tokens)
            row = {"mode": mode, "question_id": q["id"], "category": q["category"], "latency_s": round(seconds, 2),
                   **answer_metrics(scorer, text, q["reference"], info), "answer": text}
            rows.append(row)
            print(f"[{mode}] q{q['id']:>2} {seconds:6.1f}s cos {row['cosine']:.3f} words {row['words']:>4} "
                  f"points edge/cloud {row['points_edge']}/{row['points_cloud']} "
                  f"rep {row['repeated_sentence_rate']:.2f}", file=sys.stderr, flush=True)
    finally:
        stop_server(proc)
    return rows


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    headings = sum(len(r["headings"]) for r in rows)
    points = sum(r["points_edge"] + r["points_cloud"] for r in rows)
    point_cos = [c for r in rows for c in r["point_cosines"]]
    return {
        "answers": len(rows),
        "progressive": sum(r["mode_served"] == "progressive" for r in rows),
        "cosine": _mean([r["cosine"] for r in rows]), "rouge_l": _mean([r["rouge_l"] for r in rows]),
        "words_median": statistics.median(r["words"] for r in rows) if rows else None,
        "repeated_sentence_rate": _mean([r["repeated_sentence_rate"] for r in rows]),
        "answers_with_repeats": sum(r["repeated_sentence_rate"] > 0 for r in rows),
        # The same over the answers served progressively: a refused sketch sends the request to the
        # base cloud model in every mode, and its cloud-only answers are where most repeats are.
        "repeated_sentence_rate_progressive": _mean([r["repeated_sentence_rate"] for r in rows
                                                     if r["mode_served"] == "progressive"]),
        "headings": headings,
        "meta_heading_rate": round(sum(r["meta_headings"] for r in rows) / headings, 4) if headings else None,
        "cut_heading_rate": round(sum(r["cut_headings"] for r in rows) / headings, 4) if headings else None,
        "bad_heading_rate": round(sum(r["meta_headings"] + r["cut_headings"] for r in rows) / headings, 4)
        if headings else None,
        "points_edge_share": round(sum(r["points_edge"] for r in rows) / points, 4) if points else None,
        "point_cosine": _mean(point_cos),
        "latency_median_s": statistics.median(r["latency_s"] for r in rows) if rows else None,
    }


# --- sketch level: raw sketches before the serving guards ------------------------------------------


def sketch_level(args: argparse.Namespace) -> dict[str, Any]:
    """Raw sketches of the base and the fine-tuned sketcher, with the serving prompt and parser."""
    from collections import Counter

    from pice_cloud import SKETCH_PREFILL, check_sketch, is_cut_heading, is_meta_heading, parse_sketch, sketch_messages
    from pice_edge import GenerationRequest
    from pice_edge.runtimes import TransformersRuntime

    qs = questions(args.sketches)
    out: dict[str, Any] = {"questions": len(qs), "max_points": args.max_points, "max_words": args.max_words,
                           "models": {}}
    for label, model in (("base", args.base), ("sketcher", args.sketcher)):
        runtime = TransformersRuntime(model, threads=args.threads)
        sketches: list[list[str]] = []
        for start in range(0, len(qs), 8):
            batch = qs[start:start + 8]
            requests = [GenerationRequest(prompt=runtime.format_chat(
                sketch_messages(q["question"], max_points=args.max_points, max_words=args.max_words), SKETCH_PREFILL),
                max_new_tokens=args.sketch_tokens) for q in batch]
            for result in runtime.generate(requests):
                try:
                    sketches.append(parse_sketch(result.text, max_points=args.max_points))
                except Exception:  # SketchError: nothing usable; counts as a failed sketch
                    sketches.append([])
            print(f"[sketches {model}] {len(sketches)}/{len(qs)}", file=sys.stderr, flush=True)
        runtime.close()
        headings = [h for sk in sketches for h in sk]
        reasons: Counter[str] = Counter()
        accepted = 0
        for q, sk in zip(qs, sketches, strict=True):
            problems = check_sketch(q["question"], sk)
            accepted += not problems
            reasons.update({p.reason for p in problems})
        well_formed = sum(len(sk) >= 3 and len({h.casefold() for h in sk}) == len(sk)
                          and all(len(h.split()) <= args.max_words and not re.search(r"[.!?]", h) for h in sk)
                          for sk in sketches)
        out["models"][label] = {
            "model": model, "points_mean": _mean([float(len(sk)) for sk in sketches]),
            "words_per_heading": _mean([float(len(h.split())) for h in headings]),
            "meta_heading_rate": round(sum(map(is_meta_heading, headings)) / len(headings), 4) if headings else None,
            "cut_heading_rate": round(sum(map(is_cut_heading, headings)) / len(headings), 4) if headings else None,
            "guard_accepted": accepted, "guard_reasons": dict(reasons.most_common()), "well_formed": well_formed,
            "sketches": [{"id": q["id"], "category": q["category"], "sketch": sk,
                          "problems": sorted({p.reason for p in check_sketch(q["question"], sk)})}
                         for q, sk in zip(qs, sketches, strict=True)],
        }
    return out


# --- point level on held-out alpaca_eval ---------------------------------------------------------


def heldout_points(report_path: Path, limit: int) -> tuple[list[Any], dict[str, Any]]:
    """The held-out expander examples of the training run whose report is ``report_path``."""
    from pice_cloud.finetune import FinetuneConfig, prepare_for

    report = json.loads(report_path.read_text())
    cfg = FinetuneConfig.model_validate(report["config"])
    prepared, _ = prepare_for(cfg)
    return prepared.heldout[:limit], {"seed": cfg.seed, "holdout_fraction": cfg.data_prep.holdout_fraction,
                                      "data": str(cfg.data), "instructions": prepared.counts["heldout_instructions"]}


def expand_points(model: str, examples: list[Any], max_new_tokens: int, threads: int) -> list[str]:
    """Each example's point expanded as an edge does it: its prompt, greedy, its clean-up."""
    from pice_edge import (
        EXPANSION_NO_REPEAT_NGRAM_SIZE,
        EXPANSION_REPETITION_PENALTY,
        GenerationRequest,
        clean_expansion,
        expansion_messages,
    )
    from pice_edge.runtimes import TransformersRuntime

    runtime = TransformersRuntime(model, threads=threads)
    out: list[str] = []
    for start in range(0, len(examples), 8):
        batch = examples[start:start + 8]
        # The edge's request (`EdgeNode._request`): its prompt and its repetition control.
        requests = [GenerationRequest(prompt=runtime.format_chat(expansion_messages(e.question, list(e.sketch),
                                                                                    e.point_index)),
                                      max_new_tokens=max_new_tokens, repetition_penalty=EXPANSION_REPETITION_PENALTY,
                                      no_repeat_ngram_size=EXPANSION_NO_REPEAT_NGRAM_SIZE) for e in batch]
        for e, result in zip(batch, runtime.generate(requests), strict=True):
            out.append(clean_expansion(result.text, truncated=result.token_count >= max_new_tokens,
                                       point=e.sketch[e.point_index], question=e.question))
        print(f"[points {model}] {len(out)}/{len(examples)}", file=sys.stderr, flush=True)
    runtime.close()
    return out


def point_level(scorer: Scorer, args: argparse.Namespace) -> dict[str, Any]:
    examples, split = heldout_points(args.expander_report, args.points)
    result: dict[str, Any] = {"split": split, "points": len(examples), "models": {}}
    texts = {}
    for label, model in (("base", args.base), ("expander", args.expander)):
        texts[label] = expand_points(model, examples, args.tokens_per_point, args.threads)
        cos = [scorer.cosine(t, e.target) if t else 0.0 for t, e in zip(texts[label], examples, strict=True)]
        result["models"][label] = {
            "model": model, "cosine": _mean(cos),
            "rouge_l": _mean([scorer.rouge_l(t, e.target) for t, e in zip(texts[label], examples, strict=True)]),
            "words_median": statistics.median(len(t.split()) for t in texts[label]),
            "empty": sum(not t for t in texts[label]),
        }
    base, tuned = result["models"]["base"]["cosine"], result["models"]["expander"]["cosine"]
    result["cosine_gain"] = round(tuned - base, 4) if base is not None and tuned is not None else None
    result["examples"] = [{"question": e.question, "sketch": list(e.sketch), "point": e.sketch[e.point_index],
                           "reference": e.target, "base": texts["base"][i], "expander": texts["expander"][i]}
                          for i, e in enumerate(examples[:6])]
    return result


# --- output ------------------------------------------------------------------------------------------


def table(summary: dict[str, dict[str, Any]]) -> str:
    cols = [("answers", "n"), ("progressive", "prog"), ("cosine", "cosine"), ("rouge_l", "ROUGE-L"),
            ("words_median", "words"), ("repeated_sentence_rate", "rep.sent"),
            ("repeated_sentence_rate_progressive", "rep.prog"), ("answers_with_repeats", "ans.rep"),
            ("meta_heading_rate", "meta.hd"), ("cut_heading_rate", "cut.hd"), ("points_edge_share", "edge.pts"),
            ("point_cosine", "pt.cos"), ("latency_median_s", "lat.s")]
    lines = ["| mode | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for mode, s in summary.items():
        cells = [("-" if s.get(k) is None else f"{s[k]:.0f}" if k == "words_median" else f"{s[k]:.3f}"
                  if isinstance(s[k], float) else str(s[k])) for k, _ in cols]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    out = ["# Answer quality: fine-tuned expander and sketcher vs base (SmolLM2-135M)", "",
           f"Vicuna-bench minus coding/math, first {result['questions']} questions, through `pice-cloud serve` "
           "(progressive mode, 2 local edges); metrics against the GPT-4o answers.", "",
           table(result["summary"]), "",
           "n: answers; prog: answered progressively; cosine: MiniLM cosine to GPT-4o; words: median; rep.sent: mean "
           "repeated-sentence rate; rep.prog: the same over the progressive answers; ans.rep: answers with a "
           "repeated sentence; meta.hd / cut.hd: share of headings "
           "that are meta or cut off; edge.pts: share of points the edges wrote; pt.cos: each point vs its closest "
           "paragraph of the GPT-4o answer; lat.s: median seconds per answer.", ""]
    if result.get("same_sketches") is not None:
        out += [f"Sketches identical between base and expander modes: {result['same_sketches']}.", ""]
    sl = result.get("sketch_level")
    if sl:
        out += ["## Raw sketches (before the serving guards)", "",
                f"{sl['questions']} Vicuna questions (coding and math excluded), serving prompt and parser, "
                "greedy.", "",
                "| sketcher | points | words/heading | meta-heading | cut heading | guards accept | well-formed | "
                "guard rejections |", "|---|---|---|---|---|---|---|---|"]
        for label, m in sl["models"].items():
            out.append(f"| {label} | {m['points_mean']} | {m['words_per_heading']} | {m['meta_heading_rate']} | "
                       f"{m['cut_heading_rate']} | {m['guard_accepted']}/{sl['questions']} | "
                       f"{m['well_formed']}/{sl['questions']} | {m['guard_reasons']} |")
        out.append("")
    pl = result.get("point_level")
    if pl:
        b, e = pl["models"]["base"], pl["models"]["expander"]
        out += ["## Point level, held-out alpaca_eval instructions", "",
                f"{pl['points']} points of {pl['split']['instructions']} instructions never trained on; each "
                "expanded with the edge's prompt and clean-up, compared with GPT-4-Turbo's text for that point "
                "(CC BY-NC data: measurement only).", "",
                "| expander | cosine | ROUGE-L | words | empty |", "|---|---|---|---|---|",
                f"| base | {b['cosine']} | {b['rouge_l']} | {b['words_median']} | {b['empty']} |",
                f"| fine-tuned | {e['cosine']} | {e['rouge_l']} | {e['words_median']} | {e['empty']} |", "",
                f"Gain in mean cosine: {pl['cosine_gain']:+.4f}.", ""]
    out += ["## Example answers", ""]
    by_q: dict[int, dict[str, str]] = {}
    for row in result["rows"]:
        by_q.setdefault(row["question_id"], {})[row["mode"]] = row["answer"]
    for qid, answers in list(by_q.items())[:3]:
        question = next(r for r in result["questions_list"] if r["id"] == qid)["question"]
        out += [f"### Q{qid}: {question}", ""]
        for mode, text in answers.items():
            out += [f"**{mode}**", "", text.strip(), ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16, help="Vicuna questions (non-coding/math)")
    parser.add_argument("--modes", default="base,expander,sketcher,both",
                        help="comma-separated: base, expander, sketcher, both ('' for none)")
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--expander", default=EXPANDER)
    parser.add_argument("--sketcher", default=SKETCHER)
    parser.add_argument("--sketches", type=int, default=0,
                        help="Vicuna questions whose raw sketches are compared, base vs fine-tuned (0: skip)")
    parser.add_argument("--max-points", type=int, default=6, help="sketch budget (serving default 6)")
    parser.add_argument("--max-words", type=int, default=6, help="words per heading asked for (serving default 6)")
    parser.add_argument("--sketch-tokens", type=int, default=64, help="sketch decode budget (serving default 64)")
    parser.add_argument("--points", type=int, default=0, help="held-out alpaca_eval points to expand (0: skip)")
    parser.add_argument("--expander-report", type=Path, default=ROOT / "tools" / "results" / "finetune_expander.json",
                        help="the expander's training report (its seed and held-out split)")
    parser.add_argument("--tokens-per-point", type=int, default=80, help="expansion budget (serving default 80)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the point-level generation")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens of each API request")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for pice-cloud serve")
    parser.add_argument("--json", type=Path, default=Path("quality.json"))
    parser.add_argument("--md", type=Path, default=None, help="also write a markdown summary with example answers")
    parser.add_argument("--update", action="store_true",
                        help="add this run's sections to an existing --json instead of replacing it (e.g. "
                             "--modes '' --sketches 70 after a full run)")
    args = parser.parse_args()

    modes = [m for m in args.modes.split(",") if m]
    configs = configurations(args.base, args.expander, args.sketcher)
    unknown = [m for m in modes if m not in configs]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(configs)}")
    scorer = Scorer()
    qs = questions(args.questions) if modes else []
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for mode in modes:
        rows += run_mode(mode, *configs[mode], qs, scorer, args)
    mode_models = {m: dict(zip(("cloud", "sketches", "edges"), configs[m], strict=True)) for m in modes}
    previous = json.loads(args.json.read_text()) if args.update and args.json.is_file() else {}
    if modes and previous.get("rows"):
        # Modes measured in an earlier run (same questions) stay; this run's modes replace theirs.
        if previous.get("questions") != len(qs):
            parser.error(f"--update: {args.json} has {previous.get('questions')} questions, this run {len(qs)}")
        rows = [r for r in previous["rows"] if r["mode"] not in modes] + rows
        mode_models = {**previous.get("modes", {}), **mode_models}
    measured = list(mode_models)
    summary = {mode: summarise([r for r in rows if r["mode"] == mode]) for mode in measured}
    same = None
    if {"base", "expander"} <= set(measured):
        base_sk = {r["question_id"]: r["headings"] for r in rows if r["mode"] == "base"}
        same = sum(base_sk.get(r["question_id"]) == r["headings"] for r in rows if r["mode"] == "expander")
        same = f"{same}/{len(base_sk)}"
    result: dict[str, Any] = {
        "questions": len(qs), "modes": mode_models,
        "summary": summary, "same_sketches": same, "rows": rows,
        "questions_list": [{k: q[k] for k in ("id", "category", "question")} for q in qs],
        "data": str(DATA_DIR), "data_note": "Vicuna-bench questions and GPT-4o answers from lm-sys/FastChat "
        "(Apache-2.0); point level: alpaca_eval GPT-4-Turbo answers (CC BY-NC 4.0, measurement only).",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
    }
    if args.sketches:
        result["sketch_level"] = sketch_level(args)
    if args.points:
        result["point_level"] = point_level(scorer, args)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if previous:
        keep = {k: v for k, v in result.items() if k in ("sketch_level", "point_level") or (modes and k != "wall_s")}
        result = {**previous, **keep}
        summary = result.get("summary", {})
    if summary:
        print(table(summary))
    if result.get("sketch_level"):
        for label, m in result["sketch_level"]["models"].items():
            print(f"raw sketches, {label}: {m['points_mean']} points, {m['words_per_heading']} words/heading, meta "
                  f"{m['meta_heading_rate']}, cut {m['cut_heading_rate']}, guards accept {m['guard_accepted']}/"
                  f"{result['sketch_level']['questions']} {m['guard_reasons']}, well-formed {m['well_formed']}")
    if result.get("point_level"):
        pl = result["point_level"]
        print(f"\npoint level ({pl['points']} held-out alpaca_eval points): cosine base "
              f"{pl['models']['base']['cosine']} -> fine-tuned {pl['models']['expander']['cosine']} "
              f"({pl['cosine_gain']:+.4f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    if args.md:
        args.md.write_text(markdown(result))
    print(f"wrote {args.json}" + (f" and {args.md}" if args.md else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
