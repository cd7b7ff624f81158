"""The one text grammar (pice_edge.text): list items, headings, sentences, rendered points."""

from __future__ import annotations

import pytest

from pice_edge.text import (
    ListItem,
    RenderedPoint,
    bold_head,
    format_point,
    list_item,
    list_items,
    markdown_heading,
    paragraphs,
    parse_point,
    parse_points,
    split_sentences,
    strip_marker,
)

# --- list items -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "marker", "body", "number"),
    [
        ("1. Plan ahead", "1.", "Plan ahead", 1),
        ("12) Plan ahead", "12)", "Plan ahead", 12),
        ("- Plan ahead", "-", "Plan ahead", None),
        ("* Plan ahead", "*", "Plan ahead", None),
        ("• Plan ahead", "•", "Plan ahead", None),
        ("+ Plan ahead", "+", "Plan ahead", None),
        ("\t-\tPlan ahead  ", "-", "Plan ahead", None),
        ("3. **Sleep** well", "3.", "**Sleep** well", 3),
        ("2.", "2.", "", 2),  # an empty item (its text may follow on the next line)
    ],
)
def test_each_marker_kind_is_a_list_item(line: str, marker: str, body: str, number: int | None) -> None:
    item = list_item(line)
    assert item is not None
    assert (item.marker, item.body, item.number) == (marker, body, number)
    assert line[item.body_start:].rstrip() == body


@pytest.mark.parametrize("line", ["1.5 million people", "-5 degrees", "**Bold** text", "100. Too many digits",
                                  "(1) Plan", "Step 2: Plan", "· Plan", "1:30 pm", "Plain prose.", ""])
def test_what_is_no_list_item(line: str) -> None:
    assert list_item(line) is None


@pytest.mark.parametrize(
    ("line", "marker", "body"),
    [
        ("(3) Take breaks", "(3)", "Take breaks"),
        ("Step 4: Sleep enough", "Step 4:", "Sleep enough"),
        ("point 2 - Rest", "point 2 -", "Rest"),
        ("1: Plan", "1:", "Plan"),
        ("1.Plan", "1.", "Plan"),
        ("· Rest", "·", "Rest"),
        ("2) Rest", "2)", "Rest"),  # the grammar itself, found first
    ],
)
def test_loose_items_of_messy_model_output(line: str, marker: str, body: str) -> None:
    item = list_item(line, loose=True)
    assert item is not None
    assert (item.marker, item.body) == (marker, body)


def test_list_items_with_nested_indent_lines_and_offsets() -> None:
    text = "Intro line\n1. Fruit\n   - Apples\n   - Pears\n2) Vegetables\n\tcontinued text\n• Grains"
    items = list(list_items(text))
    assert [(i.line, i.indent, i.marker, i.body) for i in items] == [
        (1, "", "1.", "Fruit"), (2, "   ", "-", "Apples"), (3, "   ", "-", "Pears"),
        (4, "", "2)", "Vegetables"), (6, "", "•", "Grains"),
    ]
    for item in items:
        assert text[item.start:].startswith(item.indent + item.marker)
        assert text[item.body_start:].startswith(item.body)
    assert isinstance(items[0], ListItem)


def test_strip_marker() -> None:
    assert strip_marker("  2) Plan ahead\nmore") == "Plan ahead\nmore"
    assert strip_marker("\n\n1. Plan") == "Plan"
    assert strip_marker("- Plan") == "Plan"
    assert strip_marker("- Plan", numbered_only=True) == "- Plan"
    assert strip_marker("3. Plan", numbered_only=True) == "Plan"
    assert strip_marker("  No marker") == "  No marker", "untouched, blanks included"
    assert strip_marker("(1) Plan") == "(1) Plan"
    assert strip_marker("(1) Plan", loose=True) == "Plan"


# --- headings ---------------------------------------------------------------------------------


def test_markdown_heading() -> None:
    assert markdown_heading("## Plan ahead ##") == (2, "Plan ahead")
    assert markdown_heading("   # Title") == (1, "Title")
    assert markdown_heading("### C# basics") == (3, "C# basics")
    assert markdown_heading("#### ") == (4, "")
    for line in ("    ## indented is code", "#hashtag", "####### seven", "Plain"):
        assert markdown_heading(line) is None


def test_bold_head() -> None:
    assert bold_head("**Plan ahead** write a list") == ("Plan ahead", "write a list")
    assert bold_head("**Plan**: write a list") == ("Plan", ": write a list")
    assert bold_head("**a** and **b**") == ("a", "and **b**")
    assert bold_head("**R_* (rate)** stars") == ("R_* (rate)", "stars")
    assert bold_head("***a*** b") is None
    assert bold_head("Plan **ahead**") is None


# --- sentences ----------------------------------------------------------------------------------


def test_sentences_end_at_a_stop_and_a_blank() -> None:
    assert split_sentences("Plan ahead. Take breaks! Sleep enough? Yes") == [
        "Plan ahead.", "Take breaks!", "Sleep enough?", "Yes"]
    # No blank after the stop, no end: decimals, versions, "e.g.," and a trailing "3." to be continued.
    assert split_sentences("It costs 3.5 dollars in v2.1, e.g., today. Then") == [
        "It costs 3.5 dollars in v2.1, e.g., today.", "Then"]
    # The quote or bracket that closes after the stop stays with its sentence.
    assert split_sentences('He said "stop." Then he left (quietly.) Done') == [
        'He said "stop."', "Then he left (quietly.)", "Done"]
    assert split_sentences("“Quoted.” Next") == ["“Quoted.”", "Next"]
    assert split_sentences("") == []


