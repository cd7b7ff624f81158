"""Guards: cheap checks that keep bad sketches and bad expansions out of an answer.

A small model's sketch can be useless in ways a parser cannot repair: two points, the same point
twice, headings about the outline instead of the answer ("The first point", "Conclusion"),
headings cut mid-phrase ("The island of Maui is famous"), a heading that only repeats the
question, or a sentence where a heading should be. A small model's expansion can be empty, the
sentence another point already said, the prompt parroted back, the opening of a letter
("Dear [Supervisor's Name],"), or one sentence looping. `check_sketch` and `check_expansion`
name these failures; the service re-samples a failed sketch, or answers cloud-only, and takes
the next candidate (or the cloud's own expansion) for a rejected one.

Everything here is pure and synchronous, and fast enough to run on the event loop, except the
optional ``embed`` callable given to `check_sketch` (a MiniLM forward pass: run the whole check
in a worker thread when one is given). Rejection reasons are fixed snake_case names
(`SKETCH_REASONS`, `EXPANSION_REASONS`), usable as Prometheus label values.

The thresholds below were chosen on headings and paragraphs of GPT-4-Turbo's answers to the
alpaca_eval instructions, good text that must pass (``tools/guard_calibration.py``, numbers in
``tools/results/guard_calibration.json``), and by reading SmolLM2-135M's sketches of alpaca_eval
questions (``tools/sketch_guard_eval.py --source alpaca``). Vicuna-bench, the evaluation set, was
not used to pick them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from pice_edge.prompts import SALUTATION, SIGN_OFF, asks_for_letter
from pice_edge.text import OutlineFormat, split_sentences, strip_marker

SketchReason = Literal["too_few_points", "duplicate_points", "meta_heading", "cut_heading", "restates_question",
                       "too_long"]
ExpansionReason = Literal["empty", "echoes_prompt", "other_document", "repeats_other_point", "repetitive"]

#: Every sketch rejection reason, in the priority order `sketch_rejection_reason` reports them.
SKETCH_REASONS: tuple[SketchReason, ...] = get_args(SketchReason)
#: Every expansion rejection reason, in the order `check_expansion` tests them.
EXPANSION_REASONS: tuple[ExpansionReason, ...] = get_args(ExpansionReason)

#: A sketch needs this many points by default: with fewer, expanding in parallel saves little
#: and the answer reads thin (Skeleton-of-Thought asks for 3-10).
MIN_POINTS = 3
#: Longest heading accepted. The prompt asks for 2-6 words; 8 leaves room for a heading with a
#: name in it ("Visit the Museum of Modern Art"), while a longer "heading" is a sentence: 96% of
#: GPT-4-Turbo's 2,499 list headings on alpaca_eval have 8 words or fewer (median 3), and the
#: longer ones are quiz questions and statements.
MAX_HEADING_WORDS = 8
#: MiniLM cosine at or above which two headings say the same thing. MiniLM scores short headings
#: of one topic high even when they differ ("Q1 2023" / "Q2 2023": 0.94, "Prepare the Meat" /
#: "Cook the Meat": 0.91), and paraphrases often lower ("Create a daily schedule" / "Make a
#: schedule": 0.83), so shared words do most of the work and MiniLM only adds near-identical
#: pairs: at 0.86, 21 of GPT-4-Turbo's 306 alpaca_eval outlines have such a pair (8 of them exact
#: repeats), 27 at 0.83, 15 at 0.9.
DUPLICATE_COSINE = 0.86
#: Two headings whose content words overlap this much (Jaccard) are one point; "Set clear
#: goals" / "Set specific goals" (0.5) stay two, "Set goals" / "Set clear goals" (one inside the
#: other) are one.
DUPLICATE_JACCARD = 0.6
#: A heading whose content words all come from the question and cover at least this share of
#: the question's content words says nothing the question did not ("Improve time management
#: skills" for "How can I improve my time management skills?").
RESTATE_COVERAGE = 0.5
#: MiniLM cosine between a heading and the question at or above which the heading is a
#: restatement even in other words: for "What are the most effective ways to deal with stress?",
#: "Coping with stress effectively" scores 0.81 and "Ways to reduce stress" 0.87, while none of
#: GPT-4-Turbo's 2,499 alpaca_eval headings reaches 0.8 against its question (highest 0.77).
RESTATE_COSINE = 0.8

#: An expansion with fewer words than this says nothing (a heading echo, "Yes.", a stray token).
MIN_EXPANSION_WORDS = 3
#: Word n-grams compared between texts: 4 words is long enough that shared n-grams mean copied
#: text, not common phrases ("one of the"), and short enough to catch a copied clause.
NGRAM = 4
#: Share of an expansion's 4-grams found in the prompt (question, outline, instructions) at or
#: above which the expansion is the prompt parroted back; in GPT-4-Turbo's 2,321 alpaca_eval
#: paragraphs it is 0 for 95% of them and at most 0.36.
ECHO_SHARE = 0.5
#: Share of an expansion's 4-grams found in one other point's text above which it repeats that
#: point (a single shared sentence is caught separately, by exact match).
OTHER_POINT_SHARE = 0.5
#: Share of an expansion's 4-grams that repeat an earlier 4-gram of the same text at or above
#: which it loops ("and the best way to ... and the best way to ..."); in GPT-4-Turbo's
#: paragraphs it is 0 for 95% of them and at most 0.14.
REPEATED_NGRAM_SHARE = 0.25
#: Sentences shorter than this many words are not compared ("Yes.", "Step 1.", "Why?" may recur
#: in good text).
MIN_SENTENCE_WORDS = 3

Embed = Callable[[list[str]], Any]
"""``texts -> (len(texts), dim)`` array-like of sentence embeddings (numpy, a CPU torch tensor, or
nested lists), e.g. `pice_cloud.embeddings.Embedder.encode`. Rows need not be normalised."""


@dataclass(frozen=True)
class SketchProblem:
    """One reason a sketch is unusable.

    Attributes:
        reason: a stable name from `SKETCH_REASONS`.
        point: 0-based index of the offending heading; ``None`` when the sketch as a whole is at
            fault (``too_few_points``).
        detail: words for a log line, e.g. ``'"Point 3" is a meta-heading'``.
    """

    reason: SketchReason
    point: int | None
    detail: str


# --- words ----------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
_MARKUP = re.compile(r"[*_`#>\[\]]+")
def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Words that carry no topic: function words, question words and the generic nouns/adjectives
#: of advice ("ways", "tips", "best"), so that "What are the best ways to sleep?" and "Sleep"
#: compare on "sleep" alone.
_STOPWORDS = _wordset("""
a an the this that these those there here it its it's they them their theirs we us our ours you your yours
he him his she her hers i me my mine one ones some any each every all both either neither no not nor
and or but so yet if then than because while although though unless whereas whether as
of to in on at by for from with without within into onto upon about over under between through
during after before above below across among against along around toward towards via per like
is are was were be been being am has have had do does did doing done can could will would shall
should may might must let lets get gets got make makes made
what which who whom whose when where why how
very too more most much many few less least also just only even still really quite rather
way ways tip tips thing things idea ideas step steps point points example examples
best good better great main key important effective effectively common different various
""")

#: Words after which a heading cannot end: articles, possessive determiners, prepositions that
#: need an object, conjunctions, auxiliaries and copulas. Left out because they also end
#: complete headings: verb particles ("Plan ahead", "Follow through", "Give up"), pronouns
#: ("How I Built This", "Ask her"), and auxiliaries that are also nouns ("Empty the Can",
#: "Write a Will", "A Must").
_FUNCTION_WORDS = _wordset("""
a an the my your his its our their each every some any such
of to for with at by from into onto upon about as than between during without within toward towards
among against despite per via unlike including like versus vs in on
and or but nor because while although though unless whereas if whether that which who whom whose
is are was were be been am has had does did could would shall should
not very too
""")
#: Adjectives and participles that need a complement ("famous for", "known as", "able to"):
#: a heading that ends in one was cut ("The island of Maui is famous"). Words that often end
#: a complete heading too ("Be responsible", "Stay aware", "The fuel used") are left out.
_DANGLING = _wordset("""
famous known renowned famed able unable likely unlikely due based related prone according located situated called
named
""")
#: Words that continue a sentence: a heading that starts with one is the tail of a sentence
#: split apart ("including a variety of meats", "and pork").
_CONTINUATIONS = _wordset("and or but nor including which whose whom")
_ELLIPSIS = re.compile(r"(?:\.{2,}|…)\s*$")
_TRAILING_ASIDE = re.compile(r"\s*\([^()]*\)\s*$")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold().replace("’", "'"))


_BRITISH_IS = re.compile(r"(?<=\w{3})is(e|es|ed|ing|ation|ations)$")


def _unnumbered(text: str) -> list[str]:
    return [w for w in _words(text) if not w.isdigit()]


def _stem(word: str) -> str:
    # Crude suffix stripping, enough to match plurals and -ing/-ed forms of the same word
    # ("improving" / "improve", "tasks" / "task"); not a linguistic stemmer.
    word = word.removesuffix("'s")
    word = _BRITISH_IS.sub(r"iz\1", word)  # "prioritise" and "prioritize" are one word
    for suffix in ("ing", "ed", "es", "s", "ly"):
        # "-ly" only off long words: "regularly" -> "regular", but "daily", "family" stay.
        shortest = 5 if suffix == "ly" else 3
        if word.endswith(suffix) and len(word) - len(suffix) >= shortest and not word.endswith("ss"):
            word = word[: -len(suffix)]
            if suffix in ("ing", "ed") and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # "setting" -> "set", "planned" -> "plan"
            break
    return word.removesuffix("e") if len(word) > 3 else word


def content_words(text: str) -> set[str]:
    """The stemmed topic words of ``text`` (no function words, no generic advice nouns)."""
    return {_stem(w) for w in _words(text) if w not in _STOPWORDS}


# --- headings -------------------------------------------------------------------------------

_ORDINALS = (r"first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last|final|next|"
             r"\d{1,2}(?:st|nd|rd|th)")
_META_NOUNS = (r"point|step|item|section|part|paragraph|thing|aspect|idea|tip|reason|factor|topic|"
               r"consideration|heading|bullet|question|answer|one")
_NUMBERS = r"\d{1,2}|[ivx]{1,4}|one|two|three|four|five|six|seven|eight|nine|ten"
_META_PATTERNS = (
    # "The first point to consider is", "Second step", "The last thing", "3rd tip"
    re.compile(rf"^(?:the\s+|a\s+|my\s+|our\s+)?(?:{_ORDINALS})\s+(?:{_META_NOUNS})s?\b"),
    # "Point 3", "Step two", "Tip #1", "Part II"
    re.compile(rf"^(?:{_META_NOUNS})\s*(?:#|no\.?|number)?\s*(?:{_NUMBERS})\b"),
    # Openers and closers of an essay, not points of an answer.
    re.compile(r"^(?:in\s+conclusion|in\s+summary|to\s+(?:summari[sz]e|sum\s+up|conclude)|overall|all\s+in\s+all|"
               r"last\s+but\s+not\s+least|finally|lastly|here\s+(?:are|is)|here's|sure|certainly|of\s+course|"
               r"as\s+an\s+ai)\b"),
    # The whole heading is a generic section name.
    re.compile(r"^(?:the\s+)?(?:introduction|intro|conclusions?|summary|overview|background|outline|skeleton|"
               r"answer|question|response|explanation|details?|body|notes?|references?|sources?|"
               r"examples?|points?|key\s+points?|main\s+points?|key\s+takeaways?|takeaways?|"
               r"(?:final|closing|concluding)\s+(?:thoughts?|remarks?|words?)|other|others|miscellaneous|"
               r"heading|header|(?:short\s+)?(?:essay\s+|point\s+)?title|more|etc)$"),
)


def _heading_text(heading: str) -> str:
    """Lower case, markup and surrounding punctuation removed, spaces collapsed."""
    text = _MARKUP.sub("", heading).casefold().replace("’", "'")
    return " ".join(text.split()).strip(" \t.:;,!?-–—\"'()")


def is_meta_heading(heading: str) -> bool:
    """Whether ``heading`` is about the outline rather than the answer: an ordinal or number with
    a generic noun ("The first point", "Point 3", "Step two"), an essay opener or closer ("In
    conclusion", "Here are some tips"), or only a section name ("Introduction", "Summary",
    "Key takeaways")."""
    text = _heading_text(heading)
    return bool(text) and any(p.search(text) for p in _META_PATTERNS)


def is_cut_heading(heading: str) -> bool:
    """Whether ``heading`` stops mid-phrase.

    The rule: the heading ends with an ellipsis, or its last word cannot end an English phrase —
    an article, determiner, preposition that needs an object, conjunction, auxiliary or copula
    ("Reduce stress by", "Time is", "Pros and"), or an adjective or participle that needs a
    complement ("The island of Maui is famous", "Python is known") — or its first word continues
    a sentence ("and pork", "including chorizo", "such as rice"). Verb particles that end
    phrasal verbs ("Plan ahead", "Give up", "Follow through") are complete, and so is a heading
    that ends in a closed parenthetical if the words before it are. A heading that ends in one
    word three times over is a decoding loop cut by the line's end.
    """
    stripped = _MARKUP.sub("", heading).strip()
    if _ELLIPSIS.search(stripped):
        return True
    # A closed parenthetical is a complete aside: judge the words before it.
    # Words, also where a comma has no space after it ("Logical,and" ends with "and").
    words = re.findall(r"[\w'’.+#-]+", _heading_text(_TRAILING_ASIDE.sub("", stripped)))
    if not words:
        return False
    if words[0] in _CONTINUATIONS or " ".join(words[:2]) == "such as":
        return True
    # A decoding loop, not an ending ("a fermented flour that can't,t,t,t,t,t").
    if len(words) >= 3 and len({w.lower() for w in words[-3:]}) == 1:
        return True
    last = words[-1].strip("\"'()[]")
    return last in _FUNCTION_WORDS or last in _DANGLING


def _cosines(vectors: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    rows = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / np.where(norms == 0, 1.0, norms)
    sims: np.ndarray[Any, np.dtype[np.float64]] = rows @ rows.T
    return sims


def _near_duplicate(a: set[str], b: set[str]) -> bool:
    if not a or not b:
        return False
    if a == b:
        return True
    # One heading inside the other ("Set goals" / "Set clear goals") is one point, unless the
    # shorter is a single word: "Needs" / "Children's needs" are distinct points of one answer.
    if (a < b or b < a) and min(len(a), len(b)) >= 2:
        return True
    return len(a & b) / len(a | b) >= DUPLICATE_JACCARD


def sketch_outline(max_points: int, max_words: int) -> OutlineFormat:
    """The form a sketch of ``max_points`` headings of ``max_words`` words is decoded under
    (`pice_edge.text.OutlineFormat`): at least `MIN_POINTS` headings (fewer when ``max_points``
    is), each of the prompt's length, or up to `MAX_HEADING_WORDS` to finish a phrase that would
    otherwise be cut (`is_cut_heading`: a cut heading is refused)."""
    return OutlineFormat(min_points=min(MIN_POINTS, max_points), max_points=max_points, max_words=max_words,
                         extra_words=max(0, MAX_HEADING_WORDS - max_words),
                         can_end=lambda heading: not is_cut_heading(heading))


def check_sketch(question: str, points: Sequence[str], *, min_points: int = MIN_POINTS,
                 max_words: int = MAX_HEADING_WORDS, embed: Embed | None = None) -> list[SketchProblem]:
    """Every problem of a sketch; an empty list means it may go out to the edges.

    Args:
        question: the user's question.
        points: the parsed headings (`pice_cloud.sketch.parse_sketch`), whole, not cut.
        min_points: fewer points than this is ``too_few_points``.
        max_words: a heading with more words than this is ``too_long`` (a sentence, not a
            heading; headings are rejected, never cut).
        embed: sentence embeddings (e.g. ``Embedder.encode``). With it, near-duplicates and
            restatements are judged by MiniLM cosine (`DUPLICATE_COSINE`, `RESTATE_COSINE`) as
            well as by shared words; without it, by shared content words only.

    Returns:
        One `SketchProblem` per (heading, reason); a heading may have several. A duplicate is
        reported on the later heading of the pair.
    """
    problems: list[SketchProblem] = []
    if len(points) < min_points:
        problems.append(SketchProblem("too_few_points", None, f"{len(points)} points, at least {min_points} needed"))
    question_words = content_words(question)
    words = [content_words(p) for p in points]
    sims = _cosines(embed([question, *points])) if embed is not None and points else None

    for i, point in enumerate(points):
        if len(point.split()) > max_words:
            problems.append(SketchProblem("too_long", i, f"{point!r} has {len(point.split())} words, "
                                                         f"at most {max_words}"))
        if is_meta_heading(point):
            problems.append(SketchProblem("meta_heading", i, f"{point!r} is about the outline, not the answer"))
        if is_cut_heading(point):
            problems.append(SketchProblem("cut_heading", i, f"{point!r} stops mid-phrase"))
        restates = bool(words[i]) and words[i] <= question_words \
            and len(words[i]) >= RESTATE_COVERAGE * len(question_words)
        if sims is not None and sims[0, i + 1] >= RESTATE_COSINE:
            restates = True
        if restates:
            problems.append(SketchProblem("restates_question", i, f"{point!r} only restates the question"))
        for j in range(i):
            same = _near_duplicate(words[i], words[j]) or (sims is not None and sims[i + 1, j + 1] >= DUPLICATE_COSINE)
            if same:
                problems.append(SketchProblem("duplicate_points", i, f"{point!r} repeats point {j + 1} "
                                                                     f"{points[j]!r}"))
                break
    return problems


def repair_sketch(points: Sequence[str], problems: Iterable[SketchProblem], *,
                  min_points: int = MIN_POINTS) -> list[str] | None:
    """The sketch without its faulty headings, when at least ``min_points`` sound ones remain.

    The points of a sketch are independent by design (each is expanded alone), so a heading that
    fails a check (the second of two duplicates, a "Conclusion", a sentence, a cut phrase) can be
    left out without touching the others: every kept heading passed every check. A sketch with too
    few points to begin with, or too few sound ones, cannot be repaired (``None``).
    """
    problems = list(problems)
    if any(p.point is None for p in problems):
        return None
    bad = {p.point for p in problems}
    kept = [point for i, point in enumerate(points) if i not in bad]
    return kept if len(kept) >= min_points else None


def sketch_rejection_reason(problems: Iterable[SketchProblem]) -> SketchReason | None:
    """The one reason to count a rejected sketch under (the first in `SKETCH_REASONS` order that
    occurs), or ``None`` for a sketch without problems."""
    found = {p.reason for p in problems}
    return next((r for r in SKETCH_REASONS if r in found), None)


# --- sentences and n-grams ------------------------------------------------------------------

def sentences(text: str) -> list[str]:
    """The sentences (and list items, one per line) of ``text``, normalised for comparison: lower
    case, markup, list markers and punctuation removed. Sentences shorter than
    `MIN_SENTENCE_WORDS` words are left out."""
    found = []
    for raw in split_sentences(text, newlines=True):
        words = _words(strip_marker(raw))
        if len(words) >= MIN_SENTENCE_WORDS:
            found.append(" ".join(words))
    return found


def drop_repeated_sentences(text: str, other_texts: Sequence[str] = ()) -> str:
    """``text`` without the sentences that one of ``other_texts`` or an earlier sentence of its
    own already said (compared as `sentences` normalises them); the rest is kept verbatim.

    The last resort for the cloud's own expansion of a point: the answer must not say the same
    sentence twice, and there is nobody left to write the point again."""
    seen = {s for other in other_texts for s in sentences(other)}
    kept: list[str] = []
    for piece in split_sentences(text, newlines=True, keep_separators=True):
        key = " ".join(_words(strip_marker(piece)))
        if len(key.split()) >= MIN_SENTENCE_WORDS:
            if key in seen:
                continue
            seen.add(key)
        kept.append(piece)
    return "".join(kept).strip()


#: Fewest words an opening clause must have to count as repeated from another point: shorter
#: openers ("In short,", "For example,") are ordinary prose, not a copied frame.
MIN_REPEATED_OPENING_WORDS = 4
#: Where an opening clause ends: a comma, a colon or a dash set off by blanks.
_CLAUSE_END = re.compile(r",\s+|:\s+|\s+[–—-]\s+")
#: Words a sentence may start with once its opening clause is gone: a subject or a determiner.
#: A remainder that starts otherwise ("including ...", "and ...", a name in apposition) would not
#: read as a sentence of its own, so the opening stays.
_SUBJECT_STARTS = _wordset("""
    it it's its i i'm i've i'd you you're we we're they they're he she this these those there
    there's that people one our your their many most some every each the a an
