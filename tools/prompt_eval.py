"""Expansion prompt layouts compared on held-out questions (`pice_edge.prompts`).

For alpaca_eval's held-out fifth (`tools/vicuna.py read_alpaca("calibration")`; never
Vicuna-bench), the model writes each sketch as the service does (greedy, under the outline
format, refused headings left out by the guards' repair); then every point is expanded once per
layout, greedily, with the edge's repetition penalty and the service's budget (`ServiceConfig`
defaults: sketch shape and tokens, each point's tokens by the sketch's length), and the answer is
put together as the service renders it. Per layout:

- ``cosine`` / ``rouge_l``: the answer against GPT-4-Turbo's (MiniLM cosine, ROUGE-L F);
- ``relevance``: mean MiniLM cosine of an expansion to "question + its heading";
- ``opening_repeat``: share of the points after the first whose first sentence shares half its
  content words with an earlier point's first sentence (a frame copied across points);
- ``words`` per answer and the expansion guard's verdicts (each point checked against the ones
  before it).

    python tools/prompt_eval.py --questions 54

Layouts: ``point`` (the question and the point: the prompt in use) and ``outline`` (the
question, the whole numbered outline, "Expand point i, ...": the layout before it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from vicuna import read_alpaca  # noqa: E402

from pice_cloud import SKETCH_PREFILL, ServiceConfig, SketchError, check_sketch, parse_sketch, repair_sketch  # noqa: E402
from pice_cloud.guards import check_expansion, content_words, sketch_outline  # noqa: E402
from pice_cloud.scheduler import Budget  # noqa: E402
from pice_cloud.sketch import sketch_messages  # noqa: E402
from pice_edge import GenerationRequest, clean_expansion  # noqa: E402
from pice_edge.prompts import (  # noqa: E402
    EXPANSION_REPETITION_PENALTY,
    expansion_messages,
    format_sketch,
    outline_expansion_messages,
)
from pice_edge.runtimes.base import ChatMessage  # noqa: E402
from pice_edge.text import format_point, split_sentences  # noqa: E402

LAYOUTS: dict[str, Callable[[str, Sequence[str], int], list[ChatMessage]]] = {
    "point": expansion_messages,
    "outline": outline_expansion_messages,
}


def _first_sentence_words(text: str) -> set[str]:
    first = split_sentences(text)[:1]
    return content_words(first[0]) if first else set()


def opening_repeat(texts: Sequence[str]) -> float:
    """Share of ``texts[1:]`` whose first sentence shares half its content words (Jaccard) with
    an earlier text's first sentence."""
    firsts = [_first_sentence_words(t) for t in texts]
    later = range(1, len(firsts))
    hits = sum(any(firsts[i] and len(firsts[i] & firsts[j]) / len(firsts[i] | firsts[j]) >= 0.5 for j in range(i))
               for i in later)
    return hits / len(later) if later else 0.0


