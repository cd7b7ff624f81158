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

from pice_cloud.aggregator import Aggregator, ChosenPoint, PendingRequest, PointState
from pice_cloud.ensemble import ConfidenceSelector, SelectionItem, Selector
from pice_cloud.fleet import Fleet
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend
from pice_cloud.router import ModeRouter, Route
from pice_cloud.scheduler import (
    Budget,
    CloudView,
    EdgeView,
    Mode,
    RequestedMode,
    choose_mode,
    ensemble_width,
    place,
    plan_budget,
)
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
    topic_level,
)
from pice_edge.runtimes.base import ChatMessage
from pice_edge.transport import Message, MqttTransport

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
    #: The mode router's P(suits a sketch), when it ran (``auto`` with live edges).
    route_probability: float | None = None


@dataclass(frozen=True)
class AnswerEvent:
    """The complete answer; always the last event."""

    text: str
    stats: AnswerStats


Event = SketchEvent | PointEvent | AnswerEvent


@dataclass(frozen=True)
class ServiceSettings:
    """Knobs of the request path (the CLI and config map onto these)."""

    #: The budget of an idle system; `plan_budget` shortens it under load.
    budget: Budget = field(default_factory=Budget)
    #: Adapt the budget to the load (`plan_budget`); off gives ``budget`` exactly.
    adaptive_budget: bool = True
    #: Most tokens of a cloud-only answer.
    max_answer_tokens: int = 400
    #: Most edges expanding one point (the ensemble); replicas only use free edge slots.
    ensemble_width: int = 1
    #: Requests the cloud LLM batches together (for the scheduler's load estimate).
    cloud_max_batch: int = 1
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
                 fleet: Fleet | None = None, aggregator: Aggregator | None = None,
                 selector: Selector | None = None, router: ModeRouter | None = None) -> None:
        self.llm = llm
        #: Advises cloud-only vs progressive for ``auto`` requests; None: progressive whenever edges are live.
        self.router = router
        self.transport = transport
        self.settings = settings or ServiceSettings()
        self.selector: Selector = selector or ConfidenceSelector()
        #: Requests currently using the cloud LLM, and its measured decode speed.
        self._cloud_busy = 0
        self._cloud_tokens_per_s = 0.0
        #: (request, point, device) -> time.monotonic() of dispatch, for link-delay estimates.
        self._sent_at: dict[tuple[str, int, str], float] = {}
        max_payload = transport.settings.max_payload_bytes
        self.fleet = fleet or Fleet(rejections=transport.rejections, max_payload_bytes=max_payload)
        self.aggregator = aggregator or Aggregator(rejections=transport.rejections, max_payload_bytes=max_payload)
        self.aggregator.add_listener(self._on_candidate)
        self._in_flight: set[PendingRequest] = set()
        transport.subscribe(EDGE_STATUS_FILTER, self._on_status)
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
        route = await self._route(question) if mode == "auto" and edges else None
        chosen_mode = choose_mode(mode, len(edges), None if route is None else route.mode == "progressive")
        stats = AnswerStats(mode=chosen_mode, route_probability=None if route is None else route.probability)
        if chosen_mode == "cloud":
            limit = min(max_tokens or self.settings.max_answer_tokens, self.settings.max_answer_tokens)
            conversation = list(messages) if messages else [ChatMessage("user", question)]
            [done] = await self._complete([ChatRequest(conversation, max_tokens=limit)])
            stats.cloud_tokens = done.tokens
            stats.total_s = stats.first_token_s = time.perf_counter() - started
            yield AnswerEvent(done.text.strip(), stats)
            return
        if chosen_mode == "sot":
            edges = []  # every point is then expanded by the cloud itself, in one batch
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

    # --- mode router ------------------------------------------------------------------------

    async def _route(self, question: str) -> Route | None:
        """Ask the router (in a worker thread: it embeds the question); None without one or on failure."""
        if self.router is None:
            return None
        try:
            return await asyncio.to_thread(self.router.predict, question)
        except Exception:
            # The router only advises; a broken one must not fail the request.
            log.exception("mode router failed; answering progressively")
            return None

    # --- progressive path ------------------------------------------------------------------

    async def _progressive(self, question: str, edges: list[EdgeView], stats: AnswerStats,
                           started: float) -> AsyncGenerator[Event, None]:
        budget = self.settings.budget
        if self.settings.adaptive_budget:
            budget = plan_budget(budget, self._cloud_view(), edges)
        sketch_request = ChatRequest(
            sketch_messages(question, max_points=budget.max_points, max_words=budget.max_words),
            max_tokens=budget.sketch_tokens,
            prefill=SKETCH_PREFILL,
        )
        [raw] = await self._complete([sketch_request])
        stats.cloud_tokens += raw.tokens
        points = parse_sketch(raw.text, max_points=budget.max_points, max_words=budget.max_words)
        stats.sketch_s = time.perf_counter() - started
        yield SketchEvent(points)

        request_id = uuid.uuid4().hex[:16]
        if edges:
            edges = self._edge_views()  # fresher than before the sketch
        width = ensemble_width(len(points), edges, self.settings.ensemble_width)
        placement = place(
            len(points), edges, tokens_per_point=budget.tokens_per_point, width=width,
            deadline_floor_s=self.settings.deadline_floor_s, deadline_factor=self.settings.deadline_factor,
            deadline_cap_s=self.settings.deadline_cap_s, cloud=self._cloud_view(),
        )
        pending = self.aggregator.open(request_id, placement.devices)
        self._in_flight.add(pending)
        supervisor = asyncio.create_task(
            self._supervise(question, points, pending, placement.deadlines_s, budget.tokens_per_point)
        )
        try:
            self._dispatch(request_id, question, points, placement.devices, placement.deadlines_s,
                           budget.tokens_per_point)
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
            self._in_flight.discard(pending)
            self._release(pending)
            self.aggregator.close(request_id)

    def _dispatch(self, request_id: str, question: str, points: list[str],
                  devices: Sequence[Sequence[str]], deadlines_s: Sequence[float], tokens_per_point: int) -> None:
        now = time.time()
        sent = time.monotonic()
        for index, (targets, wait) in enumerate(zip(devices, deadlines_s, strict=False)):
            for device_id in targets:
                task = ExpandTask(
                    request_id=request_id, point_index=index, question=question, sketch=points,
                    max_new_tokens=tokens_per_point, deadline=now + wait,
                    sampling=self.settings.sampling,
                )
                info = self.fleet.get(device_id)
                if info is not None:
                    info.outstanding += 1
                self._sent_at[(request_id, index, device_id)] = sent
                self.transport.publish(edge_tasks_topic(device_id), encode(task))

    async def _supervise(self, question: str, points: list[str], pending: PendingRequest,
                         deadlines_s: Sequence[float], tokens_per_point: int) -> None:
        """Settle points once all their edges answered or their deadline passed: by the ensemble
        when there are several candidates, by cloud expansion when there is none."""
        start = time.monotonic()
        due = [start + d for d in deadlines_s]
        while True:
            now = time.monotonic()
            missing: list[int] = []
            to_choose: list[PointState] = []
            for state, when in zip(pending.points, due, strict=True):
                # A point is due at its deadline, or once none of the edges it still waits for is
                # live (all answered, none was assigned, or the rest went offline: a last will).
                waiting = any(self.fleet.get(d) is not None for d in state.expected - state.received.keys())
                if state.settled or (waiting and now < when):
                    continue
                # Take what arrived in time before giving up on the edges.
                usable = state.usable()
                if not usable:
                    missing.append(state.index)
                elif len(usable) == 1:
                    pending.settle_single(state.index)
                else:
                    to_choose.append(state)
            if to_choose:
                await self._choose(question, points, pending, to_choose, tokens_per_point)
            if missing:
                await self._cloud_expand(question, points, pending, missing, tokens_per_point)
            if to_choose or missing:
                continue
            open_due = [when for state, when in zip(pending.points, due, strict=False) if not state.settled]
            if not open_due:
                return
            pending.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pending.wakeup.wait(), timeout=max(0.0, min(open_due) - time.monotonic()))

    async def _choose(self, question: str, points: list[str], pending: PendingRequest,
                      states: list[PointState], tokens_per_point: int) -> None:
        """Run the ensemble selector over every point that has several candidates."""
        items = [SelectionItem(question, points, s.index, s.usable(), tokens_per_point) for s in states]
        try:
            picks = await self.selector.choose(items)
        except Exception:
            # A broken scorer must not lose the answer: fall back to the edges' own confidence.
            log.exception("request %s: ensemble selection failed; using edge confidence", pending.request_id)
            picks = await ConfidenceSelector().choose(items)
        for item, pick in zip(items, picks, strict=True):
            pending.settle(ChosenPoint.from_candidate(item.candidates[pick], len(item.candidates)))

    async def _cloud_expand(self, question: str, points: list[str], pending: PendingRequest,
                            indices: list[int], tokens_per_point: int) -> None:
        budget = tokens_per_point
        log.info("request %s: cloud expands point(s) %s", pending.request_id, [i + 1 for i in indices])
        requests = [ChatRequest(expansion_messages(question, points, i), max_tokens=budget) for i in indices]
        results = await self._complete(requests)
        for index, res in zip(indices, results, strict=True):
            text = clean_expansion(res.text, truncated=res.tokens >= budget, point=points[index]) or points[index]
            pending.settle(ChosenPoint(index, text, "cloud", None, res.tokens, 0))

    # --- cloud and fleet bookkeeping ---------------------------------------------------------

    async def _complete(self, requests: list[ChatRequest]) -> list[Completion]:
        """Run the cloud LLM, keeping the load and speed figures the scheduler reads."""
        self._cloud_busy += 1
        started = time.perf_counter()
        try:
            results = await self.llm.complete(requests)
        finally:
            self._cloud_busy -= 1
        elapsed = time.perf_counter() - started
        longest = max((r.tokens for r in results), default=0)
        if elapsed > 0 and longest >= 8:
            rate = longest / elapsed  # per-sequence decode speed, as edges report theirs
            prev = self._cloud_tokens_per_s
            self._cloud_tokens_per_s = rate if prev == 0 else 0.7 * prev + 0.3 * rate
        return results

    def _cloud_view(self) -> CloudView:
        return CloudView(queue_depth=self._cloud_busy, tokens_per_s=self._cloud_tokens_per_s,
                         max_batch=self.settings.cloud_max_batch)

    def _edge_views(self) -> list[EdgeView]:
        return [
            EdgeView(device_id=e.device_id, max_batch=e.status.max_batch, queue_depth=e.status.queue_depth,
                     outstanding=e.outstanding, tokens_per_s=e.status.tokens_per_s, link_delay_s=e.link_delay_s)
            for e in self.fleet.live()
        ]

    def _on_status(self, message: Message) -> None:
        device_id = topic_level(message.topic, -2)
        known = self.fleet.get(device_id) is not None
        self.fleet.handle_status(message)
        if known and self.fleet.get(device_id) is None:
            # An edge left (its last will, or a clean shutdown): settle its points now.
            for pending in self._in_flight:
                pending.wakeup.set()

    def _on_candidate(self, candidate: Candidate) -> None:
        info = self.fleet.get(candidate.device_id)
        sent = self._sent_at.pop((candidate.request_id, candidate.point_index, candidate.device_id), None)
        if info is None:
            return
        if info.outstanding > 0:
            info.outstanding -= 1
        if sent is not None:
            # Round trip minus the edge's own time (queue + generation) is the link's share.
            delay = max(0.0, time.monotonic() - sent - candidate.latency_s)
            info.link_delay_s = delay if info.link_delay_s == 0 else 0.8 * info.link_delay_s + 0.2 * delay

    def _release(self, pending: PendingRequest) -> None:
        # Tasks that never came back no longer count against their edges.
        for state in pending.points:
            for device_id in state.expected:
                self._sent_at.pop((pending.request_id, state.index, device_id), None)
            for device_id in state.expected - state.received.keys():
                info = self.fleet.get(device_id)
                if info is not None and info.outstanding > 0:
                    info.outstanding -= 1
