"""How many of a model's sketches pass the sketch guards (`pice_cloud.guards.check_sketch`),
per sketch prompt, greedy and re-sampled.

The service re-samples a failed sketch once before answering cloud-only, so the number that
matters is "greedy passes, or else the re-sample passes"; it is reported next to each.

    python tools/sketch_guard_eval.py --prompt current --source vicuna --limit 21
    python tools/sketch_guard_eval.py --prompt legacy --source alpaca --limit 40 --no-embed

Sources: ``vicuna`` (Vicuna-bench without coding and math, taken round-robin over the
categories: the evaluation set) or ``alpaca`` (alpaca_eval instructions: the development set
used to choose the prompt). Results are appended to ``--out`` as one JSON object per run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from guard_calibration import outlines  # noqa: E402
from vicuna import read_vicuna  # noqa: E402

from pice_cloud import (  # noqa: E402
    SKETCH_PREFILL,
    Embed,
    SketchError,
    check_sketch,
    parse_sketch,
    repair_sketch,
    sketch_messages,
    sketch_rejection_reason,
)
from pice_cloud.guards import sketch_outline  # noqa: E402
from pice_edge import ChatMessage, GenerationRequest  # noqa: E402

MAX_POINTS = 6
MAX_WORDS = 6
SKETCH_TOKENS = 64
SKIP = {"coding", "math"}


def legacy_messages(question: str, *, max_points: int, max_words: int) -> list[ChatMessage]:
    """The sketch prompt as it was before the guards (commit 69c771e)."""
    low = min(3, max_points)
    return [
        ChatMessage("system", f"You write the skeleton of an answer: a numbered list of {low} to {max_points} short "
                              f"points, {max(2, max_words - 2)} to {max_words} words each. No explanations, nothing "
                              "else."),
        ChatMessage("user", question),
    ]


PROMPTS: dict[str, Callable[..., list[ChatMessage]]] = {"legacy": legacy_messages, "current": sketch_messages}


def questions(source: str, limit: int) -> list[str]:
    if source == "vicuna":
        rows = [q for q in read_vicuna() if q["category"] not in SKIP]
        by_category: dict[str, list[str]] = {}
        for q in rows:
            by_category.setdefault(q["category"], []).append(q["question"])
        # Round-robin over categories, so a small limit still covers every kind of question.
        mixed = [q for group in itertools.zip_longest(*by_category.values()) for q in group if q]
        return mixed[:limit]
    # Instructions whose GPT-4-Turbo answer is a list of headings (questions a sketch suits),
    # every 7th, spread over the file's sources (helpful_base, koala, ...).
    return [o["question"] for o in outlines(725)[1::7] if len(o["question"]) < 300][:limit]


def judge(question: str, raw: str, *, cut_words: int | None, embed: Embed | None,
          truncated: bool = False) -> dict[str, Any]:
    try:
        points = parse_sketch(raw, max_points=MAX_POINTS, truncated=truncated)
    except SketchError:
        points = []
    if cut_words:
        # What the parser did before the guards: cut every heading at max_words.
        points = [" ".join(p.split()[:cut_words]) for p in points]
    problems = check_sketch(question, points, embed=embed)
    reason = sketch_rejection_reason(problems)
    # What the service serves: the sketch as it is, or repaired by leaving faulty headings out.
    served = points if reason is None else repair_sketch(points, problems)
    return {"points": points, "reasons": sorted({p.reason for p in problems}), "reason": reason,
            "served": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", choices=sorted(PROMPTS), default="current")
    parser.add_argument("--source", choices=("vicuna", "alpaca"), default="vicuna")
    parser.add_argument("--limit", type=int, default=21)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--temperature", type=float, default=0.7, help="of the re-sample")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cut-words", type=int, default=None, help="cut headings at N words (the old parser)")
    parser.add_argument("--no-embed", action="store_true", help="lexical duplicate/restatement checks only")
    parser.add_argument("--outline", action="store_true", help="decode under the outline format (sketch_format: "
                                                               "constrained, the service's default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "sketch_guards.jsonl")
    args = parser.parse_args()

    from pice_edge.runtimes import TransformersRuntime

    runtime = TransformersRuntime(args.model, threads=args.threads)
    embed = None
    if not args.no_embed:
        from pice_cloud import Embedder

        embed = Embedder().encode
    qs = questions(args.source, args.limit)
    build = PROMPTS[args.prompt]
    prompts = [runtime.format_chat(build(q, max_points=MAX_POINTS, max_words=MAX_WORDS), SKETCH_PREFILL) for q in qs]
    started = time.perf_counter()
    # --outline: decoded under the outline format as the service does (`service.sketch_format`),
    # through the step batch that the embedded cloud backend runs.
    outline = sketch_outline(MAX_POINTS, MAX_WORDS) if args.outline else None
    generate = runtime.new_batch().run if args.outline else runtime.generate
    greedy = generate([GenerationRequest(p, SKETCH_TOKENS, outline=outline) for p in prompts])
    sampled = generate([GenerationRequest(p, SKETCH_TOKENS, temperature=args.temperature, seed=args.seed,
                                          outline=outline) for p in prompts])
    elapsed = time.perf_counter() - started
    rows = []
    for q, g, s in zip(qs, greedy, sampled, strict=True):
        rows.append({"question": q, "greedy": judge(q, g.text, cut_words=args.cut_words, embed=embed,
                                          truncated=g.token_count >= SKETCH_TOKENS and not args.cut_words),
                     "sampled": judge(q, s.text, cut_words=args.cut_words, embed=embed,
                                           truncated=s.token_count >= SKETCH_TOKENS and not args.cut_words)})
    greedy_pass = sum(r["greedy"]["reason"] is None for r in rows)
    sampled_pass = sum(r["sampled"]["reason"] is None for r in rows)
    either = sum(r["greedy"]["reason"] is None or r["sampled"]["reason"] is None for r in rows)
    greedy_served = sum(r["greedy"]["served"] is not None for r in rows)
    either_served = sum(r["greedy"]["served"] is not None or r["sampled"]["served"] is not None for r in rows)
    report = {
        "prompt": args.prompt, "outline": args.outline, "source": args.source, "questions": len(rows),
        "model": runtime.model_id,
        "embed": embed is not None, "cut_words": args.cut_words, "temperature": args.temperature, "seed": args.seed,
        "greedy_pass": greedy_pass, "sampled_pass": sampled_pass, "greedy_or_resample_pass": either,
        "greedy_served_with_repair": greedy_served, "served_with_repair_and_resample": either_served,
        "greedy_reasons": Counter(r for row in rows for r in row["greedy"]["reasons"]),
        "sampled_reasons": Counter(r for row in rows for r in row["sampled"]["reasons"]),
        "generation_s": round(elapsed, 1),
        "examples": [{"question": r["question"][:100], "greedy": r["greedy"]["points"],
                      "greedy_reasons": r["greedy"]["reasons"], "greedy_served": r["greedy"]["served"]}
                     for r in rows],
    }
    summary = {k: v for k, v in report.items() if k != "examples"}
    print(json.dumps(summary))
    for r in rows:
        print(f"- {r['question'][:70]!r}\n    greedy  {r['greedy']['reasons']} {r['greedy']['points']}\n"
              f"    sampled {r['sampled']['reasons']} {r['sampled']['points']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
