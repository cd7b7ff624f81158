#!/usr/bin/env python3
"""Fit the ensemble selector's feature weights on a calibration set built from alpaca_eval.

Two steps (each can be re-run alone; the first is the slow one and resumes where it stopped):

    # 1. sketch each question as the service does (sketches the guards refuse are skipped: those
    #    requests are answered cloud-only), expand every point K times as the edges do (replica 0
    #    greedy, the others at the ensemble temperature), record each candidate's edge log-prob,
    #    the cloud LLM's log-likelihood of it and the expansion guard's verdict
    python tools/fit_ensemble.py generate --questions 96 --k 3
    # 2. embed, compute features and the target (MiniLM similarity of the candidate to the
    #    best-matching passage of the reference answer), fit, report, write weights
    python tools/fit_ensemble.py fit

Questions come from alpaca_eval's fitting part (``tools/vicuna.py``: never the fifth the mode
router is calibrated on, never the Vicuna questions the benchmarks report); ``--source vicuna``
uses Vicuna-bench instead.

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
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "results"
CALIBRATION = RESULTS / "ensemble_calibration.jsonl"
SKIP_CATEGORIES = {"coding", "math"}  # routed cloud-only: no sketch, no ensemble
#: Features whose weight may not be negative (each is minus an amount of repetition).
PENALTIES = {"self_repetition", "cross_repetition"}
#: Standardised weights below this share of the largest are dropped (see ``fit_on``).
NEGLIGIBLE = 0.02
#: Features the cloud LLM computes (a prefill of every candidate on the cloud): one stays in the
#: weights only where the held-out picks gain with it by more than twice the gain's standard error.
COSTLY = ("cloud_loglik",)


def load_questions(source: str, data: Path | None, limit: int) -> list[dict[str, Any]]:
    """``limit`` questions spread over categories (round-robin): alpaca_eval's fitting part
    (never the router's calibration part) or Vicuna-bench without coding and math."""
    from vicuna import VICUNA, read_alpaca, read_vicuna

    if source == "alpaca":
        picked = read_alpaca("fit", data) if data else read_alpaca("fit")
    else:
        picked = [q for q in read_vicuna(data or VICUNA) if q["category"] not in SKIP_CATEGORIES]
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
    """Candidates as the served path makes them: the serving sketch prompt and budget, only
    sketches that pass the sketch guard (the others are answered cloud-only), each point
    expanded ``--k`` times by the edge runtime with the edge's prompt and repetition control
    (replica 0 with the request's sampling, greedy; the others at the ensemble temperature with
    seeds of their own, as `PiceService` samples replicas), and every candidate's expansion-guard
    verdict (the selector only ever sees candidates that pass it)."""
    from pice_cloud import defaults
    from pice_cloud.errors import SketchError
    from pice_cloud.guards import check_expansion, check_sketch, sketch_rejection_reason
    from pice_cloud.llm.base import ChatRequest
    from pice_cloud.llm.transformers import TransformersBackend
    from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages
    from pice_edge.prompts import (
        EXPANSION_NO_REPEAT_NGRAM_SIZE,
        EXPANSION_REPETITION_PENALTY,
        SYSTEM_PROMPT,
        clean_expansion,
        expansion_messages,
        format_sketch,
    )
    from pice_edge.runtimes.base import GenerationRequest
    from pice_edge.runtimes.transformers import TransformersRuntime

    llm = TransformersBackend(args.model, threads=args.threads)
    edge = TransformersRuntime(args.model, threads=args.threads)
    done = set()
    if CALIBRATION.exists() and not args.fresh:
        done = {json.loads(line)["id"] for line in CALIBRATION.read_text().splitlines() if line.strip()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    questions = [q for q in load_questions(args.source, Path(args.data) if args.data else None, args.questions)
                 if q["id"] not in done]
    started = time.perf_counter()
    refused = 0
    with CALIBRATION.open("w" if args.fresh else "a") as out:
        for n, q in enumerate(questions, 1):
            [raw] = await llm.complete([ChatRequest(
                sketch_messages(q["question"], max_points=defaults.MAX_POINTS, max_words=defaults.MAX_WORDS),
                max_tokens=defaults.SKETCH_TOKENS, prefill=SKETCH_PREFILL)])
            try:
                points = parse_sketch(raw.text, max_points=defaults.MAX_POINTS)
            except SketchError:  # an unparsable sketch is refused like a bad one
                points = []
            reason = sketch_rejection_reason(check_sketch(q["question"], points))
            if args.no_sketch_guard and points:
                reason = None
            if reason is not None:
                refused += 1
                print(f"[{n}/{len(questions)}] q{q['id']} sketch refused ({reason})", file=sys.stderr, flush=True)
                continue
            requests, temps = [], []
            for i in range(len(points)):
                for k in range(args.k):
                    temperature = 0.0 if k == 0 else args.temperature
                    temps.append(temperature)
                    requests.append(GenerationRequest(
                        prompt=edge.format_chat(expansion_messages(q["question"], points, i)),
                        max_new_tokens=args.tokens, temperature=temperature, seed=1000 * q["id"] + 7 * i + k,
                        repetition_penalty=EXPANSION_REPETITION_PENALTY,
                        no_repeat_ngram_size=EXPANSION_NO_REPEAT_NGRAM_SIZE))
            results = []
            for start in range(0, len(requests), 8):
                results.extend(edge.generate(requests[start:start + 8]))
            texts = [clean_expansion(r.text, truncated=r.token_count >= args.tokens, point=points[j // args.k],
                                     question=q["question"]) for j, r in enumerate(results)]
            scores = await llm.score([ChatRequest(expansion_messages(q["question"], points, j // args.k), max_tokens=0)
                                      for j in range(len(texts))], texts)
            outline = format_sketch(points)
            cands = []
            for j, (res, text, cloud_ll) in enumerate(zip(results, texts, scores, strict=True)):
                point = j // args.k
                others = [t for m, t in enumerate(texts) if m // args.k != point]
                guard = check_expansion(text, point=points[point], question=q["question"], other_texts=others,
                                        prompt_texts=(outline, SYSTEM_PROMPT))
                cands.append({"point": point, "temperature": temps[j], "text": text, "tokens": res.token_count,
                              "edge_logprob": res.mean_logprob, "cloud_loglik": cloud_ll, "guard": guard})
            out.write(json.dumps({**q, "sketch": points, "tokens_per_point": args.tokens, "candidates": cands}) + "\n")
            out.flush()
            print(f"[{n}/{len(questions)}] q{q['id']} {len(points)} points, {len(cands)} candidates, "
                  f"{sum(c['guard'] is not None for c in cands)} refused by the guard "
                  f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    print(f"{refused} sketches refused by the guard", file=sys.stderr)
    edge.close()
    await llm.close()


def _chunks(reference: str) -> list[str]:
    """The reference's paragraphs, cut at each list item (its marker dropped): the units a
    candidate's text is scored against."""
    from pice_edge.text import list_item, paragraphs

    parts: list[list[str]] = []
    for block in paragraphs(reference):
        parts.append([])
        for line in block.split("\n"):
            item = list_item(line)
            if item is not None and parts[-1]:
                parts.append([])
            parts[-1].append(item.body if item is not None else line)
    texts = ["\n".join(lines).strip(" #\n") for lines in parts]  # "## Title": a heading's marks
    return [p for p in texts if len(p.split()) >= 4] or [reference]


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


def _picks(groups: list[dict[str, Any]], weights: list[float]) -> list[float]:
    """The target of the candidate ``weights`` pick, per point."""
    out = []
    for g in groups:
        scores = [sum(w * x for w, x in zip(weights, row, strict=True)) for row in g["x"]]
        out.append(g["y"][max(range(len(scores)), key=lambda i: scores[i])])
    return out


def _evaluate(groups: list[dict[str, Any]], weights: list[float]) -> tuple[float, float]:
    """(fraction of points where the pick is the oracle, mean target of the picks)."""
    picked = _picks(groups, weights)
    hits = sum(y == max(g["y"]) for y, g in zip(picked, groups, strict=True))
    return hits / len(groups), sum(picked) / len(groups)


def _paired_gain(groups: list[dict[str, Any]], better: list[float], base: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-point gain in pick target of ``better`` over ``base``."""
    diffs = [a - b for a, b in zip(_picks(groups, better), _picks(groups, base), strict=True)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return mean, (var / len(diffs)) ** 0.5


def fit(args: argparse.Namespace) -> None:
    from pice_cloud.embeddings import Embedder
    from pice_cloud.ensemble import FEATURES, cosine, feature_row, feature_vector, similarity_features

    # The design matrix's columns, by name: rows are laid out and weights written back in this
    # order, so the selector (which matches weights to features by name) reads them as fitted.
    names = FEATURES
    rows = [json.loads(line) for line in CALIBRATION.read_text().splitlines() if line.strip()]
    embedder = Embedder()
    groups: list[dict[str, Any]] = []
    for q in rows:
        ref = embedder.encode_lists(_chunks(q["reference"]))
        # What the selector sees in service: non-empty candidates the expansion guard accepted.
        usable = [c for c in q["candidates"] if c["text"].strip() and c.get("guard") is None]
        by_point: dict[int, list[dict[str, Any]]] = {}
        for c in usable:
            by_point.setdefault(c["point"], []).append(c)
        for point, cands in sorted(by_point.items()):
            if len(cands) < 2:
                continue
            others = [c["text"] for c in usable if c["point"] != point]
            vecs = embedder.encode_lists([c["text"] for c in cands])
            ctx = embedder.encode_lists([f"{q['question']} {q['sketch'][point]}"])[0]
            x, y = [], []
            for j, (c, (agreement, relevance)) in enumerate(zip(cands, similarity_features(vecs, ctx), strict=True)):
                row = feature_row(c["text"], tokens=c["tokens"], tokens_per_point=q["tokens_per_point"],
                                  edge_logprob=c["edge_logprob"], cloud_loglik=c["cloud_loglik"],
                                  agreement=agreement, relevance=relevance, other_texts=others)
                x.append(feature_vector(row, names))
                y.append(max(cosine(vecs[j], r) for r in ref))
            first = next((j for j, c in enumerate(cands) if c.get("temperature", 0.0) == 0.0), 0)
            groups.append({"qid": q["id"], "x": x, "y": y, "first": first})

    qids = sorted({g["qid"] for g in groups})
    rng = random.Random(args.seed)
    rng.shuffle(qids)
    n_test = max(1, int(len(qids) * args.test_fraction))
    test_ids = set(qids[:n_test])
    train = [g for g in groups if g["qid"] not in test_ids]
    test = [g for g in groups if g["qid"] in test_ids]

    def fit_on(gs: list[dict[str, Any]], lam: float, exclude: frozenset[str] = frozenset()) -> list[float]:
        xs: list[list[float]] = []
        ys: list[float] = []
        for g in gs:
            xs.extend(_center(g["x"]))
            ymean = sum(g["y"]) / len(g["y"])
            ys.extend(v - ymean for v in g["y"])
        # Standardise so one penalty suits features of different scales; map back after.
        scale = [max(1e-9, (sum(r[i] ** 2 for r in xs) / len(xs)) ** 0.5) for i in range(len(names))]
        active = [i for i in range(len(names)) if names[i] not in exclude]
        while True:
            w = _ridge([[r[i] / scale[i] for i in active] for r in xs], ys, lam)
            full = [0.0] * len(names)
            for i, wi in zip(active, w, strict=True):
                full[i] = wi / scale[i]
            # Repetition is never a merit: a penalty feature whose fitted weight would reward it
            # is noise of a small sample; drop it and fit the others again (sign-constrained).
            wrong = [i for i in active if names[i] in PENALTIES and full[i] < 0]
            # A feature that barely moves the choice still costs its computation (the cloud's
            # scoring prefill, the embeddings): below 2% of the strongest, drop it too.
            top = max(abs(w[k]) for k in range(len(active))) if active else 0.0
            wrong += [i for k, i in enumerate(active) if abs(w[k]) < NEGLIGIBLE * top and i not in wrong]
            if not wrong:
                return full
            active = [i for i in active if i not in wrong]

    def select_and_fit(exclude: frozenset[str]) -> tuple[float, list[float]]:
        """The penalty by leave-one-question-out accuracy on the training questions, and the
        weights fitted with it on all of them."""
        train_ids = sorted({g["qid"] for g in train})
        best_lam, best_acc = 1.0, -1.0
        for lam in (0.01, 0.1, 1.0, 10.0, 100.0):
            accs = []
            for held in train_ids:
                w = fit_on([g for g in train if g["qid"] != held], lam, exclude)
                accs.append(_evaluate([g for g in train if g["qid"] == held], w)[0])
            acc = sum(accs) / len(accs)
            if acc > best_acc:
                best_lam, best_acc = lam, acc
        return best_lam, fit_on(train, best_lam, exclude)

    # A feature the cloud LLM computes costs the cloud a prefill of every candidate: it stays
    # only if the held-out questions show it pays (and `--keep-costly` does not override that).
    lam_all, with_costly = select_and_fit(frozenset())
    lam_cheap, without_costly = select_and_fit(frozenset(COSTLY))
    acc_all, mean_all = _evaluate(test, with_costly)
    acc_cheap, mean_cheap = _evaluate(test, without_costly)
    # Pays: the held-out points' picks gain with it by more than twice the gain's standard error.
    gain, gain_se = _paired_gain(test, with_costly, without_costly)
    pays = gain > 2 * gain_se and gain > 0
    keep = pays or args.keep_costly
    best_lam, weights = (lam_all, with_costly) if keep else (lam_cheap, without_costly)
    costly_verdict = {
        "features": list(COSTLY), "kept": keep, "pays": pays, "gain": gain, "gain_standard_error": gain_se,
        "held_out_with": {"oracle_hit": acc_all, "mean_similarity": mean_all},
        "held_out_without": {"oracle_hit": acc_cheap, "mean_similarity": mean_cheap},
    }

    report: list[dict[str, Any]] = []
    report.append({"selector": "fitted (all features)", "oracle_hit": acc_all, "mean_similarity": mean_all})
    report.append({"selector": f"fitted without {', '.join(COSTLY)}", "oracle_hit": acc_cheap,
                   "mean_similarity": mean_cheap})
    rand_hit = sum(1 / len(g["y"]) for g in test) / len(test)
    rand_mean = sum(sum(g["y"]) / len(g["y"]) for g in test) / len(test)
    report.append({"selector": "random pick", "oracle_hit": rand_hit, "mean_similarity": rand_mean})
    # Width 1: the request's own (greedy) candidate, what a point gets without an ensemble.
    first_hit = sum(g["y"][g["first"]] == max(g["y"]) for g in test) / len(test)
    first_mean = sum(g["y"][g["first"]] for g in test) / len(test)
    report.append({"selector": "no ensemble (greedy replica)", "oracle_hit": first_hit, "mean_similarity": first_mean})
    for i, name in enumerate(names):
        # Sign from the training data: a single feature used the way it helps there.
        sign = 1.0 if fit_on(train, 1e6)[i] >= 0 else -1.0
        single = [sign if j == i else 0.0 for j in range(len(names))]
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
            "target": "MiniLM cosine to the best-matching passage of the reference answer",
            "question_set": "alpaca_eval's fitting part (tools/vicuna.py read_alpaca('fit')), sketches that pass the "
                         "guard; candidates made as served (edge prompt and repetition penalty, replicas at 0.7)",
            "categories": sorted({str(r.get("category", "")) for r in rows}),
            "costly_features": costly_verdict, "report": report, "command": "python tools/fit_ensemble.py fit"}
    out = {"weights": dict(zip(names, weights, strict=True)), "fit": meta}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "ensemble.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{', '.join(COSTLY)}: held-out mean similarity {mean_all:.4f} with, {mean_cheap:.4f} without "
          f"(paired gain {gain:+.4f} ± {gain_se:.4f}); "
          f"{'kept' if keep else 'left out (the cloud computes it for every candidate and it does not pay)'}")
    print(f"weights {out['weights']} written to {args.out}")


def args_k(rows: list[dict[str, Any]]) -> float:
    counts: dict[tuple[int, int], int] = {}
    for q in rows:
        for c in q["candidates"]:
            counts[(q["id"], c["point"])] = counts.get((q["id"], c["point"]), 0) + 1
    return sum(counts.values()) / max(1, len(counts))


def main() -> int:
    global RESULTS, CALIBRATION  # --results moves both
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the calibration set (ensemble_calibration.jsonl) and the fit's report")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--model", default="smollm2-135m-instruct")
    gen.add_argument("--source", choices=("alpaca", "vicuna"), default="alpaca",
                     help="alpaca_eval's fitting part (default) or Vicuna-bench without coding/math")
    gen.add_argument("--data", default=None, help="the source's file or folder (default: under $PICE_DATA_DIR)")
    gen.add_argument("--questions", type=int, default=48)
    gen.add_argument("--k", type=int, default=3, help="candidates per point")
    gen.add_argument("--temperature", type=float, default=0.7,
                     help="sampling temperature of replicas 1.. (service.ensemble_temperature)")
    gen.add_argument("--tokens", type=int, default=80, help="expansion budget per point (serving default)")
    gen.add_argument("--threads", type=int, default=2)
    gen.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    gen.add_argument("--no-sketch-guard", action="store_true",
                     help="keep every sketch that parses (smoke runs on a random model, whose sketches it refuses)")
    f = sub.add_parser("fit")
    f.add_argument("--out", default=str(ROOT / "pice_cloud" / "data" / "ensemble.json"))
    f.add_argument("--test-fraction", type=float, default=0.3)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--keep-costly", action="store_true",
                   help=f"keep the features the cloud LLM computes ({', '.join(COSTLY)}) even where they do not pay")
    args = parser.parse_args()
    RESULTS, CALIBRATION = args.results, args.results / CALIBRATION.name
    if args.command == "generate":
        asyncio.run(generate(args))
    else:
        fit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
