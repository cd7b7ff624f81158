"""The state machine of one progressive request, sans I/O.

`ProgressiveRequest` alone decides when each point of a sketch is settled and alone writes the
fleet's dispatch accounting for its tasks. It never sleeps, publishes or calls a model: every
input (`start`, `on_candidate`, `on_refusal`, `on_edge_gone`, `on_disconnect`, `on_reconnect`,
`tick`, and the results of the work it asked for: `on_cloud_texts`, `on_choice`,
`on_self_served`; `close` when the request ends or its client went away) returns the actions the
caller must carry out:

- `SendTask`: publish an expansion task to an edge (already counted against that edge);
- `ExpandInCloud`: the cloud LLM expands these points (answer with `on_cloud_texts`);
- `Choose`: the ensemble selector picks among a point's candidates (answer with `on_choice`);
- `Settle`: a point's text is final;
- `Reject`: a message or a text was refused, and why (for the counters).

The rules: a point settles with its only usable candidate as soon as all its edges answered or
refused; with several, the selector chooses; at its deadline it takes what arrived; if nothing
usable did, a refused candidate whose fault was repeated sentences is used without them when the
rest passes the guard, else the cloud expands it (and stops if an edge's candidate comes first).
An edge that stops being live (last will, missed heartbeats) or refuses its task does not hold
the point until the deadline: the point is placed again on another edge with a free slot (at
most `defaults.MAX_REPLACEMENTS` times), else the cloud expands it; so does a task the fleet
knows was lost in an outage (`FleetLedger.task_lost`). While the cloud itself is disconnected
from the broker (`on_disconnect` .. `on_reconnect`) the time does not count against a point's
deadline, up to ``deadline_cap_s`` more: its edges keep working, and their candidates, queued
meanwhile (QoS 1, persistent sessions), arrive when the cloud is back. The cloud's own expansion
passes the same guard as an edge's: a refused one is sampled once more.

`pice_cloud.progressive.driver.RequestDriver` carries the actions out on asyncio; the unit tests
drive this class directly on a fake clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pice_cloud import defaults
from pice_cloud.cloud_ledger import CloudLedger
from pice_cloud.config import ServiceConfig
from pice_cloud.ensemble import SelectionItem
from pice_cloud.events import EXPANSION_RESAMPLE_SEED_OFFSET, ChosenPoint, resampled
from pice_cloud.guards import check_expansion, drop_repeated_sentences
from pice_cloud.progressive.planner import Plan, PlannedTask, PointSampling, plan_replacement
from pice_cloud.scheduler import EdgeView
from pice_edge.prompts import SYSTEM_PROMPT, format_sketch
from pice_edge.protocol import Candidate, Sampling, TaskRefusal


class FleetLedger(Protocol):
    """What the request needs of the fleet: liveness, and the dispatch accounting it writes
    (`pice_cloud.fleet.Fleet` implements it; its clock must be the one passed as ``now``)."""

    def is_live(self, device_id: str) -> bool: ...

    def expires_at(self, device_id: str) -> float | None: ...

    def task_lost(self, request_id: str, point: int, device_id: str) -> bool: ...

    def task_sent(self, request_id: str, point: int, device_id: str) -> None: ...

    def candidate_received(self, candidate: Candidate) -> None: ...

    def task_refused(self, refusal: TaskRefusal) -> None: ...

    def task_abandoned(self, request_id: str, point: int, device_id: str, *, answered: bool) -> None: ...


class CandidateCheck(Protocol):
    """The expansion guard of one request: why ``text``, an expansion of point ``point_index``
    (an edge's candidate or the cloud's own), must not be used, given the texts of the request's
    other points, or None."""

    def __call__(self, point_index: int, text: str, other_texts: Sequence[str]) -> str | None: ...


def expansion_check(question: str, points: Sequence[str]) -> CandidateCheck:
    """The expansion guard of one request (`pice_cloud.guards.check_expansion`)."""
    outline = format_sketch(list(points))

    def check(point_index: int, text: str, other_texts: Sequence[str]) -> str | None:
        return check_expansion(text, point=points[point_index], question=question,
                               other_texts=other_texts, prompt_texts=(outline, SYSTEM_PROMPT))

    return check


# --- actions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SendTask:
    """Publish this task to its edge (`FleetLedger.task_sent` was called already)."""

    task: PlannedTask


@dataclass(frozen=True)
class ExpandInCloud:
    """The cloud LLM expands ``points`` with these samplings; ``attempt`` 1 re-samples texts the
    guard refused. Answer with `ProgressiveRequest.on_cloud_texts`."""

    points: tuple[int, ...]
    samplings: tuple[Sampling, ...]
    attempt: int = 0


@dataclass(frozen=True)
class Choose:
    """Run the ensemble selector over these points' candidates; answer with `on_choice`."""

    items: tuple[SelectionItem, ...]


