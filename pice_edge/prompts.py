"""The expansion prompt, shared by edges and by the cloud's own fallback expansion.

Both sides must build the same prompt so that a point expanded in the cloud reads like one
expanded at the edge, and so that the cloud can score an edge's candidate under its own
model with the exact context the edge saw.

A fixed system turn, then the question and the point, and not the rest of the outline. Given
the whole outline (the layout until December 2026: question, numbered outline, "Expand point
3, ...") SmolLM2-135M fixed on its first point. `tools/prompt_eval.py` (54 held-out alpaca_eval
questions, 48 sketches, 255 points, greedy, the service's budget; tools/results/prompt_layouts.json),
outline against point only: a later point opened like an earlier one 40% against 17% of the time,
the expansion guard passed 187 against 229 of the 255 expansions (48 against 20 refused as a
repeat of another point), and the answers were closer to GPT-4-Turbo's (MiniLM cosine 0.605
against 0.638, ROUGE-L 0.151 against 0.162, relevance to question and heading 0.555 against 0.621).
Telling the model to keep to its point, or to start with it, with the outline shown, did worse
than the outline alone (24 questions). The points of a request still share a prefix (system turn
and question) that prefix caching can reuse, and their prompts are shorter. With the outline in
the system turn the model parroted the prompt back on some points; with a role-setting system
turn it expanded every point.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from pice_edge.runtimes.base import ChatMessage
from pice_edge.text import list_items, split_sentences, strip_marker

#: Repetition penalty of an expansion (Hugging Face semantics, 1.0 = off): the device profiles'
#: default, and what the cloud should use when it expands a point itself. Measured with
#: tools/repetition_eval.py (with the outline layout; SmolLM2-135M, greedy, two samples of 12 alpaca_eval outlines, 111
#: points; tools/results/repetition_control.jsonl): off, 13% and 10% of an answer's sentences
#: repeated an earlier one and 20/55 and 20/56 expansions failed the expansion guard; at 1.1, 4%
#: and 6%, 5/55 and 9/56, with text as close to GPT-4-Turbo's (MiniLM cosine 0.55 vs 0.52, 0.51
#: vs 0.51); 1.15 to 1.3 repeat no less and read worse (cosine 0.47-0.49: odd word choices once
#: common words are penalised).
EXPANSION_REPETITION_PENALTY = 1.1
#: No-repeat n-gram size of an expansion: ``None`` leaves the model folder's own setting (none
#: for SmolLM2), since the right size depends on the model's tokenizer. For SmolLM2, on top of
#: the penalty, blocking 4-grams changed nothing measurable (4.0% repeated sentences, cosine
#: 0.546), and alone it also blocks the prompt's phrases (n=3: cosine 0.47; n=4: 6% repeated
#: sentences, cosine 0.50).
EXPANSION_NO_REPEAT_NGRAM_SIZE: int | None = None

SYSTEM_PROMPT = "You are a helpful assistant. You expand one point of an outline into two sentences."
_ECHOES = ("Question:", "Outline:", SYSTEM_PROMPT[:30])


def format_sketch(points: Sequence[str]) -> str:
    """The numbered outline as shown to models and users."""
    return "\n".join(f"{i}. {p}" for i, p in enumerate(points, 1))


def expansion_messages(question: str, sketch: Sequence[str], point_index: int) -> list[ChatMessage]:
    """Chat messages asking for point ``point_index`` (0-based) of ``sketch`` and nothing else:
    the question and that point (the other points are left out; see the module's notes)."""
    return [
        ChatMessage("system", SYSTEM_PROMPT),
        ChatMessage("user", f"Question: {question}\n\nExpand the point \"{sketch[point_index]}\" in two sentences."),
    ]


def outline_expansion_messages(question: str, sketch: Sequence[str], point_index: int) -> list[ChatMessage]:
    """The earlier layout, with the whole outline shown (kept to measure against:
    ``tools/prompt_eval.py``)."""
    return [
        ChatMessage("system", SYSTEM_PROMPT),
        ChatMessage(
            "user",
            f"Question: {question}\nOutline:\n{format_sketch(sketch)}\n\n"
            f"Expand point {point_index + 1}, \"{sketch[point_index]}\", in two sentences.",
        ),
    ]


#: Where a letter or e-mail starts (at the start of the text, a line or a sentence): its
#: salutation, subject line, or sign-off.
_LETTER_START = re.compile(
    r"(?:^|\n|(?<=[.!?])[ \t]+)[ \t]*(?:Dear\s|Subject\s*:|To whom it may concern|(?:Hi|Hello)\s+\[|"
    r"(?:Best|Kind|Warm)\s+regards\b|Sincerely,|Yours (?:sincerely|truly|faithfully)\b)",
    re.IGNORECASE,
)


#: A question that asks for a letter or a message ("Write a resignation letter", "Draft an e-mail
#: to ..."): its points are parts of one letter, so an expansion written as a letter is on task.
_ASKS_FOR_LETTER = re.compile(
    r"\b(?:write|draft|compose|prepare|craft|create|generate|produce|pen|send|structure|format|reply|respond)\b.{0,160}?"
    r"\b(?:letters?|e-?mails?|memos?|thank[- ]you\s+notes?|messages?|invitations?)\b",
    re.IGNORECASE | re.DOTALL,
)
#: A letter's salutation and sign-off words (regex, case-insensitive): what the expansion clean-up
#: here and the expansion guard (`pice_cloud.guards`) both recognise a letter by.
SALUTATION = r"(?:dear|hi|hello|hey|greetings|good\s+(?:morning|afternoon|evening))"
SIGN_OFF = (r"(?:sincerely|best\s+regards|kind\s+regards|warm\s+regards|regards|yours\s+(?:truly|faithfully|sincerely)"
            r"|best\s+wishes)")
#: The frame of a letter, a line of its own: salutation, header fields, sign-off, a placeholder
#: alone ("[Your Name]", "[Date]"). Its body is what an expansion of a letter's point keeps.
_LETTER_FRAME_LINE = re.compile(
    rf"^[ \t]*(?:{SALUTATION}\b[^\n.!?]{{0,60}}[,:!]?"
    r"|(?:subject|re|fwd?|to|from|cc|bcc|date)\s*:[^\n]*"
    r"|to\s+whom\s+it\s+may\s+concern[,:]?"
    rf"|(?:{SIGN_OFF}|thank\s+you|thanks|best|cheers|respectfully)[,!.]?"
    r"|\[[^\]\n]{1,60}\]"
    # A header field whose value is a placeholder ("Your Position: [Your Position]").
    r"|[^\n:\[\]]{1,40}:[ \t]*\[[^\]\n]{1,60}\])[ \t]*$\n?",
    re.IGNORECASE | re.MULTILINE,
)
#: A salutation that opens the body's first line ("Dear Ms. Lee, I am writing to ...").
_INLINE_SALUTATION = re.compile(r"\A\s*(?:dear|hi|hello)\s[^\n,]{1,60},[ \t]+(?=\S)", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def asks_for_letter(question: str) -> bool:
    """Whether ``question`` asks for a letter, an e-mail or a similar message (cached: the
    clean-up and the guard ask it of every candidate and every streamed piece of a request)."""
    return bool(_ASKS_FOR_LETTER.search(question))


def _letter_body(text: str) -> str:
    """``text`` without its letter frame (salutation, header fields, sign-off, placeholders)."""
    body = _INLINE_SALUTATION.sub("", _LETTER_FRAME_LINE.sub("", text))
    return re.sub(r"\n{3,}", "\n\n", body).strip()


#: A reply's preamble at its very start: "Sure!", "Certainly,", and a line introducing what
#: follows ("Here's a revised version of the letter:", "Below is an expanded point:"). It says
#: nothing about the point; what it introduces is the expansion, if anything is.
_PREAMBLE = re.compile(
    r"""\A\s*(?:(?:sure|certainly|of\ course|absolutely|okay|ok)[!,.]\s*)?
    (?:(?:here(?:'s|’s|\ is|\ are)|below\ (?:is|are)|the\ following\ (?:is|are))\b[^\n:]{0,160}:[ \t]*(?:\n|\Z))?""",
    re.IGNORECASE | re.VERBOSE,
)


def settled_sentences(partial: str) -> str:
    """The whole sentences of a text that is still being generated: up to the last sentence end
    that more text already follows ("3." may yet become "3.5"); "" when there is none."""
    finished = split_sentences(partial, keep_separators=True)[:-1]
    if finished and not finished[-1][-1:].isspace():
        finished.pop()  # the text ends with this sentence's stop: nothing follows it yet
    return "".join(finished).strip()


def clean_expansion(text: str, *, truncated: bool, point: str = "", question: str = "") -> str:
    """Keep the expansion of one point: stop where the model starts the next point or another
    document ("Dear ...", "Subject:", a sign-off), and drop a trailing half sentence when
    generation was cut by the token budget.

    With a ``question`` that asks for a letter or an e-mail (`asks_for_letter`), an expansion
    written as the letter is the answer's own text: its frame (salutation, subject line,
    sign-off, "[Your Name]") is dropped and its body kept, where otherwise the whole letter
    would be cut as a drift into another document.

    With ``point``, a leading echo of the point ("2. Plan the day") is removed, and an
    expansion that is nothing but that echo counts as empty (worthless to the answer). So is a
    reply's preamble ("Sure!", "Here's a revised version of the letter:"): what it introduces is
    kept, and an expansion that is only a preamble is empty; a last sentence that introduces
    what was cut ("... include the following:") is dropped.
    """
    # An echo of the point's number ("2. ..."); a bullet may be the expansion's own.
    text = strip_marker(text, numbered_only=True)
    # A preamble ("Here's a revised version of the letter:") would be kept as the whole
    # expansion by the first-paragraph rule below: drop it, judge what it introduces.
    unprefaced = _PREAMBLE.sub("", text, count=1)
    if unprefaced != text:
        text = unprefaced[:1].upper() + unprefaced[1:]
    if point:
        head = point.strip().rstrip(".:").lower()
        first, _, rest = text.strip().partition("\n")
        if first.strip().rstrip(".:*").strip("*").lower() == head:
            text = rest
        elif text.lower().startswith(head) and text[len(head):len(head) + 1] in (":", "."):
            text = text[len(head) + 1:]
    if question and asks_for_letter(question):
        text = _letter_body(text)
    following = next((item for item in list_items(text) if item.line > 0), None)
    if following is not None:
        text = text[: following.start]
    text = text.split("\n\n")[0] if text.strip().split("\n\n")[0].strip() else text
    # A small model may drift into another document (a letter, an e-mail): keep what came
    # before it; an expansion that is only that document is worthless.
    letter = _LETTER_START.search(text)
    if letter:
        text = text[: letter.start()]
    text = text.strip()
    # A last sentence ending in a colon ("... can be structured as follows:") introduces what the
    # rules above cut (a list, a letter): without it, it says nothing.
    if text.endswith(":"):
        text = "".join(split_sentences(text, keep_separators=True)[:-1]).strip()
    # Small models sometimes parrot the prompt back; such an expansion is worthless.
    if any(text.startswith(echo) for echo in _ECHOES):
        return ""
    if truncated:
        pieces = split_sentences(text, keep_separators=True)
        if len(pieces) > 1:
            text = "".join(pieces[:-1])  # the last piece is the unfinished sentence
    return text.strip()
