"""The service's vocabulary: the events one request yields, its per-request options, and the
small text rules shared by the service and the HTTP layer (seeds, stop strings, rendering).

`PiceService.answer` yields `SketchEvent`, then `PointEvent` per point in order (progressive), or
`DeltaEvent` pieces (a streamed cloud-only answer), and always ends with one `AnswerEvent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pice_cloud.cloud_ledger import CloudLedger
from pice_cloud.llm.base import TokenLogprob
from pice_cloud.scheduler import Mode
from pice_edge.protocol import Candidate, Sampling
from pice_edge.text import format_point

Source = Literal["edge", "cloud"]


@dataclass(frozen=True)
class ChosenPoint:
    """The text that goes into the answer for one point."""

    index: int
    text: str
    source: Source
    device_id: str | None = None
    tokens: int = 0
    #: How many usable candidates the choice was made among.
    candidates: int = 0

    @classmethod
    def from_candidate(cls, cand: Candidate, among: int = 1) -> ChosenPoint:
        return cls(cand.point_index, cand.text, "edge", cand.device_id, cand.token_count, among)


@dataclass(frozen=True)
class SketchEvent:
    """The outline, as soon as the cloud LLM wrote it."""

    points: list[str]


@dataclass(frozen=True)
class DeltaEvent:
    """A piece of a cloud-only answer as the cloud LLM writes it; the pieces of one answer
    concatenate to its `AnswerEvent` text."""

    text: str


@dataclass(frozen=True)
class PointEvent:
    """One point's expansion, in point order."""

    point: ChosenPoint
    heading: str
    #: Its text already went out as `DeltaEvent` pieces (the cloud streamed this point).
    streamed: bool = False


@dataclass
class AnswerStats:
    mode: Mode = "cloud"
    edge_tokens: int = 0
    points_edge: int = 0
    points_cloud: int = 0
    sketch_s: float = 0.0
    #: Seconds spent placing the points and publishing their tasks (the scheduler's share).
    schedule_s: float = 0.0
    #: Seconds to the answer's first content: a cloud-only answer's first token, a progressive
    #: answer's first heading (sent once the points are placed).
    first_token_s: float = 0.0
    #: Seconds to the first point's expansion text (progressive; 0 otherwise).
    first_text_s: float = 0.0
    total_s: float = 0.0
    devices: list[str] = field(default_factory=list)
    #: The mode router's P(suits a sketch), when it ran (``auto`` with live edges).
    route_probability: float | None = None
    #: A stop string ended the text (cloud-only), or a point's text (progressive).
    stopped: bool = False
    #: A point's expansion ran to the share of the client's ``max_tokens`` it was given
    #: (progressive): the answer was cut by the limit (``finish_reason`` "length").
    length_capped: bool = False
    #: Why the sketches were refused, when the guards sent the request cloud-only.
    sketch_rejected: list[str] = field(default_factory=list)
    #: Why headings were left out of the sketch that was used (see `pice_cloud.guards.repair_sketch`).
    sketch_repaired: list[str] = field(default_factory=list)
    #: Everything the cloud LLM computed for this request, by purpose.
    cloud_work: CloudLedger = field(default_factory=CloudLedger)

    @property
    def cloud_tokens(self) -> int:
        """Tokens the cloud LLM decoded for this request (every purpose; prefill not included)."""
        return self.cloud_work.total.decode_tokens


@dataclass(frozen=True)
class GenerationOptions:
    """A request's own sampling and stop strings; None takes the service's configured default.

    One request's ``seed`` drives every generation it causes, each with its own derived seed
    (`derive_seed`): the cloud-only answer and the sketch use ``seed``, point ``i``'s expansion
    (at an edge, or by the cloud as a fallback) uses ``seed + 1 + i``. The same seed gives the
    same answer; points of one answer do not share a random stream.
    """

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    #: Cut the text at the first of these (each point's text in progressive mode).
    stop: tuple[str, ...] = ()
    #: Per-token log-probabilities with this many alternatives (None: none). Cloud-only answers
    #: only: ``auto`` then answers cloud-only, ``progressive`` and ``sot`` refuse.
    logprobs: int | None = None


#: Offset of the re-sampled sketch's seed (far from the points' seed + 1 + i).
SKETCH_RESAMPLE_SEED_OFFSET = 1 << 20
#: Offset of the seed of the cloud's second try at a point whose expansion the guards refused.
EXPANSION_RESAMPLE_SEED_OFFSET = 3 << 20
#: Offset (times the replica number) of an ensemble replica's seed from its point's seed.
REPLICA_SEED_OFFSET = 1 << 21


def derive_seed(seed: int | None, offset: int) -> int | None:
    """The seed of the ``offset``-th generation of a request seeded with ``seed``."""
    return None if seed is None else (seed + offset) % 2**32


def resampled(base: Sampling, *, min_temperature: float, seed_offset: int, unseeded: int | None = None) -> Sampling:
    """Another sample of what ``base`` samples: at least ``min_temperature`` (greedy decoding
    would write the same text again) and a seed of its own, ``base``'s offset by ``seed_offset``;
    an unseeded ``base`` gets ``unseeded + seed_offset`` (``None``: stays unseeded)."""
    seed = derive_seed(base.seed if base.seed is not None else unseeded, seed_offset)
    return Sampling(temperature=max(base.temperature, min_temperature), top_p=base.top_p, seed=seed,
                    repetition_penalty=base.repetition_penalty)


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one was found."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass(frozen=True)
class AnswerEvent:
    """The complete answer; always the last event."""

    text: str
    stats: AnswerStats
    #: The answer's tokens with their log-probabilities, when asked for (cloud-only answers).
    logprobs: tuple[TokenLogprob, ...] | None = None


Event = SketchEvent | DeltaEvent | PointEvent | AnswerEvent


def too_long_message(chars: int, limit: int, mode: str) -> str:
    """Why a question cannot be answered in ``mode``, and what to do instead."""
    return (f"the question (with its chat history) has {chars} characters; mode {mode!r} sends it to the edges, "
            f"which takes at most {limit} (service.max_question_chars): shorten it, or use mode 'cloud' or 'auto'")


def within_length(entries: tuple[TokenLogprob, ...] | None, length: int) -> tuple[TokenLogprob, ...] | None:
    """The tokens that make up the first ``length`` characters of the text (a stop string cut the rest)."""
    if entries is None:
        return None
    kept, total = [], 0
    for entry in entries:
        if total >= length:
            break
        kept.append(entry)
        total += len(entry.token)
    return tuple(kept)


def render_point(index: int, heading: str, text: str) -> str:
    """One point of the final answer: a numbered, bold heading and its expansion
    (`pice_edge.text.format_point`; `pice_edge.text.parse_points` reads an answer back)."""
    return format_point(index, heading, text)