@dataclass(frozen=True)
class Settle:
    """Point ``point.index`` is final."""

    point: ChosenPoint


@dataclass(frozen=True)
class Reject:
    """A message or a text was refused. ``kind``: a malformed or unexpected message
    (``protocol``, counted with the transport's rejections), an edge's candidate the expansion
    guard refused (``candidate_guard``), or the cloud's own expansion refused (``cloud_guard``)."""

    kind: Literal["protocol", "candidate_guard", "cloud_guard"]
    topic: str
    reason: str
    detail: str


Action = SendTask | ExpandInCloud | Choose | Settle | Reject

#: Guard reasons a candidate loses by dropping its repeated sentences (`ProgressiveRequest._repaired`).
_REPAIRABLE = frozenset({"repeats_other_point", "repetitive"})


@dataclass
class PointState:
    """One point's tasks and candidates."""

    index: int
    #: The edges whose answer the point waits for now (a re-placement swaps them).
    expected: set[str]
    #: Seconds on the request's clock at which the point stops waiting for its edges.
    due: float
    received: dict[str, Candidate] = field(default_factory=dict)
    #: Device -> why its candidate may not go into the answer (the expansion guard).
    rejected: dict[str, str] = field(default_factory=dict)
    #: Devices that refused the task (`TaskRefusal`): they will not answer.
    refused: set[str] = field(default_factory=set)
    chosen: ChosenPoint | None = None
    #: The cloud or the selector is working on this point now.
    busy: bool = False
    replaced: int = 0

    @property
    def settled(self) -> bool:
        return self.chosen is not None

    @property
    def ready(self) -> bool:
        """Every edge the point waits for has answered or refused."""
        return bool(self.expected) and self.expected <= (self.received.keys() | self.refused)

    def outstanding(self) -> set[str]:
        """Edges it waits for that have neither answered nor refused."""
        return self.expected - self.received.keys() - self.refused

    def usable(self) -> list[Candidate]:
        """Non-empty candidates the guard accepted, in a stable order (by device id)."""
        return sorted((c for c in self.received.values() if c.text.strip() and c.device_id not in self.rejected),
                      key=lambda c: c.device_id)


