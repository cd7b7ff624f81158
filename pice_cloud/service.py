"""One request end to end, as an async stream of events.

Progressive mode: the cloud LLM writes the sketch (here, with its guards) -> the planner
places the points on edges (`pice_cloud.progressive`) -> a `ProgressiveRequest` owns the
points until each is settled (by an edge's candidate, the ensemble, or the cloud itself when a
deadline passes), its `RequestDriver` carries out what it decides, and the `Inbox` routes
candidates and refusals to it -> points are yielded in order, each as soon as it and all before
it are settled.

Cloud-only mode: the cloud LLM answers the question directly.

This module keeps the mode choice, the sketch, the subscriptions and the event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from pice_cloud import defaults
from pice_cloud.cloud_ledger import CloudLedger, current_ledger
from pice_cloud.cloud_meter import CloudMeter
from pice_cloud.config import ServiceConfig
from pice_cloud.ensemble import ConfidenceSelector, LearnedSelector, Selector
from pice_cloud.errors import InputTooLongError, SketchError, UnavailableInModeError
from pice_cloud.events import (
    SKETCH_RESAMPLE_SEED_OFFSET,
    AnswerEvent,
    AnswerStats,
    DeltaEvent,
    Event,
    GenerationOptions,
    PointEvent,
    SketchEvent,
    apply_stop,
    render_point,
    resampled,
    too_long_message,
    within_length,
)
from pice_cloud.fleet import Fleet
from pice_cloud.guards import (
    MIN_POINTS,
    Embed,
    check_sketch,
    drop_repeated_opening,
    repair_sketch,
    sketch_outline,
    sketch_rejection_reason,
)
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend, TextRequest
from pice_cloud.progressive import (
    CloudExpander,
    Inbox,
    PlannedTask,
    PointSampling,
    ProgressiveRequest,
    RejectionCounters,
    RequestDriver,
    eligible,
    expansion_check,
    first_point_in_cloud,
    plan_request,
)
from pice_cloud.replica import LiveReplicas
from pice_cloud.router import EmbeddingRouter, ModeRouter, Route
from pice_cloud.scheduler import Budget, EdgeView, RequestedMode, choose_mode, plan_budget
from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages
from pice_edge.errors import ProtocolError
from pice_edge.protocol import (
    CLOUD_STATUS_FILTER,
    EDGE_STATUS_FILTER,
    FLEET_ROLLOUT_TOPIC,
    ExpandTask,
    FleetRollout,
    Sampling,
    cloud_candidates_filter,
    cloud_refusals_filter,
    decode,
    edge_tasks_topic,
    encode,
    topic_level,
)
from pice_edge.rejects import Rejections
from pice_edge.runtimes.base import ChatMessage
from pice_edge.transport import Message, MqttTransport

if TYPE_CHECKING:
    from pice_cloud.embeddings import Embedder

log = logging.getLogger(__name__)


class PiceService:
    """Answers questions using the cloud LLM and the edge fleet reachable through ``transport``.

    Orchestration only: the router and scheduler choose the mode and budget, the planner places
    points, a `ProgressiveRequest` per request settles them (and alone writes the fleet's
    dispatch accounting), the `Inbox` routes candidates to it, and `CloudMeter` measures the
    cloud LLM. Build it with `pice_cloud.bootstrap.start_system`;
    used directly, subscriptions are made when ``transport`` connects. ``sketcher``, when given,
    writes the sketches instead of ``llm`` (``llm.sketch_model``); everything else stays on ``llm``.
    """

    def __init__(self, llm: LLMBackend, transport: MqttTransport, *, config: ServiceConfig | None = None,
                 fleet: Fleet | None = None, inbox: Inbox | None = None,
                 selector: Selector | None = None, router: ModeRouter | None = None,
                 cloud_max_batch: int | None = None, embed: Embed | None = None,
                 cloud_id: str | None = None, sketcher: LLMBackend | None = None) -> None:
        self.llm = llm
        #: This replica's id: tasks name it (``reply_to``) and edges answer on its own topics.
        #: Default: the transport's MQTT client id.
        self.cloud_id = cloud_id or transport.client_id
        #: Advises cloud-only vs progressive for ``auto`` requests; None: progressive whenever edges are live.
        self.router = router
        self.transport = transport
        self.config = config or ServiceConfig()
        self.selector: Selector = selector or ConfidenceSelector()
        self.cloud = CloudMeter(llm) if cloud_max_batch is None else CloudMeter(llm, max_batch=cloud_max_batch)
        #: Writes the sketches: a separate model (``llm.sketch_model``, e.g. a fine-tuned sketcher or a
        #: LoRA adapter on the same server) or the cloud LLM itself.
        self.sketch_cloud = self.cloud if sketcher is None else CloudMeter(sketcher, max_batch=self.cloud.max_batch)
        if isinstance(self.selector, LearnedSelector) and self.selector.scorer is not None:
            # The ensemble's scoring pass is cloud work too: on the ledger, under "scoring".
            self.selector.scorer = self.cloud.metered_scorer(self.selector.scorer)
        max_payload = transport.settings.max_payload_bytes
        self.fleet = fleet or Fleet(rejections=transport.rejections, max_payload_bytes=max_payload)
        #: Routes candidates and refusals to the requests in flight.
        self.inbox = inbox or Inbox(rejections=transport.rejections, max_payload_bytes=max_payload)
        #: The cloud's own expansions of points (whole, or streamed as an answer's opening).
        self.expander = CloudExpander(self.cloud)
        #: Sentence embeddings for the sketch guard's near-duplicate check (None: shared words only).
        self.embed = embed
        self._meter_embeddings()
        #: Sketches refused by the guards, by reason (``pice_sketch_rejected_total``).
        self.sketch_rejections = Rejections()
        #: Sketches used after leaving faulty headings out, by the first reason
        #: (``pice_sketch_repaired_total``).
        self.sketch_repairs = Rejections()
        #: The cloud's own expansions refused by the guards (``pice_cloud_expansion_rejected_total``).
        self.cloud_expansion_rejections = Rejections()
        transport.add_subscription(EDGE_STATUS_FILTER, self._on_status)
        transport.add_subscription(cloud_candidates_filter(self.cloud_id), self.inbox.handle_candidate)
        transport.add_subscription(cloud_refusals_filter(self.cloud_id), self.inbox.handle_refusal)
        #: The cloud replicas sharing the broker's edges, this one included (they share the
        #: edges' free slots for ensembles).
        self.replicas = LiveReplicas(self.cloud_id)
        transport.add_subscription(CLOUD_STATUS_FILTER, self.replicas.watch)
        #: The fleet's model rollout in progress (retained on the broker), if any.
        self.rollout: FleetRollout | None = None
        transport.add_subscription(FLEET_ROLLOUT_TOPIC, self._on_rollout)
        transport.on_connect(self._on_reconnect)
        transport.on_disconnect(self._on_disconnect)

    # --- public ----------------------------------------------------------------------------

    async def answer(self, question: str, *, mode: RequestedMode = "auto", max_tokens: int | None = None,
                     messages: Sequence[ChatMessage] | None = None,
                     options: GenerationOptions | None = None) -> AsyncGenerator[Event, None]:
        """Answer ``question``; yields events and always ends with an `AnswerEvent`.

        ``messages`` is the whole conversation for a cloud-only answer (default: ``question``
        as one user turn); the sketch and expansions work from ``question`` alone. ``options``
        are the request's sampling and stop strings (see `GenerationOptions`).
        """
        options = options or GenerationOptions()
        started = time.perf_counter()
        fits = len(question) <= self.config.max_question_chars
        if not fits and mode in ("progressive", "sot"):
            raise InputTooLongError(too_long_message(len(question), self.config.max_question_chars, mode))
        if options.logprobs is not None:
            if mode in ("progressive", "sot"):
                raise UnavailableInModeError(f"logprobs are available for cloud-only answers; mode {mode!r} writes "
                                             "the answer from several models' expansions: use mode 'cloud' or 'auto'")
            mode = "cloud"  # the caller wants the tokens' probabilities: the cloud answers alone
        edges = self._eligible()
        work = CloudLedger()
        route = await self._route(question, work) if mode == "auto" and edges and fits else None
        chosen_mode = choose_mode(mode, len(edges), None if route is None else route.mode == "progressive",
                                  question_fits=fits)
        stats = AnswerStats(mode=chosen_mode, route_probability=None if route is None else route.probability,
                            cloud_work=work)
        if chosen_mode == "cloud":
            async for event in self._cloud_answer(question, messages, max_tokens, options, stats, started):
                yield event
            return
        if chosen_mode == "sot":
            edges = []  # every point is then expanded by the cloud itself, in one batch
        # aclosing: when our consumer stops early (a client that disconnected), the inner
        # generator's finally (cancel the supervisor, release edges) runs now, not at GC time.
        progressive = self._progressive(question, edges, stats, started, options, messages, max_tokens)
        async with contextlib.aclosing(progressive) as events:
            async for event in events:
                yield event

    async def complete_text(self, prompt: str, *, max_tokens: int | None = None,
                            options: GenerationOptions | None = None) -> AsyncGenerator[Event, None]:
        """Continue a raw prompt with the cloud LLM (the legacy completions endpoint: always
        cloud-only); yields one `AnswerEvent`."""
        options = options or GenerationOptions()
        started = time.perf_counter()
        limit = min(max_tokens or self.config.max_answer_tokens, self.config.max_answer_tokens)
        sampling = self._sampling(options)
        stats = AnswerStats(mode="cloud")
        [done] = await self.cloud.complete_raw([TextRequest(prompt, max_tokens=limit, temperature=sampling.temperature,
                                                            top_p=sampling.top_p, seed=sampling.seed)],
                                               ledger=stats.cloud_work)
        stats.total_s = stats.first_token_s = time.perf_counter() - started
        text, stats.stopped = apply_stop(done.text, options.stop)
        yield AnswerEvent(text, stats)

    def cloud_ledgers(self) -> list[CloudLedger]:
        """What the cloud LLM(s) computed since start, by purpose: the answering model's ledger,
        and the sketch model's when a separate one writes the sketches."""
        meters = [self.cloud] if self.sketch_cloud is self.cloud else [self.cloud, self.sketch_cloud]
        return [meter.ledger for meter in meters]

    async def ask(self, question: str, *, mode: RequestedMode = "auto") -> AnswerEvent:
        """Answer ``question`` and return only the final event."""
        final: AnswerEvent | None = None
        async for event in self.answer(question, mode=mode):
            if isinstance(event, AnswerEvent):
                final = event
        assert final is not None
        return final

    def _meter_embeddings(self) -> None:
        # The embedding model's passes are cloud CPU as well: on the ledger, by purpose. Each
        # runs in a worker thread started with `asyncio.to_thread`, which carries the request's
        # `current_ledger` along.
        if isinstance(self.router, EmbeddingRouter) and self.router.embedder is not None:
            # A proxy: every attribute but the metered ``encode`` is the embedder's own.
            self.router.embedder = cast("Embedder", self.cloud.metered_embedder(self.router.embedder, "route"))
        if isinstance(self.selector, LearnedSelector) and self.selector.embedder is not None:
            self.selector.embedder = self.cloud.metered_embedder(self.selector.embedder, "selection")
        if self.embed is not None:
            owner = getattr(self.embed, "__self__", None)  # a bound `Embedder.encode`: its model
            embedder = owner if owner is not None and hasattr(owner, "encode_counted") else SimpleNamespace(
                encode=self.embed)
            self.embed = self.cloud.metered_embedder(embedder, "sketch_check").encode

    # --- mode router ------------------------------------------------------------------------

    async def _route(self, question: str, ledger: CloudLedger) -> Route | None:
        """Ask the router (in a worker thread: it embeds the question, on ``ledger``); None
        without one or on failure."""
        if self.router is None:
            return None
        scope = current_ledger.set(ledger)
        try:
            return await asyncio.to_thread(self.router.predict, question)
        except Exception:
            # The router only advises; a broken one must not fail the request.
            log.exception("mode router failed; answering progressively")
            return None
        finally:
            current_ledger.reset(scope)

    # --- progressive path ------------------------------------------------------------------

    async def _sketch(self, question: str, budget: Budget, options: GenerationOptions,
                      stats: AnswerStats) -> list[str] | None:
        """The sketch's headings, or None when it failed the guards twice (the reasons are in
        ``stats.sketch_rejected`` and counted in `sketch_rejections`)."""
        base = self._sampling(options)
        attempts = 2 if self.config.sketch_guard else 1
        # The form a sketch must have, decoded under where the engine can (`sketch_format`).
        outline = (sketch_outline(budget.max_points, budget.max_words)
                   if self.config.sketch_format == "constrained" else None)
        for attempt in range(attempts):
            sampling = base if attempt == 0 else resampled(
                base, min_temperature=defaults.SKETCH_RESAMPLE_TEMPERATURE, seed_offset=SKETCH_RESAMPLE_SEED_OFFSET,
                unseeded=attempt)
            request = ChatRequest(
                sketch_messages(question, max_points=budget.max_points, max_words=budget.max_words),
                max_tokens=budget.sketch_tokens, prefill=SKETCH_PREFILL,
                temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, outline=outline,
            )
            [raw] = await self.sketch_cloud.complete([request], purpose="resketch" if attempt else "sketch",
                                                     ledger=stats.cloud_work)
            try:
                points = parse_sketch(raw.text, max_points=budget.max_points)
            except SketchError:
                if not self.config.sketch_guard:
                    raise
                points = []
            if not self.config.sketch_guard:
                return points
            if self.embed is not None:
                scope = current_ledger.set(stats.cloud_work)
                try:
                    problems = await asyncio.to_thread(check_sketch, question, points, embed=self.embed)
                finally:
                    current_ledger.reset(scope)
            else:
                problems = check_sketch(question, points)
            reason = sketch_rejection_reason(problems)
            if reason is None:
                return points
            repaired = repair_sketch(points, problems, min_points=MIN_POINTS)
            if repaired is not None:
                # Cheaper and as good as a second sketch: every heading kept passed every check.
                stats.sketch_repaired.append(reason)
                self.sketch_repairs.record("sketch", reason, "; ".join(p.detail for p in problems[:3]))
                log.info("sketch repaired (%s): %s -> %s", reason, points, repaired)
                return repaired
            stats.sketch_rejected.append(reason)
            self.sketch_rejections.record("sketch", reason, "; ".join(p.detail for p in problems[:3]))
            log.info("sketch refused (%s)%s: %s", reason, "" if attempt else ", sampling another", points)
        return None

    async def _cloud_answer(self, question: str, messages: Sequence[ChatMessage] | None, max_tokens: int | None,
                            options: GenerationOptions, stats: AnswerStats,
                            started: float) -> AsyncGenerator[Event, None]:
        """The cloud LLM answers the conversation itself (cloud-only mode, or a refused sketch)."""
        limit = min(max_tokens or self.config.max_answer_tokens, self.config.max_answer_tokens)
        conversation = list(messages) if messages else [ChatMessage("user", question)]
        sampling = self._sampling(options)
        request = ChatRequest(conversation, max_tokens=limit, temperature=sampling.temperature, top_p=sampling.top_p,
                              seed=sampling.seed, logprobs=options.logprobs)
        # With logprobs the answer arrives whole (its tokens' probabilities with it).
        if not self.cloud.streams or options.logprobs is not None:
            [done] = await self.cloud.complete([request], purpose="cloud_answer", ledger=stats.cloud_work)
            stats.total_s = stats.first_token_s = time.perf_counter() - started
            cut, stats.stopped = apply_stop(done.text, options.stop)
            yield AnswerEvent(cut.strip(), stats, within_length(done.token_logprobs, len(cut)))
            return
        # Stream, holding back what could still change: leading and trailing whitespace (the
        # answer is stripped) and a tail that could be the start of a stop string.
        hold = max((len(s) for s in options.stop), default=1) - 1
        raw, sent = "", ""
        pieces = contextlib.aclosing(self.cloud.stream(request, purpose="cloud_answer", ledger=stats.cloud_work))
        async with pieces as stream:
            async for piece in stream:
                if isinstance(piece, Completion):
                    continue  # its tokens are counted in the ledger by the meter
                raw += piece
                cut, stopped = apply_stop(raw, options.stop)
                visible = cut.lstrip()
                if not stopped and hold:
                    visible = visible[: max(0, len(visible) - hold)]
                visible = visible.rstrip()
                if len(visible) > len(sent):
                    if not sent:
                        stats.first_token_s = time.perf_counter() - started
                    yield DeltaEvent(visible[len(sent):])
                    sent = visible
                if stopped:
                    break  # closing the stream stops the generation
        text, stats.stopped = apply_stop(raw, options.stop)
        text = text.strip()
        if len(text) > len(sent):
            if not sent:
                stats.first_token_s = time.perf_counter() - started
            yield DeltaEvent(text[len(sent):])
        stats.total_s = time.perf_counter() - started
        yield AnswerEvent(text, stats)

    def _sampling(self, options: GenerationOptions) -> Sampling:
        """The sampling of a request's answer or sketch."""
        return PointSampling.of(self.config, options).request()

    async def _progressive(self, question: str, edges: list[EdgeView], stats: AnswerStats, started: float,
                           options: GenerationOptions, messages: Sequence[ChatMessage] | None,
                           max_tokens: int | None) -> AsyncGenerator[Event, None]:
        budget = Budget.from_config(self.config)
        if self.config.adaptive_budget:
            budget = plan_budget(budget, self.cloud.view(), edges)
        points = await self._sketch(question, budget, options, stats)
        stats.sketch_s = time.perf_counter() - started
        if points is None:
            # Two sketches failed the guards: the cloud answers alone rather than send a broken
            # outline to the edges.
            stats.mode = "cloud"
            async for event in self._cloud_answer(question, messages, max_tokens, options, stats, started):
                yield event
            return
        yield SketchEvent(points)

        scheduling = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        if edges:
            edges = self._eligible(len(points))  # fresher than before the sketch
        sampling = PointSampling.of(self.config, options)
        tokens = budget.point_tokens(len(points), max_tokens)
        capped = tokens < budget.point_tokens(len(points))  # the client's max_tokens binds
        plan = plan_request(len(points), edges, config=self.config, sampling=sampling, tokens_per_point=tokens,
                            cloud=self.cloud.view(), replicas=self.replicas.count(), replica_id=self.cloud_id,
                            first_in_cloud=first_point_in_cloud(self.config, n_points=len(points),
                                                                cloud_streams=self.cloud.streams,
                                                                has_stop=bool(options.stop)))
        request = ProgressiveRequest(request_id, question, points, plan, fleet=self.fleet, edges=self._eligible,
                                     config=self.config, sampling=sampling, tokens_per_point=tokens,
                                     check=expansion_check(question, points) if self.config.expansion_guard else None,
                                     ledger=stats.cloud_work)

        def publish(task: PlannedTask) -> None:
            self.transport.publish(edge_tasks_topic(task.device_id), encode(ExpandTask(
                request_id=request_id, point_index=task.point, question=question, sketch=points,
                max_new_tokens=tokens, deadline=time.time() + task.deadline_s, sampling=task.sampling,
                reply_to=self.cloud_id)))

        driver = RequestDriver(request, publish=publish, expander=self.expander, selector=self.selector,
                               counters=RejectionCounters(self.inbox.rejections, self.inbox.quality,
                                                          self.cloud_expansion_rejections))
        self.inbox.open(request, driver.feed)
        supervisor: asyncio.Task[None] | None = None
        try:
            driver.feed(request.start(time.monotonic()))
            supervisor = asyncio.create_task(driver.run())
            stats.schedule_s = time.perf_counter() - scheduling
            streamed = ""
            for index in sorted(plan.self_served):
                async for piece, text, spent in self.expander.stream(question, points, index, tokens,
                                                                     sampling.point(index), ledger=stats.cloud_work):
                    if piece:
                        if not streamed:
                            stats.first_token_s = stats.first_text_s = time.perf_counter() - started
                        streamed += piece
                        yield DeltaEvent(piece)
                    if text is not None:
                        driver.feed(request.on_self_served(index, text, spent))
            parts: list[str] = []
            # The answer's opening is the first point's heading, known since the sketch: it goes
            # out now, so a reader sees the answer start at sketch time + scheduling instead of
            # after the slowest candidate of point 1, at no cloud cost. Its text follows as a
            # delta of its own when the point is settled.
            headed = -1
            if not streamed and points:
                headed = 0
                stats.first_token_s = time.perf_counter() - started
                yield DeltaEvent(render_point(0, points[0], ""))
            said: list[str] = []  # the points' texts so far, as the answer gives them
            for index in range(len(points)):
                chosen = await driver.point(index)
                if index not in plan.self_served and said:
                    # Each point was written alone: a frame its writer copied from an earlier
                    # point ("In addition to <point 1>, ...") shows only now, in the answer.
                    opened = drop_repeated_opening(chosen.text, said)
                    if opened != chosen.text:
                        chosen = dataclasses.replace(chosen, text=opened)
                if not parts and not streamed and headed < 0:
                    stats.first_token_s = time.perf_counter() - started
                if index == 0 and stats.first_text_s == 0.0:
                    stats.first_text_s = time.perf_counter() - started
                if chosen.source == "edge":
                    stats.points_edge += 1
                    stats.edge_tokens += chosen.tokens
                    if chosen.device_id and chosen.device_id not in stats.devices:
                        stats.devices.append(chosen.device_id)
                else:
                    stats.points_cloud += 1
                stopped = False
                if options.stop:
                    text, stopped = apply_stop(chosen.text, options.stop)
                    if stopped:
                        stats.stopped = True
                        chosen = dataclasses.replace(chosen, text=text.rstrip())
                if capped and not stopped and chosen.tokens >= tokens:
                    stats.length_capped = True
                said.append(chosen.text)
                parts.append(render_point(chosen.index, points[chosen.index], chosen.text))
                if chosen.index == headed:
                    if chosen.text:
                        yield DeltaEvent(" " + chosen.text)
                    yield PointEvent(chosen, points[chosen.index], streamed=True)
                else:
                    yield PointEvent(chosen, points[chosen.index], streamed=chosen.index in plan.self_served)
            stats.total_s = time.perf_counter() - started
            yield AnswerEvent("\n\n".join(parts), stats)
        finally:
            if supervisor is not None:
                supervisor.cancel()
                await asyncio.gather(supervisor, return_exceptions=True)
            self.inbox.close(request_id)
            request.close()

    # --- fleet events ------------------------------------------------------------------------

    def _on_status(self, message: Message) -> None:
        device_id = topic_level(message.topic, -2)
        known = self.fleet.get(device_id) is not None
        lost_before = self.fleet.lost_before(device_id)
        self.fleet.handle_status(message)
        if known and self.fleet.get(device_id) is None:
            # An edge left (its last will, or a clean shutdown): its points move on now.
            self.inbox.edge_gone(device_id)
        elif self.fleet.lost_before(device_id) != lost_before:
            # Its queue was empty after an outage of ours: the tasks it had not answered are lost.
            self.inbox.tasks_lost(device_id)

    def _eligible(self, points: int = 0) -> list[EdgeView]:
        """The edges a point may go to now (`pice_cloud.progressive.eligible`)."""
        return eligible(self.fleet.views(), expander_model=self.config.expander_model, rollout=self.rollout,
                        points=points)

    def _on_rollout(self, message: Message) -> None:
        if not message.payload:
            self.rollout = None
            return
        try:
            self.rollout = decode(FleetRollout, message.payload, max_bytes=self.transport.settings.max_payload_bytes)
        except ProtocolError as exc:
            self.transport.rejections.record("rollout", exc.kind, str(exc))

    def _on_disconnect(self) -> None:
        # We cannot hear the broker: that says nothing about the edges. None expires and none is
        # scheduled until we are back, and the requests in flight stop their deadline clocks.
        self.fleet.disconnected()
        self.inbox.disconnected()

    def _on_reconnect(self) -> None:
        # Back (or connected for the first time). The edges we knew get a grace to re-announce
        # themselves; candidates they wrote meanwhile arrive now if the broker kept our session
        # (persistence), and a task or candidate it lost shows as an edge with an empty queue.
        settings = self.transport.settings
        away = self.fleet.reconnected(retry_min_s=max(1.0, round(settings.reconnect_min_s)),
                                      retry_max_s=max(1.0, round(settings.reconnect_max_s)))
        if self.transport.connect_count > 1:
            log.warning("back on the broker after %.1fs; it %s", away,
                        "kept our session: what was sent to us meanwhile arrives now" if self.transport.session_present
                        else "had lost our session (a restart without persistence?): candidates sent to us before we "
                             "re-subscribed are lost, and their points move on when their edges report an empty queue")
        self.inbox.reconnected()
