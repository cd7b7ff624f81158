#!/usr/bin/env python3
"""Choose the mode router's threshold on held-back answers: as many progressive answers as
possible while ``auto`` stays at least as good as cloud-only.

Input: answers to the same questions in modes ``cloud`` and ``progressive`` from
``tools/eval_modes.py --source alpaca`` (alpaca_eval's held-out fifth: never used to fit the
router, never the Vicuna questions the benchmark reports). For every candidate threshold t,
``auto`` is simulated question by question: the router's P(suits a sketch) >= t takes the
progressive answer (which is itself cloud-only when the sketch guards refused both sketches, as
in service), otherwise the cloud-only one. The chosen t maximises the share of questions served
progressively subject to mean MiniLM cosine and mean ROUGE-L of auto >= cloud-only's less
``--tolerance`` (default 0.005: the quality bar `auto` is held to, issue 23); ties go to the higher
cosine. The curve (share progressive vs quality, per threshold) and the choice are
written to ``tools/results/router_calibration.{json,png}`` (``--out``); ``--write`` also stores
the threshold and how it was chosen in ``pice_cloud/data/router.json``.

A random sample holds few of the questions the router scores lowest, yet they decide how low the
threshold may go: answer every one of them too (``eval_modes.py --below``), and the means are
post-stratified (``--strata``): each answer weighs as many held-out questions of its probability
stratum as it stands for, so the dense low end does not outvote the rest.

    python tools/eval_modes.py --source alpaca --modes cloud,progressive --questions 30 \\
        --rows tools/results/quality_modes_alpaca.jsonl             # a random sample
    python tools/eval_modes.py --source alpaca --modes cloud,progressive --below 0.17 \\
        --rows tools/results/quality_modes_alpaca.jsonl             # the low end, all of it
    python tools/calibrate_router.py --rows tools/results/quality_modes_alpaca.jsonl --write
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vicuna import read_alpaca  # noqa: E402  (this folder is on sys.path when run as a script)

from pice_cloud import (  # noqa: E402  (the repo root must be on sys.path first)
    CalibrationSample,
    EmbeddingRouter,
    RouterWeights,
    ThresholdPoint,
    calibrate_threshold,
    simulate_auto,
    stratum_weights,
)

RESULTS = ROOT / "tools" / "results"
WEIGHTS = ROOT / "pice_cloud" / "data" / "router.json"


def paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Questions answered in both modes: {question, cloud row, progressive row}."""
    by_q: dict[Any, dict[str, Any]] = {}
    for r in rows:
        by_q.setdefault(r["question_id"], {"question": r["question"]})[r["mode"]] = r
    return [q for q in by_q.values() if "cloud" in q and "progressive" in q]


def sample(q: dict[str, Any], probability: float, weight: float = 1.0) -> CalibrationSample:
    def side(r: dict[str, Any]) -> tuple[tuple[float, ...], float]:
        return (r["cosine"], r["rouge_l"]), float(r["cloud_tokens"] or 0)

    return CalibrationSample(probability, side(q["cloud"]), side(q["progressive"]),
                             q["progressive"]["mode_served"] == "progressive", weight)


def population() -> list[str]:
    """alpaca_eval's held-out fifth: the questions the answered ones stand for."""
    try:
        return [q["question"] for q in read_alpaca("calibration")]
    except OSError as exc:
        raise SystemExit(f"cannot read alpaca_eval ({exc}); set PICE_DATA_DIR, or pass --strata 1") from exc


def as_dict(point: ThresholdPoint) -> dict[str, Any]:
    return {"threshold": round(point.threshold, 4) if math.isfinite(point.threshold) else None,
            "routed_progressive": round(point.routed_progressive, 4),
            "served_progressive": round(point.served_progressive, 4), "cosine": round(point.quality[0], 4),
            "rouge_l": round(point.quality[1], 4), "cloud_tokens": round(point.cloud_tokens, 1)}


