"""The sketch: a short numbered outline of the answer, written by the cloud LLM.

`sketch_messages` builds the prompt (two worked examples, then the question; the assistant's
turn is pre-filled with ``"1."`` so that even a small model keeps the format); `parse_sketch`
turns whatever the model wrote into a clean list of headings and survives messy output: bullets
instead of numbers, bold markdown, explanations after a colon or a full stop, blank or repeated
points, one run-on paragraph, more points than allowed, or a last line cut by the token budget.
Headings are kept whole; whether they are good enough is `pice_cloud.guards.check_sketch`'s call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pice_cloud.errors import SketchError
from pice_edge.runtimes.base import ChatMessage
from pice_edge.text import list_item, markdown_heading, split_sentences, strip_marker

SKETCH_PREFILL = "1."

_MARKUP = re.compile(r"[*_`#]+")


#: Worked examples shown before the question, as earlier turns of the conversation. Measured
#: on SmolLM2-135M (tools/sketch_guard_eval.py --source alpaca, 30 development questions; results
#: in tools/results/sketch_guards.jsonl): with instructions alone, 1-3 outlines out of 30 passed
#: the guards greedily, whatever the wording; with these two examples, 10 (16 counting one
#: re-sample, against 6). Two topics far apart, so that the model copies their form rather than
#: a topic (with a single example it sometimes answered about that example instead).
SKETCH_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("How can I sleep better?",
     "1. Keep a regular bedtime\n2. Make the bedroom dark\n3. Limit caffeine after noon\n4. Avoid screens before bed"),
    ("Why did the Roman Empire fall?",
     "1. Political instability\n2. Economic decline\n3. Pressure from invaders\n4. Division of the empire"),
)


def sketch_messages(question: str, *, max_points: int, max_words: int) -> list[ChatMessage]:
    """Chat messages asking for an outline of at most ``max_points`` short, complete headings of
    at most ``max_words`` words (the guards accept a little more: `pice_cloud.guards.MAX_HEADING_WORDS`).
    """
    low = min(3, max_points)
    messages = [
        ChatMessage(
            "system",
            f"You write the skeleton of an answer: a numbered list of {low} to {max_points} short, concrete "
            f"headings, 2 to {max_words} words each, each one a complete phrase. No introduction or conclusion, "
            "no explanations, nothing else.",
        )
    ]
    for example, outline in SKETCH_EXAMPLES:
        messages += [ChatMessage("user", example), ChatMessage("assistant", outline)]
    messages.append(ChatMessage("user", question))
    return messages


_ELLIPSIS = re.compile(r"\s*(?:\.{2,}|…)\s*$")


def _first_sentence(text: str) -> str:
    # "Plan ahead. It saves time later." -> "Plan ahead": the explanation is not the heading.
    # Prose rules, so that "Dr. Smith's method" and "U.S. holidays" stay whole.
    first, *rest = split_sentences(text, prose=True, keep_separators=True)
    if not "".join(rest).strip():
        return text  # one sentence: its "?" or "!" is the heading's own
    first = first.rstrip()
    return first[:-1] if first[-1:] in ".!?" else first


def _item_body(line: str) -> str | None:
    # A point's line: a list item in any form a small model writes, or a markdown heading.
    item = list_item(line, loose=True)
    if item is not None:
        return item.body
    heading = markdown_heading(line.lstrip())
    return heading[1] if heading is not None else None


def _drop_unfinished(text: str) -> str:
    head, newline, _ = text.rstrip(" \t").rpartition("\n")
    if newline and head.strip():
        return head
    # A single line: keep its finished sentences (if it has any); its "1." ends none.
    item = list_item(text, loose=True)
    start = item.body_start if item is not None else 0
    pieces = split_sentences(text[start:], keep_separators=True)
    return text[:start] + "".join(pieces[:-1]) if len(pieces) > 1 else text


def _clean_point(body: str) -> str:
    text = _MARKUP.sub("", body).strip()
    # "Point title: long explanation" or "Title - explanation": keep the title.
    for sep in (":", " - ", " – ", " — "):
        head, found, _ = text.partition(sep)
        if found and head.strip():
            text = head
            break
    text = _first_sentence(text.strip())
    # A trailing ellipsis says the model cut its own heading short: keep it for the guards.
    ellipsis = "..." if _ELLIPSIS.search(text) else ""
    text = _ELLIPSIS.sub("", text).strip(" \t.;,-–—\"'")
    return f"{text}{ellipsis}" if text else ""


def parse_sketch(text: str, *, max_points: int = 8, max_words: int | None = None,
                 prefilled: str = SKETCH_PREFILL, truncated: bool = False) -> list[str]:
    """Turn the LLM's outline into at most ``max_points`` headings, each kept whole.

    Headings are never cut at a word count: a cut heading reads as nonsense ("The island of
    Maui is famous"), so a long one is left for `pice_cloud.guards.check_sketch` to reject.
    What follows a heading's colon, dash or first full stop is its explanation and is dropped.

    Args:
        text: the model's continuation (after the pre-filled ``prefilled``).
        max_points: keep at most this many points (the first ones).
        max_words: ignored; accepted so that callers written for the old parser, which cut
            headings at this many words, keep working.
        prefilled: what the assistant turn was pre-filled with; prepended before parsing.
        truncated: the generation stopped at its token budget, so its last line is unfinished
            and is dropped (a one-paragraph outline loses its unfinished last sentence).

    Raises:
        SketchError: no usable point could be found.
    """
    del max_words
    full = f"{prefilled}{text}" if prefilled and not text.lstrip().startswith(prefilled) else text
    full = full.replace("\r", "")
    if truncated and not full.rstrip(" \t").endswith("\n"):
        full = _drop_unfinished(full)
    lines = [ln for ln in full.split("\n") if ln.strip()]
    items = [body for ln in lines if (body := _item_body(ln)) is not None]
    if len(items) <= 1:
        # One paragraph (or lines with no list markers): its sentences become the points.
        joined = strip_marker(" ".join(items if len(lines) == 1 and items else lines), loose=True)
        items = split_sentences(joined, semicolons=True)
        if len(items) == 1 and "," in items[0]:
            items = items[0].split(",")
    points: list[str] = []
    seen: set[str] = set()
    for body in items:
        point = _clean_point(body)
        key = point.casefold()
        # A heading needs a word: "3", "100%" or "---" is list debris, not a point.
        if not any(ch.isalpha() for ch in point) or key in seen:
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
