"""The one batching engine (`pice_edge._engine.BatchEngine`) on a fake stepping runtime: admission
under a KV-cache budget (first in line is never overtaken; a lone job over the budget still runs),
a failing step fails every job of its batch and the engine keeps serving, the stats, streaming,
letting a job go, whole-batch runtimes, the gathering window, and switching runtimes when idle."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pice_edge._engine import BatchEngine, GenerateBatch, Job, TokenCallback, WaitingLine
from pice_edge.runtimes.base import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Runtime,
    SteppingRuntime,
    StreamingDecodeBatch,
    StreamingRuntime,
)
from tests.conftest import eventually

#: KV-cache bytes the fake runtime estimates per token of a request's budget.
KV_PER_TOKEN = 10


class FakeBatch:
    """One token (its running count) per live sequence per step; a sequence finishes after its
    ``max_new_tokens``. A prompt ``"boom"`` makes the step fail; ``gate`` holds each step until
    the test lets it run."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.rows: dict[object, tuple[GenerationRequest, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, key: object, request: GenerationRequest) -> None:
        self.rows[key] = (request, [])

    def step(self) -> list[tuple[object, GenerationResult]]:
        if self.runtime.gate is not None:
            assert self.runtime.gate.acquire(timeout=30), "the test never let the step run"
        self.runtime.steps.append({r.prompt for r, _ in self.rows.values()})
        if any(r.prompt == "boom" for r, _ in self.rows.values()):
            raise RuntimeError("the model failed")
        finished = []
        for key, (request, tokens) in list(self.rows.items()):
            tokens.append(len(tokens) + 1)
            if len(tokens) >= request.max_new_tokens:
                del self.rows[key]
                finished.append((key, GenerationResult(request.prompt, len(tokens), -0.5)))
        return finished

    def progress(self) -> list[tuple[object, list[int]]]:
        return [(key, list(tokens)) for key, (_, tokens) in self.rows.items()]

    def discard(self, key: object) -> None:
        self.runtime.discarded.append(self.rows.pop(key)[0].prompt)


class FakeRuntime:
    """A `StreamingRuntime` made of `FakeBatch`es (``generate`` is never used by the engine)."""

    name = "fake"

    def __init__(self, model_id: str = "fake", gate: threading.Semaphore | None = None) -> None:
        self.model_id = model_id
        self.gate = gate
        #: The prompts in the batch at every step, and the prompts discarded.
        self.steps: list[set[str]] = []
        self.discarded: list[str] = []
        self.batches_made = 0

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        return messages[-1].content + prefill

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise AssertionError("a stepping runtime is stepped, not asked to generate")

    def close(self) -> None:
        pass

    def new_batch(self) -> FakeBatch:
        self.batches_made += 1
        return FakeBatch(self)

    def kv_cache_bytes(self, request: GenerationRequest) -> int:
        return request.max_new_tokens * KV_PER_TOKEN


class PlainRuntime:
    """A runtime with only ``generate``: whole batches, whose sizes it records."""

    name = "plain"
    model_id = "plain"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        return messages[-1].content + prefill

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.sizes.append(len(requests))
        return [GenerationResult(r.prompt.upper(), r.max_new_tokens, -1.0) for r in requests]

    def close(self) -> None:
        pass


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-engine")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def job(prompt: str, tokens: int, on_tokens: TokenCallback | None = None) -> Job[str]:
    return Job(GenerationRequest(prompt=prompt, max_new_tokens=tokens), prompt, on_tokens)


async def results(jobs: Sequence[Job[str]]) -> list[GenerationResult]:
    return list(await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), timeout=30))


async def run_all(runtime: Runtime, jobs: Sequence[Job[str]], executor: ThreadPoolExecutor,
                  **limits: Any) -> tuple[BatchEngine[str], list[GenerationResult]]:
    """Queue ``jobs`` before the engine starts (so the first admission sees them all), run them to
    the end; the stopped engine and their results."""
    line: WaitingLine[str] = WaitingLine()
    for j in jobs:
        line.put(j)
    engine = BatchEngine(runtime, line, executor, **limits)
    engine.start()
    try:
        return engine, await results(jobs)
    finally:
        await engine.close()


