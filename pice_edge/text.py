"""The text grammar both sides read and write: list items, headings, sentences, rendered points.

One place for it, so that the sketch parser, the expansion cleaner, the guards, the fine-tuning
data and the evaluation tools agree on what a list item or a sentence is. Plain ``re`` only: the
edge imports this, and it must not pull in a model library.

- **List items**: numbered ``1.`` ``1)`` or bulleted ``-`` ``*`` ``•`` ``+``, a blank after the
  marker (or nothing: an empty item), any indent (`list_item`, `list_items`, `strip_marker`).
  ``loose=True`` also takes what a small model writes for an outline: ``(1)``, ``1:``, ``1]``,
  ``Step 1:``, ``Point 2 -``, ``·``, and a number with no blank after it (``1.Plan``).
- **Headings**: a markdown ``#`` heading (`markdown_heading`), and a bold head opening a text,
  ``**Heading** rest`` (`bold_head`).
- **Sentences**: `split_sentences`, one splitter with keywords for what callers need differently.
- **Paragraphs**: `paragraphs`, blocks between blank lines.
- **Rendered points**: `format_point` writes one point of a progressive answer (what
  ``pice_cloud.events.render_point`` returns), `parse_point` and `parse_points` read it back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "ListItem",
    "RenderedPoint",
    "bold_head",
    "format_point",
    "list_item",
    "list_items",
    "markdown_heading",
    "paragraphs",
    "parse_point",
    "parse_points",
    "split_sentences",
    "strip_marker",
]

# --- list items -------------------------------------------------------------------------------

#: One line of a list. ``marker`` is set for the list grammar proper; ``loose`` for the forms only
#: ``loose=True`` accepts. The grammar is tried first, so a line the grammar reads is never loose.
#: A marker may end its line (an empty item, or one whose text follows on the next line).
_LIST_ITEM = re.compile(
    r"""^(?P<indent>[ \t]*)
    (?:
        (?P<marker>\d{1,2}[.)]|[-*•+])(?=\s|$)          # 1.  1)  -  *  •  +
      | (?P<loose>
            \(?\d{1,2}[ \t]*[.):\]]                     # (1)  1:  1]  1 .  and 1.Plan
          | (?i:step|point)[ \t]+\d{1,2}[ \t]*[.:)-]?   # Step 1:  Point 2 -
          | ·(?=\s)                                     # a middle dot used as a bullet
        )
    )
    \s*(?P<body>.*?)\s*$""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class ListItem:
    """One list item, as `list_item` or `list_items` found it.

    Attributes:
        indent: the blanks before the marker (nesting: a deeper indent is a sub-item).
        marker: ``"1."``, ``"2)"``, ``"-"``, ...; with ``loose=True`` also ``"(3)"``, ``"Step 4:"``.
        body: the item's text on its line, without the blanks around it; ``""`` for an empty item.
        line: 0-based number of the item's line in the text parsed.
        start: offset of that line in the text parsed.
        body_start: offset of ``body`` in the text parsed.
    """

    indent: str
    marker: str
    body: str
    line: int = 0
    start: int = 0
    body_start: int = 0

    @property
    def number(self) -> int | None:
        """The item's number (``3`` for ``"3."``, ``"(3)"`` or ``"Step 3:"``), ``None`` for a bullet."""
        digits = "".join(ch for ch in self.marker if ch.isdigit())
        return int(digits) if digits else None


def _item(line: str, *, loose: bool, line_number: int = 0, offset: int = 0) -> ListItem | None:
    match = _LIST_ITEM.match(line)
    if match is None or (match["marker"] is None and not loose):
        return None
    return ListItem(match["indent"], (match["marker"] or match["loose"]).strip(), match["body"],
                    line_number, offset, offset + match.start("body"))


def list_item(text: str, *, loose: bool = False) -> ListItem | None:
    """The list item that the first line of ``text`` is, or ``None`` when that line is no list item.

    Args:
        text: a line (only the text up to its first line break is read).
        loose: also accept the markers of messy model output (see the module docstring).
    """
    return _item(text.partition("\n")[0], loose=loose)


def list_items(text: str, *, loose: bool = False) -> Iterator[ListItem]:
    """Each line of ``text`` that is a list item, in order, with its line number and offsets.

    Lines that are no list item (an item's continuation, prose, blank lines) are skipped; nesting
    is left to the caller, by ``indent``.
    """
    offset = 0
    for number, line in enumerate(text.split("\n")):
        found = _item(line, loose=loose, line_number=number, offset=offset)
        if found is not None:
            yield found
        offset += len(line) + 1


