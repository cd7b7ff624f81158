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
