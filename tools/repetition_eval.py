"""Measure repetition control on an expander: repetition penalty and no-repeat n-grams.

Expands every heading (the first five) of GPT-4-Turbo's list answers to alpaca_eval instructions
(the development set; never Vicuna-bench) with the edge's expansion prompt, once per setting, and
reports per setting:

- ``answer_repeated_sentences``: mean `pice_cloud.guards.repeated_sentence_rate` of the answer
  assembled from the points (the same sentence under several points);
- ``own_repeated_4grams``: mean share of an expansion's 4-grams that repeat within it;
- ``cosine_to_reference``: mean MiniLM cosine of an expansion to GPT-4-Turbo's text for that
  heading (does the control wreck the text?);
- ``words`` per expansion, and the expansion guard's verdicts (`check_expansion`, each point
  checked against the points before it, as the cloud does).

    python tools/repetition_eval.py --settings 1.0:0,1.1:0,1.2:0,1.0:4 --outlines 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from guard_calibration import outlines  # noqa: E402

from pice_cloud import check_expansion, repeated_ngram_share, repeated_sentence_rate  # noqa: E402
from pice_edge import GenerationRequest, clean_expansion, expansion_messages  # noqa: E402

POINTS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="1.0:0,1.1:0", help="PENALTY:NGRAM,... (1.0:0 is off)")
    parser.add_argument("--outlines", type=int, default=12, help="alpaca_eval list answers used")
    parser.add_argument("--offset", type=int, default=2, help="first answer taken (then every 9th)")
    parser.add_argument("--tokens", type=int, default=80, help="expansion budget (the service's default)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--examples", type=int, default=6, help="expansions kept in the report per setting")
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "repetition_control.jsonl")
    args = parser.parse_args()

    from pice_cloud import Embedder
    from pice_edge.runtimes import TransformersRuntime

    chosen = [o for o in outlines(725) if len(o["question"]) < 300][args.offset::9][:args.outlines]
    runtime = TransformersRuntime(args.model, threads=args.threads)
    embedder = Embedder()
    jobs = [(o, i, runtime.format_chat(expansion_messages(o["question"], o["headings"][:POINTS], i)))
            for o in chosen for i in range(min(POINTS, len(o["headings"])))]
    references = embedder.encode([o["texts"][i] or o["headings"][i] for o, i, _ in jobs])
    for setting in args.settings.split(","):
        penalty_text, ngram_text = setting.split(":")
        penalty, ngram = float(penalty_text), int(ngram_text)
        started = time.perf_counter()
        results = runtime.generate([
            GenerationRequest(prompt, args.tokens, temperature=args.temperature, seed=args.seed,
                              repetition_penalty=penalty, no_repeat_ngram_size=ngram) for _, _, prompt in jobs])
        elapsed = time.perf_counter() - started
        texts = [clean_expansion(r.text, truncated=r.token_count >= args.tokens, point=o["headings"][i],
                                 question=o["question"])
                 for (o, i, _), r in zip(jobs, results, strict=True)]
        cosines = (embedder.encode([t or "-" for t in texts]) * references).sum(dim=1).tolist()
        answers: dict[int, list[str]] = {}
        verdicts: Counter[str] = Counter()
        for (o, i, _), text in zip(jobs, texts, strict=True):
            before = answers.setdefault(id(o), [])
            reason = check_expansion(text, point=o["headings"][i], question=o["question"], other_texts=before,
                                            prompt_texts=o["headings"][:POINTS])
            verdicts[reason or "accepted"] += 1
            before.append(text)
        report = {
            "repetition_penalty": penalty, "no_repeat_ngram_size": ngram, "model": runtime.model_id,
            "temperature": args.temperature, "outlines": len(chosen), "offset": args.offset, "expansions": len(texts),
            "answer_repeated_sentences": round(statistics.mean(
                repeated_sentence_rate("\n".join(v)) for v in answers.values()), 3),
            "own_repeated_4grams": round(statistics.mean(repeated_ngram_share(t) for t in texts), 3),
            "cosine_to_reference": round(statistics.mean(cosines), 3),
            "words": round(statistics.mean(len(t.split()) for t in texts), 1),
            "guard": dict(verdicts.most_common()),
            "generation_s": round(elapsed, 1),
            "examples": [{"question": o["question"][:80], "point": o["headings"][i], "text": t}
                         for (o, i, _), t in list(zip(jobs, texts, strict=True))[:args.examples]],
        }
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
