"""The one batching engine: every in-process model of the project (an edge's runtime, the cloud's
embedded model) generates through a `BatchEngine`.

The engine owns a runtime's decode batch and runs one loop on the event loop. Between two decode
steps it admits waiting jobs, first in line first, while the batch holds fewer than ``max_batch``
sequences and their estimated KV caches fit ``memory_budget_bytes``; a job that arrives while
others are being generated joins at the next step instead of waiting for the batch to finish
(continuous batching, as vLLM, TensorRT-LLM and llama.cpp's server do). A job over the budget
waits first in line until memory frees up (so small jobs never overtake it forever); alone it
runs anyway, since it could never fit otherwise. Each step (the prefill of the jobs that joined
plus one decode step) runs on the caller's worker thread: runtimes stay synchronous and the model
is never used by two threads at once. A step that fails poisons the whole batch's KV cache, so
every job in it fails and the next step starts a fresh batch.

A runtime with only `Runtime.generate` runs through the same loop: its batch (`GenerateBatch`)
generates everything it was given in one step, so it is empty again after each step and the
next jobs form the next batch.

What waits, and in what order, is the driver's: the engine admits from a `JobSource` (the cloud's
first-come first-served `WaitingLine`; the edge's bounded task queue with deadlines and refusals)
and tells the driver, after each step, which jobs ended (``after_step``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from pice_edge.runtimes.base import (
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
    Runtime,
    SteppingRuntime,
    StreamingDecodeBatch,
)
from pice_edge.timing import per_sequence_rate

log = logging.getLogger(__name__)

#: Weight of a new sample in the moving average of the decode rate (new = (1 - w) * old + w * sample):
#: a step's rate swings with the batch's size and prompt lengths, so the figure moves slowly.
RATE_SAMPLE_WEIGHT = 0.1
#: Batch sizes remembered in `EngineStats.batch_sizes`.
BATCH_SIZES_KEPT = 100

C = TypeVar("C")
#: Called after each step with the tokens the job has generated so far.
TokenCallback = Callable[[list[int]], None]


def _new_future() -> asyncio.Future[GenerationResult]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class Job(Generic[C]):
    """One generation: its request, what the driver keeps with it (``context``) and its outcome
    (``future``: the result, the step's exception, or cancelled when the engine closes).

    Create it on the event loop (the future belongs to the running loop).
    """

    request: GenerationRequest
    context: C
    #: Sees the tokens generated so far after every step (streaming).
    on_tokens: TokenCallback | None = None
    future: asyncio.Future[GenerationResult] = field(default_factory=_new_future)
    #: Estimated KV-cache bytes; the engine fills it in the first time it considers the job.
    kv_bytes: int | None = None
    #: The job's key in the decode batch (set when it is admitted).
    key: int = -1
    #: Tokens already passed to ``on_tokens``.
    sent: int = 0
    #: The model's seconds spent on this job so far: its prefill, and an equal share of each step.
    compute_s: float = 0.0


class JobSource(Protocol[C]):
    """Where the engine admits jobs from: the driver's waiting line and its queue policy."""

    def peek(self) -> Job[C] | None:
        """The job first in line, ready to start, or ``None``. It stays first until `pop`: a job
        that does not fit yet is offered again after the next step."""
        ...

    def pop(self) -> Job[C]:
        """Take the job `peek` returned (the engine admits it)."""
        ...

    async def wait(self, timeout: float | None) -> bool:
        """Return ``True`` once a job waits, ``False`` after ``timeout`` seconds (``None``: as long
        as the source likes; returning ``False`` early makes the engine call `idle` again)."""
        ...

    def idle(self) -> None:
        """Nothing runs and nothing is admitted: the moment to switch the runtime (`BatchEngine.use`)."""
        ...


class WaitingLine(Generic[C]):
    """A first-come first-served, unbounded `JobSource` (the cloud's)."""

    def __init__(self) -> None:
        self._jobs: deque[Job[C]] = deque()
        self._added = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job[C]) -> None:
        self._jobs.append(job)
        self._added.set()

    def remove(self, job: Job[C]) -> bool:
        """Take ``job`` out of the line; ``False`` if it is not waiting (admitted, or never put)."""
        try:
            self._jobs.remove(job)
        except ValueError:
            return False
        return True

    def clear(self) -> list[Job[C]]:
        """Empty the line; the jobs that were waiting."""
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs

    def peek(self) -> Job[C] | None:
        return self._jobs[0] if self._jobs else None

    def pop(self) -> Job[C]:
        return self._jobs.popleft()

    async def wait(self, timeout: float | None) -> bool:
        if self._jobs:
            return True
        self._added.clear()
        try:
            await asyncio.wait_for(self._added.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return bool(self._jobs)

    def idle(self) -> None:
        pass


@dataclass
class EngineStats:
    """Counters of a `BatchEngine`, for `/metrics`, node stats and the benchmarks."""

    #: Steps run (for a runtime with only ``generate``: batches).
    steps: int = 0
    #: Steps that failed (every job of the batch failed with them).
    failed_steps: int = 0
    #: Sum over steps of the sequences in the batch (mean batch = rows / steps).
    rows: int = 0
    #: Jobs admitted while other sequences were being generated.
    joined_running: int = 0
    #: Largest number of sequences generated together so far.
    peak_batch: int = 0
    #: Sequences in the batch at each of the last `BATCH_SIZES_KEPT` steps.
    batch_sizes: list[int] = field(default_factory=list)
    #: Jobs that ran to the end (a result), and the tokens they generated.
    finished: int = 0
    tokens_generated: int = 0
    #: Moving average of the decode rate per sequence, normalised to batch 1
    #: (`pice_edge.timing.per_sequence_rate`): what the cloud's placement and the node's
    #: refusals both read.
    tokens_per_s: float = 0.0


class GenerateBatch:
    """A `StreamingDecodeBatch` over a runtime that can only generate whole batches: a step
    generates everything added since the last one, so the batch is empty after every step."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._pending: list[tuple[object, GenerationRequest]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: object, request: GenerationRequest) -> None:
        self._pending.append((key, request))

    def step(self) -> list[tuple[object, GenerationResult]]:
        items, self._pending = self._pending, []
        if not items:
            return []
        results = self._runtime.generate([request for _, request in items])
        # strict: a runtime that returns too few results fails the batch instead of losing jobs.
        return [(key, result) for (key, _), result in zip(items, results, strict=True)]

    def progress(self) -> list[tuple[object, list[int]]]:
        return []  # nothing to show before the one step that generates everything

    def discard(self, key: object) -> None:
        self._pending = [(k, r) for k, r in self._pending if k != key]


class BatchEngine(Generic[C]):
    """Continuous batching of one runtime's generations (see the module docstring).

    Args:
        runtime: the model; a `SteppingRuntime` decodes step by step, any other `Runtime` runs
            whole batches (`GenerateBatch`).
        source: the driver's waiting jobs.
        executor: the model's worker thread (one thread: the runtime is used by one thread only;
            the driver may run other model work on it between steps).
        max_batch: most sequences decoded together.
        memory_budget_bytes: most estimated KV-cache bytes of the sequences in the batch (``None``:
            no limit; a runtime without ``kv_cache_bytes`` counts 0 per sequence).
        batch_window_s: when the engine is idle and a job arrives, how long to wait for more before
            the first step, so jobs that arrive a few milliseconds apart share a prefill.
        after_step: called on the event loop after each step with the jobs that ended in it
            (their futures are done: a result, or the failed step's exception).
        name: what the logs call the model.
    """

    def __init__(self, runtime: Runtime, source: JobSource[C], executor: Executor, *, max_batch: int = 8,
                 memory_budget_bytes: int | None = None, batch_window_s: float = 0.0,
                 after_step: Callable[[list[Job[C]]], None] | None = None, name: str = "model") -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.memory_budget_bytes = memory_budget_bytes
        self.batch_window_s = batch_window_s
        self.stats = EngineStats()
        self._source = source
        self._executor = executor
        self._after_step = after_step
        self._name = name
        self._live: dict[object, Job[C]] = {}
        self._keys = itertools.count()
        self._batch: DecodeBatch | None = None
        self._task: asyncio.Task[None] | None = None
        self.use(runtime)

    @property
    def running(self) -> int:
        """Jobs in the batch (admitted and not ended)."""
        return len(self._live)

    def use(self, runtime: Runtime) -> None:
        """Generate with ``runtime`` from now on; only while nothing runs (`JobSource.idle`)."""
        if self._live:
            raise RuntimeError("the runtime can only change while nothing runs")
        self._runtime = runtime
        # Checked once: isinstance against a runtime-checkable protocol inspects every member.
        self._stepping: SteppingRuntime | None = runtime if isinstance(runtime, SteppingRuntime) else None
        self._batch = None

    def start(self) -> None:
        """Start the loop on the running event loop (no-op while it runs)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._name}-batching")
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        # The loop only ends by `close`; anything else (a driver's source that raised) stops all
        # generation, which must not go unnoticed.
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: the batching loop stopped", self._name, exc_info=task.exception())

    async def close(self) -> None:
        """Stop the loop; the jobs in the batch are cancelled (the source keeps those that wait)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # its end, cancelled or failed (logged by `_ended`)
            self._task = None
        for job in self._live.values():
            job.future.cancel()
        self._live.clear()
        self._batch = None

    def discard(self, job: Job[C]) -> None:
        """Drop an admitted job nobody waits for any more; its slot frees at once. A batch that
        cannot let a sequence go (no ``discard``) decodes it to its end and the result is dropped."""
        if self._live.pop(job.key, None) is None:
            return
        batch = self._batch
        if isinstance(batch, StreamingDecodeBatch):
            # On the model thread, after the step that may be running now.
            self._executor.submit(batch.discard, job.key)

    # --- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            admitted = await self._admit()
            if admitted and self._live:
                self.stats.joined_running += len(admitted)
            for job in admitted:
                job.key = next(self._keys)
                self._live[job.key] = job
            if self._live:
                await self._step(loop, admitted)

    def _kv_bytes(self, job: Job[C]) -> int:
        if job.kv_bytes is None:
            job.kv_bytes = self._stepping.kv_cache_bytes(job.request) if self._stepping is not None else 0
        return job.kv_bytes

    async def _admit(self) -> list[Job[C]]:
        """The jobs that may start now, within ``max_batch`` and the memory budget. When nothing
        runs, wait for a job and then ``batch_window_s`` for more; while a batch runs, take only
        what already waits (the running batch must not wait)."""
        window_end = 0.0
        if not self._live:
            self._source.idle()
            if not await self._source.wait(None):
                return []
            window_end = time.monotonic() + self.batch_window_s
        used = sum(self._kv_bytes(job) for job in self._live.values())
        budget = self.memory_budget_bytes
        admitted: list[Job[C]] = []
        while len(self._live) + len(admitted) < self.max_batch:
            job = self._source.peek()
            if job is None:
                left = window_end - time.monotonic()
                if left > 0 and await self._source.wait(left):
                    continue
                break
            need = self._kv_bytes(job)
            alone = not self._live and not admitted
            if budget is not None and not alone and used + need > budget:
                break  # first in line until memory frees up: a big job is not overtaken forever
            self._source.pop()
            used += need
            admitted.append(job)
        return admitted

    async def _step(self, loop: asyncio.AbstractEventLoop, admitted: list[Job[C]]) -> None:
        if self._batch is None:
            self._batch = self._stepping.new_batch() if self._stepping is not None else GenerateBatch(self._runtime)
        batch = self._batch
        rows = len(self._live)
        watch = any(job.on_tokens is not None for job in self._live.values())
        added: list[tuple[object, GenerationRequest]] = [(job.key, job.request) for job in admitted]
        started = time.perf_counter()
        try:
            finished, progress, timing = await loop.run_in_executor(self._executor, _advance, batch, added, watch)
        except Exception as exc:
            log.exception("%s failed on a batch of %d", self._name, rows)
            failed = list(self._live.values())
            self._live.clear()
            self._batch = None
            self.stats.failed_steps += 1
            for job in failed:
                if not job.future.done():
                    job.future.set_exception(exc)
            self._report(failed)
            return
        self._count(rows, [result for _, result in finished], time.perf_counter() - started)
        prefills, step_s = timing
        share = step_s / rows if rows else 0.0
        for job in self._live.values():
            job.compute_s += share + prefills.get(job.key, 0.0)
        for key, ids in progress:
            watched = self._live.get(key)
            if watched is not None and watched.on_tokens is not None and len(ids) > watched.sent:
                watched.sent = len(ids)
                watched.on_tokens(ids)
        ended: list[Job[C]] = []
        for key, result in finished:
            done = self._live.pop(key, None)
            if done is None:
                continue  # discarded during the step
            if not done.future.done():
                done.future.set_result(dataclasses.replace(result, compute_s=done.compute_s))
            ended.append(done)
        self._report(ended)

    def _report(self, ended: list[Job[C]]) -> None:
        if self._after_step is None or not ended:
            return
        try:
            self._after_step(ended)
        except Exception:
            # The driver's bookkeeping must not stop the loop that serves every other job.
            log.exception("%s: handling the end of %d jobs failed", self._name, len(ended))

    def _count(self, rows: int, results: Sequence[GenerationResult], elapsed: float) -> None:
        stats = self.stats
        stats.steps += 1
        stats.rows += rows
        stats.peak_batch = max(stats.peak_batch, rows)
        stats.batch_sizes.append(rows)
        del stats.batch_sizes[:-BATCH_SIZES_KEPT]
        stats.finished += len(results)
        tokens = sum(result.token_count for result in results)
        stats.tokens_generated += tokens
        # A decode step adds one token to every sequence; a whole-batch step all of their tokens.
        produced = rows if self._stepping is not None else tokens
        rate = per_sequence_rate(rows, produced, elapsed)
        if rate > 0:
            w = RATE_SAMPLE_WEIGHT
            stats.tokens_per_s = rate if stats.tokens_per_s == 0 else (1 - w) * stats.tokens_per_s + w * rate


Timing = tuple[dict[object, float], float]


def _advance(batch: DecodeBatch, added: list[tuple[object, GenerationRequest]], watch: bool,
             ) -> tuple[list[tuple[object, GenerationResult]], list[tuple[object, list[int]]], Timing]:
    """One step on the model thread: the new jobs join, then every sequence advances. Also how
    long each join (its prefill, where the batch prefills on ``add``) and the step took, timed
    here so that waiting for the thread is not counted."""
    prefills: dict[object, float] = {}
    for key, request in added:
        started = time.perf_counter()
        batch.add(key, request)
        prefills[key] = time.perf_counter() - started
    started = time.perf_counter()
    finished = batch.step()
    step_s = time.perf_counter() - started
    progress = batch.progress() if watch and isinstance(batch, StreamingDecodeBatch) else []
    return finished, progress, (prefills, step_s)


__all__ = ["BatchEngine", "EngineStats", "GenerateBatch", "Job", "JobSource", "TokenCallback", "WaitingLine"]
