#!/usr/bin/env python3
"""Fit the ensemble selector's feature weights on a calibration set built from Vicuna-bench.

Two steps (each can be re-run alone; the first is the slow one and is cached):

    # 1. sketch each question with the cloud LLM, expand every point K times with different
    #    sampling (edges with different temperatures), record each candidate's edge log-prob
    #    and the cloud LLM's log-likelihood of it
    python tools/fit_ensemble.py generate --questions 24 --k 3
    # 2. embed, compute features and the target (MiniLM similarity of the candidate to the
    #    best-matching passage of the GPT-4o reference answer), fit, report, write weights
    python tools/fit_ensemble.py fit

Fitting: per point, features and target are centred (only differences between candidates of
one point matter to an argmax), then a ridge regression of target on features, with the
penalty chosen by leave-one-question-out selection accuracy on the training questions. The
report compares, on held-out questions, how often each selector picks the oracle candidate
(highest target) and the mean target of its picks: fitted weights, random pick, and each
single feature.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "results"
CALIBRATION = RESULTS / "ensemble_calibration.jsonl"
SKIP_CATEGORIES = {"coding", "math"}  # routed cloud-only: no sketch, no ensemble
TEMPERATURES = (0.0, 0.7, 1.0, 1.2)


def load_questions(data: Path, limit: int) -> list[dict[str, Any]]:
    from vicuna import read_vicuna

    picked = [q for q in read_vicuna(data) if q["category"] not in SKIP_CATEGORIES]
    # Spread over categories: round-robin.
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for q in picked:
        by_cat.setdefault(q["category"], []).append(q)
    ordered = []
    while any(by_cat.values()):
        for cat in sorted(by_cat):
            if by_cat[cat]:
                ordered.append(by_cat[cat].pop(0))
    return ordered[:limit]


async def generate(args: argparse.Namespace) -> None:
    from pice_cloud.llm.base import ChatRequest
    from pice_cloud.llm.transformers import TransformersBackend
    from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages
    from pice_edge.prompts import clean_expansion, expansion_messages

    llm = TransformersBackend(args.model, threads=args.threads)
    done = set()
    if CALIBRATION.exists() and not args.fresh:
        done = {json.loads(line)["id"] for line in CALIBRATION.read_text().splitlines() if line.strip()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from vicuna import VICUNA

    questions = [q for q in load_questions(Path(args.data) if args.data else VICUNA, args.questions)
                 if q["id"] not in done]
    started = time.perf_counter()
    with CALIBRATION.open("w" if args.fresh else "a") as out:
        for n, q in enumerate(questions, 1):
            [raw] = await llm.complete([ChatRequest(sketch_messages(q["question"], max_points=5, max_words=6),
                                                    max_tokens=64, prefill=SKETCH_PREFILL)])
            points = parse_sketch(raw.text, max_points=5, max_words=6)
            requests = []
            for i in range(len(points)):
                for k in range(args.k):
                    requests.append(ChatRequest(
                        expansion_messages(q["question"], points, i), max_tokens=args.tokens,
                        temperature=TEMPERATURES[k % len(TEMPERATURES)], seed=1000 * q["id"] + k,
                    ))
            results = await llm.complete(requests)
            texts = [clean_expansion(r.text, truncated=r.tokens >= args.tokens, point=points[j // args.k])
                     for j, r in enumerate(results)]
            scores = await llm.score(requests, texts)
            cands = []
            for j, (req, res, text, cloud_ll) in enumerate(zip(requests, results, texts, scores, strict=True)):
                cands.append({"point": j // args.k, "temperature": req.temperature, "text": text,
                              "tokens": res.tokens, "edge_logprob": res.mean_logprob, "cloud_loglik": cloud_ll})
            out.write(json.dumps({**q, "sketch": points, "tokens_per_point": args.tokens, "candidates": cands}) + "\n")
            out.flush()
            print(f"[{n}/{len(questions)}] q{q['id']} {len(points)} points, {len(cands)} candidates "
                  f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    await llm.close()


def _chunks(reference: str) -> list[str]:
    parts = [p.strip(" -*#\n") for p in re.split(r"\n\s*\n|\n\s*(?:\d+\.|[-*])\s", reference)]
    return [p for p in parts if len(p.split()) >= 4] or [reference]


def _center(rows: list[list[float]]) -> list[list[float]]:
    n = len(rows)
    means = [sum(r[i] for r in rows) / n for i in range(len(rows[0]))]
    return [[x - m for x, m in zip(r, means, strict=True)] for r in rows]


def _ridge(xs: list[list[float]], ys: list[float], lam: float) -> list[float]:
    import torch

    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(x.T @ x + lam * eye, x.T @ y)
    return [float(v) for v in w]


def _evaluate(groups: list[dict[str, Any]], weights: list[float]) -> tuple[float, float]:
    """(fraction of points where the pick is the oracle, mean target of the picks)."""
    hits = total = 0.0
    for g in groups:
        scores = [sum(w * x for w, x in zip(weights, row, strict=True)) for row in g["x"]]
        pick = max(range(len(scores)), key=lambda i: scores[i])
        hits += g["y"][pick] == max(g["y"])
        total += g["y"][pick]
    return hits / len(groups), total / len(groups)


def fit(args: argparse.Namespace) -> None:
    from pice_cloud.embeddings import Embedder
    from pice_cloud.ensemble import FEATURES, length_fit

    rows = [json.loads(line) for line in CALIBRATION.read_text().splitlines() if line.strip()]
    embedder = Embedder()
    groups: list[dict[str, Any]] = []
    for q in rows:
        ref = embedder.encode_lists(_chunks(q["reference"]))
        by_point: dict[int, list[dict[str, Any]]] = {}
        for c in q["candidates"]:
            if c["text"].strip():
                by_point.setdefault(c["point"], []).append(c)
        for point, cands in sorted(by_point.items()):
            if len(cands) < 2:
                continue
            vecs = embedder.encode_lists([c["text"] for c in cands])
            ctx = embedder.encode_lists([f"{q['question']} {q['sketch'][point]}"])[0]
            x, y = [], []
            for j, c in enumerate(cands):
                others = [vecs[m] for m in range(len(cands)) if m != j]
                agreement = sum(_dot(vecs[j], o) for o in others) / len(others)
                x.append([c["cloud_loglik"], agreement, _dot(vecs[j], ctx), c["edge_logprob"],
                          length_fit(c["tokens"], q["tokens_per_point"])])
                y.append(max(_dot(vecs[j], r) for r in ref))
            groups.append({"qid": q["id"], "x": x, "y": y})

    qids = sorted({g["qid"] for g in groups})
    rng = random.Random(args.seed)
    rng.shuffle(qids)
    n_test = max(1, int(len(qids) * args.test_fraction))
    test_ids = set(qids[:n_test])
    train = [g for g in groups if g["qid"] not in test_ids]
    test = [g for g in groups if g["qid"] in test_ids]

    def fit_on(gs: list[dict[str, Any]], lam: float) -> list[float]:
        xs: list[list[float]] = []
        ys: list[float] = []
        for g in gs:
            xs.extend(_center(g["x"]))
            ymean = sum(g["y"]) / len(g["y"])
            ys.extend(v - ymean for v in g["y"])
        # Standardise so one penalty suits features of different scales; map back after.
        scale = [max(1e-9, (sum(r[i] ** 2 for r in xs) / len(xs)) ** 0.5) for i in range(len(FEATURES))]
        w = _ridge([[v / s for v, s in zip(r, scale, strict=True)] for r in xs], ys, lam)
        return [wi / s for wi, s in zip(w, scale, strict=True)]

    # Penalty by leave-one-question-out accuracy on the training questions.
    train_ids = sorted({g["qid"] for g in train})
    best_lam, best_acc = 1.0, -1.0
    for lam in (0.01, 0.1, 1.0, 10.0, 100.0):
        accs = []
        for held in train_ids:
            w = fit_on([g for g in train if g["qid"] != held], lam)
            accs.append(_evaluate([g for g in train if g["qid"] == held], w)[0])
        acc = sum(accs) / len(accs)
        if acc > best_acc:
            best_lam, best_acc = lam, acc
    weights = fit_on(train, best_lam)

    report: list[dict[str, Any]] = []
    acc, mean = _evaluate(test, weights)
    report.append({"selector": "fitted (all features)", "oracle_hit": acc, "mean_similarity": mean})
    rand_hit = sum(1 / len(g["y"]) for g in test) / len(test)
    rand_mean = sum(sum(g["y"]) / len(g["y"]) for g in test) / len(test)
    report.append({"selector": "random pick", "oracle_hit": rand_hit, "mean_similarity": rand_mean})
    for i, name in enumerate(FEATURES):
        # Sign from the training data: a single feature used the way it helps there.
        sign = 1.0 if fit_on(train, 1e6)[i] >= 0 else -1.0
        single = [sign if j == i else 0.0 for j in range(len(FEATURES))]
        acc_i, mean_i = _evaluate(test, single)
        report.append({"selector": f"{name} only ({'+' if sign > 0 else '-'})", "oracle_hit": acc_i,
                       "mean_similarity": mean_i})
    oracle_mean = sum(max(g["y"]) for g in test) / len(test)
    report.append({"selector": "oracle", "oracle_hit": 1.0, "mean_similarity": oracle_mean})

    print(f"{'selector':<28}{'picks oracle':>14}{'mean sim':>10}")
    for r in report:
        print(f"{r['selector']:<28}{r['oracle_hit']:>14.3f}{r['mean_similarity']:>10.4f}")
    meta = {"questions": len(qids), "test_questions": len(test_ids), "train_points": len(train),
            "test_points": len(test), "ridge_lambda": best_lam, "candidates_per_point": args_k(rows),
            "target": "MiniLM cosine to the best-matching passage of the GPT-4o answer",
            "report": report, "command": "python tools/fit_ensemble.py fit"}
    out = {"weights": dict(zip(FEATURES, weights, strict=True)), "fit": meta}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "ensemble.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"weights {out['weights']} written to {args.out}")


def args_k(rows: list[dict[str, Any]]) -> float:
    counts: dict[tuple[int, int], int] = {}
    for q in rows:
        for c in q["candidates"]:
            counts[(q["id"], c["point"])] = counts.get((q["id"], c["point"]), 0) + 1
    return sum(counts.values()) / max(1, len(counts))


def _dot(a: Any, b: Any) -> float:
    return float(sum(float(x) * float(y) for x, y in zip(a, b, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--model", default="smollm2-135m-instruct")
    gen.add_argument("--data", default=None, help="vicuna_bench folder (default: $PICE_DATA_DIR/vicuna_bench)")
    gen.add_argument("--questions", type=int, default=24)
    gen.add_argument("--k", type=int, default=3, help="candidates per point")
    gen.add_argument("--tokens", type=int, default=64, help="expansion budget per point")
    gen.add_argument("--threads", type=int, default=2)
    gen.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    f = sub.add_parser("fit")
    f.add_argument("--out", default=str(ROOT / "pice_cloud" / "data" / "ensemble.json"))
    f.add_argument("--test-fraction", type=float, default=0.3)
    f.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "generate":
        asyncio.run(generate(args))
    else:
        fit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
