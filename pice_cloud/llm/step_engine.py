"""Continuous batching for the cloud's embedded model: every generation shares decode steps.

Sketches, cloud-only answers, fallback expansions and legacy completions all go through one
`StepEngine`, a thin driver of the project's one batching engine (`pice_edge._engine.BatchEngine`,
the same one the edges run): requests wait in a first-come first-served line, and between two
decode steps the engine admits them while the batch has fewer than ``max_batch`` sequences and
their KV caches fit ``memory_budget_bytes``; a request that arrives mid-generation joins at the
next step instead of waiting for the batch to finish. A short request therefore never waits for a
long one to end, only for a free slot.

Each step runs on the backend's single model thread, the same one that scores candidates, so the
model is never used by two threads at once; scoring runs between two steps. Streaming callers get
the tokens generated so far after every step. A caller that goes away (a closed stream, a
cancelled request) frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from pice_edge._engine import BatchEngine, EngineStats, Job, TokenCallback, WaitingLine
from pice_edge.runtimes.base import GenerationRequest, GenerationResult, Runtime


class StepEngine:
    """Continuous batching over one streaming runtime (see the module docstring).

    Args:
        source: the runtime: a `pice_edge.runtimes.base.StreamingRuntime` decodes step by step and
            streams; any other `Runtime` generates whole batches (its tokens come all at once).
        executor: the model's one worker thread (shared with scoring).
        max_batch: most sequences decoded together.
        memory_budget_bytes: most KV-cache bytes of the sequences in the batch (None: no limit);
            a single request over the budget still runs, alone.
    """

    def __init__(self, source: Runtime, executor: Executor, max_batch: int = 8,
                 memory_budget_bytes: int | None = None) -> None:
        self._line: WaitingLine[None] = WaitingLine()
        self._engine: BatchEngine[None] = BatchEngine(source, self._line, executor, max_batch=max_batch,
                                                      memory_budget_bytes=memory_budget_bytes, name="cloud model")

    @property
    def stats(self) -> EngineStats:
        """Counters for `/metrics` and the benchmarks."""
        return self._engine.stats

    @property
    def max_batch(self) -> int:
        return self._engine.max_batch

    @property
    def memory_budget_bytes(self) -> int | None:
        return self._engine.memory_budget_bytes

    @memory_budget_bytes.setter
    def memory_budget_bytes(self, value: int | None) -> None:
        self._engine.memory_budget_bytes = value  # takes effect at the next admission

    @property
    def load(self) -> int:
        """Requests in the batch plus those waiting for a slot."""
        return self._engine.running + len(self._line)

    async def generate(self, request: GenerationRequest, on_tokens: TokenCallback | None = None) -> GenerationResult:
        """Generate ``request`` in the shared batch; ``on_tokens`` sees its tokens as they come."""
        job: Job[None] = Job(request, None, on_tokens)
        self._line.put(job)
        self._engine.start()  # here, not in __init__: the backend may be built before the event loop runs
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            # The caller went away: drop the job (its slot frees at the next step).
            if not self._line.remove(job):
                self._engine.discard(job)
            raise

    async def close(self) -> None:
        """Stop the loop; requests still waiting or running fail with `asyncio.CancelledError`."""
        await self._engine.close()
        for job in self._line.clear():
            job.future.cancel()


__all__ = ["EngineStats", "StepEngine", "TokenCallback"]
