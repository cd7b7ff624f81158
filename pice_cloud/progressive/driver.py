"""Carries out one progressive request's actions on asyncio: publishes its tasks, runs the
cloud's expansions and the ensemble selector, wakes the request at its deadlines, and lets the
answer await its points in order. The decisions are `ProgressiveRequest`'s; this is the I/O."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pice_cloud.cloud_ledger import Purpose, current_ledger
from pice_cloud.ensemble import ConfidenceSelector, Selector
from pice_cloud.events import ChosenPoint
from pice_cloud.progressive.cloud_text import CloudExpander
from pice_cloud.progressive.planner import PlannedTask
from pice_cloud.progressive.request import (
    Action,
    Choose,
    ExpandInCloud,
    ProgressiveRequest,
    Reject,
    SendTask,
    Settle,
)
from pice_edge.rejects import Rejections

log = logging.getLogger(__name__)

#: A small margin past a deadline, so the tick that runs at a wake-up sees it passed.
_WAKE_SLACK_S = 0.01


@dataclass(frozen=True)
class RejectionCounters:
    """Where each kind of `Reject` is counted."""

    protocol: Rejections
    candidate_guard: Rejections
    cloud_guard: Rejections

    def record(self, reject: Reject) -> None:
        getattr(self, reject.kind).record(reject.topic, reject.reason, reject.detail)


class RequestDriver:
    """Runs one `ProgressiveRequest` until every point is settled (or it is cancelled).

    ``publish`` sends a task to its edge; ``clock`` must be the request's fleet clock.
    """

    def __init__(self, request: ProgressiveRequest, *, publish: Callable[[PlannedTask], None],
                 expander: CloudExpander, selector: Selector, counters: RejectionCounters,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.request = request
        self._publish = publish
        self._expander = expander
        self._selector = selector
        self._counters = counters
        self._clock = clock
        self._work: list[ExpandInCloud | Choose] = []
        #: The cloud's expansion under way for each point: an edge's candidate that settles the
        #: point first cancels it (the engine frees its slot at the next step).
        self._in_cloud: dict[int, asyncio.Task[tuple[str, int]]] = {}
        #: Cloud expansions stopped because an edge settled their point first.
        self.cloud_cancelled = 0
        self._expanding: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._points: list[asyncio.Future[ChosenPoint]] = [loop.create_future() for _ in range(request.plan.n_points)]

    def feed(self, actions: list[Action]) -> None:
        """Carry out ``actions`` (synchronous ones now; model work in `run`'s loop)."""
        for action in actions:
            if isinstance(action, SendTask):
                self._publish(action.task)
            elif isinstance(action, Settle):
                future = self._points[action.point.index]
                if not future.done():
                    future.set_result(action.point)
                job = self._in_cloud.get(action.point.index)
                if job is not None and not job.done() and action.point.source == "edge":
                    job.cancel()
                    self.cloud_cancelled += 1
            elif isinstance(action, Reject):
                self._counters.record(action)
            else:
                self._work.append(action)
        if actions:
            self._wakeup.set()

    async def point(self, index: int) -> ChosenPoint:
        """Point ``index`` once it is settled."""
        return await asyncio.shield(self._points[index])

    async def run(self) -> None:
        """Drive the request until every point is settled; cancel it to stop early. If the
        cloud fails (a backend error while it expands a point), the points still waited for
        fail with that error, so the answer ends with it instead of waiting forever."""
        try:
            await self._run()
        except Exception as exc:
            for future in self._points:
                if not future.done():
                    future.set_exception(exc)
            raise

    async def _run(self) -> None:
        request = self.request
        try:
            while True:
                self.feed(request.tick(self._clock()))
                while self._work:
                    work = self._work.pop(0)
                    if isinstance(work, ExpandInCloud):
                        # Concurrently: the engine batches them, and the selector need not wait.
                        task = asyncio.create_task(self._expand(work))
                        self._expanding.add(task)
                        task.add_done_callback(self._expanded)
                    else:
                        await self._choose(work)
                if self._failure is not None:
                    raise self._failure
                if request.done or request.closed:
                    return
                await self._sleep()
        finally:
            for task in self._expanding:
                task.cancel()

    def _expanded(self, task: asyncio.Task[None]) -> None:
        self._expanding.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()
        self._wakeup.set()

    async def _sleep(self) -> None:
        """Until new work, a failure, or the request's next deadline."""
        wake = self.request.next_wakeup()
        self._wakeup.clear()
        if self._work or self._failure is not None:
            return
        timeout = None if wake is None else max(0.0, wake - self._clock()) + _WAKE_SLACK_S
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)

    async def _choose(self, work: Choose) -> None:
        request = self.request
        # A selector that has the cloud score candidates puts that work on this request's ledger.
        scope = current_ledger.set(request.ledger)
        try:
            picks = await self._selector.choose(work.items)
        except Exception:
            # A broken scorer must not lose the answer: fall back to the edges' own confidence.
            log.exception("request %s: ensemble selection failed; using edge confidence", request.request_id)
            picks = await ConfidenceSelector().choose(work.items)
        finally:
            current_ledger.reset(scope)
        for item, pick in zip(work.items, picks, strict=True):
            self.feed(request.on_choice(item.index, pick, self._clock()))

    async def _expand(self, work: ExpandInCloud) -> None:
        request = self.request
        log.info("request %s: cloud expands point(s) %s%s", request.request_id, [i + 1 for i in work.points],
                 " again (the guard refused the first)" if work.attempt else "")
        purpose: Purpose = "fallback_resample" if work.attempt else "fallback_expansion"
        jobs = {index: asyncio.create_task(self._expander.expand_one(
                    request.question, request.headings, index, request.tokens_per_point, sampling,
                    purpose=purpose, ledger=request.ledger))
                for index, sampling in zip(work.points, work.samplings, strict=True)}
        self._in_cloud.update(jobs)
        try:
            await asyncio.wait(jobs.values())
        finally:
            for index, job in jobs.items():
                job.cancel()  # no-op when done; stops the work if we are cancelled ourselves
                if self._in_cloud.get(index) is job:
                    del self._in_cloud[index]
        texts: dict[int, tuple[str, int]] = {}
        for index, job in jobs.items():
            if job.cancelled():
                texts[index] = ("", 0)  # settled by an edge meanwhile: the request ignores it
            else:
                texts[index] = job.result()  # a backend error propagates (see `run`)
        self.feed(request.on_cloud_texts(work, texts, self._clock()))
