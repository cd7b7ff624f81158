"""Vicuna-bench questions and GPT-4o reference answers, for the tools in this folder.

The data lives outside the repository: ``$PICE_DATA_DIR/vicuna_bench`` (default: the shared
data folder beside the checkout, ``../shared/data``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("PICE_DATA_DIR", ROOT.parent / "shared" / "data"))
VICUNA = DATA_DIR / "vicuna_bench"


def read_vicuna(folder: Path = VICUNA) -> list[dict[str, Any]]:
    """Every question as ``{"id", "category", "question", "reference"}`` (the reference is the
    GPT-4o answer, "" where there is none).

    Raises:
        FileNotFoundError: ``folder/question.jsonl`` is missing (set PICE_DATA_DIR).
    """
    questions = [json.loads(line) for line in (folder / "question.jsonl").read_text().splitlines() if line.strip()]
    answers: dict[int, str] = {}
    answers_file = folder / "model_answer_gpt-4o.jsonl"
    if answers_file.is_file():
        for line in answers_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                answers[row["question_id"]] = row["choices"][0]["turns"][0]
    return [{"id": q["question_id"], "category": q["category"], "question": q["turns"][0],
             "reference": answers.get(q["question_id"], "")} for q in questions]


ALPACA = DATA_DIR / "alpaca_eval" / "gpt-4-turbo.jsonl"


def read_alpaca(part: str, path: Path = ALPACA) -> list[dict[str, Any]]:
    """alpaca_eval instructions with GPT-4-Turbo's answers, in the same shape as `read_vicuna`.

    ``part`` splits them by a hash of the instruction (`pice_cloud.router.is_held_out`, 20%) so
    that tools never fit and measure on the same questions: ``"calibration"`` is the held-out
    fifth (the mode router's threshold is chosen on it), ``"fit"`` the rest (the ensemble
    selector is fitted on it). The data is CC BY-NC 4.0: fitting and measurement only.
    """
    from pice_cloud import is_held_out

    if part not in ("fit", "calibration"):
        raise ValueError(f"part must be 'fit' or 'calibration', not {part!r}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"id": 100_000 + int(r["id"]), "category": r.get("dataset", ""), "question": r["instruction"],
             "reference": r["output"]}
            for r in rows if is_held_out(r["instruction"]) == (part == "calibration")]
