"""The cloud LLM as the scheduler and the ledger see it: how busy it is, how fast it decodes,
and what it computed.

Every call the request path makes to the cloud LLM goes through `CloudMeter` (`complete`,
`complete_raw`, `stream`), which counts the calls in flight, keeps a moving average of the
per-sequence decode speed (as edges report theirs), so that `CloudMeter.view` gives the
scheduler a fresh `CloudView`, and records each call's work under its purpose in the request's
`CloudLedger` and in the process-wide `CloudMeter.ledger` (`pice_cloud.cloud_ledger`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import Any

from pice_cloud import defaults
from pice_cloud.cloud_ledger import CloudLedger, Purpose, Work, current_ledger
from pice_cloud.ensemble import LikelihoodScorer
from pice_cloud.errors import BackendError
from pice_cloud.llm.base import (
    ChatRequest,
    Completion,
    LLMBackend,
    RawCompleter,
    StreamingBackend,
    TextRequest,
    count_prompt_tokens,
    count_tokens,
)
from pice_cloud.scheduler import CloudView


class CloudMeter:
    """Wraps an `LLMBackend`; measures its load and decode speed."""

    def __init__(self, llm: LLMBackend, *, max_batch: int = defaults.CLOUD_MAX_BATCH) -> None:
        self.llm = llm
        self.max_batch = max_batch
        #: Calls to the cloud LLM in flight (a call may carry a batch of requests).
        self.busy = 0
        #: Moving average of the per-sequence decode speed, tokens/s (0 until measured).
        self.tokens_per_s = 0.0
        #: Everything the cloud LLM computed since start, by purpose (``/metrics``).
        self.ledger = CloudLedger()

    async def complete(self, requests: list[ChatRequest], *, purpose: Purpose,
                       ledger: CloudLedger | None = None) -> list[Completion]:
        """Run ``requests`` on the cloud LLM, recording load, speed and their work under ``purpose``."""
        prefill = sum(self._prompt_tokens(r) for r in requests)
        return await self._metered(self.llm.complete(requests), purpose, ledger, prefill)

    async def complete_raw(self, requests: list[TextRequest], *, purpose: Purpose = "completion",
                           ledger: CloudLedger | None = None) -> list[Completion]:
        """Continue raw prompts (the backend must be a `RawCompleter`), recording load, speed and work."""
        if not isinstance(self.llm, RawCompleter):
            raise BackendError(f"the {self.llm.name} backend cannot continue raw prompts; use /v1/chat/completions")
        prefill = sum(count_tokens(self.llm, r.prompt) for r in requests)
        return await self._metered(self.llm.complete_raw(requests), purpose, ledger, prefill)

    async def stream(self, request: ChatRequest, *, purpose: Purpose,
                     ledger: CloudLedger | None = None) -> AsyncGenerator[str | Completion, None]:
        """Stream one continuation (the backend must be a `StreamingBackend`), recording load,
        speed and work (also when the consumer stops early: what was decoded was computed)."""
        if not isinstance(self.llm, StreamingBackend):
            raise BackendError(f"the {self.llm.name} backend cannot stream")
        self.busy += 1
        started = time.perf_counter()
        text, tokens, compute = "", 0, None
        try:
            # aclosing: a consumer that stops early stops the generation now, not at GC time.
            async with contextlib.aclosing(self.llm.stream(request)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, Completion):
                        tokens, compute = piece.tokens, piece.compute_s
                        self._sample(piece.tokens, time.perf_counter() - started)
                    else:
                        text += piece
                    yield piece
        finally:
            self.busy -= 1
            decoded = tokens or (count_tokens(self.llm, text) if text else 0)
            # A stream stopped early never got its engine time: its wall time stands in.
            seconds = compute if compute is not None else time.perf_counter() - started
            self._record(purpose, ledger, Work(1, 1, self._prompt_tokens(request), decoded, seconds))

    def metered_scorer(self, scorer: LikelihoodScorer) -> LikelihoodScorer:
        """``scorer`` (the cloud LLM scoring candidates for the ensemble) with its prefill on the
        ledgers, under ``scoring``: the process's, and the request's (`current_ledger`)."""
        return _MeteredScorer(self, scorer)

    def metered_embedder(self, embedder: Any, purpose: Purpose) -> MeteredEmbedder:
        """``embedder`` (the cloud's sentence-embedding model, e.g. `pice_cloud.embeddings.Embedder`)
        with each ``encode`` on the ledgers under ``purpose``: the process's, and the request's
        (`current_ledger`, which `asyncio.to_thread` carries into the worker thread)."""
        return MeteredEmbedder(self, embedder, purpose)

    def record(self, purpose: Purpose, work: Work, ledger: CloudLedger | None = None) -> None:
        """Put ``work`` on the process's ledger and on ``ledger`` (default: `current_ledger`'s)."""
        self._record(purpose, ledger, work)

    def _record(self, purpose: Purpose, ledger: CloudLedger | None, work: Work) -> None:
        ledger = ledger if ledger is not None else current_ledger.get()
        self.ledger.record(purpose, work)
        if ledger is not None:
            ledger.record(purpose, work)

    def _prompt_tokens(self, request: ChatRequest) -> int:
        return count_prompt_tokens(self.llm, request.messages) + (count_tokens(self.llm, request.prefill)
                                                                  if request.prefill else 0)

    @property
    def streams(self) -> bool:
        """Whether the backend can stream tokens."""
        return isinstance(self.llm, StreamingBackend)

    async def _metered(self, call: Awaitable[list[Completion]], purpose: Purpose, ledger: CloudLedger | None,
                       prefill: int) -> list[Completion]:
        self.busy += 1
        started = time.perf_counter()
        try:
            results = await call
        finally:
            self.busy -= 1
        elapsed = time.perf_counter() - started
        self._sample(max((r.tokens for r in results), default=0), elapsed)
        measured = [r.compute_s for r in results]
        seconds = sum(m for m in measured if m is not None) if results and None not in measured else elapsed
        self._record(purpose, ledger, Work(1, len(results), prefill, sum(r.tokens for r in results), seconds))
        return results

    def _sample(self, longest: int, elapsed: float) -> None:
        if elapsed <= 0 or longest < defaults.MIN_RATE_SAMPLE_TOKENS:
            return
        rate = longest / elapsed  # per-sequence speed: a batch's sequences decode side by side
        w = defaults.CLOUD_RATE_SAMPLE_WEIGHT
        self.tokens_per_s = rate if self.tokens_per_s == 0 else (1 - w) * self.tokens_per_s + w * rate

    def view(self) -> CloudView:
        """The scheduler's snapshot of the cloud LLM now."""
        return CloudView(queue_depth=self.busy, tokens_per_s=self.tokens_per_s, max_batch=self.max_batch)