def decode(runtime: Any, requests: Sequence[GenerationRequest], batch: int = 16) -> list[Any]:
    """``requests`` through the engine the service and the edges run (continuous batching and the
    outline mask; Hugging Face's `generate` would decode the unconstrained ones differently)."""
    out: list[Any] = []
    for i in range(0, len(requests), batch):
        out += runtime.new_batch().run(requests[i:i + batch])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="point,outline", help=f"some of {sorted(LAYOUTS)}")
    parser.add_argument("--questions", type=int, default=54, help="held-out questions taken, in file order")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=None,
                        help="expansion budget of every point (default: the service's, by the sketch's length)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--examples", type=int, default=3, help="answers kept in the report per layout")
    parser.add_argument("--unguarded", action="store_true",
                        help="keep every sketch that parses, refused or not (a model whose sketches the guards refuse)")
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "prompt_layouts.json")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        parser.error(f"unknown layouts {sorted(unknown)}; choose from {sorted(LAYOUTS)}")

    from rouge_score import rouge_scorer

    from pice_cloud import Embedder
    from pice_edge.runtimes import TransformersRuntime

    questions = read_alpaca("calibration")[args.offset:args.offset + args.questions]
    runtime = TransformersRuntime(args.model, threads=args.threads)
    embedder = Embedder()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # The service's own budget (an idle system's): sketch shape, and each point's tokens.
    budget = Budget.from_config(ServiceConfig())

    # Sketches, as the service writes and repairs them (one greedy try).
    form = sketch_outline(budget.max_points, budget.max_words)
    sketch_prompts = [runtime.format_chat(sketch_messages(q["question"], max_points=budget.max_points,
                                                          max_words=budget.max_words), SKETCH_PREFILL)
                      for q in questions]
    sketches = decode(runtime, [GenerationRequest(p, budget.sketch_tokens, outline=form) for p in sketch_prompts])
    items: list[tuple[dict[str, Any], list[str]]] = []
    for q, result in zip(questions, sketches, strict=True):
        try:
            points = parse_sketch(result.text, max_points=budget.max_points)
        except SketchError:
            continue
        problems = [] if args.unguarded else check_sketch(q["question"], points, embed=embedder.encode)
        kept = repair_sketch(points, problems) if problems else points
        if kept:
            items.append((q, kept))

    if not items:
        sys.exit(f"none of the {len(questions)} sketches passed the guards: nothing to expand (--unguarded keeps them)")
    reports: list[dict[str, Any]] = []
    for layout in layouts:
        build = LAYOUTS[layout]
        # (answer, point, prompt, the point's token budget)
        jobs = [(k, i, runtime.format_chat(build(q["question"], points, i)),
                 args.tokens or budget.point_tokens(len(points)))
                for k, (q, points) in enumerate(items) for i in range(len(points))]
        started = time.perf_counter()
        penalty = EXPANSION_REPETITION_PENALTY
        results = decode(runtime, [GenerationRequest(prompt, tokens, repetition_penalty=penalty)
                                   for _, _, prompt, tokens in jobs])
        elapsed = time.perf_counter() - started
        texts: dict[tuple[int, int], str] = {}
        for (k, i, _, tokens), r in zip(jobs, results, strict=True):
            q, points = items[k]
            texts[k, i] = clean_expansion(r.text, truncated=r.token_count >= tokens, point=points[i],
                                          question=q["question"])
        cosines, rouges, relevances, repeats, words = [], [], [], [], []
        verdicts: Counter[str] = Counter()
        examples: list[dict[str, str]] = []
        for k, (q, points) in enumerate(items):
            own = [texts[k, i] for i in range(len(points))]
            for i, text in enumerate(own):
                reason = check_expansion(text, point=points[i], question=q["question"], other_texts=own[:i],
                                         prompt_texts=(format_sketch(points),))
                verdicts[reason or "ok"] += 1
            answer = "\n\n".join(format_point(i, p, t) for i, (p, t) in enumerate(zip(points, own, strict=True)))
            ref, ans = embedder.encode([q["reference"], answer])
            cosines.append(float((ref * ans).sum()))
            rouges.append(scorer.score(q["reference"], answer)["rougeL"].fmeasure)
            heads = embedder.encode([f"{q['question']} {p}" for p in points])
            bodies = embedder.encode([t or "-" for t in own])
            relevances += (heads * bodies).sum(dim=1).tolist()
            repeats.append(opening_repeat(own))
            words.append(len(answer.split()))
            if len(examples) < args.examples:
                examples.append({"question": q["question"], "answer": answer})
        report = {
            "layout": layout, "model": str(args.model), "questions": len(questions), "answers": len(items),
            "points": len(jobs), "tokens": args.tokens or "service",
            "budget": {"max_points": budget.max_points, "max_words": budget.max_words,
                       "sketch_tokens": budget.sketch_tokens, "tokens_per_point": budget.tokens_per_point,
                       "point_stretch": budget.point_stretch},
            "cosine": statistics.fmean(cosines), "rouge_l": statistics.fmean(rouges),
            "relevance": statistics.fmean(relevances), "opening_repeat": statistics.fmean(repeats),
            "words": statistics.fmean(words), "guard": dict(verdicts), "expand_s": round(elapsed, 1),
            "examples": examples,
        }
        reports.append(report)
        print(f"{layout:>8}: cosine {report['cosine']:.3f}  ROUGE-L {report['rouge_l']:.4f}  relevance "
              f"{report['relevance']:.3f}  opening repeat {report['opening_repeat']:.2f}  words "
              f"{report['words']:.0f}  guard ok {verdicts['ok']}/{len(jobs)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "layouts": reports}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