def test_the_fakes_implement_the_protocols() -> None:
    runtime = FakeRuntime()
    assert isinstance(runtime, StreamingRuntime)
    assert isinstance(runtime.new_batch(), StreamingDecodeBatch)
    assert not isinstance(PlainRuntime(), SteppingRuntime)


async def test_admission_fits_the_kv_budget_and_never_lets_a_later_job_overtake(executor: ThreadPoolExecutor) -> None:
    runtime = FakeRuntime()
    # a (60 bytes) and b (50) do not fit 100 together; c (10) would fit beside a but waits behind b.
    jobs = [job("a", 6), job("b", 5), job("c", 1)]
    engine, done = await run_all(runtime, jobs, executor, max_batch=8, memory_budget_bytes=100)
    assert [r.token_count for r in done] == [6, 5, 1]
    assert runtime.steps[:6] == [{"a"}] * 6
    assert runtime.steps[6] == {"b", "c"}  # b and c (60 bytes) together once a freed its memory
    assert engine.stats.peak_batch == 2
    assert engine.stats.joined_running == 0  # b and c started together when nothing ran


async def test_a_lone_job_over_the_budget_still_runs_alone(executor: ThreadPoolExecutor) -> None:
    runtime = FakeRuntime()
    jobs = [job("big1", 3), job("big2", 2)]  # 30 and 20 bytes, each over a 10-byte budget
    engine, done = await run_all(runtime, jobs, executor, memory_budget_bytes=10)
    assert [r.token_count for r in done] == [3, 2]
    assert runtime.steps == [{"big1"}] * 3 + [{"big2"}] * 2
    assert engine.stats.peak_batch == 1


async def test_max_batch_bounds_the_batch(executor: ThreadPoolExecutor) -> None:
    runtime = FakeRuntime()
    engine, _ = await run_all(runtime, [job(f"j{i}", 2) for i in range(5)], executor, max_batch=2)
    assert max(len(s) for s in runtime.steps) == 2
    assert engine.stats.batch_sizes == [2, 2, 2, 2, 1, 1]


async def test_a_failed_step_fails_every_job_of_the_batch_and_the_engine_keeps_serving(
        executor: ThreadPoolExecutor) -> None:
    runtime = FakeRuntime()
    line: WaitingLine[str] = WaitingLine()
    ended: list[list[str]] = []
    engine = BatchEngine(runtime, line, executor, after_step=lambda jobs: ended.append([j.context for j in jobs]))
    doomed = [job("fine", 4), job("boom", 4)]
    for j in doomed:
        line.put(j)
    engine.start()
    try:
        outcome = await asyncio.wait_for(asyncio.gather(*(j.future for j in doomed), return_exceptions=True), 30)
        assert all(isinstance(o, RuntimeError) for o in outcome), outcome
        assert engine.running == 0
        assert engine.stats.failed_steps == 1
        assert engine.stats.steps == 0  # only successful steps count
        assert ended == [["fine", "boom"]]  # the driver hears of every job of the failed batch
        after = job("after", 2)
        line.put(after)
        [result] = await results([after])
    finally:
        await engine.close()
    assert result.token_count == 2
    assert runtime.batches_made == 2  # the poisoned batch was dropped, a fresh one started
    assert ended[-1] == ["after"]


async def test_stats_count_steps_rows_tokens_and_joins(executor: ThreadPoolExecutor) -> None:
    gate = threading.Semaphore(0)
    runtime = FakeRuntime(gate=gate)
    line: WaitingLine[str] = WaitingLine()
    engine = BatchEngine(runtime, line, executor, max_batch=4)
    long = job("long", 5)
    line.put(long)
    engine.start()
    try:
        await eventually(lambda: engine.running == 1, what="the long job to start")
        short = job("short", 2)
        line.put(short)
        gate.release()  # step 1: long alone; short joins at step 2
        await eventually(lambda: engine.running == 2, what="the short job to join")
        for _ in range(10):
            gate.release()
        done = await results([short, long])
    finally:
        await engine.close()
    assert [r.token_count for r in done] == [2, 5]
    assert runtime.steps == [{"long"}, {"long", "short"}, {"long", "short"}, {"long"}, {"long"}]
    stats = engine.stats
    assert stats.steps == 5
    assert stats.batch_sizes == [1, 2, 2, 1, 1]
    assert stats.rows == 7
    assert stats.peak_batch == 2
    assert stats.joined_running == 1
    assert stats.finished == 2
    assert stats.tokens_generated == 7
    assert stats.tokens_per_s > 0


