"""The sketch: a short numbered outline of the answer, written by the cloud LLM.

`sketch_messages` builds the prompt (the assistant's turn is pre-filled with ``"1."`` so that
even a small model keeps the format); `parse_sketch` turns whatever the model wrote into a
clean list of points and survives messy output: bullets instead of numbers, bold markdown,
explanations after a colon, blank or repeated points, one run-on paragraph, or more points
than allowed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pice_cloud.errors import SketchError
from pice_edge.runtimes.base import ChatMessage

SKETCH_PREFILL = "1."

_ITEM = re.compile(
    r"""^\s*(?:
        \(?\d{1,2}\s*[.):\]]\s*      # 1.  1)  (1)  1:
      | (?:step|point)\s+\d{1,2}\s*[.:)-]?\s*   # Step 1:
      | [-*•·+]\s+                   # bullets
      | \#{1,6}\s+                   # markdown headings
    )(?P<body>.*)$""",
    re.IGNORECASE | re.VERBOSE,
)
_MARKUP = re.compile(r"[*_`#]+")
_SPLIT_SENTENCES = re.compile(r"(?<=[.!?;])\s+")


def sketch_messages(question: str, *, max_points: int, max_words: int) -> list[ChatMessage]:
    """Chat messages asking for a skeleton of at most ``max_points`` points."""
    low = min(3, max_points)
    return [
        ChatMessage(
            "system",
            f"You write the skeleton of an answer: a numbered list of {low} to {max_points} short points, "
            f"{max(2, max_words - 2)} to {max_words} words each. No explanations, nothing else.",
        ),
        ChatMessage("user", question),
    ]


def _clean_point(body: str, max_words: int) -> str:
    text = _MARKUP.sub("", body).strip()
    # "Point title: long explanation" or "Title - explanation": keep the title.
    for sep in (":", " - ", " – ", " — "):
        head, found, _ = text.partition(sep)
        if found and head.strip():
            text = head
            break
    text = text.strip(" \t.;,-–—\"'")
    words = text.split()
    return " ".join(words[:max_words])


def parse_sketch(text: str, *, max_points: int = 8, max_words: int = 8, prefilled: str = SKETCH_PREFILL) -> list[str]:
    """Turn the LLM's outline into at most ``max_points`` short points.

    Args:
        text: the model's continuation (after the pre-filled ``prefilled``).
        max_points: keep at most this many points (the first ones).
        max_words: truncate each point to this many words.
        prefilled: what the assistant turn was pre-filled with; prepended before parsing.

    Raises:
        SketchError: no usable point could be found.
    """
    full = f"{prefilled}{text}" if prefilled and not text.lstrip().startswith(prefilled) else text
    lines = [ln for ln in full.replace("\r", "").split("\n") if ln.strip()]
    items = [m.group("body") for ln in lines if (m := _ITEM.match(ln))]
    if len(items) <= 1:
        # One paragraph (or lines with no list markers): its sentences become the points.
        joined = " ".join(items if len(lines) == 1 and items else lines)
        joined = re.sub(r"^\s*\d{1,2}\s*[.)]\s*", "", joined)
        items = [s for s in _SPLIT_SENTENCES.split(joined) if s.strip()]
        if len(items) == 1 and "," in items[0]:
            items = items[0].split(",")
    points: list[str] = []
    seen: set[str] = set()
    for body in items:
        point = _clean_point(body, max_words)
        key = point.casefold()
        if not point or not any(ch.isalnum() for ch in point) or key in seen:
            continue
        seen.add(key)
        points.append(point)
        if len(points) == max_points:
            break
    if not points:
        raise SketchError(f"the LLM's sketch has no usable point: {text[:200]!r}")
    return points


def describe(points: Sequence[str]) -> str:
    """The sketch as shown to a user."""
    return "\n".join(f"{i}. {p}" for i, p in enumerate(points, 1))
