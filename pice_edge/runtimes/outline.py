"""Decoding a numbered outline under its format (`pice_edge.text.OutlineFormat`), so that a
sketch cannot fail on its form.

A sketch the guards refuse costs the cloud a second sketch, and two refused sketches cost it a
whole cloud-only answer. Most refusals are about form, not content: too few points (the model
stopped, or wrote a paragraph), headings that are sentences. The format says what a sketch
must look like (after the assistant turn's pre-filled ``"1."``): ``min_points`` to ``max_points``
items numbered in order, one per line, each of at most ``max_words`` words. Engines apply it:

- ours (`pice_edge.runtimes._decode.StepBatch`, which the embedded cloud backend runs) through
  `OutlineGuide`, a per-sequence logits mask: a heading opens with a word (not the one another
  heading opened with) and gets at least one before it may end, no new word past ``max_words``
  (``extra_words`` more while `OutlineFormat.can_end` says it would be cut; a heading whose model
  wants a word past them ends there, rather than glue the word on), the end of the text
  only after ``min_points`` headings, and after each line break the next number is written for
  the model (after the last heading the line break ends the text, which may so end with one);
- remote engines through structured output: `OutlineFormat.regex` (vLLM's ``guided_regex``,
  TensorRT-LLM's guided decoding) or `OutlineFormat.gbnf` (llama.cpp's ``grammar``).

Content (meta headings, duplicates, restating the question) stays the guards' job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pice_edge.text import OutlineFormat

FloatArray = npt.NDArray[np.floating]


@dataclass
class TokenTexts:
    """What each token of a vocabulary writes, as the outline mask needs it."""

    #: Tokens that end a line: their text ends with a line break and holds no other.
    line_end: np.ndarray
    #: Tokens an outline never has: other line breaks, runs of spaces, tabs, trailing or lone
    #: spaces (words are separated by exactly one space).
    never: np.ndarray
    #: Tokens that start a new word (their text opens with one space).
    word_start: np.ndarray
    texts: list[str]

    @classmethod
    def build(cls, decode: Callable[[list[int]], str], vocab_size: int) -> TokenTexts:
        texts = [decode([i]) for i in range(vocab_size)]
        line_end = np.array([t.endswith("\n") and t.count("\n") == 1 and "\r" not in t for t in texts], dtype=bool)
        never = np.array([("\n" in t or "\r" in t or "\t" in t or "  " in t or not t.strip() or t.endswith(" "))
                          for t in texts], dtype=bool) & ~line_end
        return cls(line_end=line_end, never=never,
                   word_start=np.array([t.startswith(" ") for t in texts], dtype=bool) & ~never, texts=texts)


@dataclass
class OutlineGuide:
    """The outline mask of one sequence: `mask` the scores before a token is chosen, then
    `advance` with the token chosen. ``budget`` is the sequence's token budget: a heading gets at
    most its share of it, so the minimum number of headings always fits."""

    form: OutlineFormat
    vocab: TokenTexts
    encode: Callable[[str], list[int]]
    eos_ids: Iterable[int]
    budget: int = 64
    item: int = 0
    heading: str = ""
    heading_tokens: int = 0
    used: int = 0
    forced: list[int] = field(default_factory=list)
    #: The first token of each heading so far: a heading may not open like another one did.
    openings: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.item = self.item or self.form.first
        self._eos = sorted(self.eos_ids)
        # A heading's tokens: its share of the budget (the numbers take a couple of tokens per
        # item), and never more than a generous two a word (a model that runs words together
        # with punctuation does not write a paragraph as one heading).
        share = self.budget // max(1, self.form.min_points - self.form.first + 1) - 3
        self._cap = max(2, min(share, 2 * (self.form.max_words + self.form.extra_words) + 2))

    def mask(self, scores: FloatArray) -> None:
        """Leave only the tokens the format allows (in place)."""
        if self.forced:
            keep = scores[self.forced[0]]
            scores[:] = -np.inf
            scores[self.forced[0]] = keep if np.isfinite(keep) else 0.0
            return
        size = min(len(scores), len(self.vocab.texts))
        head = scores[:size]
        head[self.vocab.never[:size]] = -np.inf
        words = len(self.heading.split())
        # A heading that has had its share of the budget ends now, whatever else holds.
        at_cap = bool(self.heading) and self.heading_tokens >= self._cap
        # A heading cut mid-phrase would be refused: it may not end yet, and may run a little longer.
        unfinished = bool(words) and not at_cap and self.form.can_end is not None \
            and not self.form.can_end(self.heading) and words < self.form.max_words + self.form.extra_words
        if unfinished:
            scores[self._eos] = -np.inf
            head[self.vocab.line_end[:size]] = -np.inf
        if words == 0 or self.item < self.form.min_points:
            scores[self._eos] = -np.inf  # the text may end only after a whole minimum outline
        if words == 0:
            head[self.vocab.line_end[:size]] = -np.inf
        if words and self.item >= self.form.min_points and self.budget - self.used <= 2:
            scores[:] = -np.inf
            scores[self._eos] = 0.0
            return
        if not self.heading:
            head[~self.vocab.word_start[:size]] = -np.inf  # " Heading": a space, then a word
            if self.openings:
                # Points that open alike are mostly one point twice ("The answer is 1", "The
                # answer is 2"), which the guards refuse as duplicates.
                opened = np.fromiter(self.openings, dtype=np.int64)
                head[opened[opened < size]] = -np.inf
        else:
            past_limit = words >= self.form.max_words and not unfinished
            best = int(np.argmax(scores)) if past_limit and not at_cap else size
            # Past its word limit, a heading whose model wants another word ends here: banning
            # only the word's leading space would have it glue the word on ("computerscience").
            if at_cap or (best < size and self.vocab.word_start[best]):
                eos = scores[self._eos]  # (a copy) ending the text stays as allowed above
                head[~self.vocab.line_end[:size]] = -np.inf
                scores[self._eos] = eos
            elif past_limit:
                head[self.vocab.word_start[:size]] = -np.inf  # no new word past the limit
        if not np.isfinite(scores).any():  # nothing left (a tiny vocabulary): end the text
            scores[self._eos] = 0.0

    def advance(self, token: int) -> None:
        """Take the chosen token into the state."""
        self.used += 1
        if self.forced:
            self.forced.pop(0)
            return
        text = self.vocab.texts[token] if token < len(self.vocab.texts) else ""
        if not text.endswith("\n"):
            if not self.heading:
                self.openings.add(token)
            self.heading += text
            self.heading_tokens += 1
            return
        self.heading, self.heading_tokens = "", 0
        if self.item >= self.form.max_points or (self.item >= self.form.min_points and self.budget - self.used <= 8):
            # The last heading (by count, or by what is left of the budget): its line break ends
            # the text. Banning the break instead would make the model run the heading on.
            self.forced = self._eos[:1]
            return
        self.item += 1
        self.forced = self.encode(f"{self.item}.")
