"""One request end to end, as an async stream of events.

Progressive mode: the cloud LLM writes the sketch -> one task per point goes to the edges the
scheduler chose -> candidates come back through the aggregator -> each point is settled by
the ensemble, or expanded by the cloud itself when its deadline passes -> points are yielded
in order, each as soon as it and all before it are settled.

Cloud-only mode: the cloud LLM answers the question directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from pice_cloud.aggregator import Aggregator, ChosenPoint, PendingRequest
from pice_cloud.fleet import Fleet
from pice_cloud.llm.base import ChatRequest, LLMBackend
from pice_cloud.scheduler import Budget, EdgeView, Mode, RequestedMode, choose_mode, place
from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages
from pice_edge.prompts import clean_expansion, expansion_messages
from pice_edge.protocol import (
    CANDIDATES_FILTER,
    EDGE_STATUS_FILTER,
    Candidate,
    ExpandTask,
    Sampling,
    edge_tasks_topic,
    encode,
)
from pice_edge.runtimes.base import ChatMessage
from pice_edge.transport import MqttTransport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SketchEvent:
    """The outline, as soon as the cloud LLM wrote it."""

    points: list[str]


@dataclass(frozen=True)
class PointEvent:
    """One point's expansion, in point order."""

    point: ChosenPoint
    heading: str


@dataclass
class AnswerStats:
    mode: Mode = "cloud"
    cloud_tokens: int = 0
    edge_tokens: int = 0
    points_edge: int = 0
    points_cloud: int = 0
    sketch_s: float = 0.0
    first_token_s: float = 0.0
    total_s: float = 0.0
    devices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AnswerEvent:
    """The complete answer; always the last event."""

    text: str
    stats: AnswerStats


Event = SketchEvent | PointEvent | AnswerEvent


@dataclass(frozen=True)
class ServiceSettings:
    """Knobs of the request path (the CLI and config map onto these)."""

    budget: Budget = field(default_factory=Budget)
    #: Most tokens of a cloud-only answer.
    max_answer_tokens: int = 400
    ensemble_width: int = 1
    deadline_floor_s: float = 5.0
    deadline_factor: float = 3.0
    deadline_cap_s: float = 60.0
    sampling: Sampling = field(default_factory=Sampling)


def render_point(index: int, heading: str, text: str) -> str:
    """One point of the final answer: a numbered, bold heading and its expansion."""
    return f"{index + 1}. **{heading}** {text}".rstrip()


