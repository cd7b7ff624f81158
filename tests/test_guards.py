"""The sketch and expansion guards on fixed inputs: every rejection reason fires on the input it
names, good outlines and good expansions pass, and the real MiniLM separates paraphrased headings
from distinct ones (slow marker)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pice_cloud import guards
from pice_cloud.guards import (
    EXPANSION_REASONS,
    SKETCH_REASONS,
    SketchProblem,
    check_expansion,
    check_sketch,
    is_cut_heading,
    is_meta_heading,
    repeated_sentence_rate,
    sketch_rejection_reason,
)
from pice_edge.prompts import SYSTEM_PROMPT, format_sketch

QUESTION = "How can I improve my time management skills?"
GOOD_OUTLINES = [
    (QUESTION, ["Set clear goals", "Prioritise tasks", "Create a daily schedule", "Limit distractions",
                "Take regular breaks"]),
    ("What are the most effective ways to deal with stress?",
     ["Exercise regularly", "Practice deep breathing", "Talk to a friend", "Get enough sleep"]),
    ("What are the main differences between Python and JavaScript programming languages?",
     ["Syntax and readability", "Typing discipline", "Where the code runs", "Concurrency model",
      "Standard library and ecosystem"]),
    ("Describe the island of Maui for a travel blog post.",
     ["Beaches of Ka'anapali", "The road to Hana", "Sunrise at Haleakala", "Local food to try"]),
    ("How do I dice an onion without cutting my finger?",
     ["Use a sharp knife", "Stabilize the cutting board", "Use the claw grip", "Take your time",
      "Keep your work area clean"]),
    ("How did US states get their names?", ["Native American origins", "Spanish origins", "French origins",
                                            "English origins", "Unique or unclear origins"]),
    ("How can I eat better?", ["Plan daily meals", "Cook with family", "Eat more vegetables"]),
]


def _reasons(question: str, points: list[str], **kwargs: object) -> set[str]:
    return {p.reason for p in check_sketch(question, points, **kwargs)}  # type: ignore[arg-type]


@pytest.mark.parametrize(("question", "points"), GOOD_OUTLINES)
def test_good_outlines_pass(question: str, points: list[str]) -> None:
    assert check_sketch(question, points) == []
    assert sketch_rejection_reason(check_sketch(question, points)) is None


@pytest.mark.parametrize(
    ("points", "reason", "bad"),
    [
        (["Set clear goals", "Prioritise tasks"], "too_few_points", None),
        (["Set clear goals", "Prioritise tasks", "Set goals", "Take breaks"], "duplicate_points", 2),
        (["Set clear goals", "Prioritise tasks", "prioritise TASKS!", "Take breaks"], "duplicate_points", 2),
        (["Setting clear goals", "Prioritise tasks", "Set clear goal", "Take breaks"], "duplicate_points", 2),
        (["Set clear goals", "Prioritise tasks", "Prioritize your tasks", "Take breaks"], "duplicate_points", 2),
        (["The first point to consider is", "Prioritise tasks", "Take breaks"], "meta_heading", 0),
        (["Set clear goals", "Point 3", "Take breaks"], "meta_heading", 1),
        (["Introduction", "Prioritise tasks", "Take breaks"], "meta_heading", 0),
        (["Set clear goals", "Prioritise tasks", "In conclusion, plan ahead"], "meta_heading", 2),
        (["Set clear goals", "Prioritise tasks", "Summary"], "meta_heading", 2),
        (["Set clear goals", "The third point", "Take breaks"], "meta_heading", 1),
        (["Set clear goals", "Reduce distractions by", "Take breaks"], "cut_heading", 1),
        (["Set clear goals", "Good planning is", "Take breaks"], "cut_heading", 1),
        (["Set clear goals", "Prioritise tasks and", "Take breaks"], "cut_heading", 1),
        (["Set clear goals", "Plan your...", "Take breaks"], "cut_heading", 1),
        (["Set clear goals", "A calendar is known", "Take breaks"], "cut_heading", 1),
        (["Set clear goals", "Use a planner that can't,t,t,t,t", "Take breaks"], "cut_heading", 1),
        (["Improve your time management skills", "Prioritise tasks", "Take breaks"], "restates_question", 0),
        (["Set clear goals", "Time management", "Take breaks"], "restates_question", 1),
        (["Set clear goals", "Write every single task you have into one long daily list", "Take breaks"],
         "too_long", 1),
    ],
)
def test_each_sketch_reason(points: list[str], reason: str, bad: int | None) -> None:
    problems = check_sketch(QUESTION, points)
    assert reason in {p.reason for p in problems}
    assert any(p.reason == reason and p.point == bad for p in problems)
    assert all(p.detail for p in problems)


def test_the_island_of_maui_is_cut() -> None:
    problems = check_sketch("Describe Maui for a travel blog.", ["The island of Maui is famous", "Road to Hana",
                                                                    "Local food to try"])
    assert [(p.reason, p.point) for p in problems] == [("cut_heading", 0)]


def test_every_problem_is_reported_and_one_reason_is_chosen_in_order() -> None:
    problems = check_sketch(QUESTION, ["Conclusion", "Conclusion and", "Time management"])
    assert {p.reason for p in problems} == {"meta_heading", "cut_heading", "restates_question", "duplicate_points"}
    assert sketch_rejection_reason(problems) == "duplicate_points"
    assert sketch_rejection_reason([SketchProblem("too_long", 0, ""), SketchProblem("too_few_points", None, "")]) \
        == "too_few_points"


@pytest.mark.parametrize(
    ("points", "repaired"),
    [
        # The later of two duplicates goes; the earlier stays where it was.
        (["Set clear goals", "Plan each morning", "Set clear goals", "Take short breaks"],
         ["Set clear goals", "Plan each morning", "Take short breaks"]),
        # A closing "Conclusion" and a sentence-long heading go.
        (["Plan each morning", "Take short breaks", "Say no to extra meetings",
          "Many people find that planning the whole day ahead helps them a lot", "Conclusion"],
         ["Plan each morning", "Take short breaks", "Say no to extra meetings"]),
        # Two sound headings left: fewer than three points is no sketch.
        (["Set clear goals", "Set clear goals", "Plan each morning", "In conclusion"], None),
        # Too few points to begin with.
        (["Set clear goals", "Plan each morning"], None),
    ],
)
def test_repair_leaves_out_faulty_headings_while_enough_remain(points: list[str], repaired: list[str] | None) -> None:
    problems = check_sketch(QUESTION, points)
    assert problems
    assert guards.repair_sketch(points, problems) == repaired
    if repaired is not None:
        assert check_sketch(QUESTION, repaired) == []


def test_max_words_and_min_points_are_parameters() -> None:
    long = ["Set clear and measurable goals", "Prioritise tasks", "Take breaks"]
    assert _reasons(QUESTION, long, max_words=4) == {"too_long"}
    assert _reasons(QUESTION, long, max_words=5) == set()
    assert _reasons(QUESTION, long[1:], min_points=2) == set()


def test_reasons_are_stable_label_values() -> None:
    assert SKETCH_REASONS == ("too_few_points", "duplicate_points", "meta_heading", "cut_heading",
                              "restates_question", "too_long")
    assert EXPANSION_REASONS == ("empty", "echoes_prompt", "other_document", "repeats_other_point", "repetitive")
    for reason in SKETCH_REASONS + EXPANSION_REASONS:
        assert re.fullmatch(r"[a-z][a-z_]*", reason)


@pytest.mark.parametrize(
    ("heading", "meta"),
    [
        ("The first point to consider is", True), ("The third point", True), ("Point 3", True), ("Step two", True),
        ("Tip #1", True), ("Final thoughts", True), ("In summary", True), ("Key takeaways", True),
        ("Here are some tips", True), ("**Conclusion**", True), ("Overview", True), ("Header", True),
        ("Essay title", True), ("Title IX compliance", False),
        ("First impressions matter", False), ("Set clear goals", False), ("Pointillism in art", False),
        ("Summary judgments in court", False), ("Step-by-step planning", False), ("Last-minute changes", False),
    ],
)
def test_meta_heading_predicate(heading: str, meta: bool) -> None:
    assert is_meta_heading(heading) is meta


@pytest.mark.parametrize(
    ("heading", "cut"),
    [
        ("The island of Maui is famous", True), ("Reduce stress by", True), ("Spend time with", True),
        ("Pros and", True), ("Choose the", True), ("Python is known", True), ("Use your…", True),
        ("Plan ahead", False), ("Follow through", False), ("Give up bad habits", False),
        ("How I Built This", False), ("Empty and clean the can", False), ("Second factor (something you are)", False),
        ("Stay calm and composed", False), ("Maui", False),
        # A comma without a space still separates words: the heading ends with "and".
        ("Logical,and", True), ("C++ vs. Java", False), ("Node.js and Deno", False),
        # One word over and over is a decoding loop; a word twice ("Bye bye") is not.
        ("It's a fermented flour that can't,t,t,t,t,t", True), ("Very very very", True), ("Bye bye", False),
    ],
)
def test_cut_heading_predicate(heading: str, cut: bool) -> None:
    assert is_cut_heading(heading) is cut


# --- near-duplicates with embeddings ----------------------------------------------------------


def _fake_embed(groups: dict[str, int]) -> guards.Embed:
    """Texts of one group embed to the same direction, others to orthogonal ones (plus a small
    per-text component, so that vectors are never exactly equal)."""

    def embed(texts: list[str]) -> np.ndarray:
        dims = 16
        out = np.zeros((len(texts), dims))
        for i, text in enumerate(texts):
            out[i, groups.get(text, 8 + i % 8)] = 1.0
            out[i, 15] = 0.05 * (i + 1)
        return out

    return embed


def test_embedding_catches_paraphrases_words_cannot() -> None:
    points = ["Exercise regularly", "Eat well", "Get regular physical activity"]
    question = "How do I stay healthy?"
    assert _reasons(question, points) == set()  # no shared content word between 0 and 2
    embed = _fake_embed({"Exercise regularly": 0, "Get regular physical activity": 0, "Eat well": 1})
    problems = check_sketch(question, points, embed=embed)
    assert [(p.reason, p.point) for p in problems] == [("duplicate_points", 2)]


def test_embedding_catches_a_restated_question() -> None:
    question = "What makes a good leader?"
    points = ["Qualities of great leadership", "Listen first", "Admit mistakes"]
    assert _reasons(question, points) == set()
    embed = _fake_embed({question: 2, "Qualities of great leadership": 2})
    assert _reasons(question, points, embed=embed) == {"restates_question"}


def test_embedding_may_be_a_torch_tensor() -> None:
    torch = pytest.importorskip("torch")
    embed = _fake_embed({"Exercise regularly": 0, "Get regular physical activity": 0})
    points = ["Exercise regularly", "Eat well", "Get regular physical activity"]
    assert _reasons("How do I stay healthy?", points, embed=lambda t: torch.tensor(embed(t))) == {"duplicate_points"}


# --- expansions --------------------------------------------------------------------------------

SKETCH = ["Set clear goals", "Prioritise tasks", "Take regular breaks"]
# What the service checks an expansion against (`pice_cloud.progressive.expansion_check`).
PROMPT = [format_sketch(SKETCH), SYSTEM_PROMPT]
GOOD_EXPANSIONS = [
    ("Set clear goals", "Write down what you want to finish this week and by when. Specific, measurable goals "
                        "make it obvious which tasks deserve your time."),
    ("Prioritise tasks", "Sort your to-do list by urgency and importance, and do the important work first. "
                         "Anything that is neither can wait or be dropped."),
    ("Take regular breaks", "A five-minute pause every hour keeps your attention sharp. Step away from the "
                            "screen, stretch, and come back with fresh focus."),
    # Repeats the question's words, as a good expansion may.
    ("Set clear goals", "To improve your time management skills, start from goals: know what done looks like "
                        "before you start."),
]


@pytest.mark.parametrize(("point", "text"), GOOD_EXPANSIONS)
def test_good_expansions_pass(point: str, text: str) -> None:
    others = [t for p, t in GOOD_EXPANSIONS[:3] if p != point]
    assert check_expansion(text, point=point, question=QUESTION, other_texts=others, prompt_texts=PROMPT) is None


OTHER = "Sort your to-do list by urgency and importance, and do the important work first."


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("**...**", "empty"),
        ("Goals matter.", "empty"),
        ("Set clear goals", "echoes_prompt"),
        ("Question: How can I improve my time management skills?", "echoes_prompt"),
        ("Outline:\n1. Set clear goals\n2. Prioritise tasks", "echoes_prompt"),
        ("How can I improve my time management skills? Set clear goals, prioritise tasks, take regular breaks.",
         "echoes_prompt"),
        ("You are a helpful assistant. You expand one point of an outline into two sentences.", "echoes_prompt"),
        ("Dear [Supervisor's Name],\nI am writing to ask for your feedback on my goals.", "other_document"),
        ("Dear team, I would like to share my goals for this quarter.", "other_document"),
        ("Subject: My goals for the quarter\nHi all, here they are.", "other_document"),
        ("To whom it may concern, goals are important for everyone.", "other_document"),
        ("Hi John, hope you are well! Goals keep us on track.", "other_document"),
        ("Goals keep you on track every day.\nBest regards,\n[Your Name]", "other_document"),
        ("Write down your goals. " + OTHER, "repeats_other_point"),
        ("Goals give direction: sort your to-do list by urgency and importance, and do the important work first, "
         "always.", "repeats_other_point"),
        ("Goals give you direction. Goals give you direction. Goals give you direction.", "repetitive"),
        ("Write your goals and the best way to do it is to write your goals and the best way to do it is to write "
         "your goals and the best way to do it is", "repetitive"),
    ],
)
def test_each_expansion_reason(text: str, reason: str) -> None:
    got = check_expansion(text, point="Set clear goals", question=QUESTION, other_texts=[OTHER], prompt_texts=PROMPT)
    assert got == reason


def test_a_letter_is_rejected_even_when_the_question_asks_for_one() -> None:
    # A progressive answer is a list of points: a point that opens a letter reads as a stray draft.
    question = "Draft a professional email asking my supervisor for feedback on the quarterly report."
    text = "Dear [Supervisor's Name],\n\nI hope this email finds you well."
    assert check_expansion(text, point="Polite opening", question=question) == "other_document"
    # ...while a placeholder inside a good expansion is not a letter.
    assert check_expansion("Thank them for the time they spend on the [Report Name] review, and say when you need "
                           "an answer.", point="Polite opening", question=question) is None
    # Asked for a letter, its name placeholder is the answer's (`clean_expansion` took the frame
    # off); asked for anything else, it marks a stray letter.
    signed = "I, [Your Name], thank you for the feedback you gave on every report this year."
    assert check_expansion(signed, point="Polite opening", question=question) is None
    assert check_expansion(signed, point="Set clear goals", question=QUESTION) == "other_document"


def test_short_common_sentences_do_not_count_as_repeats() -> None:
    text = "Start small. Write one goal for today and finish it before lunch."
    assert check_expansion(text, point="Set clear goals", question=QUESTION,
                           other_texts=["Start small. Sort tasks by urgency and do the important ones first."]) is None


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("", 0.0),
        ("One sentence only here.", 0.0),
        ("Sheldon is a master of subtlety. He plans. Sheldon is a master of subtlety! "
         "sheldon IS a master of subtlety.", 2 / 3),
        ("1. **Plan the day.**\n2. Plan the day\nPlan the day. Then rest well.", 2 / 4),
        ("Yes. Yes. Yes. It works well here.", 0.0),  # sentences under three words are not compared
    ],
)
def test_repeated_sentence_rate(text: str, rate: float) -> None:
    assert repeated_sentence_rate(text) == pytest.approx(rate)


def test_drop_repeated_sentences_keeps_the_rest_verbatim() -> None:
    other = "Write down three goals for the week. Check them every evening."
    text = ("Block the morning for deep work! write down three goals for the week. "
            "Block the morning for deep work. Leave e-mail for later.")
    assert guards.drop_repeated_sentences(text, [other]) == "Block the morning for deep work! Leave e-mail for later."
    assert guards.drop_repeated_sentences("Yes. Yes. Plan well.", []) == "Yes. Yes. Plan well."
    assert guards.drop_repeated_sentences(other, [other]) == ""


FRAME = "In addition to setting clear goals and prioritizing tasks, "
PURPOSE = "To enhance your time management skills, "


@pytest.mark.parametrize(
    ("text", "earlier", "expected"),
    [
        # The frame an earlier point opened with goes; the sentence starts at its subject.
        (FRAME + "it’s also important to take short breaks. Walk a little.",
         [FRAME + "it's also important to delegate tasks."],
         "It’s also important to take short breaks. Walk a little."),
        ("The answer lies within the realm of music itself – each song tells a story of its time.",
         ["1. The answer lies within the realm of music itself – it is not only sound."],
         "Each song tells a story of its time."),
        # No earlier point opened so: kept.
        (FRAME + "it's also important to take short breaks.", ["Write down three goals for the week."],
         FRAME + "it's also important to take short breaks."),
        # What follows would not read as a sentence: kept.
        (FRAME + "including breaks and sleep, you will get more done.", [FRAME + "it's wise."],
         FRAME + "including breaks and sleep, you will get more done."),
        # A short opener is ordinary prose, not a copied frame.
        ("In short, it is good to rest well and often.", ["In short, sleep well."],
         "In short, it is good to rest well and often."),
        # The clause must open the first sentence, and leave a sentence of some length.
        ("Goals matter a great deal. " + FRAME + "it is key.", [FRAME + "it is key."],
         "Goals matter a great deal. " + FRAME + "it is key."),
        (FRAME + "it works.", [FRAME + "it's wise to plan."], FRAME + "it works."),
        # After a repeated purpose clause an imperative is a sentence too; a connective is not.
        (PURPOSE + "consider using a planner every day.", [PURPOSE + "set clear goals for each week."],
         "Consider using a planner every day."),
        (PURPOSE + "however, most people never plan at all.", [PURPOSE + "set clear goals for each week."],
         PURPOSE + "however, most people never plan at all."),
        # A frame that is not a purpose clause still needs a subject after it.
        (FRAME + "consider using a planner every day.", [FRAME + "it's wise."],
         FRAME + "consider using a planner every day."),
    ],
)
def test_drop_repeated_opening(text: str, earlier: list[str], expected: str) -> None:
    assert guards.drop_repeated_opening(text, earlier) == expected


def test_repetition_signals_grade_what_the_guard_thresholds() -> None:
    clean = guards.repetition_signals(GOOD_EXPANSIONS[0][1], [OTHER])
    assert clean == guards.RepetitionSignals(own_sentences=0.0, own_4grams=0.0, other_points=0.0)
    looping = guards.repetition_signals("Goals give you direction. Goals give you direction. Plan well each day.")
    assert looping.own_sentences == pytest.approx(1 / 3)
    assert looping.own_4grams > 0
    half = guards.repetition_signals("Write down your goals for the week. " + OTHER, [OTHER, "Unrelated text here."])
    assert 0.5 < half.other_points < 1.0
    assert half.own_sentences == half.own_4grams == 0.0


# --- the real MiniLM ---------------------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_sees_restatements_words_miss_and_passes_good_outlines(minilm: Path) -> None:
    from pice_cloud.embeddings import Embedder

    embed = Embedder(minilm).encode
    question = "What are the most effective ways to deal with stress?"
    # The question in other words (MiniLM cosine ~0.81): no shared-word rule catches it.
    restated = ["Coping with stress effectively", "Exercise regularly", "Talk to a friend"]
    assert _reasons(question, restated) == set()
    problems = check_sketch(question, restated, embed=embed)
    assert [(p.reason, p.point) for p in problems] == [("restates_question", 0)]
    # A paraphrased pair is one point, with or without embeddings (shared stems).
    paraphrased = ["Exercise regularly", "Practice deep breathing", "Get regular exercise", "Talk to a friend"]
    for kwargs in ({}, {"embed": embed}):
        found = check_sketch(question, paraphrased, **kwargs)  # type: ignore[arg-type]
        assert [(p.reason, p.point) for p in found] == [("duplicate_points", 2)]
    # Distinct points of one topic are not duplicates, and good outlines pass.
    for good_question, points in GOOD_OUTLINES:
        assert check_sketch(good_question, points, embed=embed) == [], points