async def test_streaming_and_letting_a_running_job_go(executor: ThreadPoolExecutor) -> None:
    gate = threading.Semaphore(0)
    runtime = FakeRuntime(gate=gate)
    line: WaitingLine[str] = WaitingLine()
    engine = BatchEngine(runtime, line, executor)
    seen: list[list[int]] = []
    streamed = job("streamed", 3, on_tokens=seen.append)
    abandoned = job("abandoned", 100)
    line.put(streamed)
    line.put(abandoned)
    engine.start()
    try:
        gate.release()
        await eventually(lambda: bool(seen), what="the first tokens")
        engine.discard(abandoned)  # its caller went away mid-generation
        assert engine.running == 1
        for _ in range(5):
            gate.release()
        [result] = await results([streamed])
        await eventually(lambda: runtime.discarded == ["abandoned"], what="the batch to let it go")
    finally:
        await engine.close()
    assert seen == [[1], [1, 2]]  # the last tokens come with the result, not as progress
    assert result.token_count == 3
    assert not abandoned.future.done()  # nobody waits for it: it is neither resolved nor failed


async def test_a_runtime_with_only_generate_runs_whole_batches(executor: ThreadPoolExecutor) -> None:
    runtime = PlainRuntime()
    jobs = [job(f"p{i}", 3) for i in range(5)]
    # A plain runtime has no KV estimate: 0 bytes each, so only max_batch bounds its batches.
    engine, done = await run_all(runtime, jobs, executor, max_batch=2, memory_budget_bytes=1)
    assert [r.text for r in done] == [f"P{i}" for i in range(5)]
    assert runtime.sizes == [2, 2, 1]
    assert engine.stats.steps == 3
    assert engine.stats.batch_sizes == [2, 2, 1]
    assert engine.stats.tokens_generated == 15
    assert engine.stats.tokens_per_s > 0


def test_a_whole_batch_lets_a_waiting_request_go_and_fails_on_too_few_results() -> None:
    batch = GenerateBatch(PlainRuntime())
    batch.add(0, GenerationRequest("a", 1))
    batch.add(1, GenerationRequest("b", 1))
    batch.discard(1)
    assert [(key, result.text) for key, result in batch.step()] == [(0, "A")]
    assert len(batch) == 0

    class Short(PlainRuntime):
        def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
            return super().generate(requests)[:-1]

    batch = GenerateBatch(Short())
    batch.add(0, GenerationRequest("a", 1))
    batch.add(1, GenerationRequest("b", 1))
    with pytest.raises(ValueError, match="shorter"):  # the batch fails instead of losing a job
        batch.step()


@pytest.mark.parametrize(("window_s", "first_step"), [(0.0, {"a"}), (30.0, {"a", "b"})])
async def test_the_gathering_window_lets_a_job_that_comes_just_after_share_the_first_step(
        executor: ThreadPoolExecutor, window_s: float, first_step: set[str]) -> None:
    gate = threading.Semaphore(0)
    runtime = FakeRuntime(gate=gate)
    line: WaitingLine[str] = WaitingLine()
    # max_batch 2: a full batch ends the window at once, so the long window costs nothing.
    engine = BatchEngine(runtime, line, executor, max_batch=2, batch_window_s=window_s)
    a, b = job("a", 2), job("b", 2)
    line.put(a)
    engine.start()
    try:
        await eventually(lambda: len(line) == 0, what="the engine to take the first job")
        line.put(b)
        for _ in range(4):
            gate.release()
        await results([a, b])
    finally:
        await engine.close()
    assert runtime.steps[0] == first_step