""")


_CONNECTIVES = _wordset("""
    however though therefore thus hence also and but or so yet then still instead otherwise moreover
    furthermore additionally meanwhile which who whom whose where when while if because since as
""")


def drop_repeated_opening(text: str, earlier_texts: Sequence[str]) -> str:
    """``text`` without the opening clause of its first sentence when an earlier point of the
    answer opened with the same words ("In addition to setting clear goals, it's also important
    to delegate." after a point that began "In addition to setting clear goals, ..." becomes
    "It's also important to delegate."); otherwise ``text`` unchanged.

    Small expansion models often open a later point with the clause an earlier one opened with
    (most often when shown the whole outline: `pice_edge.prompts`); each point is written alone,
    so no guard sees the frame repeat until the answer is put together. Only a clause of at
    least `MIN_REPEATED_OPENING_WORDS` words, ending in a comma, colon or dash, is dropped, and
    only when what follows reads as a sentence (it starts with a subject or a determiner, or after
    a purpose clause, "To ...,", with an imperative too, and has as many words); its first letter
    is capitalised.
    """
    end = _CLAUSE_END.search(text)
    if end is None or any(stop in text[:end.start()] for stop in ".!?\n"):
        return text  # the first sentence has no opening clause
    opening = _words(text[:end.start()])
    rest = text[end.end():]
    first_sentence = split_sentences(rest)[:1]
    if len(opening) < MIN_REPEATED_OPENING_WORDS or not first_sentence \
            or len(_words(first_sentence[0])) < MIN_REPEATED_OPENING_WORDS:
        return text
    first = _words(rest)[0]
    # After a purpose clause ("To manage your time better, consider a planner.") the rest may
    # also be an imperative; a connective ("however, ...") would leave half a sentence.
    purpose = opening[0] == "to" or opening[:3] == ["in", "order", "to"]
    if first in _CONNECTIVES or (first not in _SUBJECT_STARTS and not purpose):
        return text
    if not any(_words(strip_marker(other))[:len(opening)] == opening for other in earlier_texts):
        return text
    return rest[:1].upper() + rest[1:]


def repeated_sentence_rate(text: str) -> float:
    """Share of ``text``'s sentences that repeat an earlier sentence of the same text (after
    normalising case, markup and punctuation; see `sentences`); 0.0 for a text without
    sentences. "A. B. A. A." gives 0.5: two of four sentences are repeats."""
    found = sentences(text)
    if not found:
        return 0.0
    return (len(found) - len(set(found))) / len(found)


def _ngrams(words: Sequence[str], n: int = NGRAM) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_share(text: str, n: int = NGRAM) -> float:
    """Share of ``text``'s word n-grams that already occurred earlier in it (0.0 when it has none)."""
    grams = _ngrams(_words(text), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _share_found(grams: Sequence[tuple[str, ...]], pool: set[tuple[str, ...]]) -> float:
    return sum(g in pool for g in grams) / len(grams) if grams else 0.0


# --- expansions -----------------------------------------------------------------------------

_LETTER_OPENING = re.compile(
    rf"^(?:{SALUTATION}\b[^\n.!?]{{0,60}}[,:!\n—–-]"
    r"|(?:dear)\s"
    r"|(?:subject|re|fwd?|from|to|cc|bcc|date|memo|title)\s*:"
    r"|to\s+whom\s+it\s+may\s+concern)",
    re.IGNORECASE,
)
#: A letter's signature placeholder or sign-off line. Other placeholders ("[Company Name]") are
#: fine: a good answer to "Write a job posting" has them.
_LETTER_PARTS = re.compile(
    r"\[your\s+(?:full\s+)?name\]"
    rf"|(?:^|\n)\s*{SIGN_OFF},?\s*(?:\n|$)",
    re.IGNORECASE,
)
_PROMPT_LABELS = re.compile(r"^\s*(?:question|outline|skeleton|expand\s+point|point\s+\d+\s*:)", re.IGNORECASE)


def check_expansion(text: str, *, point: str, question: str, other_texts: Sequence[str] = (),
                    prompt_texts: Sequence[str] = ()) -> ExpansionReason | None:
    """Why the expansion ``text`` of ``point`` must not go into the answer, or ``None`` if it may.

    Args:
        text: the candidate, already cleaned (`pice_edge.prompts.clean_expansion`).
        point: the heading it expands.
        question: the user's question.
        other_texts: the texts already chosen for the request's other points (or their other
            candidates); a candidate that repeats one of them is ``repeats_other_point``.
        prompt_texts: the rest of what the expander saw (the outline, the instructions: e.g.
            the contents of `pice_edge.prompts.expansion_messages`); with the question and the
            point, what an echo is measured against.

    Returns:
        The first reason that applies, tested in `EXPANSION_REASONS` order: ``empty`` (fewer
        than `MIN_EXPANSION_WORDS` words), ``echoes_prompt`` (starts with a prompt label, is
        only the heading, or copies the prompt: `ECHO_SHARE`), ``other_document`` (a letter or
        e-mail: "Dear ...", "Subject:", "To whom it may concern", "[Your Name]", a sign-off),
        ``repeats_other_point`` (a sentence of another point's text, or `OTHER_POINT_SHARE` of
        its 4-grams), ``repetitive`` (repeats its own sentences, or `REPEATED_NGRAM_SHARE`).
    """
    stripped = _MARKUP.sub("", text).strip()
    words = _words(stripped)
    if len(words) < MIN_EXPANSION_WORDS:
        return "empty"
    grams = _ngrams(words)
    prompt = [question, point, *prompt_texts]
    joined = " ".join(words)
    if _PROMPT_LABELS.match(stripped) or joined in {" ".join(_words(p)) for p in prompt}:
        return "echoes_prompt"
    # Numbers are left out of this comparison: a copied outline differs from the prompt's in
    # its list numbers ("Set clear goals, prioritise tasks" vs "1. Set clear goals 2. ...").
    prompt_grams = {g for p in prompt for g in _ngrams(_unnumbered(p))}
    if _share_found(_ngrams(_unnumbered(stripped)), prompt_grams) >= ECHO_SHARE:
        return "echoes_prompt"
    # Asked for a letter, its placeholders ("I, [Your Name], ...") are the answer's; its frame was
    # cleaned off (`pice_edge.prompts.clean_expansion`), so an opening left is another letter.
    if _LETTER_OPENING.match(stripped) or (_LETTER_PARTS.search(text) and not asks_for_letter(question)):
        return "other_document"
    own = set(sentences(stripped))
    for other in other_texts:
        if own & set(sentences(other)):
            return "repeats_other_point"
        if _share_found(grams, set(_ngrams(_words(other)))) >= OTHER_POINT_SHARE:
            return "repeats_other_point"
    if repeated_sentence_rate(stripped) > 0 or repeated_ngram_share(stripped) >= REPEATED_NGRAM_SHARE:
        return "repetitive"
    return None


@dataclass(frozen=True)
class RepetitionSignals:
    """Graded repetition measures of one candidate, for a learned selector (0 = none, 1 = all).

    Attributes:
        own_sentences: `repeated_sentence_rate` of the candidate.
        own_4grams: `repeated_ngram_share` of the candidate.
        other_points: the largest share of its 4-grams found in any one of ``other_texts``.
    """

    own_sentences: float
    own_4grams: float
    other_points: float


def repetition_signals(text: str, other_texts: Sequence[str] = ()) -> RepetitionSignals:
    """What `check_expansion` thresholds, as numbers: a candidate that passes the guard can still
    repeat more than another one of the same point, and a selector may prefer the other."""
    grams = _ngrams(_words(text))
    overlap = max((_share_found(grams, set(_ngrams(_words(other)))) for other in other_texts), default=0.0)
    return RepetitionSignals(own_sentences=repeated_sentence_rate(text), own_4grams=repeated_ngram_share(text),
                             other_points=overlap)


__all__ = [
    "DUPLICATE_COSINE",
    "DUPLICATE_JACCARD",
    "ECHO_SHARE",
    "EXPANSION_REASONS",
    "MAX_HEADING_WORDS",
    "MIN_EXPANSION_WORDS",
    "MIN_POINTS",
    "MIN_REPEATED_OPENING_WORDS",
    "MIN_SENTENCE_WORDS",
    "NGRAM",
    "OTHER_POINT_SHARE",
    "REPEATED_NGRAM_SHARE",
    "RESTATE_COSINE",
    "RESTATE_COVERAGE",
    "SKETCH_REASONS",
    "Embed",
    "ExpansionReason",
    "RepetitionSignals",
    "SketchProblem",
    "SketchReason",
    "check_expansion",
    "check_sketch",
    "content_words",
    "drop_repeated_opening",
    "drop_repeated_sentences",
    "is_cut_heading",
    "is_meta_heading",
    "repair_sketch",
    "repeated_ngram_share",
    "repeated_sentence_rate",
    "repetition_signals",
    "sentences",
    "sketch_outline",
    "sketch_rejection_reason",
]
