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
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence

from pice_cloud import defaults
from pice_cloud.aggregator import Aggregator, CandidateCheck, ChosenPoint, PendingRequest
from pice_cloud.cloud_meter import CloudMeter
from pice_cloud.config import ServiceConfig
from pice_cloud.ensemble import ConfidenceSelector, Selector
from pice_cloud.errors import InputTooLongError, SketchError, UnavailableInModeError
from pice_cloud.events import (
    REPLICA_SEED_OFFSET,
    SKETCH_RESAMPLE_SEED_OFFSET,
    AnswerEvent,
    AnswerStats,
    DeltaEvent,
    Event,
    GenerationOptions,
    PointEvent,
    SketchEvent,
    apply_stop,
    derive_seed,
    render_point,
    resampled,
    too_long_message,
    within_length,
)
from pice_cloud.fleet import Fleet
from pice_cloud.guards import MIN_POINTS, Embed, check_expansion, check_sketch, repair_sketch, sketch_rejection_reason
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend, TextRequest, count_tokens
from pice_cloud.router import ModeRouter, Route
from pice_cloud.scheduler import Budget, EdgeView, RequestedMode, choose_mode, ensemble_width, place, plan_budget
from pice_cloud.settling import PointSettler
from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages
from pice_edge.errors import ProtocolError
from pice_edge.prompts import SYSTEM_PROMPT, clean_expansion, expansion_messages, format_sketch, settled_sentences
from pice_edge.protocol import (
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
    runs,
    topic_level,
)
from pice_edge.rejects import Rejections
from pice_edge.runtimes.base import ChatMessage
from pice_edge.transport import Message, MqttTransport

log = logging.getLogger(__name__)