async def test_the_runtime_changes_only_when_nothing_runs(executor: ThreadPoolExecutor) -> None:
    gate = threading.Semaphore(0)
    old, new = FakeRuntime("old", gate=gate), FakeRuntime("new")

    class Switching(WaitingLine[str]):
        """Switches to ``new`` at the first moment nothing runs (what EdgeNode does for a rollout)."""

        due = False

        def idle(self) -> None:
            if self.due:
                engine.use(new)
                self.due = False

    line = Switching()
    engine = BatchEngine(old, line, executor)
    first = job("first", 3)
    line.put(first)
    engine.start()
    try:
        await eventually(lambda: engine.running == 1, what="the first job to start")
        with pytest.raises(RuntimeError, match="nothing runs"):
            engine.use(new)
        line.due = True
        gate.release(3)
        await results([first])
        second = job("second", 2)
        line.put(second)
        await results([second])
    finally:
        await engine.close()
    assert {p for s in old.steps for p in s} == {"first"}
    assert new.steps == [{"second"}] * 2


async def test_close_cancels_the_running_jobs(executor: ThreadPoolExecutor) -> None:
    gate = threading.Semaphore(0)
    runtime = FakeRuntime(gate=gate)
    line: WaitingLine[str] = WaitingLine()
    engine = BatchEngine(runtime, line, executor)
    running, waiting = job("running", 5), job("waiting", 1)
    line.put(running)
    engine.start()
    await eventually(lambda: engine.running == 1, what="the job to start")
    await engine.close()
    gate.release(10)  # let the step in the thread end
    line.put(waiting)
    assert running.future.cancelled()
    assert engine.running == 0
    assert line.peek() is waiting  # waiting jobs are the source's: the engine leaves them


async def test_a_source_that_raises_stops_the_loop_loudly(executor: ThreadPoolExecutor,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    class Broken(WaitingLine[str]):
        def peek(self) -> Job[str] | None:
            raise ValueError("a task the driver cannot prepare")

    line = Broken()
    line.put(job("x", 1))
    engine = BatchEngine(FakeRuntime(), line, executor, name="broken")
    engine.start()
    try:
        await eventually(lambda: "broken: the batching loop stopped" in caplog.text, what="the loop's error")
    finally:
        await engine.close()


class _Ticks:
    """Stands in for the engine's `time` module: every `perf_counter` call is one second later."""

    def __init__(self) -> None:
        import itertools
        import time

        self.monotonic = time.monotonic
        self._count = itertools.count()

    def perf_counter(self) -> float:
        return float(next(self._count))


async def test_each_sequence_gets_its_prefill_and_a_share_of_every_step(
        executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    import pice_edge._engine as engine_module

    monkeypatch.setattr(engine_module, "time", _Ticks())  # each join and each step takes "1 s"
    runtime = FakeRuntime()
    _, (long, short) = await run_all(runtime, [job("long", 4), job("short", 2)], executor)
    assert runtime.steps == [{"long", "short"}, {"long", "short"}, {"long"}, {"long"}]
    # Prefill 1 each; two shared steps split 0.5/0.5; the last two steps are long's alone.
    assert short.compute_s == pytest.approx(1 + 0.5 + 0.5)
    assert long.compute_s == pytest.approx(1 + 0.5 + 0.5 + 1 + 1)
    # Nothing double-counted: the sequences' seconds add up to the engine's (2 joins + 4 steps).
    assert long.compute_s + short.compute_s == pytest.approx(6)


def test_reported_rate_is_per_sequence_whatever_the_batch() -> None:
    """A step whose cost follows the timing model (b ** BATCH_EXPONENT times a lone step) gives
    the same per-sequence rate at every batch size, so the cloud's placement and the node's
    refusals read one number whether the edge was idle or full when it measured it."""
    from pice_edge.timing import BATCH_EXPONENT, finish_s, per_sequence_rate

    lone_step = 0.05  # 20 tokens/s alone
    for rows in (1, 2, 4, 8):
        elapsed = lone_step * rows**BATCH_EXPONENT
        assert per_sequence_rate(rows, rows, elapsed) == pytest.approx(20.0)  # a decode step
        assert per_sequence_rate(rows, 10 * rows, 10 * elapsed) == pytest.approx(20.0)  # a whole batch
    assert per_sequence_rate(0, 0, 1.0) == 0.0
    # Alone: tokens / rate; behind a full batch of 4: that batch's round first.
    assert finish_s(0, 4, 80, 20.0) == pytest.approx(4.0)
    assert finish_s(4, 4, 80, 20.0) == pytest.approx(4.0 * 4**BATCH_EXPONENT + 4.0)
