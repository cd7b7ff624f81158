#!/usr/bin/env python3
"""Fit the mode router's answer-length model: does this question want a long answer?

A progressive answer is an outline of at least three points of about two sentences each: some
150 words or more. A question whose best answer is shorter (classify this tweet, did Facebook
change its name, convert this time zone) is served worse by one: on alpaca_eval's held-out
fifth, where GPT-4-Turbo answered in under 150 words the progressive answers lost 0.03 to 0.06
ROUGE-L to cloud-only ones, and above that they did not. Skeleton-of-Thought's labels
(`tools/train_router.py`) do not see this: they judge whether the answer's *content* splits into
points, not how much of it there should be.

Data: alpaca_eval's ``fit`` part (the 80% never used to calibrate the threshold), label 1 where
GPT-4-Turbo's answer has at least ``--words`` words. Model: logistic regression (scikit-learn,
the ``bench`` extra) on the question's all-MiniLM-L6-v2 embedding, C by 5-fold cross-validation.
Evaluated on the ``calibration`` part (held out). Written as the ``long_answer`` section of
``pice_cloud/data/router.json``: the router's score becomes P(suits a sketch) x P(long answer),
so re-run ``tools/calibrate_router.py`` after it.

    python tools/train_length.py                 # fit, evaluate, write
    python tools/train_length.py --no-write      # evaluate only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train_router import embed, grid_search, metrics, quiet_offline, sklearn_missing  # noqa: E402  (this folder is on sys.path)
from vicuna import read_alpaca  # noqa: E402

from pice_cloud.router import LONG_ANSWER_WORDS  # noqa: E402  (the repo root must be on sys.path first)

WEIGHTS = ROOT / "pice_cloud" / "data" / "router.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=LONG_ANSWER_WORDS,
                        help="a reference answer this long or longer is a long answer")
    parser.add_argument("--model", default="all-minilm-l6-v2", help="embedding model name or folder")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="router weights to add the section to")
    parser.add_argument("--json", type=Path, default=ROOT / "tools" / "results" / "answer_length.json")
    parser.add_argument("--no-write", action="store_true", help="evaluate only; write no files")
    args = parser.parse_args(argv)
    quiet_offline()
    if sklearn_missing():
        return 2
    import numpy as np
    try:
        fit, held = read_alpaca("fit"), read_alpaca("calibration")
    except OSError as exc:
        print(f"cannot read alpaca_eval ({exc}); set PICE_DATA_DIR", file=sys.stderr)
        return 2

    def labels(rows: list[dict[str, object]]) -> list[int]:
        return [int(len(str(r["reference"]).split()) >= args.words) for r in rows]

    vectors = embed([str(q["question"]) for q in fit + held], args.model, None)
    x_fit, x_held = vectors[: len(fit)], vectors[len(fit):]
    y_fit, y_held = np.array(labels(fit)), labels(held)
    smaller = int(min(y_fit.sum(), len(y_fit) - y_fit.sum()))
    if smaller < 2:
        print(f"the fit part has {smaller} answers on one side of {args.words} words: nothing to learn",
              file=sys.stderr)
        return 2
    search = grid_search(x_fit, y_fit, n_splits=min(5, smaller))
    model = search.best_estimator_
    weights = [round(float(w), 7) for w in model.coef_[0]]
    bias = round(float(model.intercept_[0]), 7)

    def predict(x: object) -> list[int]:
        z = np.asarray(x) @ np.array(weights) + bias
        return [int(p >= 0.5) for p in 1.0 / (1.0 + np.exp(-z))]

    held_out = metrics(y_held, predict(x_held))
    majority = int(np.mean(y_fit) >= 0.5)
    baseline = metrics(y_held, [majority] * len(y_held))
    print(f"long answer (>= {args.words} words): C={search.best_params_['C']}, fitted on {len(fit)} alpaca_eval "
          f"questions ({int(y_fit.sum())} long)")
    print(f"held out ({len(held)}): accuracy {held_out['accuracy']:.3f} (majority class {baseline['accuracy']:.3f}), "
          f"precision {held_out['precision']:.3f}, recall {held_out['recall']:.3f}")
    section = {"weights": weights, "bias": bias, "words": args.words,
               "trained_on": "alpaca_eval minus its 20% held-out fifth; label: GPT-4-Turbo's answer has at least "
                             f"{args.words} words",
               "n_train": len(fit), "positives_train": int(y_fit.sum()), "C": float(search.best_params_["C"]),
               "held_out": held_out, "majority_class_held_out": baseline, "created": time.strftime("%Y-%m-%d"),
               "command": "python tools/train_length.py" + (f" --words {args.words}"
                                                              if args.words != LONG_ANSWER_WORDS else "")}
    if not args.no_write:
        data = json.loads(args.weights.read_text())
        data["long_answer"] = section
        args.weights.write_text(json.dumps(data, indent=1) + "\n")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({k: v for k, v in section.items() if k != "weights"}, indent=2) + "\n")
        print(f"wrote the long_answer section of {args.weights} and {args.json}; now re-run "
              "tools/calibrate_router.py (the router's score changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
