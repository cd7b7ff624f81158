"""Fit the scheduler's mode router on Skeleton-of-Thought's labels and report its accuracy.

    PICE_MODELS_DIR=/tmp/pm python tools/train_router.py            # fit, evaluate, write both JSON files
    python tools/train_router.py --no-write                          # evaluate only

Data (``--data``, default ../shared/data/sot_router): LIMA (1,030 labelled questions) is split
by a hash of the text (`pice_cloud.router.is_held_out`, 20%) into training and held-out parts;
Vicuna-80 and WizardLM are test sets never seen in fitting. Label 1 = suits sketch-then-expand.

Model: logistic regression (scikit-learn, the ``bench`` extra) on all-MiniLM-L6-v2 embeddings
of the question; the inverse regularisation strength C is chosen by 5-fold stratified
cross-validation on the training part only. The decision threshold stays 0.5 unless
``--tune-threshold`` picks the one with the best out-of-fold accuracy on the training part.

Outputs: a table on stdout (accuracy, precision and recall of "suits a sketch" per data set,
for the router, the majority class of the training labels, and the keyword heuristic),
``tools/results/router.json`` with every figure, and ``pice_cloud/data/router.json`` (the
weights the service loads).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vicuna import DATA_DIR  # noqa: E402  (this folder is on sys.path when run as a script)

from pice_cloud import (  # noqa: E402  (the repo root must be on sys.path first)
    WEIGHTS_FORMAT,
    HeuristicRouter,
    is_held_out,
    read_labels,
)

DEFAULT_DATA = DATA_DIR / "sot_router"
C_GRID = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
SEED = 0
log = logging.getLogger("train_router")


def metrics(truth: Sequence[int], predicted: Sequence[int]) -> dict[str, float | int]:
    """Accuracy, and precision/recall/F1 of the positive class (1 = suits a sketch)."""
    tp = sum(1 for t, p in zip(truth, predicted, strict=True) if t == 1 and p == 1)
    fp = sum(1 for t, p in zip(truth, predicted, strict=True) if t == 0 and p == 1)
    fn = sum(1 for t, p in zip(truth, predicted, strict=True) if t == 1 and p == 0)
    correct = sum(1 for t, p in zip(truth, predicted, strict=True) if t == p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(truth), "positives": int(sum(truth)), "accuracy": round(correct / len(truth), 4),
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def embed(texts: list[str], model: str, cache: Path | None) -> Any:
    """Embeddings of ``texts`` (numpy array), reusing ``cache`` when it holds the same texts."""
    import numpy as np
    import torch

    from pice_cloud import MAX_QUESTION_CHARS, Embedder

    clipped = [t[:MAX_QUESTION_CHARS] for t in texts]
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved.get("texts") == clipped and saved.get("model") == model:
            log.info("embeddings from %s", cache)
            return np.asarray(saved["vectors"])
    embedder = Embedder(model)
    started = time.perf_counter()
    vectors = embedder.encode(clipped).numpy()
    log.info("embedded %d texts in %.1fs", len(texts), time.perf_counter() - started)
    if cache is not None:
        torch.save({"texts": clipped, "model": model, "vectors": vectors}, cache)
    return vectors


def quiet_offline() -> None:
    """Log with times; never reach a model hub (the models come from PyPI packages)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def sklearn_missing() -> bool:
    """Whether scikit-learn (the ``bench`` extra) is absent; if so, says how to install it."""
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        print(f"training needs scikit-learn: pip install 'pice[bench]' ({exc})", file=sys.stderr)
        return True
    return False


