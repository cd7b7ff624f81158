"""The cloud LLM as the scheduler sees it: how busy it is and how fast it decodes.

Every call the request path makes to the cloud LLM goes through `CloudMeter.complete`, which
counts the calls in flight and keeps a moving average of the per-sequence decode speed (as
edges report theirs), so that `CloudMeter.view` gives the scheduler a fresh `CloudView`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable

from pice_cloud import defaults
from pice_cloud.errors import BackendError
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend, RawCompleter, StreamingBackend, TextRequest
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

    async def complete(self, requests: list[ChatRequest]) -> list[Completion]:
        """Run ``requests`` on the cloud LLM, recording load and speed."""
        return await self._metered(self.llm.complete(requests))

    async def complete_raw(self, requests: list[TextRequest]) -> list[Completion]:
        """Continue raw prompts (the backend must be a `RawCompleter`), recording load and speed."""
        if not isinstance(self.llm, RawCompleter):
            raise BackendError(f"the {self.llm.name} backend cannot continue raw prompts; use /v1/chat/completions")
        return await self._metered(self.llm.complete_raw(requests))

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Completion, None]:
        """Stream one continuation (the backend must be a `StreamingBackend`), recording load and speed."""
        if not isinstance(self.llm, StreamingBackend):
            raise BackendError(f"the {self.llm.name} backend cannot stream")
        self.busy += 1
        started = time.perf_counter()
        try:
            # aclosing: a consumer that stops early stops the generation now, not at GC time.
            async with contextlib.aclosing(self.llm.stream(request)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, Completion):
                        self._sample(piece.tokens, time.perf_counter() - started)
                    yield piece
        finally:
            self.busy -= 1

    @property
    def streams(self) -> bool:
        """Whether the backend can stream tokens."""
        return isinstance(self.llm, StreamingBackend)

    async def _metered(self, call: Awaitable[list[Completion]]) -> list[Completion]:
        self.busy += 1
        started = time.perf_counter()
        try:
            results = await call
        finally:
            self.busy -= 1
        self._sample(max((r.tokens for r in results), default=0), time.perf_counter() - started)
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
