"""Calibrate the guards' thresholds (`pice_cloud.guards`) on good text: GPT-4-Turbo's answers to
the alpaca_eval instructions (training data, never Vicuna-bench, which is for evaluation).

From every answer that is a numbered list with bold headings ("1. **Set Clear Goals:** ..."), it
takes the headings as a good sketch and each item's text as a good expansion, then reports how
often each guard fires on them (false rejections), and the distributions the thresholds cut:
heading length, MiniLM cosine between headings of one outline and between a heading and its
question, 4-gram shares of the paragraphs.

    python tools/guard_calibration.py [--limit 725] [--no-embed] [--out tools/results/guard_calibration.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from vicuna import DATA_DIR  # noqa: E402

from pice_cloud import MAX_HEADING_WORDS, check_expansion, check_sketch, repeated_ngram_share  # noqa: E402
from pice_cloud.guards import _cosines, _ngrams, _share_found, _words  # noqa: E402  (private: their thresholds are calibrated here)
from pice_edge import parse_point  # noqa: E402

ALPACA = DATA_DIR / "alpaca_eval" / "gpt-4-turbo.jsonl"


def outlines(limit: int) -> list[dict[str, Any]]:
    """``{"question", "headings", "texts"}`` for each answer that is a list of 3+ bold headings."""
    found = []
    for line in ALPACA.read_text().splitlines()[:limit]:
        row = json.loads(line)
        headings: list[str] = []
        texts: list[str] = []
        for raw in row["output"].split("\n"):
            # A top-level "1. **Heading**: text" item (the grammar of a rendered point); an
            # indented one is a sub-item of the previous point.
            point = None if raw[:1].isspace() else parse_point(raw)
            if point:
                headings.append(point.heading.rstrip(":").strip())
                texts.append(point.text.removeprefix(":").strip())
            elif headings and raw.strip() and not raw.startswith("#"):
                texts[-1] = f"{texts[-1]}\n{raw.strip()}".strip()
        if len(headings) >= 3:
            found.append({"question": row["instruction"], "headings": headings, "texts": texts})
    return found


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in (50, 90, 95, 99)} | {"max": round(float(arr.max()),
                                                                                                     3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=725, help="answers read from alpaca_eval")
    parser.add_argument("--no-embed", action="store_true", help="skip MiniLM (lexical checks only)")
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "guard_calibration.json")
    args = parser.parse_args()

    data = outlines(args.limit)
    embed = None
    if not args.no_embed:
        from pice_cloud import Embedder

        embed = Embedder().encode
    lengths = [len(h.split()) for o in data for h in o["headings"]]
    heading_pairs: list[float] = []
    heading_question: list[float] = []
    reasons: Counter[str] = Counter()
    flagged: dict[str, list[str]] = {}
    for o in data:
        if embed is not None:
            sims = _cosines(embed([o["question"], *o["headings"]]))
            n = len(o["headings"])
            heading_question += [float(sims[0, i + 1]) for i in range(n)]
            heading_pairs.append(max(float(sims[i + 1, j + 1]) for i in range(n) for j in range(i)))
        for p in check_sketch(o["question"], o["headings"], embed=embed):
            reasons[p.reason] += 1
            flagged.setdefault(p.reason, []).append(p.detail)

    expansion_reasons: Counter[str] = Counter()
    expansion_flagged: dict[str, list[str]] = {}
    echo: list[float] = []
    repeat: list[float] = []
    paragraphs = 0
    for o in data:
        for i, text in enumerate(o["texts"]):
            if not text:
                continue
            paragraphs += 1
            words = _words(text)
            grams = _ngrams(words)
            pool = {g for p in [o["question"], *o["headings"]] for g in _ngrams(_words(p))}
            echo.append(_share_found(grams, pool))
            repeat.append(repeated_ngram_share(text))
            others = [t for j, t in enumerate(o["texts"]) if j != i]
            reason = check_expansion(text, point=o["headings"][i], question=o["question"], other_texts=others,
                                            prompt_texts=o["headings"])
            if reason:
                expansion_reasons[reason] += 1
                expansion_flagged.setdefault(reason, []).append(text[:160])

    headings = len(lengths)
    report = {
        "source": "alpaca_eval gpt-4-turbo answers that are numbered lists of 3+ bold headings",
        "outlines": len(data),
        "headings": headings,
        "heading_words": _quantiles([float(n) for n in lengths]),
        "headings_over_max_words": sum(n > MAX_HEADING_WORDS for n in lengths) / headings,
        "max_pairwise_heading_cosine_per_outline": _quantiles(heading_pairs),
        "outlines_with_a_heading_pair_at_or_above": {
            str(t): sum(c >= t for c in heading_pairs) for t in (0.8, 0.83, 0.86, 0.9)} if heading_pairs else {},
        "heading_question_cosine": _quantiles(heading_question),
        "headings_at_or_above_question_cosine": {
            str(t): sum(c >= t for c in heading_question) for t in (0.7, 0.75, 0.8, 0.85)} if heading_question else {},
        "sketch_problems_per_heading": {r: round(c / headings, 4) for r, c in reasons.most_common()},
        "outlines_rejected": sum(bool(check_sketch(o["question"], o["headings"], embed=embed)) for o in data),
        "sketch_examples": {r: v[:8] for r, v in flagged.items()},
        "paragraphs": paragraphs,
        "paragraph_prompt_4gram_share": _quantiles(echo),
        "paragraph_repeated_4gram_share": _quantiles(repeat),
        "expansions_rejected": {r: c for r, c in expansion_reasons.most_common()},
        "expansion_examples": {r: v[:6] for r, v in expansion_flagged.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