def test_prose_rules_keep_abbreviations_and_initials() -> None:
    text = "Ask Dr. Smith about it. He knows e.g. the U.S. rules. J. K. Rowling wrote them. it ends."
    assert split_sentences(text, prose=True) == [
        "Ask Dr. Smith about it.", "He knows e.g. the U.S. rules.", "J. K. Rowling wrote them. it ends."]
    # Without prose rules every stop before a blank ends a sentence: model output, repetition checks.
    assert split_sentences("Ask Dr. Smith. it ends.")[:2] == ["Ask Dr.", "Smith."]
    assert split_sentences("Fees rose ($4.50). Then fell. See lottadigital.com. Done", prose=True) == [
        "Fees rose ($4.50).", "Then fell.", "See lottadigital.com.", "Done"]
    assert split_sentences('It said "Hi." Then (Approx. 5 km) we left.', prose=True) == [
        'It said "Hi."', "Then (Approx. 5 km) we left."]


def test_newlines_and_semicolons_on_request() -> None:
    items = "- Plan ahead every day\n- Take short breaks"
    assert split_sentences(items) == [items]
    assert split_sentences(items, newlines=True) == ["- Plan ahead every day", "- Take short breaks"]
    assert split_sentences("Plan; rest; sleep well") == ["Plan; rest; sleep well"]
    assert split_sentences("Plan; rest; sleep well", semicolons=True) == ["Plan;", "rest;", "sleep well"]
    # A ";" that does not count leaves the line break after it to count.
    assert split_sentences("x = 1;\ny = 2;", newlines=True) == ["x = 1;", "y = 2;"]


def test_keep_separators_joins_back_and_ends_with_the_unfinished_tail() -> None:
    for text in ("Plan ahead.  Take breaks.\nSleep eno", "One. Two.", "No end at all", "", "A.\n\n  - B\n"):
        pieces = split_sentences(text, newlines=True, keep_separators=True)
        assert "".join(pieces) == text
    assert split_sentences("Plan ahead. Take breaks.", keep_separators=True) == ["Plan ahead. ", "Take breaks.", ""]
    assert split_sentences("Plan ahead. Take bre", keep_separators=True) == ["Plan ahead. ", "Take bre"]
    # After a line break the next line keeps its indent.
    assert split_sentences("One\n  - two", newlines=True, keep_separators=True) == ["One\n", "  - two"]


def test_paragraphs() -> None:
    assert paragraphs("One\ntwo\n\n  \n Three\n\n\n") == ["One\ntwo", "Three"]
    assert paragraphs(" \n ") == []


# --- rendered points ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "heading", "text"),
    [
        (0, "Keep a schedule", "Go to bed at the same time. Wake up at the same time."),
        (9, "Use “I” statements", "Say how you feel (not what they did)."),
        (41, "Rest", ""),
        (2, "C++ and R_* rates", "Both are **languages**: fast ones."),
    ],
)
def test_render_point_round_trip(index: int, heading: str, text: str) -> None:
    from pice_cloud.events import render_point

    rendered = render_point(index, heading, text)
    assert rendered == format_point(index, heading, text)
    assert parse_point(rendered) == RenderedPoint(index, heading, text)


def test_parse_points_of_a_whole_answer() -> None:
    points = [(0, "Plan ahead", "Write tomorrow's list tonight."), (1, "Take breaks", "Every hour, stand up.\n- Walk."),
              (2, "Sleep", "")]
    answer = "\n\n".join(format_point(*p) for p in points)
    assert parse_points(answer) == [RenderedPoint(*p) for p in points]
    # A cloud-only answer's prose is no point; "1)" items and indents read as well.
    assert parse_points("Intro text.\n\n  1) **One** first\n\n- **Bullet** no") == [RenderedPoint(0, "One", "first")]
    assert parse_point("1. Plan ahead") is None


# --- the callers agree ------------------------------------------------------------------------


def test_callers_share_the_grammar() -> None:
    from pice_cloud.guards import sentences
    from pice_cloud.sketch import parse_sketch
    from pice_edge.prompts import clean_expansion, settled_sentences

    # "1)" and "+" items are items everywhere.
    assert parse_sketch(" Plan ahead\n2) Take breaks\n+ Sleep enough") == ["Plan ahead", "Take breaks", "Sleep enough"]
    assert clean_expansion("Locals know the area.\n+ Another point", truncated=False) == "Locals know the area."
    assert sentences("1) Plan ahead every day\n+ Plan ahead every day") == ["plan ahead every day"] * 2
    # "3." may yet become "3.5": not settled until a blank follows.
    assert settled_sentences("It costs 3.") == ""
    assert settled_sentences("It costs 3. More") == "It costs 3."
    # A closing bracket or quote alone ends no sentence: nothing is cut after "(paper or app)".
    assert clean_expansion("Use a planner (paper or app) to track tas", truncated=True) == \
        "Use a planner (paper or app) to track tas"
    assert clean_expansion("Use a planner. Track your tas", truncated=True) == "Use a planner."