def plot(curve: list[dict[str, Any]], chosen: dict[str, Any], cloud: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [c["served_progressive"] for c in curve]
    ax.plot(xs, [c["cosine"] for c in curve], marker=".", label="auto: MiniLM cosine")
    ax.axhline(cloud["cosine"], color="grey", linestyle="--", label="cloud-only cosine")
    ax.scatter([chosen["served_progressive"]], [chosen["cosine"]], color="red", zorder=3,
               label=f"chosen threshold {chosen['threshold']}")
    ax.set_xlabel("share of questions served progressively")
    ax.set_ylabel("mean cosine to the reference answer")
    ax.set_title("Mode router calibration (alpaca_eval held-out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True, help="eval_modes.py answers (modes cloud, progressive)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--write", action="store_true", help="store the chosen threshold in --weights")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="how far below cloud-only auto's mean cosine and ROUGE-L may be (default 0.005)")
    parser.add_argument("--strata", type=int, default=6,
                        help="weigh the answers by the router-probability stratum of alpaca_eval's held-out "
                             "fifth each stands for (1: every answer alike)")
    parser.add_argument("--out", type=Path, default=RESULTS / "router_calibration.json",
                        help="the curve and the choice (JSON; the plot goes beside it as .png)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    pairs = paired(rows)
    if len(pairs) < 10:
        raise SystemExit(f"{args.rows}: only {len(pairs)} questions answered in both modes; need 10 or more")
    weights = RouterWeights.load(args.weights)
    router = EmbeddingRouter.load(weights_path=args.weights)
    if router.name != "embedding":
        raise SystemExit("the embedding model is not available (pice-edge models fetch all-minilm-l6-v2): "
                         "a threshold calibrated on the keyword fallback would be meaningless")
    # Gated questions (code, math, translation) get P = 0: cloud-only at every threshold.
    probabilities = [r.probability for r in router.predict_many([q["question"] for q in pairs])]
    weights_by_q = [1.0] * len(pairs)
    if args.strata > 1:
        everyone = population()
        known = set(everyone)
        missing = [q["question"][:60] for q in pairs if q["question"] not in known]
        if missing:
            raise SystemExit(f"{len(missing)} answered questions are not in alpaca_eval's held-out fifth "
                             f"(e.g. {missing[0]!r}): pass --strata 1 to weigh every answer alike")
        weights_by_q = stratum_weights(probabilities,
                                       [r.probability for r in router.predict_many(everyone)], args.strata)
    samples = [sample(q, p, w) for q, p, w in zip(pairs, probabilities, weights_by_q, strict=True)]
    best, points = calibrate_threshold(samples, args.tolerance)
    chosen, curve = as_dict(best), [as_dict(p) for p in points]
    cloud, always = as_dict(simulate_auto(samples, math.inf)), as_dict(simulate_auto(samples, 0.0))
    print(f"{len(pairs)} questions; cloud-only cosine {cloud['cosine']} ROUGE-L {cloud['rouge_l']}; "
          f"all progressive: cosine {always['cosine']} ROUGE-L {always['rouge_l']} "
          f"(served progressive {always['served_progressive']})")
    print(f"{'threshold':>10}{'routed':>8}{'served':>8}{'cosine':>8}{'ROUGE-L':>9}{'cloud tok':>10}")
    for c in curve:
        mark = "  <- chosen" if c["threshold"] == chosen["threshold"] else ""
        print(f"{c['threshold']:>10}{c['routed_progressive']:>8}{c['served_progressive']:>8}{c['cosine']:>8}"
              f"{c['rouge_l']:>9}{c['cloud_tokens']:>10}{mark}")
    previous = weights.threshold
    result = {"questions": len(pairs), "strata": args.strata,
              "weights": {"min": round(min(weights_by_q), 3), "max": round(max(weights_by_q), 3)},
              "rows": str(args.rows.relative_to(ROOT)) if args.rows.is_absolute()
              and args.rows.is_relative_to(ROOT) else str(args.rows),
              "rule": f"max share served progressively s.t. auto's mean cosine and ROUGE-L >= cloud-only's "
                      f"- {args.tolerance:g}",
              "previous_threshold": previous, "chosen": chosen, "cloud_only": cloud, "all_progressive": always,
              "curve": curve, "command": "python tools/calibrate_router.py " + " ".join(sys.argv[1:]),
              "created": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(curve, chosen, cloud, args.out.with_suffix(".png"))
    if args.write:
        data = json.loads(args.weights.read_text())
        data["threshold"] = best.threshold  # exact: a rounded one could drop the question at the boundary
        data["threshold_calibration"] = {k: result[k] for k in ("questions", "rule", "previous_threshold", "chosen",
                                                                 "cloud_only", "command", "created")}
        args.weights.write_text(json.dumps(data, indent=1) + "\n")
        print(f"threshold {previous} -> {chosen['threshold']} written to {args.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
