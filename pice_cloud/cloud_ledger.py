"""What the cloud's models computed, by purpose: one source of truth for "what did the cloud do".

PICE exists to take work off the cloud, so every forward pass the cloud LLM runs for a request
is counted here, in prefill (prompt) tokens, decode tokens and engine seconds, under the reason
it ran. `pice_cloud.cloud_meter.CloudMeter` is the only way the request path reaches the cloud
LLM, and each of its calls names a purpose and the request's ledger; the meter also keeps a
ledger of everything since start (for ``/metrics``). A request's ledger goes out in the
``pice`` extension of its response, which is what the benchmark and the eval tools read.

Engine seconds are the model's own time for the request's sequences where the engine measures
it (the embedded engine: a sequence's prefill, and an equal share of every batched decode step
it was in, so the sum over requests is the engine's busy time); elsewhere (an HTTP engine, a
stream stopped early) the wall time of the call, which counts waiting and, under load, time
shared with other requests. Prefill tokens are the prompt as the model sees it (chat template
included), counted with the backend's tokenizer where it has one, else estimated; an engine
with prefix caching may compute fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, get_args

#: Why the cloud LLM ran:
#: ``sketch``: the outline; ``resketch``: another outline after the guards refused one;
#: ``first_point``: the answer's opening point, streamed by the cloud while edges expand the rest;
#: ``fallback_expansion``: a point no edge answered in time (or whose candidates were refused);
#: ``fallback_resample``: another expansion after the guard refused the cloud's first;
#: ``cloud_answer``: a whole answer (cloud-only mode, or after refused sketches);
#: ``completion``: a raw prompt continued (the legacy completions endpoint);
#: ``scoring``: the ensemble's cloud log-likelihood of candidates (prefill only).
#: The cloud's sentence-embedding model (MiniLM, forward passes only) is on the ledger too:
#: ``route``: the mode router embeds the question; ``sketch_check``: the sketch guard embeds the
#: question and headings; ``selection``: the ensemble selector embeds a point's candidates.
Purpose = Literal["sketch", "resketch", "first_point", "fallback_expansion", "fallback_resample", "cloud_answer",
                  "completion", "scoring", "route", "sketch_check", "selection"]
PURPOSES: tuple[Purpose, ...] = get_args(Purpose)
#: The purposes run by the embedding model, not the cloud LLM: they are left out of `CloudLedger.total`.
EMBEDDING_PURPOSES: frozenset[Purpose] = frozenset({"route", "sketch_check", "selection"})


@dataclass
class Work:
    """An amount of cloud LLM work."""

    calls: int = 0
    #: Sequences run (a batched call runs several).
    sequences: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: Work) -> None:
        self.calls += other.calls
        self.sequences += other.sequences
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens
        self.seconds += other.seconds

    def as_dict(self) -> dict[str, int | float]:
        return {"calls": self.calls, "sequences": self.sequences, "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens, "seconds": round(self.seconds, 4)}


@dataclass
class CloudLedger:
    """The cloud LLM's work, by purpose (of one request, or of a whole process)."""

    by_purpose: dict[Purpose, Work] = field(default_factory=dict)

    def record(self, purpose: Purpose, work: Work) -> None:
        self.by_purpose.setdefault(purpose, Work()).add(work)

    @property
    def total(self) -> Work:
        """The cloud LLM's work (every purpose but the embedding model's)."""
        return self._sum(lambda purpose: purpose not in EMBEDDING_PURPOSES)

    @property
    def embeddings(self) -> Work:
        """The embedding model's work (`EMBEDDING_PURPOSES`)."""
        return self._sum(lambda purpose: purpose in EMBEDDING_PURPOSES)

    def _sum(self, include: Callable[[Purpose], bool]) -> Work:
        total = Work()
        for purpose, work in self.by_purpose.items():
            if include(purpose):
                total.add(work)
        return total

    def as_dict(self) -> dict[str, dict[str, int | float]]:
        """Purpose -> its work, plus ``total`` (the cloud LLM's) and, when it ran, ``embeddings``
        (the embedding model's); purposes that did not run are left out."""
        out: dict[str, dict[str, int | float]] = {
            purpose: self.by_purpose[purpose].as_dict() for purpose in PURPOSES if purpose in self.by_purpose}
        out["total"] = self.total.as_dict()
        if any(purpose in EMBEDDING_PURPOSES for purpose in self.by_purpose):
            out["embeddings"] = self.embeddings.as_dict()
        return out


#: The ledger of the request whose work runs in this context: for cloud work done behind an
#: interface that does not know the request (the ensemble's scoring pass, inside a `Selector`).
current_ledger: ContextVar[CloudLedger | None] = ContextVar("pice_current_ledger", default=None)
