"""Continuous batching for the cloud's embedded model: every generation shares decode steps.

Sketches, cloud-only answers, fallback expansions and legacy completions all go through one
`StepEngine`. It owns one decode batch of the runtime (`pice_edge.runtimes.base.SteppingRuntime`,
the step engine the edges use) and runs one loop on the event loop: between two decode steps it
admits waiting requests, oldest first, while the batch has fewer than ``max_batch`` sequences and
their KV caches fit ``memory_budget_bytes``; a request that arrives mid-generation joins at the
next step instead of waiting for the batch to finish (what vLLM, TensorRT-LLM and llama.cpp's
server do). A short request therefore never waits for a long one to end, only for a free slot.

Each step runs on the backend's single model thread, the same one that scores candidates, so the
model is never used by two threads at once; scoring runs between two steps. Streaming callers get
the tokens generated so far after every step. A caller that goes away (a closed stream, a
cancelled request) frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from pice_edge.runtimes.base import DecodeBatch, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

#: Called after each step with the tokens the request has generated so far.
TokenCallback = Callable[[list[int]], None]


class StreamingBatch(DecodeBatch, Protocol):
    """A decode batch that reports progress and lets a sequence go (`pice_edge.runtimes._decode.StepBatch`)."""

    def progress(self) -> list[tuple[object, list[int]]]: ...

    def discard(self, key: object) -> None: ...


class BatchSource(Protocol):
    """What the engine needs of a runtime: a fresh batch and a KV-cache estimate per request."""

    def new_batch(self) -> StreamingBatch: ...

    def kv_cache_bytes(self, request: GenerationRequest) -> int: ...


@dataclass
class EngineStats:
    """Counters for `/metrics` and the benchmarks."""

    steps: int = 0
    #: Requests admitted while other sequences were being generated.
    joined_running: int = 0
    peak_batch: int = 0
    #: Sum over steps of the live sequences (mean batch = rows / steps).
    rows: int = 0


@dataclass
class _Job:
    key: int
    request: GenerationRequest
    future: asyncio.Future[GenerationResult]
    on_tokens: TokenCallback | None
    kv_bytes: int
    sent: int = 0
    started: bool = False


@dataclass
class StepEngine:
    """Continuous batching over one `BatchSource` (see the module docstring).

    Args:
        source: the runtime (it must also provide ``new_batch`` and ``kv_cache_bytes``).
        executor: the model's one worker thread (shared with scoring).
        max_batch: most sequences decoded together.
        memory_budget_bytes: most KV-cache bytes of the sequences in the batch (None: no limit);
            a single request over the budget still runs, alone.
    """

    source: BatchSource
    executor: Executor
    max_batch: int = 8
    memory_budget_bytes: int | None = None
    stats: EngineStats = field(default_factory=EngineStats)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._waiting: deque[_Job] = deque()
        self._live: dict[int, _Job] = {}
        self._keys = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._batch: StreamingBatch | None = None

    @property
    def load(self) -> int:
        """Requests in the batch plus those waiting for a slot."""
        return len(self._live) + len(self._waiting)

    async def generate(self, request: GenerationRequest, on_tokens: TokenCallback | None = None) -> GenerationResult:
        """Generate ``request`` in the shared batch; ``on_tokens`` sees its tokens as they come."""
        loop = asyncio.get_running_loop()
        job = _Job(next(self._keys), request, loop.create_future(), on_tokens, self.source.kv_cache_bytes(request))
        self._waiting.append(job)
        self._start(loop)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self._forget(job)
            raise

    async def close(self) -> None:
        """Stop the loop; requests still waiting or running fail with `asyncio.CancelledError`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for job in [*self._waiting, *self._live.values()]:
            if not job.future.done():
                job.future.cancel()
        self._waiting.clear()
        self._live.clear()

    # --- the loop -------------------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="pice-cloud-step-engine")
        self._wake.set()

    def _forget(self, job: _Job) -> None:
        """The caller went away: drop the job (its slot frees at the next step)."""
        if job in self._waiting:
            self._waiting.remove(job)
        elif self._live.pop(job.key, None) is not None and self._batch is not None:
            batch = self._batch
            # On the model thread, after the step that may be running now.
            self.executor.submit(batch.discard, job.key)

    def _admit(self) -> list[_Job]:
        used = sum(j.kv_bytes for j in self._live.values())
        admitted: list[_Job] = []
        while self._waiting and len(self._live) + len(admitted) < self.max_batch:
            job = self._waiting[0]
            alone = not self._live and not admitted
            if self.memory_budget_bytes is not None and not alone and used + job.kv_bytes > self.memory_budget_bytes:
                break  # oldest first: a big request is not overtaken forever by small ones
            self._waiting.popleft()
            used += job.kv_bytes
            admitted.append(job)
        return admitted

    def _step(self, batch: StreamingBatch, admitted: list[_Job],
              watch: bool) -> tuple[list[tuple[object, GenerationResult]], list[tuple[object, list[int]]]]:
        for job in admitted:
            batch.add(job.key, job.request)
        finished = batch.step()
        return finished, batch.progress() if watch else []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self._waiting and not self._live:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._batch is None:
                self._batch = self.source.new_batch()
            admitted = self._admit()
            if admitted and self._live:
                self.stats.joined_running += len(admitted)
            for job in admitted:
                self._live[job.key] = job
            if not self._live:
                continue
            watch = any(j.on_tokens is not None for j in self._live.values())
            batch = self._batch
            try:
                finished, progress = await loop.run_in_executor(self.executor, self._step, batch, admitted, watch)
            except Exception as exc:
                # A failed step poisons the whole batch's KV cache: fail its requests, start afresh.
                log.exception("cloud model failed on a batch of %d", len(self._live))
                for job in self._live.values():
                    if not job.future.done():
                        job.future.set_exception(exc)
                self._live.clear()
                self._batch = None
                continue
            self.stats.steps += 1
            self.stats.rows += len(self._live)
            self.stats.peak_batch = max(self.stats.peak_batch, len(self._live))
            for key, ids in progress:
                job = self._live.get(key)  # type: ignore[call-overload]
                if job is not None and job.on_tokens is not None and len(ids) > job.sent:
                    job.sent = len(ids)
                    job.on_tokens(ids)
            for key, result in finished:
                job = self._live.pop(key, None)  # type: ignore[call-overload]
                if job is not None and not job.future.done():
                    job.future.set_result(result)


__all__ = ["BatchSource", "EngineStats", "StepEngine", "StreamingBatch", "TokenCallback"]