def grid_search(x: Any, y: Any, n_splits: int = 5) -> Any:
    """A logistic regression whose C (`C_GRID`) is chosen by stratified ``n_splits``-fold
    cross-validated accuracy; the fitted ``GridSearchCV`` (its ``cv`` holds the folds).

    Raises:
        ImportError: scikit-learn is not installed (the ``bench`` extra).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=SEED)
    search = GridSearchCV(LogisticRegression(max_iter=5000), {"C": C_GRID}, cv=folds, scoring="accuracy")
    search.fit(x, y)
    return search


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with lima/vicuna/wizardlm.csv")
    parser.add_argument("--model", default="all-minilm-l6-v2", help="embedding model name or folder")
    parser.add_argument("--weights-out", type=Path, default=ROOT / "pice_cloud" / "data" / "router.json")
    parser.add_argument("--json", type=Path, default=ROOT / "tools" / "results" / "router.json",
                        help="where to write the evaluation")
    parser.add_argument("--cache", type=Path, default=None, help="reuse/store embeddings here (torch file)")
    parser.add_argument("--tune-threshold", action="store_true",
                        help="pick the threshold by out-of-fold accuracy on the training part")
    parser.add_argument("--no-write", action="store_true", help="evaluate only; write no files")
    args = parser.parse_args(argv)
    quiet_offline()
    if sklearn_missing():
        return 2
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    lima = read_labels(args.data / "lima.csv")
    sets = {
        "lima_held_out": [r for r in lima if is_held_out(r[0])],
        "vicuna": read_labels(args.data / "vicuna.csv"),
        "wizardlm": read_labels(args.data / "wizardlm.csv"),
    }
    train = [r for r in lima if not is_held_out(r[0])]
    everything = train + [r for rows in sets.values() for r in rows]
    vectors = embed([q for q, _ in everything], args.model, args.cache)
    x_train, y_train = vectors[: len(train)], np.array([y for _, y in train])
    offset = len(train)
    x_sets = {}
    for name, rows in sets.items():
        x_sets[name] = vectors[offset: offset + len(rows)]
        offset += len(rows)

    search = grid_search(x_train, y_train)
    folds = search.cv
    best_c = float(search.best_params_["C"])
    cv_table = {str(c): round(float(s), 4) for c, s in zip(C_GRID, search.cv_results_["mean_test_score"], strict=True)}
    threshold = 0.5
    if args.tune_threshold:
        oof = cross_val_predict(LogisticRegression(C=best_c, max_iter=5000), x_train, y_train, cv=folds,
                                method="predict_proba")[:, 1]
        candidates = np.round(np.arange(0.3, 0.71, 0.02), 2)
        threshold = float(max(candidates, key=lambda t: (np.mean((oof >= t) == y_train), -abs(t - 0.5))))
    model = search.best_estimator_
    # Rounded before evaluating, so the recorded accuracy is that of the shipped file.
    weights = [round(float(w), 7) for w in model.coef_[0]]
    bias = round(float(model.intercept_[0]), 7)
    majority = int(np.mean(y_train) >= 0.5)

    def router_predict(x: Any) -> list[int]:
        z = x @ np.array(weights) + bias
        return [int(p >= threshold) for p in 1.0 / (1.0 + np.exp(-z))]

    heuristic = HeuristicRouter()
    results: dict[str, dict[str, Any]] = {}
    for name, rows in sets.items():
        truth = [y for _, y in rows]
        results[name] = {
            "router": metrics(truth, router_predict(x_sets[name])),
            "majority": metrics(truth, [majority] * len(rows)),
            "heuristic": metrics(truth, [int(heuristic.predict(q).mode == "progressive") for q, _ in rows]),
        }
    results["lima_train"] = {"router": metrics([int(v) for v in y_train], router_predict(x_train))}

    print(f"mode router: logistic regression on {args.model} embeddings; C={best_c} (5-fold CV on "
          f"{len(train)} LIMA questions), threshold {threshold}")
    print(f"{'set':<14}{'n':>5}{'pos':>5}  {'method':<10}{'accuracy':>9}{'precision':>10}{'recall':>8}")
    for name in sets:
        for method, m in results[name].items():
            print(f"{name:<14}{m['n']:>5}{m['positives']:>5}  {method:<10}{m['accuracy']:>9.3f}"
                  f"{m['precision']:>10.3f}{m['recall']:>8.3f}")

    import sklearn
    import torch
    import transformers

    meta = {
        "trained_on": "SoT router labels, LIMA minus a 20% held-out split (sha256 of the request < 0.2)",
        "n_train": len(train),
        "positives_train": int(y_train.sum()),
        "C": best_c,
        "cv_accuracy": cv_table,
        "held_out": {name: results[name]["router"] for name in sets},
        "majority_class": majority,
        "created": time.strftime("%Y-%m-%d"),
        "command": "python tools/train_router.py" + (" --tune-threshold" if args.tune_threshold else ""),
    }
    report = {
        "results": results,
        "meta": meta,
        "environment": {"python": platform.python_version(), "sklearn": sklearn.__version__,
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "cpu": platform.processor() or platform.machine()},
    }
    if not args.no_write:
        args.weights_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": WEIGHTS_FORMAT, "embedding_model": "all-minilm-l6-v2", "dim": len(weights),
                   "bias": bias, "threshold": threshold, **meta, "weights": weights}
        # The answer-length model (tools/train_length.py) is fitted on other data: keep it. The
        # calibrated threshold is not kept: it belonged to the old weights (re-run calibrate_router).
        if args.weights_out.is_file():
            previous = json.loads(args.weights_out.read_text())
            if previous.get("long_answer") is not None:
                payload["long_answer"] = previous["long_answer"]
        args.weights_out.write_text(json.dumps(payload, indent=1) + "\n")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.weights_out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