class _MeteredScorer:
    """A `LikelihoodScorer` whose prefill goes on the cloud's ledgers."""

    def __init__(self, meter: CloudMeter, scorer: LikelihoodScorer) -> None:
        self._meter, self._scorer = meter, scorer

    async def score(self, requests: Sequence[ChatRequest], continuations: Sequence[str]) -> list[float]:
        started = time.perf_counter()
        self._meter.busy += 1
        try:
            scores = await self._scorer.score(requests, continuations)
        finally:
            self._meter.busy -= 1
        prefill = sum(self._meter._prompt_tokens(r) + count_tokens(self._meter.llm, c)
                      for r, c in zip(requests, continuations, strict=True))
        self._meter._record("scoring", None, Work(1, len(requests), prefill, 0, time.perf_counter() - started))
        return scores


class MeteredEmbedder:
    """A sentence embedder whose ``encode`` calls go on the cloud's ledgers (its other
    attributes are the wrapped embedder's)."""

    def __init__(self, meter: CloudMeter, embedder: Any, purpose: Purpose) -> None:
        self._meter, self._embedder, self._purpose = meter, embedder, purpose

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)

    def encode(self, texts: Sequence[str]) -> Any:
        started = time.perf_counter()
        counted = getattr(self._embedder, "encode_counted", None)
        if counted is not None:
            vectors, tokens = counted(texts)
        else:
            vectors, tokens = self._embedder.encode(texts), 0
        self._meter.record(self._purpose, Work(1, len(texts), tokens, 0, time.perf_counter() - started))
        return vectors