class ProgressiveRequest:
    """The points of one progressive request, from dispatch until each is settled.

    ``edges`` returns the edges a re-placed point may go to now (fresh, eligible views);
    ``check`` is the expansion guard (None: every non-empty text is usable); ``ledger`` receives
    the cloud's work for the points (the request's whole ledger, in service). All times are
    seconds on the clock of ``fleet`` (``time.monotonic`` in service).
    """

    def __init__(self, request_id: str, question: str, points: Sequence[str], plan: Plan, *,
                 fleet: FleetLedger, edges: Callable[[], Sequence[EdgeView]], config: ServiceConfig,
                 sampling: PointSampling, tokens_per_point: int, check: CandidateCheck | None = None,
                 ledger: CloudLedger | None = None) -> None:
        if plan.n_points != len(points):
            raise ValueError(f"the plan has {plan.n_points} points, the sketch {len(points)}")
        self.request_id = request_id
        self.question = question
        self.headings = list(points)
        self.plan = plan
        self.check = check
        self.tokens_per_point = tokens_per_point
        #: Candidates stored (valid and assigned), whether or not they were used.
        self.accepted = 0
        #: What the cloud LLM computed for this request's points (the cloud's expansions).
        self.ledger = ledger if ledger is not None else CloudLedger()
        self._fleet = fleet
        self._edges = edges
        self._config = config
        self._sampling = sampling
        self._points: list[PointState] = []
        self._cloud_first: dict[int, tuple[str, int, str]] = {}  # point -> first text, tokens, why refused
        self._choosing: dict[int, list[Candidate]] = {}
        self._started = False
        self.closed = False
        #: When (request clock) the cloud lost the broker; None while it is connected.
        self._deaf_since: float | None = None

    # --- queries -------------------------------------------------------------------------

    @property
    def points(self) -> Sequence[PointState]:
        return self._points

    def chosen(self, index: int) -> ChosenPoint | None:
        return self._points[index].chosen if self._points else None

    @property
    def done(self) -> bool:
        """Every point is settled."""
        return bool(self._points) and all(s.settled for s in self._points)

    def next_wakeup(self) -> float | None:
        """When `tick` must run next (a deadline, or an edge it waits for would stop being live
        without another status); None when nothing is waited for."""
        times: list[float] = []
        for s in self._waiting():
            times.append(s.due if self._deaf_since is None else s.due + self._config.deadline_cap_s)
            times += [t for d in s.expected - s.received.keys() if (t := self._fleet.expires_at(d)) is not None]
        return min(times, default=None)

    def other_candidates(self, index: int) -> list[str]:
        """The usable candidates of every point but ``index``."""
        return [c.text for s in self._points if s.index != index for c in s.usable()]

    def other_texts(self, index: int) -> list[str]:
        """What the other points say so far: their settled text, else their usable candidates."""
        texts: list[str] = []
        for s in self._points:
            if s.index == index:
                continue
            texts += [s.chosen.text] if s.chosen is not None else [c.text for c in s.usable()]
        return texts

    # --- inputs --------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Dispatch the plan's tasks; points no edge was given are expanded by the cloud."""
        if self._started:
            raise RuntimeError(f"request {self.request_id} already started")
        self._started = True
        self._points = [PointState(i, set(devices), now + wait)
                        for i, (devices, wait) in enumerate(zip(self.plan.devices, self.plan.deadlines_s, strict=True))]
        actions: list[Action] = [self._send(task) for task in self.plan.tasks]
        return actions + self.tick(now)

    def on_candidate(self, cand: Candidate, now: float) -> list[Action]:
        """An edge's candidate for this request (its identity already checked by the inbox)."""
        if self.closed:
            return []
        topic = "candidate"
        if cand.point_index >= len(self._points):
            return [Reject("protocol", topic, "unknown_point", f"{self.request_id} has no point {cand.point_index}")]
        state = self._points[cand.point_index]
        if cand.device_id not in state.expected:
            return [Reject("protocol", topic, "unassigned", f"{cand.device_id} was not asked for this point")]
        if cand.device_id in state.received:
            return [Reject("protocol", topic, "duplicate", f"{cand.device_id} already answered this point")]
        state.received[cand.device_id] = cand
        self.accepted += 1
        self._fleet.candidate_received(cand)
        actions: list[Action] = []
        if self.check is not None and cand.text.strip():
            reason = self.check(state.index, cand.text, self.other_candidates(state.index))
            if reason is not None:
                state.rejected[cand.device_id] = reason
                actions.append(Reject("candidate_guard", topic, reason,
                                      f"{self.request_id}/{state.index} from {cand.device_id}"))
        if state.settled:
            return [*actions, Reject("protocol", topic, "late", "point already settled")]
        return actions + self._settle_if_single(state) + self.tick(now)

    def on_refusal(self, refusal: TaskRefusal, now: float) -> list[Action]:
        """An edge refused one of this request's tasks (full): it no longer counts against the
        edge, and the point is placed again at once."""
        if self.closed or refusal.point_index >= len(self._points):
            return []  # an answered request: nothing to place any more
        state = self._points[refusal.point_index]
        if refusal.device_id in state.refused:
            # A QoS 1 re-delivery: the task was counted off once already.
            return [Reject("protocol", "refusal", "duplicate", f"{refusal.device_id} already refused this point")]
        if refusal.device_id not in state.expected or refusal.device_id in state.received:
            return [Reject("protocol", "refusal", "unassigned",
                           f"{refusal.device_id} holds no task {self.request_id}/{refusal.point_index}")]
        state.refused.add(refusal.device_id)
        self._fleet.task_refused(refusal)
        return self._settle_if_single(state) + self.tick(now)

    def on_edge_gone(self, device_id: str, now: float) -> list[Action]:
        """``device_id`` left the fleet (last will or clean shutdown): its points move on now."""
        return [] if self.closed else self.tick(now)

    def on_disconnect(self, now: float) -> list[Action]:
        """The cloud lost the broker: until `on_reconnect`, the time does not count against the
        points' deadlines (up to ``deadline_cap_s``), since no candidate can reach it."""
        if not self.closed and self._deaf_since is None:
            self._deaf_since = now
        return []

    def on_reconnect(self, now: float) -> list[Action]:
        """The cloud is back on the broker: the points' deadlines move by the time it was away
        (at most ``deadline_cap_s``). Candidates the edges wrote meanwhile arrive now (queued
        for our persistent session); the edges' liveness, and tasks the fleet knows were lost,
        decide the rest (`tick`)."""
        if self.closed:
            return []
        if self._deaf_since is not None:
            away = min(max(0.0, now - self._deaf_since), self._config.deadline_cap_s)
            self._deaf_since = None
            for state in self._points:
                if not state.settled:
                    state.due += away
        return self.tick(now)

    def on_cloud_texts(self, request: ExpandInCloud, texts: Mapping[int, tuple[str, int]],
                       now: float) -> list[Action]:
        """The cloud's expansions asked for by ``request``: point -> (text, tokens decoded)."""
        actions: list[Action] = []
        retry: list[int] = []
        for index in request.points:
            state = self._points[index]
            state.busy = False
            text, tokens = texts[index]
            if state.settled or self.closed:
                continue  # an edge's candidate settled it meanwhile
            reason = None if self.check is None else self.check(index, text, self.other_texts(index))
            if reason is None:
                spent = self._cloud_first.pop(index, ("", 0, ""))[1]
                actions += self._settle(ChosenPoint(index, text, "cloud", None, spent + tokens, 0))
                continue
            if request.attempt == 0:
                actions.append(Reject("cloud_guard", "cloud", reason, f"{self.request_id}/{index}"))
                self._cloud_first[index] = (text, tokens, reason)
                retry.append(index)
                continue
            # Both refused: keep the first (the request's own sampling) unless it said nothing,
            # without the sentences other points already say.
            first, spent, first_reason = self._cloud_first.pop(index, (text, 0, reason))
            best = text if first_reason == "empty" else first
            others = self.other_texts(index)
            actions += self._settle(ChosenPoint(index, drop_repeated_sentences(best, others) or best, "cloud", None,
                                                spent + tokens, 0))
        if retry:
            for index in retry:
                self._points[index].busy = True
            actions.append(ExpandInCloud(tuple(retry), tuple(self._resampling(i) for i in retry), attempt=1))
        return actions + self.tick(now)

    def on_choice(self, index: int, pick: int, now: float) -> list[Action]:
        """The selector chose candidate ``pick`` of the `Choose` item for point ``index``."""
        state = self._points[index]
        state.busy = False
        among = self._choosing.pop(index, [])
        if state.settled or self.closed or not among:
            return self.tick(now)
        return self._settle(ChosenPoint.from_candidate(among[pick], len(among))) + self.tick(now)

    def on_self_served(self, index: int, text: str, tokens: int) -> list[Action]:
        """The cloud's own streamed text of a self-served point (the answer's opening)."""
        if index not in self.plan.self_served:
            raise ValueError(f"point {index} is not served by the cloud itself")
        return self._settle(ChosenPoint(index, text, "cloud", None, tokens, 0))

    def tick(self, now: float) -> list[Action]:
        """Settle what can be settled at ``now``: points whose edges all answered, whose
        deadline passed, or whose edges stopped being live."""
        if self.closed:
            return []
        actions: list[Action] = []
        missing: list[int] = []
        to_choose: list[PointState] = []
        for state in self._waiting():
            outstanding = state.outstanding()
            waiting = any(self._fleet.is_live(d) and not self._fleet.task_lost(self.request_id, state.index, d)
                          for d in outstanding)
            due = state.due if self._deaf_since is None else \
                state.due + min(max(0.0, now - self._deaf_since), self._config.deadline_cap_s)
            if waiting and now < due:
                continue
            # Re-placed: a point whose edges went quiet, or that an assigned edge refused (not one
            # whose edges answered with refused candidates: that one is the cloud's).
            if ((outstanding or state.refused & state.expected) and not waiting and not state.usable()
                    and state.replaced < defaults.MAX_REPLACEMENTS and now < due):
                state.replaced += 1
                task = self._replacement(state)
                if task is not None:
                    for gone in outstanding:
                        self._fleet.task_abandoned(self.request_id, state.index, gone, answered=False)
                    state.expected = (state.expected - outstanding - state.refused) | {task.device_id}
                    state.due = now + task.deadline_s
                    actions.append(self._send(task))
                    continue
            # Take what arrived in time before giving up on the edges.
            usable = state.usable()
            if not usable and (repaired := self._repaired(state)) is not None:
                actions += self._settle(ChosenPoint.from_candidate(repaired, len(state.received)))
            elif not usable:
                missing.append(state.index)
            elif len(usable) == 1:
                actions += self._settle(ChosenPoint.from_candidate(usable[0]))
            else:
                to_choose.append(state)
        if to_choose:
            for state in to_choose:
                state.busy = True
                self._choosing[state.index] = state.usable()
            actions.append(Choose(tuple(
                SelectionItem(self.question, self.headings, s.index, self._choosing[s.index], self.tokens_per_point,
                              self.other_candidates(s.index))
                for s in to_choose)))
        if missing:
            for index in missing:
                self._points[index].busy = True
            actions.append(ExpandInCloud(tuple(missing), tuple(self._sampling.point(i) for i in missing)))
        return actions

    def close(self) -> None:
        """The request is over (answered, failed, or its client went away): its tasks stop
        counting against their edges, and later inputs are ignored."""
        if self.closed:
            return
        self.closed = True
        for state in self._points:
            for device_id in state.expected:
                self._fleet.task_abandoned(self.request_id, state.index, device_id,
                                           answered=device_id in state.received or device_id in state.refused)

    # --- internals -----------------------------------------------------------------------

    def _waiting(self) -> list[PointState]:
        return [s for s in self._points if not s.settled and not s.busy and s.index not in self.plan.self_served]

    def _send(self, task: PlannedTask) -> SendTask:
        self._fleet.task_sent(self.request_id, task.point, task.device_id)
        return SendTask(task)

    def _settle(self, chosen: ChosenPoint) -> list[Action]:
        # The only place a point's text is fixed.
        state = self._points[chosen.index]
        if state.settled:
            return []
        state.chosen = chosen
        state.busy = False
        return [Settle(chosen)]

    def _settle_if_single(self, state: PointState) -> list[Action]:
        # All its edges answered and one candidate is usable: it wins at once, even over a cloud
        # expansion of the point already under way (whose text is then dropped).
        usable = state.usable()
        return self._settle(ChosenPoint.from_candidate(usable[0])) if state.ready and len(usable) == 1 else []

    def _repaired(self, state: PointState) -> Candidate | None:
        """A refused candidate that only repeated sentences (another point's, or its own),
        without them, when what is left passes the guard: the edge's work is kept instead of
        the cloud writing the point again. The most confident candidate first."""
        others = self.other_texts(state.index)
        for cand in sorted(state.received.values(), key=lambda c: (-c.mean_logprob, c.device_id)):
            if state.rejected.get(cand.device_id) not in _REPAIRABLE:
                continue
            text = drop_repeated_sentences(cand.text, others)
            if text and text != cand.text and (self.check is None or self.check(state.index, text, others) is None):
                return cand.model_copy(update={"text": text})
        return None

    def _replacement(self, state: PointState) -> PlannedTask | None:
        return plan_replacement(state.index, self._edges(), avoid=frozenset(state.expected | state.refused),
                                config=self._config, sampling=self._sampling.point(state.index),
                                tokens_per_point=self.tokens_per_point)

    def _resampling(self, index: int) -> Sampling:
        return resampled(self._sampling.point(index), min_temperature=defaults.EXPANSION_RESAMPLE_TEMPERATURE,
                         seed_offset=EXPANSION_RESAMPLE_SEED_OFFSET, unseeded=index)

