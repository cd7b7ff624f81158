"""Training examples from plain ``{"instruction", "output"}`` JSONL (a user's own data).

Each answer is split into points, the points get short headings (the outline), and the outline
becomes one **sketcher** example (question -> outline) and one **expander** example per point
(question + point -> that point's text). The prompts are the serving prompts
(`pice_cloud.sketch.sketch_messages` with the ``"1."`` pre-fill, `pice_edge.prompts.expansion_messages`),
so a change to a prompt changes the training data with it.

Splitting (`split_answer`), in this order:

1. **List**: two or more list items (``1.``, ``1)``, ``-``, ``*``, ``•``, ``+``). The items at the
   smallest indentation are the points (the first ``max_outline_points`` of a longer list: a
   "ten tips" answer still makes a complete outline of eight); indented lines under an item are
   its sub-items and continuation lines; text before the first item (the intro) and unindented
   text after the last one (the outro) are not points. An item's heading is its leading
   ``**bold**`` text, or the text before a ``:`` or a spaced dash (`` - ``), or else one made from
   its first clause; parentheticals are removed from headings ("Market (SAATM)" -> "Market").
   Its text is what follows the heading (the sub-items' sentences when the item line itself
   says nearly nothing).
2. **Paragraphs**: otherwise, the blank-line separated paragraphs, without an intro that ends
   with ``:`` and an outro that opens with a summary phrase ("In conclusion", "Overall", ...),
   when at least ``min_points`` remain. Headings are made from each paragraph's first clause.
3. **Sentence groups**: otherwise, the sentences in groups of ``target_sentences``.

A heading made from a first clause skips leading connectives ("Additionally,") and must fit
``max_words`` whole: headings are never cut, because a cut heading ("The island of Maui is
famous") is one of the faults the sketcher is trained out of.

An answer is **dropped** (the reason is counted) when:

- it has a code block (``code``) or formulas (``math``): its parts depend on each other;
- it has markdown section headings beyond a single title (``sections``), a second list after the
  first, or paragraphs between items (``several_lists``): nested structure is not one outline.
  For the **sketcher** only, an answer in sections is outlined by the titles of its content
  sections instead (`split_sections`: "Introduction" and "Conclusion" left out), counted as
  ``answers_outlined_by_sections``: more outlines, and outlines of essay-like questions ("Write
  an article about ...") by content. (On alpaca_eval: 76 more outlines. They do not by themselves
  train the sketcher out of an essay's frame; its own meta headings as negatives do, see
  `pice_cloud.finetune.train`.);
- it is a letter or a poem (``letter``, ``verse``): there are no points to expand apart;
- it has fewer than ``min_points`` points, or is prose of more than ``max_outline_points``
  paragraphs (``too_few_points``, ``too_many_points``);
- a heading is longer than ``max_words`` (``long_heading``), stops mid-phrase ("Learn the basics
  of": ``cut_heading``), is about the outline rather than the answer ("The first point", "Step 2",
  or a bare section name such as "Introduction" or "Conclusion": ``meta_heading``), or two headings
  are the same (``duplicate_headings``). Both checks are the serving guards' own
  (`pice_cloud.guards.is_cut_heading`, `is_meta_heading`): the sketcher is not trained on an
  outline the cloud would refuse;
- the points are **not independent enough to expand apart** (``dependent_points``): a point
  whose heading was made from its own text opens with a back-reference ("This", "These",
  "Then", "Next", ...) whose antecedent is in an earlier point, or any point refers to "the
  above" or "the previous step". An edge expands a point seeing only the question and the
  outline, so such a point cannot be written from what the edge is given. (A list item's
  "This ..." after an explicit heading refers to the heading, which the edge does see: kept.)
- the outline does not read back through the serving sketch parser as the same headings
  (``unparseable_outline``).

An expander example is dropped when its point has no text (``empty_point``), when its target
has fewer than ``min_target_words`` words (``short_point``: a fragment such as "by James S.A.
Corey" would teach the edge to answer a point in three words), or when prompt + target exceed
``max_seq_len`` tokens or the target (its first ``target_sentences`` sentences, else its first
sentence) exceeds ``max_target_tokens`` (``too_long``). A sketcher example is dropped when it
exceeds ``max_seq_len`` (``too_long``).

Malformed lines (not UTF-8, not JSON, not an object, a missing or non-string field, an empty
instruction or output, longer than ``max_line_bytes``) raise `DataError` naming the file and the
line, or with ``skip_bad_lines`` are counted and listed in the report.

A share of the *instructions* (``holdout_fraction``, chosen by a seeded hash of the instruction
text, so both roles and later evaluations agree) is kept out of training for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pice_cloud import guards
from pice_cloud.errors import DataError, SketchError
from pice_cloud.finetune.config import DataConfig, Role
from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages
from pice_edge.prompts import expansion_messages, format_sketch
from pice_edge.runtimes.base import ChatMessage
from pice_edge.text import (
    ListItem,
    bold_head,
    list_item,
    list_items,
    markdown_heading,
    paragraphs,
    split_sentences,
    strip_marker,
)

SplitKind = Literal["list", "paragraphs", "sentences", "sections"]
#: Renders chat messages plus an assistant pre-fill into the model's prompt text.
Renderer = Callable[[Sequence[ChatMessage], str], str]
#: Counts the tokens of a text.
TokenCounter = Callable[[str], int]

#: "Step 1:", "Part 2 -": a section's position, not its content (as is a list number: `strip_marker`).
_SECTION_NUMBER = re.compile(r"^(?:step|part|section|phase|stage|day|week)\s*\d+\s*[:.)\-\u2013\u2014]?\s*",
                             re.IGNORECASE)
_SEPARATORS = (":", " - ", " – ", " — ")
#: Longest text before a ``:`` or dash that is read as an item's heading.
_HEAD_CHARS = 80
_CLAUSE_SPLIT = re.compile(r"[,;:()\u2013\u2014]|\s-\s")
_CONNECTIVES = {
    "additionally", "also", "moreover", "furthermore", "first", "firstly", "second", "secondly", "third",
    "thirdly", "finally", "lastly", "however", "in addition", "besides", "similarly", "likewise", "next",
    "then", "overall", "in fact", "of course", "importantly", "most importantly", "for example",
    "for instance", "in general", "generally", "ultimately",
}
_BACKREF_WORDS = {"this", "these", "that", "those", "it", "they", "them", "then", "next", "afterward",
                  "afterwards", "repeat", "continue", "once", "thus", "hence", "therefore"}
_BACKREF_PHRASE = re.compile(r"\b(?:as mentioned|mentioned above|the above|above-mentioned|previous (?:step|point)|"
                             r"preceding (?:step|point)|the last step)\b", re.IGNORECASE)
_OUTRO = re.compile(r"^(?:in conclusion|in summary|to summarize|to sum up|overall|ultimately|in short|"
                    r"remember|by following)\b", re.IGNORECASE)
_MATH = re.compile(r"\\\(|\\\[|\$\$|\\frac|\\sqrt|\d\s*[-+*/×÷^]\s*\d+\s*=")
_LETTER = re.compile(r"^(?:dear\b|subject:|hi\b|hello\b)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Record:
    """One line of the data file."""

    line: int
    instruction: str
    output: str


@dataclass(frozen=True)
class Point:
    """One point of an answer: its heading (``None`` when none could be made) and its text.

    ``derived`` is true when the heading was made from the point's own first clause (so the
    text does not lean on an explicit heading).
    """

    heading: str | None
    text: str
    derived: bool = False


@dataclass(frozen=True)
class Split:
    """An answer split into points; ``problem`` is why it is unusable as an outline (or ``None``)."""

    kind: SplitKind
    points: tuple[Point, ...]
    problem: str | None = None


@dataclass(frozen=True)
class Example:
    """One training example: the serving prompt (messages + assistant pre-fill) and the target."""

    role: Role
    line: int
    question: str
    sketch: tuple[str, ...]
    point_index: int | None
    messages: tuple[ChatMessage, ...]
    prefill: str
    target: str

    def as_json(self) -> dict[str, Any]:
        """A JSON-friendly view (for inspection and the report's samples)."""
        return {"role": self.role, "line": self.line, "question": self.question, "sketch": list(self.sketch),
                "point_index": self.point_index, "prefill": self.prefill, "target": self.target}


@dataclass
class Prepared:
    """The examples of one role, split into training and held-out, and what happened to the data."""

    train: list[Example]
    heldout: list[Example]
    counts: dict[str, Any] = field(default_factory=dict)
    #: The instructions of every readable record outside the held-out share, usable or not (a
    #: question needs no answer to be outlined by the model itself: see the trainer's negatives).
    questions: list[str] = field(default_factory=list)
    #: The held-out instructions of every readable record.
    heldout_questions: list[str] = field(default_factory=list)


# --- reading --------------------------------------------------------------------------------


def read_records(path: Path, *, max_line_bytes: int = 1 << 20, skip_bad_lines: bool = False,
                 bad: list[str] | None = None) -> list[Record]:
    """Every record of a JSONL file of ``{"instruction", "output"}`` objects (other keys ignored).

    Args:
        path: the file.
        max_line_bytes: longer lines are refused without being read whole.
        skip_bad_lines: record problems in ``bad`` and go on, instead of raising.
        bad: receives one message per skipped line.

    Raises:
        DataError: the file cannot be read, or (without ``skip_bad_lines``) a line is malformed;
            the message names the file and the line.
    """
    records = []
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read training data {path}: {exc.strerror or exc}") from exc
    with fh:
        for number, raw in _lines(fh, max_line_bytes):
            try:
                record = _parse_line(path, number, raw, max_line_bytes)
            except DataError as exc:
                if not skip_bad_lines:
                    raise
                if bad is not None:
                    bad.append(str(exc))
                continue
            if record is not None:
                records.append(record)
    if not records and not (bad and skip_bad_lines):
        raise DataError(f"{path} has no records (expected one JSON object per line)")
    return records


def _lines(fh: Any, limit: int) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes) of each line; an over-long line is yielded cut at ``limit + 1``
    bytes and the rest of it skipped, so a huge line never sits in memory whole."""
    number = 0
    while True:
        chunk: bytes = fh.readline(limit + 1)
        if not chunk:
            return
        number += 1
        if len(chunk) > limit and not chunk.endswith(b"\n"):
            while True:  # skip to the end of this line
                rest: bytes = fh.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
        yield number, chunk


def _parse_line(path: Path, number: int, raw: bytes, limit: int) -> Record | None:
    where = f"{path}, line {number}"
    if len(raw.rstrip(b"\r\n")) > limit:
        raise DataError(f"{where}: the line is longer than {limit} bytes (data_prep.max_line_bytes)", line=number)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte {exc.start + 1}: {raw[exc.start:exc.start + 1]!r})",
                        line=number) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})", line=number) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with \"instruction\" and \"output\", "
                        f"got {type(obj).__name__}", line=number)
    values = {}
    for key in ("instruction", "output"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}", line=number)
        value = obj[key]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}", line=number)
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty", line=number)
        values[key] = value.strip()
    return Record(number, values["instruction"], values["output"])


# --- splitting an answer into points ---------------------------------------------------------


def split_answer(output: str, *, max_words: int = 6, min_points: int = 3, max_points: int = 8,
                 target_sentences: int = 2) -> Split:
    """Split one answer into points with headings; see the module docstring for the rules."""
    text = output.replace("\r\n", "\n").replace("\r", "\n").strip()
    problem = _content_problem(text)
    lines = text.split("\n")
    headings = [i for i, ln in enumerate(lines) if markdown_heading(ln)]
    if headings:
        first_content = next(i for i, ln in enumerate(lines) if ln.strip())
        if len(headings) > 1 or headings[0] != first_content:
            problem = problem or "sections"
        lines = [ln for i, ln in enumerate(lines) if i not in headings]
    items = [item for item in list_items("\n".join(lines)) if item.body]
    if len(items) >= 2:
        kind: SplitKind = "list"
        points, list_problem = _list_points(lines, items, max_words)
        problem = problem or list_problem
        # A long list ("ten tips") keeps its first points: still a complete outline of that many.
        points = points[:max_points]
    else:
        kind, points = _prose_points("\n".join(lines), max_words, min_points, target_sentences)
    return Split(kind, tuple(points), problem or _outline_problem(points, max_words, min_points, max_points))


def split_sections(output: str, *, max_words: int = 6, min_points: int = 3, max_points: int = 8) -> Split:
    """The outline of an answer written as markdown sections: the titles of its top-level sections.

    A first heading that is the only one of its level is the answer's title, not a section.
    Numbering ("Step 1:", "2.") and a trailing ``:`` are taken off a title, and sections named for
    the essay's frame rather than its content ("Introduction", "Conclusion", "Overview":
    `pice_cloud.guards.is_meta_heading`) are left out of the outline. The other checks are
    `split_answer`'s (``too_few_points``, ``long_heading``, ...). Used for sketcher examples only:
    a section's text is often several paragraphs or a list, more than one point's expansion.
    """
    text = output.replace("\r\n", "\n").replace("\r", "\n").strip()
    problem = _content_problem(text)
    lines = text.split("\n")
    sections = [(i, *found) for i, ln in enumerate(lines) if (found := markdown_heading(ln))]
    levels = [level for _, level, _ in sections]
    if len(sections) > 1 and levels.count(levels[0]) == 1 and levels[0] < min(levels[1:]):
        sections = sections[1:]  # the title
    if not sections:
        return Split("sections", (), problem or "too_few_points")
    top = min(level for _, level, _ in sections)
    starts = [(i, title) for i, level, title in sections if level == top]
    points = []
    for k, (start, title) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
        heading = _clean_heading(strip_marker(_SECTION_NUMBER.sub("", _plain(title)), numbered_only=True))
        if guards.is_meta_heading(heading):
            continue
        body = " ".join(ln.strip() for ln in lines[start + 1:end] if ln.strip() and not markdown_heading(ln))
        points.append(Point(heading, _plain(body)))
    return Split("sections", tuple(points), problem or _outline_problem(points, max_words, min_points, max_points))


def _content_problem(text: str) -> str | None:
    if "```" in text:
        return "code"
    if _MATH.search(text):
        return "math"
    if _LETTER.search(text):
        return "letter"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    short = [ln for ln in lines if len(ln.split()) <= 8 and not _item(ln) and ln[-1] not in ".:?!"]
    # Verse: most lines short and without closing punctuation.
    if len(lines) >= 6 and len(short) >= 0.6 * len(lines):
        return "verse"
    return None


def _item(line: str) -> ListItem | None:
    """The list item ``line`` is, when it has text on its line (a bare "2." is no point)."""
    item = list_item(line)
    return item if item is not None and item.body else None


def _list_points(lines: list[str], items: list[ListItem], max_words: int) -> tuple[list[Point], str | None]:
    indent = min(_width(item.indent) for item in items)
    top = [item for item in items if _width(item.indent) == indent]
    problem = None
    numbered = {item.number is not None for item in top}
    if len(numbered) > 1:
        problem = "several_lists"
    points = []
    for k, item in enumerate(top):
        end = top[k + 1].line if k + 1 < len(top) else len(lines)
        subs: list[str] = []
        more: list[str] = []
        for ln in lines[item.line + 1:end]:
            if not ln.strip():
                continue
            sub = _item(ln)
            if _width(ln[: len(ln) - len(ln.lstrip())]) > indent:
                (subs if sub else more).append((sub.body if sub else ln).strip())
            elif k + 1 < len(top):
                problem = problem or "several_lists"  # unindented text between two items
            else:
                break  # the outro
        points.append(_item_point(item.body, subs, more, max_words))
    return points, problem


def _width(indent: str) -> int:
    return len(indent.expandtabs(4))


def _item_point(body: str, subs: list[str], more: list[str], max_words: int) -> Point:
    heading, rest = _explicit_heading(body)
    words = len(_plain(rest).split())
    if words < 3 and subs:
        rest = " ".join(_as_sentence(_plain(s)) for s in subs)
    if more:
        rest = " ".join([rest, *more])
    rest = _plain(rest)
    if heading is not None:
        return Point(_clean_heading(heading), rest)
    return Point(first_clause_heading(rest, max_words), rest, derived=True)


def _explicit_heading(body: str) -> tuple[str | None, str]:
    """(heading, rest) when the item names its heading (bold, or text before ``:``/a dash)."""
    bold = bold_head(body)
    if bold:
        return bold[0], bold[1].lstrip(":-–—. \t")
    plain = _plain(body)
    cut = [(plain.find(sep), sep) for sep in _SEPARATORS if 0 < plain.find(sep) <= _HEAD_CHARS]
    if cut:
        pos, sep = min(cut)
        head = plain[:pos]
        # "Note that X: ..." reads as a sentence, not a heading: a heading has no verb-like
        # sentence end before the separator; keep it simple and accept short heads only.
        if len(head.split()) <= 10 and not re.search(r"[.!?]", head):
            return head, plain[pos + len(sep):]
    return None, body


def _plain(text: str) -> str:
    """Text without markdown emphasis or code marks, whitespace collapsed."""
    text = re.sub(r"\*\*|__|`", "", text)
    text = re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"\1", text)
    return " ".join(text.split())


def _as_sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


def _clean_heading(text: str) -> str:
    # "Single African Air Transport Market (SAATM)": the parenthetical adds words, not meaning.
    text = re.sub(r"\s*\([^()]*\)", "", _plain(text))
    text = text.strip(" \t.:;,-–—\"'")
    return " ".join(text.split())


def first_clause_heading(text: str, max_words: int) -> str | None:
    """A heading made from the first clause of ``text`` (leading connectives skipped), or
    ``None`` when that clause is longer than ``max_words`` (it is never cut)."""
    first = split_sentences(_plain(text), prose=True)[:1]
    if not first:
        return None
    for clause in _CLAUSE_SPLIT.split(first[0]):
        clause = clause.strip().rstrip(".!?")
        if not clause or clause.lower() in _CONNECTIVES:
            continue
        words = clause.split()
        if len(words) > max_words:
            return None
        return _clean_heading(clause) or None
    return None


def _prose_points(text: str, max_words: int, min_points: int, group: int) -> tuple[SplitKind, list[Point]]:
    blocks = [" ".join(p.split()) for p in paragraphs(text)]
    if blocks and blocks[0].endswith(":"):
        blocks = blocks[1:]
    if len(blocks) > 1 and _OUTRO.match(blocks[-1]):
        blocks = blocks[:-1]
    if len(blocks) >= min_points:
        return "paragraphs", [Point(first_clause_heading(p, max_words), _plain(p), derived=True) for p in blocks]
    sentences = split_sentences(_plain(" ".join(blocks)), prose=True)
    groups = [sentences[i:i + group] for i in range(0, len(sentences), group)]
    if len(groups) > 1 and len(groups[-1]) < group:
        last = groups.pop()
        groups[-1] += last
    return "sentences", [Point(first_clause_heading(" ".join(g), max_words), " ".join(g), derived=True)
                         for g in groups]


def heading_problem(heading: str | None, max_words: int) -> str | None:
    """Why ``heading`` cannot stand in an outline, or ``None`` when it can."""
    if heading is None or not any(ch.isalnum() for ch in heading):
        return "long_heading" if heading is None else "empty_heading"
    words = heading.split()
    if len(words) > max_words:
        return "long_heading"
    # The serving guards' own rules: an outline the cloud would refuse or repair is not one to train
    # the sketcher on ("Introduction", "Conclusion" and "Background" sections included).
    if guards.is_meta_heading(heading):
        return "meta_heading"
    if guards.is_cut_heading(heading):
        return "cut_heading"
    return None


def _outline_problem(points: Sequence[Point], max_words: int, min_points: int, max_points: int) -> str | None:
    if len(points) < min_points:
        return "too_few_points"
    if len(points) > max_points:
        return "too_many_points"
    for p in points:
        problem = heading_problem(p.heading, max_words)
        if problem:
            return problem
    keys = [(p.heading or "").casefold() for p in points]
    if len(set(keys)) < len(keys):
        return "duplicate_headings"
    for p in points:
        first = p.text.split(maxsplit=1)[0].lower().strip(",.;:") if p.text.split() else ""
        if (p.derived and first in _BACKREF_WORDS) or _BACKREF_PHRASE.search(p.text):
            return "dependent_points"
    return None


# --- examples ---------------------------------------------------------------------------------


def _approx_tokens(text: str) -> int:
    # Without a tokenizer: about 1.3 tokens per English word, plus markup.
    return int(len(text.split()) * 1.3) + 1


def _plain_render(messages: Sequence[ChatMessage], prefill: str) -> str:
    return "\n".join(m.content for m in messages) + "\n" + prefill


def expansion_target(text: str, sentences: int, max_tokens: int, count: TokenCounter) -> str | None:
    """The first ``sentences`` sentences of a point's text, fewer when that exceeds ``max_tokens``
    (``None`` when even one sentence does)."""
    parts = split_sentences(text, prose=True)
    for n in range(min(sentences, len(parts)), 0, -1):
        target = " ".join(parts[:n])
        if count(target) <= max_tokens:
            return target
    return None


def examples_for(record: Record, split: Split, role: Role, cfg: DataConfig, *,
                 render: Renderer = _plain_render, count: TokenCounter = _approx_tokens,
                 drops: Counter[str] | None = None) -> list[Example]:
    """The examples of ``role`` from one usable answer; per-example drops are counted in ``drops``."""
    drops = drops if drops is not None else Counter()
    headings = [p.heading or "" for p in split.points]
    max_points = max(cfg.max_points, len(headings))
    outline = format_sketch(headings)
    sketch = serving_sketch(headings, max_points=max_points, max_words=cfg.max_words)
    if sketch is None:
        raise DataError(f"line {record.line}: the outline does not read back through the sketch parser")
    out = []
    if role == "sketcher":
        messages = tuple(sketch_messages(record.instruction, max_points=max_points, max_words=cfg.max_words))
        target = outline.removeprefix(SKETCH_PREFILL)
        if count(render(messages, SKETCH_PREFILL)) + count(target) + 1 > cfg.max_seq_len:
            drops["too_long"] += 1
            return []
        return [Example("sketcher", record.line, record.instruction, sketch, None, messages, SKETCH_PREFILL, target)]
    for index, point in enumerate(split.points):
        if not point.text.strip():
            drops["empty_point"] += 1
            continue
        expansion = expansion_target(point.text, cfg.target_sentences, cfg.max_target_tokens, count)
        if expansion is not None and len(expansion.split()) < cfg.min_target_words:
            # "by James S.A. Corey": a fragment teaches the edge to answer a point in three words.
            drops["short_point"] += 1
            continue
        messages = tuple(expansion_messages(record.instruction, list(sketch), index))
        if expansion is None or count(render(messages, "")) + count(expansion) + 1 > cfg.max_seq_len:
            drops["too_long"] += 1
            continue
        out.append(Example("expander", record.line, record.instruction, sketch, index, messages, "", expansion))
    return out


def serving_sketch(headings: Sequence[str], *, max_points: int, max_words: int) -> tuple[str, ...] | None:
    """The outline as the serving sketch parser reads it back, or ``None`` when that differs from
    ``headings`` (a heading the parser would cut or drop: training on it would teach an outline
    that serving never shows)."""
    try:
        parsed = parse_sketch(format_sketch(headings).removeprefix(SKETCH_PREFILL), max_points=max_points,
                              max_words=max_words)
    except SketchError:
        return None
    return tuple(parsed) if parsed == list(headings) else None


def is_heldout(instruction: str, *, seed: int, fraction: float) -> bool:
    """Whether an instruction is kept out of training (a seeded hash: stable across runs and roles)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{instruction}".encode()).hexdigest()
    return int(digest[:8], 16) / 2**32 < fraction