def strip_marker(text: str, *, loose: bool = False, numbered_only: bool = False) -> str:
    """``text`` without the list marker it opens with (and the blanks around the marker, blank
    lines before it included); ``text`` unchanged when it opens with none. Later lines are kept.

    Args:
        loose: also strip the markers of messy model output (see `list_item`).
        numbered_only: strip a number ("2.", "2)") but keep a bullet.
    """
    stripped = text.lstrip()
    found = list_item(stripped, loose=loose)
    if found is None or (numbered_only and found.number is None):
        return text
    return stripped[found.body_start:]


# --- headings ---------------------------------------------------------------------------------

_MARKDOWN_HEADING = re.compile(r"^\s{0,3}(?P<level>#{1,6})\s+(?P<title>.*?)\s*#*\s*$")
#: A bold head: the shortest, so that ``**a** and **b**`` gives ``a``; a ``*`` inside it ("F*ck",
#: "R_*") but not at its ends, so that ``***a***`` is no bold head ``*a``.
_BOLD_HEAD = re.compile(r"\*\*(?P<head>[^*](?:.*?[^*])??)\*\*\s*(?P<rest>.*)", re.DOTALL)


def markdown_heading(line: str) -> tuple[int, str] | None:
    """``(level, title)`` of a markdown ATX heading line (``"## Title ##"`` gives ``(2, "Title")``),
    or ``None``. At most three blanks of indent, as markdown allows; a deeper one is code."""
    match = _MARKDOWN_HEADING.match(line)
    return (len(match["level"]), match["title"]) if match else None


def bold_head(text: str) -> tuple[str, str] | None:
    """``(head, rest)`` of a text that opens with a bold head, ``"**Plan** ahead"`` giving
    ``("Plan", "ahead")`` (blanks after the head dropped, a ``:`` after it kept for the caller);
    ``None`` when the text does not open with one."""
    match = _BOLD_HEAD.match(text)
    return (match["head"], match["rest"]) if match else None


# --- sentences and paragraphs -----------------------------------------------------------------

#: Where a sentence may end: a stop and the marks that close a quotation or an aside, before a
#: blank or the end of the text; or a line break (`split_sentences` decides which of these count).
#: ``capital`` is set when what follows starts like a sentence (a capital or a digit, perhaps
#: after an opening quote or bracket). No blank, no end: "3.5" and "e.g.," are never split. The
#: blanks are looked at, not taken, so that a stop that does not count leaves its line break
#: to count ("x = 1;" then a new line).
_SENTENCE_END = re.compile(
    r"""(?P<stop>[.!?;])[\"”’')\]]*
        (?P<capital>(?=\s+[\"“‘'(\[]?[A-Z0-9]))?
        (?=\s|\Z)
      | \n+""",
    re.VERBOSE,
)
#: Words whose full stop ends no sentence in prose (compared in lower case, the last dot dropped;
#: initials such as "J." and "e.g." or "U.S." are found by `_initials`).
_ABBREVIATIONS = frozenset({"approx", "dr", "etc", "jr", "mr", "mrs", "ms", "no", "prof", "sr", "st", "vs"})
_BLANK_LINE = re.compile(r"\n\s*\n")


def _initials(word: str) -> bool:
    # "j", "e.g", "u.s", "ph.d": letters in dotted groups of one or two ("lottadigital.com" is a
    # word that ends a sentence; "$4.50" is no word at all).
    return all(part.isalpha() and len(part) <= 2 for part in word.split(".")) and (len(word) == 1 or "." in word)


def split_sentences(text: str, *, prose: bool = False, newlines: bool = False, semicolons: bool = False,
                    keep_separators: bool = False) -> list[str]:
    """The sentences of ``text``: each ends at ``.``, ``!`` or ``?`` (with the quotes or brackets
    that close after it) followed by blanks or the end of the text.

    Args:
        prose: written prose rules, for well-formed text: a stop after an abbreviation ("e.g.",
            "Dr.", "U.S.") or an initial ("J.") ends no sentence, and neither does one followed by
            a lower-case word. Off, every stop followed by a blank ends one: model output's case
            is unreliable, and for repetition checks or truncation a missed end costs more.
        newlines: a line break ends a sentence too (list items and headings are one each).
        semicolons: ``;`` ends one too (an outline written as one line: "Plan; rest; sleep").
        keep_separators: return the pieces verbatim, each with the blanks after it, so that they
            join back into ``text``; the last piece is what follows the last sentence end (``""``
            when the text ends with one). Otherwise the sentences are stripped and empty ones left out.
    """
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        stop = match["stop"]
        if match.start() < start or (stop is None and not newlines) or (stop == ";" and not semicolons):
            continue  # a line break among the blanks the last end took, or an end not asked for
        if prose and stop is not None:
            before = text[start:match.start("stop")].split()
            word = before[-1].lstrip("\"“‘'([").lower().rstrip(".") if before else ""
            if (match["capital"] is None and match.end() < len(text)) or word in _ABBREVIATIONS \
                    or _initials(word):
                continue
        end = match.end()
        while stop is not None and end < len(text) and text[end].isspace():
            end += 1  # the blanks after a stop go with it; after a line break, the next line's indent stays
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    if keep_separators:
        return pieces
    return [s for piece in pieces if (s := piece.strip())]