class PiceService:
    """Answers questions using the cloud LLM and the edge fleet reachable through ``transport``."""

    def __init__(self, llm: LLMBackend, transport: MqttTransport, *, settings: ServiceSettings | None = None,
                 fleet: Fleet | None = None, aggregator: Aggregator | None = None) -> None:
        self.llm = llm
        self.transport = transport
        self.settings = settings or ServiceSettings()
        max_payload = transport.settings.max_payload_bytes
        self.fleet = fleet or Fleet(rejections=transport.rejections, max_payload_bytes=max_payload)
        self.aggregator = aggregator or Aggregator(rejections=transport.rejections, max_payload_bytes=max_payload)
        self.aggregator.add_listener(self._on_candidate)
        transport.subscribe(EDGE_STATUS_FILTER, self.fleet.handle_status)
        transport.subscribe(CANDIDATES_FILTER, self.aggregator.handle_candidate)

    # --- public ----------------------------------------------------------------------------

    async def answer(self, question: str, *, mode: RequestedMode = "auto", max_tokens: int | None = None,
                     messages: Sequence[ChatMessage] | None = None) -> AsyncGenerator[Event, None]:
        """Answer ``question``; yields events and always ends with an `AnswerEvent`.

        ``messages`` is the whole conversation for a cloud-only answer (default: ``question``
        as one user turn); the sketch and expansions work from ``question`` alone.
        """
        started = time.perf_counter()
        edges = self._edge_views()
        chosen_mode = choose_mode(mode, len(edges))
        stats = AnswerStats(mode=chosen_mode)
        if chosen_mode == "cloud":
            limit = min(max_tokens or self.settings.max_answer_tokens, self.settings.max_answer_tokens)
            conversation = list(messages) if messages else [ChatMessage("user", question)]
            [done] = await self.llm.complete([ChatRequest(conversation, max_tokens=limit)])
            stats.cloud_tokens = done.tokens
            stats.total_s = stats.first_token_s = time.perf_counter() - started
            yield AnswerEvent(done.text.strip(), stats)
            return
        # aclosing: when our consumer stops early (a client that disconnected), the inner
        # generator's finally (cancel the supervisor, release edges) runs now, not at GC time.
        async with contextlib.aclosing(self._progressive(question, edges, stats, started)) as events:
            async for event in events:
                yield event

    async def ask(self, question: str, *, mode: RequestedMode = "auto") -> AnswerEvent:
        """Answer ``question`` and return only the final event."""
        final: AnswerEvent | None = None
        async for event in self.answer(question, mode=mode):
            if isinstance(event, AnswerEvent):
                final = event
        assert final is not None
        return final

    # --- progressive path ------------------------------------------------------------------

    async def _progressive(self, question: str, edges: list[EdgeView], stats: AnswerStats,
                           started: float) -> AsyncGenerator[Event, None]:
        budget = self.settings.budget
        sketch_request = ChatRequest(
            sketch_messages(question, max_points=budget.max_points, max_words=budget.max_words),
            max_tokens=budget.sketch_tokens,
            prefill=SKETCH_PREFILL,
        )
        [raw] = await self.llm.complete([sketch_request])
        stats.cloud_tokens += raw.tokens
        points = parse_sketch(raw.text, max_points=budget.max_points, max_words=budget.max_words)
        stats.sketch_s = time.perf_counter() - started
        yield SketchEvent(points)

        request_id = uuid.uuid4().hex[:16]
        placement = place(
            len(points), edges, tokens_per_point=budget.tokens_per_point, width=self.settings.ensemble_width,
            deadline_floor_s=self.settings.deadline_floor_s, deadline_factor=self.settings.deadline_factor,
            deadline_cap_s=self.settings.deadline_cap_s,
        )
        pending = self.aggregator.open(request_id, placement.devices)
        supervisor = asyncio.create_task(self._supervise(question, points, pending, placement.deadlines_s))
        try:
            self._dispatch(request_id, question, points, placement.devices, placement.deadlines_s)
            parts: list[str] = []
            for state in pending.points:
                chosen = await asyncio.shield(state.future)
                if not parts:
                    stats.first_token_s = time.perf_counter() - started
                if chosen.source == "edge":
                    stats.points_edge += 1
                    stats.edge_tokens += chosen.tokens
                    if chosen.device_id and chosen.device_id not in stats.devices:
                        stats.devices.append(chosen.device_id)
                else:
                    stats.points_cloud += 1
                    stats.cloud_tokens += chosen.tokens
                parts.append(render_point(chosen.index, points[chosen.index], chosen.text))
                yield PointEvent(chosen, points[chosen.index])
            stats.total_s = time.perf_counter() - started
            yield AnswerEvent("\n\n".join(parts), stats)
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
            self._release(pending)
            self.aggregator.close(request_id)

    def _dispatch(self, request_id: str, question: str, points: list[str],
                  devices: Sequence[Sequence[str]], deadlines_s: Sequence[float]) -> None:
        now = time.time()
        for index, (targets, wait) in enumerate(zip(devices, deadlines_s, strict=False)):
            for device_id in targets:
                task = ExpandTask(
                    request_id=request_id, point_index=index, question=question, sketch=points,
                    max_new_tokens=self.settings.budget.tokens_per_point, deadline=now + wait,
                    sampling=self.settings.sampling,
                )
                info = self.fleet.get(device_id)
                if info is not None:
                    info.outstanding += 1
                self.transport.publish(edge_tasks_topic(device_id), encode(task))

    async def _supervise(self, question: str, points: list[str], pending: PendingRequest,
                         deadlines_s: Sequence[float]) -> None:
        """Settle points whose edges missed the deadline (or wrote nothing) by cloud expansion."""
        start = time.monotonic()
        due = [start + d for d in deadlines_s]
        while True:
            now = time.monotonic()
            missing = []
            for state, when in zip(pending.points, due, strict=False):
                if state.settled:
                    continue
                exhausted = state.expected and state.expected.issubset(state.received)
                due_now = not state.expected or now >= when or exhausted
                # Take what arrived in time before giving up on the edges.
                if due_now and not pending.settle_from_candidates(state.index):
                    missing.append(state.index)
            if missing:
                await self._cloud_expand(question, points, pending, missing)
                continue
            open_due = [when for state, when in zip(pending.points, due, strict=False) if not state.settled]
            if not open_due:
                return
            pending.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pending.wakeup.wait(), timeout=max(0.0, min(open_due) - time.monotonic()))

    async def _cloud_expand(self, question: str, points: list[str], pending: PendingRequest,
                            indices: list[int]) -> None:
        budget = self.settings.budget.tokens_per_point
        log.info("request %s: cloud expands point(s) %s", pending.request_id, [i + 1 for i in indices])
        requests = [ChatRequest(expansion_messages(question, points, i), max_tokens=budget) for i in indices]
        results = await self.llm.complete(requests)
        for index, res in zip(indices, results, strict=False):
            text = clean_expansion(res.text, truncated=res.tokens >= budget) or points[index]
            pending.settle(ChosenPoint(index, text, "cloud", None, res.tokens, 0))

    # --- fleet bookkeeping -----------------------------------------------------------------

    def _edge_views(self) -> list[EdgeView]:
        return [
            EdgeView(device_id=e.device_id, max_batch=e.status.max_batch, queue_depth=e.status.queue_depth,
                     outstanding=e.outstanding, tokens_per_s=e.status.tokens_per_s)
            for e in self.fleet.live()
        ]

    def _on_candidate(self, candidate: Candidate) -> None:
        info = self.fleet.get(candidate.device_id)
        if info is not None and info.outstanding > 0:
            info.outstanding -= 1

    def _release(self, pending: PendingRequest) -> None:
        # Tasks that never came back no longer count against their edges.
        for state in pending.points:
            for device_id in state.expected - state.received.keys():
                info = self.fleet.get(device_id)
                if info is not None and info.outstanding > 0:
                    info.outstanding -= 1
