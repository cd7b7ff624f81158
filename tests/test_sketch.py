"""The sketch parser on messy LLM output."""

from __future__ import annotations

import pytest

from pice_cloud.errors import SketchError
from pice_cloud.sketch import parse_sketch
from pice_edge.prompts import clean_expansion

CASES = [
    # (continuation after the pre-filled "1.", expected points)
    (" Plan ahead\n2. Prioritize tasks\n3. Take breaks", ["Plan ahead", "Prioritize tasks", "Take breaks"]),
    (" **Plan ahead**: write tomorrow's list\n2. **Prioritize**: urgent vs important",
     ["Plan ahead", "Prioritize"]),
    (" Plan ahead\n\n\n2.   \n3. Take breaks\n4.", ["Plan ahead", "Take breaks"]),
    (" Plan ahead\n- Prioritize tasks\n* Take breaks\n• Sleep enough", ["Plan ahead", "Prioritize tasks",
                                                                         "Take breaks", "Sleep enough"]),
    (" Plan ahead. Prioritize tasks. Take breaks.", ["Plan ahead", "Prioritize tasks", "Take breaks"]),
    (" Plan ahead\n2) Prioritize tasks\n(3) Take breaks\nStep 4: Sleep enough",
     ["Plan ahead", "Prioritize tasks", "Take breaks", "Sleep enough"]),
    (" Plan ahead\n2. plan AHEAD\n3. Take breaks", ["Plan ahead", "Take breaks"]),
    ("".join(f"\n{i}. Point number {i}" for i in range(2, 20)), [f"Point number {i}" for i in range(2, 8)]),
    (" Plan ahead - because time is scarce\n2. Take breaks – they help", ["Plan ahead", "Take breaks"]),
    (" A very long point that goes on and on well past the word limit\n2. Short",
     ["A very long point that goes", "Short"]),
    ("\n## Plan ahead\n## Take breaks", ["Plan ahead", "Take breaks"]),
    (" Plan ahead\nSome explanation line without a marker\n2. Take breaks", ["Plan ahead", "Take breaks"]),
    (" Plan, prioritize, rest", ["Plan", "prioritize", "rest"]),
]


@pytest.mark.parametrize(("raw", "expected"), CASES)
def test_parse_messy_outlines(raw: str, expected: list[str]) -> None:
    assert parse_sketch(raw, max_points=6, max_words=6) == expected


@pytest.mark.parametrize("raw", ["", "   \n\n", "\n2. \n3. ...", "\n- *** \n- ---"])
def test_no_usable_point_is_an_error(raw: str) -> None:
    with pytest.raises(SketchError, match="no usable point"):
        parse_sketch(raw)


def test_without_prefill() -> None:
    assert parse_sketch("1. One\n2. Two", prefilled="") == ["One", "Two"]


@pytest.mark.parametrize(
    ("raw", "truncated", "expected"),
    [
        ("1. Local vs. Tourist", False, ""),  # nothing but an echo of the point
        ("Local vs. Tourist: locals know the area. They eat well.", False, "locals know the area. They eat well."),
        ("**Local vs. Tourist**\nLocals know the area.", False, "Locals know the area."),
        ("Locals know the area. They eat\n2. Next point", False, "Locals know the area. They eat"),
        ("Locals know the area. They eat where", True, "Locals know the area."),
        ("Question: where?\nOutline: 1. x", False, ""),  # the prompt parroted back
    ],
)
def test_clean_expansion(raw: str, truncated: bool, expected: str) -> None:
    assert clean_expansion(raw, truncated=truncated, point="Local vs. Tourist") == expected
