"""The pure planner of a progressive request: which edges expand which points, by when, with
what sampling, and which points the cloud serves itself.

Everything here is a deterministic function of (points, edge views, cloud view, rollout,
config, request options): no clock, no broker, no model. The service and the request state
machine call it, and ``tools/simulate.py`` replays it over simulated fleets, so a change to
the rules shows up in both at once. The placement rule itself is `pice_cloud.scheduler.place`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pice_cloud.config import ServiceConfig
from pice_cloud.events import REPLICA_SEED_OFFSET, GenerationOptions, derive_seed, resampled
from pice_cloud.scheduler import CloudView, EdgeView, ensemble_width, place
from pice_edge.protocol import FleetRollout, Sampling, runs


@dataclass(frozen=True)
class PlannedTask:
    """One expansion task: point ``point`` goes to ``device_id`` with this sampling."""

    point: int
    device_id: str
    #: Seconds from dispatch after which the cloud stops waiting for this point's edges.
    deadline_s: float
    sampling: Sampling


@dataclass(frozen=True)
class Plan:
    """Where each point of one request is expanded."""

    #: Per point: the edges that expand it (empty: the cloud expands it).
    devices: tuple[tuple[str, ...], ...]
    #: Per point: seconds after dispatch at which it falls back to the cloud (0 for cloud points).
    deadlines_s: tuple[float, ...]
    #: Points the cloud streams itself as the answer's opening (not placed, not deadline-bound).
    self_served: frozenset[int]
    tasks: tuple[PlannedTask, ...]

    @property
    def n_points(self) -> int:
        return len(self.devices)

    @property
    def cloud_points(self) -> tuple[int, ...]:
        """Points no edge was asked for (the cloud expands them at once)."""
        return tuple(i for i, d in enumerate(self.devices) if not d and i not in self.self_served)


@dataclass(frozen=True)
class PointSampling:
    """The sampling of every generation of one request: the answer or sketch (offset 0), and
    each point's replicas (the first keeps the request's; the others sample at least at
    ``ensemble_temperature`` with seeds of their own, so a greedy request still gets candidates
    that differ)."""

    temperature: float
    top_p: float
    seed: int | None
    ensemble_temperature: float

    @classmethod
    def of(cls, config: ServiceConfig, options: GenerationOptions) -> PointSampling:
        return cls(
            temperature=config.temperature if options.temperature is None else options.temperature,
            top_p=config.top_p if options.top_p is None else options.top_p,
            seed=options.seed, ensemble_temperature=config.ensemble_temperature,
        )

    def request(self) -> Sampling:
        """The answer's (or the sketch's) sampling."""
        return self._offset(0)

    def point(self, index: int, replica: int = 0) -> Sampling:
        """The sampling of point ``index``'s ``replica``-th candidate."""
        first = self._offset(1 + index)
        if replica == 0:
            return first
        return resampled(first, min_temperature=self.ensemble_temperature, seed_offset=REPLICA_SEED_OFFSET * replica)

    def _offset(self, offset: int) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=derive_seed(self.seed, offset))


def eligible(edges: Sequence[EdgeView], *, expander_model: str | None, rollout: FleetRollout | None,
             points: int = 0) -> list[EdgeView]:
    """The edges a point may go to: those running ``expander_model`` (``NAME`` or
    ``NAME@BUILD``, when set); during a ``rollout`` of that model, only those already on the new
    build when they have room for ``points`` points (the rest are still switching)."""
    name, _, build = expander_model.partition("@") if expander_model else ("", "", "")
    chosen = [e for e in edges if runs(e.model_id, name, build or None)] if expander_model else list(edges)
    if rollout is not None and (not expander_model or (rollout.model == name and not build)):
        on_target = [e for e in edges if runs(e.model_id, rollout.model, rollout.build)]
        if on_target and sum(e.free_slots for e in on_target) >= max(1, points):
            return on_target
    return chosen


def first_point_in_cloud(config: ServiceConfig, *, n_points: int, cloud_streams: bool, has_stop: bool) -> bool:
    """Whether the cloud streams point 0 itself while the edges expand the rest, so the answer
    starts as soon as the sketch is written. Not with a stop string: a cut must not be streamed
    before it is known."""
    return config.first_point == "cloud" and cloud_streams and n_points > 1 and not has_stop


def plan_request(n_points: int, edges: Sequence[EdgeView], *, config: ServiceConfig, sampling: PointSampling,
                 tokens_per_point: int, cloud: CloudView | None = None, first_in_cloud: bool = False,
                 replicas: int = 1, replica_id: str = "") -> Plan:
    """Place the ``n_points`` points of one sketch on ``edges`` (already `eligible`). With
    several live cloud ``replicas`` (this one, ``replica_id``, included) their free slots are
    shared for ensembles, and near-equal edges are taken in this replica's own order."""
    first = 1 if first_in_cloud and n_points > 1 else 0
    width = ensemble_width(n_points - first, edges, config.ensemble_width, replicas=replicas)
    placement = place(
        n_points - first, edges, tokens_per_point=tokens_per_point, width=width,
        deadline_floor_s=config.deadline_floor_s, deadline_factor=config.deadline_factor,
        deadline_cap_s=config.deadline_cap_s, cloud=cloud, spread=replica_id if replicas > 1 else None,
    )
    devices = ((),) * first + placement.devices
    deadlines = (0.0,) * first + placement.deadlines_s
    tasks = tuple(PlannedTask(index, device_id, deadlines[index], sampling.point(index, replica))
                  for index, targets in enumerate(devices) for replica, device_id in enumerate(targets))
    return Plan(devices=devices, deadlines_s=deadlines, self_served=frozenset(range(first)), tasks=tasks)


def plan_replacement(point: int, edges: Sequence[EdgeView], *, avoid: frozenset[str], config: ServiceConfig,
                     sampling: Sampling, tokens_per_point: int) -> PlannedTask | None:
    """Place point ``point`` again, on the edge (not in ``avoid``) predicted to finish it first
    among those with a free slot now; None when none has one. Its deadline is set as at first
    placement."""
    free = [e for e in edges if e.device_id not in avoid and e.free_slots > 0]
    if not free:
        return None
    placement = place(1, free, tokens_per_point=tokens_per_point, deadline_floor_s=config.deadline_floor_s,
                      deadline_factor=config.deadline_factor, deadline_cap_s=config.deadline_cap_s)
    [targets], [deadline_s] = placement.devices, placement.deadlines_s
    if not targets:
        return None
    return PlannedTask(point, targets[0], deadline_s, sampling)
