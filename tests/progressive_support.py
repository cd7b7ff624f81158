"""Building progressive requests for tests without a broker: a fake clock, a fleet of live edges
on it, a fixed plan, and a recorder that carries out actions the way the driver would."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pice_cloud.config import ServiceConfig
from pice_cloud.fleet import Fleet
from pice_cloud.progressive import (
    Action,
    CandidateCheck,
    Inbox,
    Plan,
    PlannedTask,
    PointSampling,
    ProgressiveRequest,
    Reject,
    RejectionCounters,
)
from pice_edge.protocol import Candidate, EdgeStatus, Sampling
from pice_edge.rejects import Rejections

QUESTION = "How can I improve my time management skills?"


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def live_fleet(clock: Callable[[], float], *devices: str, max_batch: int = 2, heartbeat_s: float = 1.0) -> Fleet:
    """A fleet on ``clock`` where ``devices`` just reported, each with ``max_batch`` free slots."""
    fleet = Fleet(clock=clock)
    for device in devices:
        fleet.update(EdgeStatus(device_id=device, online=True, max_batch=max_batch, free_slots=max_batch,
                                heartbeat_s=heartbeat_s))
    return fleet


def fixed_plan(assignments: Sequence[Sequence[str]], *, deadline_s: float = 30.0,
               self_served: Sequence[int] = ()) -> Plan:
    """Point i goes to ``assignments[i]`` (empty: the cloud), all with one deadline."""
    devices = tuple(tuple(a) for a in assignments)
    deadlines = tuple(0.0 if (not a or i in self_served) else deadline_s for i, a in enumerate(devices))
    tasks = tuple(PlannedTask(i, d, deadlines[i], Sampling()) for i, a in enumerate(devices) for d in a)
    return Plan(devices=devices, deadlines_s=deadlines, self_served=frozenset(self_served), tasks=tasks)


def make_request(assignments: Sequence[Sequence[str]], fleet: Fleet, *, request_id: str = "r1",
                 points: Sequence[str] | None = None, check: CandidateCheck | None = None,
                 deadline_s: float = 30.0, self_served: Sequence[int] = (), tokens_per_point: int = 40,
                 config: ServiceConfig | None = None, seed: int | None = None) -> ProgressiveRequest:
    points = list(points) if points is not None else [f"Point number {i + 1}" for i in range(len(assignments))]
    return ProgressiveRequest(
        request_id, QUESTION, points, fixed_plan(assignments, deadline_s=deadline_s, self_served=self_served),
        fleet=fleet, edges=fleet.views, config=config or ServiceConfig(), tokens_per_point=tokens_per_point,
        sampling=PointSampling(temperature=0.0, top_p=1.0, seed=seed, ensemble_temperature=0.7), check=check,
    )


@dataclass
class Recorder:
    """Carries out actions as `RequestDriver.feed` does, minus the I/O: rejections are counted,
    the rest kept in ``actions`` for the test to read."""

    counters: RejectionCounters = field(default_factory=lambda: RejectionCounters(Rejections(), Rejections(),
                                                                                  Rejections()))
    actions: list[Action] = field(default_factory=list)

    def __call__(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Reject):
                self.counters.record(action)
            else:
                self.actions.append(action)

    def of(self, kind: type) -> list[Action]:
        return [a for a in self.actions if isinstance(a, kind)]


def open_request(inbox: Inbox, assignments: Sequence[Sequence[str]], fleet: Fleet, *, request_id: str = "r1",
                 check: CandidateCheck | None = None) -> tuple[ProgressiveRequest, Recorder]:
    """A started request routed by ``inbox``, its actions recorded (rejections into the inbox's counters)."""
    request = make_request(assignments, fleet, request_id=request_id, check=check)
    recorder = Recorder(RejectionCounters(inbox.rejections, inbox.quality, Rejections()))
    inbox.open(request, recorder)
    recorder(request.start(fleet.now()))
    return request, recorder


def candidate(point: int, device: str, text: str, request_id: str = "r1", logprob: float = -0.5) -> Candidate:
    return Candidate(request_id=request_id, point_index=point, device_id=device, text=text, token_count=20,
                     mean_logprob=logprob, latency_s=0.1)