def prepare(path: Path, role: Role, cfg: DataConfig, *, seed: int = 0, render: Renderer | None = None,
            count: TokenCounter | None = None) -> Prepared:
    """Read ``path`` and build the examples of ``role``, with counts of everything dropped.

    Args:
        path: JSONL of ``{"instruction", "output"}``.
        role: ``"expander"`` or ``"sketcher"``.
        cfg: the data preparation settings.
        seed: seeds the held-out choice and the subsample.
        render: the model's prompt rendering (chat template) used to measure lengths; without
            it, message contents joined.
        count: the model's token counter; without it, about 1.3 tokens per word.

    Raises:
        DataError: a malformed line (see `read_records`), or no usable example at all.
    """
    bad: list[str] = []
    records = read_records(path, max_line_bytes=cfg.max_line_bytes, skip_bad_lines=cfg.skip_bad_lines, bad=bad)
    render = render or _plain_render
    count = count or _approx_tokens
    kinds: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    example_drops: Counter[str] = Counter()
    train: list[Example] = []
    heldout: list[Example] = []
    usable = points = heldout_records = from_sections = 0
    for record in records:
        split = split_answer(record.output, max_words=cfg.max_words, min_points=cfg.min_points,
                             max_points=cfg.max_outline_points, target_sentences=cfg.target_sentences)
        kinds[split.kind] += 1
        if split.problem == "sections" and role == "sketcher":
            sections = split_sections(record.output, max_words=cfg.max_words, min_points=cfg.min_points,
                                      max_points=cfg.max_outline_points)
            if sections.problem is None:
                split = sections
                from_sections += 1
        if split.problem is not None:
            dropped[split.problem] += 1
            continue
        headings = [p.heading or "" for p in split.points]
        if serving_sketch(headings, max_points=max(cfg.max_points, len(headings)), max_words=cfg.max_words) is None:
            dropped["unparseable_outline"] += 1
            continue
        examples = examples_for(record, split, role, cfg, render=render, count=count, drops=example_drops)
        usable += 1
        points += len(split.points)
        if is_heldout(record.instruction, seed=seed, fraction=cfg.holdout_fraction):
            heldout_records += 1
            heldout += examples
        else:
            train += examples
    if not train:
        raise DataError(f"{path}: no usable {role} example in {len(records)} records (answers dropped: "
                        f"{dict(dropped) or 'none'}; examples dropped: {dict(example_drops) or 'none'})")
    available = len(train)
    random.Random(seed).shuffle(train)
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    counts = {
        "records": len(records), "bad_lines": len(bad), "bad_line_errors": bad[:20],
        "answers_by_kind": dict(sorted(kinds.items())), "answers_usable": usable,
        "answers_outlined_by_sections": from_sections,
        "answers_dropped": dict(dropped.most_common()), "points_in_usable_answers": points,
        "examples_dropped": dict(example_drops.most_common()),
        "heldout_instructions": heldout_records, "heldout_examples": len(heldout),
        "train_examples_available": available, "train_examples_used": len(train),
    }
    held = {r.instruction: is_heldout(r.instruction, seed=seed, fraction=cfg.holdout_fraction) for r in records}
    return Prepared(train, heldout, counts, [q for q, h in held.items() if not h], [q for q, h in held.items() if h])