class PiceService:
    """Answers questions using the cloud LLM and the edge fleet reachable through ``transport``.

    Orchestration only: the scheduler decides, the fleet keeps the edges' state and dispatch
    accounting, the aggregator collects candidates, `PointSettler` settles points, and
    `CloudMeter` measures the cloud LLM. Build it with `pice_cloud.bootstrap.start_system`;
    used directly, subscriptions are made when ``transport`` connects. ``sketcher``, when given,
    writes the sketches instead of ``llm`` (``llm.sketch_model``); everything else stays on ``llm``.
    """

    def __init__(self, llm: LLMBackend, transport: MqttTransport, *, config: ServiceConfig | None = None,
                 fleet: Fleet | None = None, aggregator: Aggregator | None = None,
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
        max_payload = transport.settings.max_payload_bytes
        self.fleet = fleet or Fleet(rejections=transport.rejections, max_payload_bytes=max_payload)
        self.aggregator = aggregator or Aggregator(rejections=transport.rejections, max_payload_bytes=max_payload)
        self.aggregator.add_listener(self.fleet.candidate_received)
        self._in_flight: set[PendingRequest] = set()
        #: Sentence embeddings for the sketch guard's near-duplicate check (None: shared words only).
        self.embed = embed
        #: Sketches refused by the guards, by reason (``pice_sketch_rejected_total``).
        self.sketch_rejections = Rejections()
        #: Sketches used after leaving faulty headings out, by the first reason
        #: (``pice_sketch_repaired_total``).
        self.sketch_repairs = Rejections()
        #: The cloud's own expansions refused by the guards (``pice_cloud_expansion_rejected_total``).
        self.cloud_expansion_rejections = Rejections()
        transport.add_subscription(EDGE_STATUS_FILTER, self._on_status)
        transport.add_subscription(cloud_candidates_filter(self.cloud_id), self.aggregator.handle_candidate)
        transport.add_subscription(cloud_refusals_filter(self.cloud_id), self._on_refusal)
        #: The fleet's model rollout in progress (retained on the broker), if any.
        self.rollout: FleetRollout | None = None
        transport.add_subscription(FLEET_ROLLOUT_TOPIC, self._on_rollout)
        transport.on_connect(self._on_reconnect)

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
        route = await self._route(question) if mode == "auto" and edges and fits else None
        chosen_mode = choose_mode(mode, len(edges), None if route is None else route.mode == "progressive",
                                  question_fits=fits)
        stats = AnswerStats(mode=chosen_mode, route_probability=None if route is None else route.probability)
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
        sampling = self._sampling(options, 0)
        [done] = await self.cloud.complete_raw([TextRequest(prompt, max_tokens=limit, temperature=sampling.temperature,
                                                            top_p=sampling.top_p, seed=sampling.seed)])
        stats = AnswerStats(mode="cloud", cloud_tokens=done.tokens)
        stats.total_s = stats.first_token_s = time.perf_counter() - started
        text, stats.stopped = apply_stop(done.text, options.stop)
        yield AnswerEvent(text, stats)

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

    async def _sketch(self, question: str, budget: Budget, options: GenerationOptions,
                      stats: AnswerStats) -> list[str] | None:
        """The sketch's headings, or None when it failed the guards twice (the reasons are in
        ``stats.sketch_rejected`` and counted in `sketch_rejections`)."""
        base = self._sampling(options, 0)
        attempts = 2 if self.config.sketch_guard else 1
        for attempt in range(attempts):
            sampling = base if attempt == 0 else resampled(
                base, min_temperature=defaults.SKETCH_RESAMPLE_TEMPERATURE, seed_offset=SKETCH_RESAMPLE_SEED_OFFSET,
                unseeded=attempt)
            request = ChatRequest(
                sketch_messages(question, max_points=budget.max_points, max_words=budget.max_words),
                max_tokens=budget.sketch_tokens, prefill=SKETCH_PREFILL,
                temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
            )
            [raw] = await self.sketch_cloud.complete([request])
            stats.cloud_tokens += raw.tokens
            try:
                points = parse_sketch(raw.text, max_points=budget.max_points)
            except SketchError:
                if not self.config.sketch_guard:
                    raise
                points = []
            if not self.config.sketch_guard:
                return points
            problems = await asyncio.to_thread(check_sketch, question, points, embed=self.embed) \
                if self.embed is not None else check_sketch(question, points)
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
        sampling = self._sampling(options, 0)
        request = ChatRequest(conversation, max_tokens=limit, temperature=sampling.temperature, top_p=sampling.top_p,
                              seed=sampling.seed, logprobs=options.logprobs)
        # With logprobs the answer arrives whole (its tokens' probabilities with it).
        if not self.cloud.streams or options.logprobs is not None:
            [done] = await self.cloud.complete([request])
            stats.cloud_tokens += done.tokens
            stats.total_s = stats.first_token_s = time.perf_counter() - started
            cut, stats.stopped = apply_stop(done.text, options.stop)
            yield AnswerEvent(cut.strip(), stats, within_length(done.token_logprobs, len(cut)))
            return
        # Stream, holding back what could still change: leading and trailing whitespace (the
        # answer is stripped) and a tail that could be the start of a stop string.
        hold = max((len(s) for s in options.stop), default=1) - 1
        raw, sent, tokens = "", "", 0
        pieces = contextlib.aclosing(self.cloud.stream(request))
        async with pieces as stream:
            async for piece in stream:
                if isinstance(piece, Completion):
                    tokens = piece.tokens
                    continue
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
        stats.cloud_tokens += tokens if tokens else count_tokens(self.llm, raw)
        stats.total_s = time.perf_counter() - started
        yield AnswerEvent(text, stats)

    def _sampling(self, options: GenerationOptions, offset: int) -> Sampling:
        """The sampling of a request's ``offset``-th generation (0: answer or sketch; 1 + i: point i)."""
        return Sampling(
            temperature=self.config.temperature if options.temperature is None else options.temperature,
            top_p=self.config.top_p if options.top_p is None else options.top_p,
            seed=derive_seed(options.seed, offset),
        )

    def _replica_sampling(self, first: Sampling, replica: int) -> Sampling:
        """The sampling of a point's ``replica``-th candidate: the first keeps the request's, the
        others sample at least at ``ensemble_temperature`` with seeds of their own, so that a
        greedy request still gets candidates that differ."""
        if replica == 0:
            return first
        # An unseeded request's replicas stay unseeded.
        return resampled(first, min_temperature=self.config.ensemble_temperature,
                         seed_offset=REPLICA_SEED_OFFSET * replica)

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
        # The cloud streams the first point itself while the edges expand the others: the answer
        # starts as soon as the sketch is written (not with a stop string: a cut must not be
        # streamed before it is known).
        first = 1 if (self.config.first_point == "cloud" and self.cloud.streams and len(points) > 1
                      and not options.stop) else 0
        width = ensemble_width(len(points) - first, edges, self.config.ensemble_width)
        placement = place(
            len(points) - first, edges, tokens_per_point=budget.tokens_per_point, width=width,
            deadline_floor_s=self.config.deadline_floor_s, deadline_factor=self.config.deadline_factor,
            deadline_cap_s=self.config.deadline_cap_s, cloud=self.cloud.view(),
        )
        devices = [(), *placement.devices] if first else list(placement.devices)
        deadlines_s = [0.0, *placement.deadlines_s] if first else list(placement.deadlines_s)
        pending = self.aggregator.open(request_id, devices,
                                       self._candidate_check(question, points) if self.config.expansion_guard else None,
                                       self_served=range(first))
        self._in_flight.add(pending)
        def point_sampling(index: int, replica: int = 0) -> Sampling:
            return self._replica_sampling(self._sampling(options, 1 + index), replica)

        settler = PointSettler(self.fleet, self.selector, self.cloud, point_sampling, self.cloud_expansion_rejections)

        def replace(index: int, avoid: frozenset[str]) -> tuple[str, float] | None:
            return self._replace(request_id, question, points, index, avoid, budget.tokens_per_point,
                                 point_sampling(index))

        supervisor = asyncio.create_task(
            settler.run(question, points, pending, deadlines_s, budget.tokens_per_point, replace)
        )
        try:
            self._dispatch(request_id, question, points, devices, deadlines_s, budget.tokens_per_point,
                           point_sampling)
            stats.schedule_s = time.perf_counter() - scheduling
            if first:
                streamed = ""
                async for piece, text, tokens in self._stream_point(question, points, 0, budget.tokens_per_point,
                                                                    point_sampling(0)):
                    if piece:
                        if not streamed:
                            stats.first_token_s = time.perf_counter() - started
                        streamed += piece
                        yield DeltaEvent(piece)
                    if text is not None:
                        pending.settle(ChosenPoint(0, text, "cloud", None, tokens, 0))
            parts: list[str] = []
            for state in pending.points:
                chosen = await asyncio.shield(state.future)
                if not parts and not first:
                    stats.first_token_s = time.perf_counter() - started
                if chosen.source == "edge":
                    stats.points_edge += 1
                    stats.edge_tokens += chosen.tokens
                    if chosen.device_id and chosen.device_id not in stats.devices:
                        stats.devices.append(chosen.device_id)
                else:
                    stats.points_cloud += 1
                    stats.cloud_tokens += chosen.tokens
                if options.stop:
                    text, stopped = apply_stop(chosen.text, options.stop)
                    if stopped:
                        stats.stopped = True
                        chosen = dataclasses.replace(chosen, text=text.rstrip())
                parts.append(render_point(chosen.index, points[chosen.index], chosen.text))
                yield PointEvent(chosen, points[chosen.index], streamed=chosen.index < first)
            stats.total_s = time.perf_counter() - started
            yield AnswerEvent("\n\n".join(parts), stats)
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
            self._in_flight.discard(pending)
            self._release(pending)
            self.aggregator.close(request_id)

    async def _stream_point(self, question: str, points: list[str], index: int, tokens_per_point: int,
                            sampling: Sampling) -> AsyncGenerator[tuple[str, str | None, int], None]:
        """The cloud expands point ``index`` and streams it: yields ``(piece, None, 0)`` as whole
        sentences settle (`pice_edge.prompts.clean_expansion`, then `settled_sentences`, on the
        text so far), the first piece opening with the point's rendered heading; then
        ``(rest, text, tokens)``: ``text`` is the point's final text, and the pieces add up to
        ``render_point(index, heading, text)`` exactly, so a streamed answer and a whole one match."""
        request = ChatRequest(expansion_messages(question, points, index), max_tokens=tokens_per_point,
                              temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
        heading = points[index]
        opening = render_point(index, heading, "") + " "
        raw, sent, tokens = "", "", 0
        async with contextlib.aclosing(self.cloud.stream(request)) as stream:
            async for piece in stream:
                if isinstance(piece, Completion):
                    tokens = piece.tokens
                    continue
                raw += piece
                cleaned = settled_sentences(clean_expansion(raw, truncated=False, point=heading))
                if len(cleaned) > len(sent) and cleaned.startswith(sent):
                    yield (opening if not sent else "") + cleaned[len(sent):], None, 0
                    sent = cleaned
        final = clean_expansion(raw, truncated=tokens >= tokens_per_point, point=heading) or heading
        if not sent:
            yield opening + final, final, tokens
        elif final.startswith(sent):
            yield final[len(sent):], final, tokens
        else:  # the clean-up of the whole text changed what went out: keep what went out
            yield "", sent, tokens

    @staticmethod
    def _candidate_check(question: str, points: list[str]) -> CandidateCheck:
        """The expansion guard of one request (`pice_cloud.guards.check_expansion`)."""
        outline = format_sketch(points)

        def check(point_index: int, text: str, other_texts: Sequence[str]) -> str | None:
            return check_expansion(text, point=points[point_index], question=question,
                                   other_texts=other_texts, prompt_texts=(outline, SYSTEM_PROMPT))

        return check

    def _dispatch(self, request_id: str, question: str, points: list[str], devices: Sequence[Sequence[str]],
                  deadlines_s: Sequence[float], tokens_per_point: int,
                  sampling: Callable[[int, int], Sampling]) -> None:
        for index, (targets, wait) in enumerate(zip(devices, deadlines_s, strict=False)):
            for replica, device_id in enumerate(targets):
                self._send(request_id, question, points, index, device_id, wait, tokens_per_point,
                           sampling(index, replica))

    def _send(self, request_id: str, question: str, points: list[str], index: int, device_id: str,
              deadline_s: float, tokens_per_point: int, sampling: Sampling) -> None:
        task = ExpandTask(
            request_id=request_id, point_index=index, question=question, sketch=points,
            max_new_tokens=tokens_per_point, deadline=time.time() + deadline_s, sampling=sampling,
            reply_to=self.cloud_id,
        )
        self.fleet.task_sent(request_id, index, device_id)
        self.transport.publish(edge_tasks_topic(device_id), encode(task))

    def _replace(self, request_id: str, question: str, points: list[str], index: int, avoid: frozenset[str],
                 tokens_per_point: int, sampling: Sampling) -> tuple[str, float] | None:
        """Send point ``index`` to the live edge (not in ``avoid``) predicted to finish it first,
        if one has a free slot now; its deadline, as at first placement."""
        edges = [e for e in self._eligible() if e.device_id not in avoid and e.free_slots > 0]
        if not edges:
            return None
        placement = place(1, edges, tokens_per_point=tokens_per_point, deadline_floor_s=self.config.deadline_floor_s,
                          deadline_factor=self.config.deadline_factor, deadline_cap_s=self.config.deadline_cap_s)
        [targets], [deadline_s] = placement.devices, placement.deadlines_s
        if not targets:
            return None
        self._send(request_id, question, points, index, targets[0], deadline_s, tokens_per_point, sampling)
        return targets[0], deadline_s

    # --- fleet events ------------------------------------------------------------------------

    def _on_status(self, message: Message) -> None:
        device_id = topic_level(message.topic, -2)
        known = self.fleet.get(device_id) is not None
        self.fleet.handle_status(message)
        if known and self.fleet.get(device_id) is None:
            # An edge left (its last will, or a clean shutdown): settle its points now.
            for pending in self._in_flight:
                pending.wakeup.set()

    def _eligible(self, points: int = 0) -> list[EdgeView]:
        """The edges a point may go to: those running ``expander_model`` (when set); during a
        rollout of that model, only those already on the new build when they have room for
        ``points`` points (the rest are still switching)."""
        want = self.config.expander_model
        name, _, build = want.partition("@") if want else ("", "", "")
        edges = self.fleet.views((lambda s: runs(s.model_id, name, build or None)) if want else None)
        rollout = self.rollout
        if rollout is not None and (not want or (rollout.model == name and not build)):
            on_target = self.fleet.views(lambda s: runs(s.model_id, rollout.model, rollout.build))
            if on_target and sum(e.free_slots for e in on_target) >= max(1, points):
                return on_target
        return edges

    def _on_rollout(self, message: Message) -> None:
        if not message.payload:
            self.rollout = None
            return
        try:
            self.rollout = decode(FleetRollout, message.payload, max_bytes=self.transport.settings.max_payload_bytes)
        except ProtocolError as exc:
            self.transport.rejections.record("rollout", exc.kind, str(exc))

    def _on_refusal(self, message: Message) -> None:
        refusal = self.aggregator.handle_refusal(message)
        if refusal is not None:
            self.fleet.task_refused(refusal)

    def _on_reconnect(self) -> None:
        # Candidates may have been lost while we were away (a broker crash): requests in flight
        # stop waiting for their edges after a short grace instead of their full deadlines.
        now = time.monotonic()
        for pending in self._in_flight:
            pending.reconnected_at = now
            pending.wakeup.set()

    def _release(self, pending: PendingRequest) -> None:
        for state in pending.points:
            for device_id in state.expected:
                self.fleet.task_abandoned(pending.request_id, state.index, device_id,
                                          answered=device_id in state.received or device_id in state.refused)
