"""The expansion prompt, shared by edges and by the cloud's own fallback expansion.

Both sides must build the same prompt so that a point expanded in the cloud reads like one
expanded at the edge, and so that the cloud can score an edge's candidate under its own
model with the exact context the edge saw.

The question and the whole sketch go first (in the system turn) and the point last: every
point of a request then shares one long prefix, which prefix caching can reuse.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pice_edge.runtimes.base import ChatMessage

_SENTENCE_END = re.compile(r"[.!?)\]\"'](?=\s|$)")
_NEXT_POINT = re.compile(r"\n\s*(?:\d{1,2}[.)]|[-*•])\s")


_ECHOES = ("The user asked:", "The answer's outline is:")


def format_sketch(points: Sequence[str]) -> str:
    """The numbered outline as shown to models and users."""
    return "\n".join(f"{i}. {p}" for i, p in enumerate(points, 1))


def expansion_messages(question: str, sketch: Sequence[str], point_index: int) -> list[ChatMessage]:
    """Chat messages asking for point ``point_index`` (0-based) of ``sketch`` and nothing else."""
    point = sketch[point_index]
    return [
        ChatMessage(
            "system",
            f"The user asked: {question}\nThe answer's outline is:\n{format_sketch(sketch)}",
        ),
        ChatMessage(
            "user",
            f"Explain point {point_index + 1}, \"{point}\", in two sentences. Write only about this point.",
        ),
    ]


def clean_expansion(text: str, *, truncated: bool) -> str:
    """Keep the expansion of one point: stop where the model starts the next point, and drop
    a trailing half sentence when generation was cut by the token budget."""
    match = _NEXT_POINT.search(text)
    if match:
        text = text[: match.start()]
    text = text.split("\n\n")[0] if text.strip().split("\n\n")[0].strip() else text
    text = text.strip()
    # Small models sometimes parrot the prompt back; such an expansion is worthless.
    if any(text.startswith(echo) for echo in _ECHOES):
        return ""
    if truncated:
        ends = list(_SENTENCE_END.finditer(text))
        if ends:
            text = text[: ends[-1].end()]
    return text.strip()