def paragraphs(text: str) -> list[str]:
    """The blocks of ``text`` between blank lines (a line of blanks is blank), stripped; empty
    ones left out."""
    return [p for block in _BLANK_LINE.split(text) if (p := block.strip())]


# --- rendered points --------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPoint:
    """One point of a progressive answer, as `parse_point` reads it back."""

    #: 0-based, as `format_point` takes it (the rendered number less one).
    index: int
    heading: str
    text: str


def format_point(index: int, heading: str, text: str) -> str:
    """One point of the final answer: a numbered, bold heading and its expansion,
    ``"2. **Heading** text"`` for ``index`` 1 (0-based); no trailing blank when ``text`` is empty."""
    return f"{index + 1}. **{heading}** {text}".rstrip()


def parse_point(paragraph: str) -> RenderedPoint | None:
    """The inverse of `format_point`: ``(index, heading, text)`` of a rendered point, heading and
    text stripped; ``None`` when ``paragraph`` is not one (a numbered item with a bold head).
    Exact for headings that neither start nor end with ``*`` (the sketch parser strips markup)
    and numbers up to 99, as the service writes them."""
    paragraph = paragraph.lstrip()
    item = list_item(paragraph)
    if item is None or item.number is None:
        return None
    head = bold_head(paragraph[item.body_start:])
    if head is None:
        return None
    return RenderedPoint(item.number - 1, head[0].strip(), head[1].strip())


def parse_points(answer: str) -> list[RenderedPoint]:
    """The points of a progressive answer: `format_point` paragraphs joined by a blank line, as
    the service assembles them. Paragraphs that are no rendered point (a cloud-only answer's
    prose) are left out; an expansion never holds a blank line (`pice_edge.prompts.clean_expansion`
    keeps its first paragraph), so nothing of a point is lost."""
    return [point for paragraph in answer.split("\n\n") if (point := parse_point(paragraph))]


# --- outlines as a format to decode under ----------------------------------------------

@dataclass(frozen=True)
class OutlineFormat:
    """A numbered outline continued after ``"{first}."``: items ``first`` .. ``max_points``."""

    min_points: int
    max_points: int
    max_words: int
    first: int = 1
    #: Whether a heading may end as it stands (e.g. not on "and" or "of"): in-process engines
    #: only (the regex and the grammar cannot say it). A heading that may not end yet may run
    #: ``extra_words`` words past ``max_words`` to finish its phrase.
    can_end: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)
    extra_words: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.min_points <= self.max_points or self.max_words < 1:
            raise ValueError(f"not an outline format: {self}")

    def regex(self) -> str:
        """The continuation as a regular expression (numbers in order, words bounded)."""
        heading = rf" [^\s]+(?: [^\s]+){{0,{self.max_words - 1}}}"

        def tail(n: int) -> str:
            if n > self.max_points:
                return ""
            item = rf"\n{n}\.{heading}{tail(n + 1)}"
            return item if n <= self.min_points else f"(?:{item})?"

        return heading + tail(self.first + 1)

    def gbnf(self, *, lead: str = "") -> str:
        """The continuation as a GBNF grammar (llama.cpp), after the literal ``lead``."""
        rules = [f'heading ::= " " word (" " word){{0,{self.max_words - 1}}}', "word ::= [^ \\t\\n]+"]
        for n in range(self.first + 1, self.max_points + 1):
            rest = f" item{n + 1}" + ("" if n + 1 <= self.min_points else "?") if n < self.max_points else ""
            rules.append(f'item{n} ::= "\\n{n}." heading{rest}')
        first = self.first + 1
        tail = "" if first > self.max_points else f" item{first}" + ("" if first <= self.min_points else "?")
        quoted = lead.replace("\\", "\\\\").replace('"', '\\"')
        root = "root ::= " + (f'"{quoted}" ' if lead else "") + "heading" + tail
        return "\n".join([root, *rules]) + "\n"
