"""The sketch prompt, and the sketch parser on messy LLM output (headings kept whole)."""

from __future__ import annotations

import pytest

from pice_cloud.errors import SketchError
from pice_cloud.guards import check_sketch
from pice_cloud.sketch import SKETCH_EXAMPLES, describe, parse_sketch, sketch_messages
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
    # Headings are never cut at a word count: the guards reject long ones instead.
    (" A very long point that goes on and on well past the word limit\n2. Short",
     ["A very long point that goes on and on well past the word limit", "Short"]),
    # ...but what follows the first full stop is an explanation, not the heading.
    (" Plan ahead. It saves time later.\n2. Dr. Smith's method. Rest.\n3. U.S. holidays",
     ["Plan ahead", "Dr. Smith's method", "U.S. holidays"]),
    # Numbers alone are list debris.
    (" Plan ahead\n2. 3\n3. 100%\n4. Take breaks", ["Plan ahead", "Take breaks"]),
    # A model that cut its own heading short says so with an ellipsis: kept for the guards.
    (" Plan your...\n2. Take breaks…", ["Plan your...", "Take breaks..."]),
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


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Plan ahead\n2. Take breaks\n3. Sleep eno", ["Plan ahead", "Take breaks"]),
        (" Plan ahead\n2. Take breaks\n", ["Plan ahead", "Take breaks"]),  # the budget ran out after a line
        (" Plan ahead\n2. Take breaks\n3.", ["Plan ahead", "Take breaks"]),
        (" Plan ahead. Take breaks. Sleep eno", ["Plan ahead", "Take breaks"]),
        (" Plan ahead and sle", ["Plan ahead and sle"]),  # nothing finished: the guards judge it
    ],
)
def test_a_truncated_sketch_loses_its_unfinished_line(raw: str, expected: list[str]) -> None:
    assert parse_sketch(raw, truncated=True) == expected


def test_max_words_is_accepted_but_no_longer_cuts() -> None:
    raw = " Write every single task into one long list\n2. Rest"
    assert parse_sketch(raw, max_words=3) == parse_sketch(raw) == ["Write every single task into one long list", "Rest"]


def test_prompt_asks_for_short_complete_headings_with_worked_examples() -> None:
    messages = sketch_messages("How do I learn Spanish?", max_points=5, max_words=6)
    system = messages[0]
    assert system.role == "system"
    for wanted in ("3 to 5", "2 to 6 words", "complete phrase", "No introduction or conclusion"):
        assert wanted in system.content
    assert [m.role for m in messages[1:]] == ["user", "assistant"] * len(SKETCH_EXAMPLES) + ["user"]
    assert messages[-1].content == "How do I learn Spanish?"
    # The examples are what the guards want: the prompt must not teach what they reject.
    for question, outline in SKETCH_EXAMPLES:
        points = parse_sketch(outline, prefilled="")
        assert describe(points) == outline
        assert check_sketch(question, points) == []


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
        # Another document begins: keep what came before it.
        ("Locals know the area. Dear [Supervisor's Name],\nI am writing", False, "Locals know the area."),
        ("Locals know the area.\nSubject: Local tips", False, "Locals know the area."),
        ("Locals know the area.\nBest regards,\n[Your Name]", False, "Locals know the area."),
        ("Dear [Supervisor's Name],\n\nI hope this email finds you well.", False, ""),
        ("Locals hold dear memories of the area.", False, "Locals hold dear memories of the area."),
        # A reply's preamble says nothing about the point: what it introduces is the expansion.
        ("Here's a revised version of the resignation letter:\n\nDear [Employer's Name],\nI am leaving.",
         False, ""),
        ("Sure! Here is an expanded version of point 2:\nLocals know the area. They eat well.", False,
         "Locals know the area. They eat well."),
        ("Certainly, locals know the area.", False, "Locals know the area."),
        ("Sure enough, locals know the area.", False, "Sure enough, locals know the area."),
        ("Here is why: locals know the area.", False, "Here is why: locals know the area."),
        ("Here are the locals' favourite places to eat.", False, "Here are the locals' favourite places to eat."),
        # An introduction to what was cut (the list that follows it) says nothing by itself.
        ("Locals know the area. Their tips include:\n- Eat late\n- Walk", False, "Locals know the area."),
        ("A formal email should include the following details:\n- Subject", False, ""),
    ],
)
def test_clean_expansion(raw: str, truncated: bool, expected: str) -> None:
    assert clean_expansion(raw, truncated=truncated, point="Local vs. Tourist") == expected


LETTER_QUESTION = "Can you help me write a resignation letter to my employer, thanking them for the opportunities?"


@pytest.mark.parametrize(
    ("raw", "expected", "otherwise"),
    [
        # The question asks for a letter: its body is the expansion, its frame is not. Asked for
        # something else ("otherwise"), a letter is a drift into another document: cut.
        ("Dear [Manager's Name],\n\nI am writing to resign from my role. I am grateful for the years here.",
         "I am writing to resign from my role. I am grateful for the years here.", ""),
        ("Dear Ms. Lee, I am writing to resign from my role.\n\nSincerely,\n[Your Name]",
         "I am writing to resign from my role.", ""),
        ("Subject: Resignation\n\nThank you for the opportunity to grow here. I learned a lot.",
         "Thank you for the opportunity to grow here. I learned a lot.", ""),
        ("Your Position: [Your Position]\nI have valued every year on this team.",
         "I have valued every year on this team.",
         "Your Position: [Your Position]\nI have valued every year on this team."),
        # A second letter after the body is a drift either way.
        ("I learned a lot here. Dear [Supervisor's Name],\nI am writing", "I learned a lot here.",
         "I learned a lot here."),
        # The heading echoed, then the letter.
        ("Express gratitude\n\nDear John,\nYour support meant a great deal to me.",
         "Your support meant a great deal to me.", ""),
    ],
)
def test_clean_expansion_of_a_letter_keeps_its_body(raw: str, expected: str, otherwise: str) -> None:
    assert clean_expansion(raw, truncated=False, point="Express gratitude", question=LETTER_QUESTION) == expected
    assert clean_expansion(raw, truncated=False, point="Express gratitude",
                           question="How do I keep a sourdough starter healthy?") == otherwise


@pytest.mark.parametrize(
    ("question", "asks"),
    [
        ("Can you help me write a resignation letter to my current employer?", True),
        ("Draft a professional email seeking your supervisor's feedback on the report.", True),
        ("Write a thank-you note to my neighbour for watering the plants.", True),
        ("Compose a short message inviting friends to a barbecue.", True),
        ("Use an appropriate format to structure a formal letter of recommendation for a student.", True),
        ("What is the history of the letter A?", False),
        ("How do e-mail spam filters work?", False),
        ("Write a poem about the sea.", False),
    ],
)
def test_asks_for_letter(question: str, asks: bool) -> None:
    from pice_edge.prompts import asks_for_letter

    assert asks_for_letter(question) is asks
