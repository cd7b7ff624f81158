"""Per-request decisions: answering mode, sketch budget, and which edges expand which points.

Everything here is a pure, deterministic function of (request, fleet snapshot, settings) so
it can be unit-tested on fixed fleet states and replayed by a simulator.

Placement rule: a point goes to the edge whose predicted finish time is earliest, counting
the work already queued there (its reported queue plus what this cloud has sent and not yet
heard back) and the points placed earlier in the same plan. The prediction is
`pice_edge.timing.finish_s`, the function the edge's own admission check uses, so the edges
take what the cloud placed unless their state moved since the cloud saw it.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pice_cloud import defaults
from pice_edge.timing import BATCH_EXPONENT, finish_s

if TYPE_CHECKING:
    from pice_cloud.config import ServiceConfig

#: "sot" is Skeleton-of-Thought in the cloud alone (sketch, then every point expanded by the
#: cloud LLM in one batch): the baseline that shows what the edges add.
Mode = Literal["cloud", "progressive", "sot"]
RequestedMode = Literal["auto", "cloud", "progressive", "sot"]

#: How much slower than predicted (at most, as a share) a cloud replica among several may rank an
#: edge (`place`'s ``spread``): predictions closer than this are about equal for a fleet whose
#: load the replicas see only through heartbeats, so each replica prefers its own edges among them.
SPREAD_JITTER = 0.1

#: Decode speed assumed for an edge that has not reported one yet (tokens/s), and no live edge
#: running its model has either. SmolLM2-135M on one free CPU core measures ~20 at batch 1; half
#: that covers a shared or slower core, so a fresh edge is not timed out before its first
#: measurement (its deadlines are always timed at this rate or slower: `place`).
DEFAULT_EDGE_TOKENS_PER_S = 10.0


@dataclass(frozen=True)
class EdgeView:
    """The scheduler's snapshot of one live edge."""

    device_id: str
    max_batch: int = 1
    queue_depth: int = 0
    outstanding: int = 0
    tokens_per_s: float = 0.0
    #: Measured network delay to the edge and back (task out, candidate in), seconds.
    link_delay_s: float = 0.0
    #: The model the edge runs (``NAME`` or ``NAME@BUILD``), for `pice_cloud.progressive.eligible`.
    model_id: str = ""

    @property
    def load(self) -> int:
        return self.load_among(1)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch - self.load)

    def load_among(self, replicas: int) -> int:
        """The edge's load as one of ``replicas`` cloud replicas sees it: its last reported
        queue, or this replica's outstanding tasks times ``replicas`` (the others' since that
        report are unknown; a load balancer gives each replica about the same share)."""
        return max(self.queue_depth, max(1, replicas) * self.outstanding)


@dataclass(frozen=True)
class CloudView:
    """The scheduler's snapshot of the cloud LLM."""

    #: Requests being served or waiting for the cloud LLM (this one excluded).
    queue_depth: int = 0
    #: Measured cloud decode speed at batch 1 (0 when not yet measured).
    tokens_per_s: float = 0.0
    #: Requests the cloud LLM can batch together.
    max_batch: int = 1


@dataclass(frozen=True)
class Budget:
    """How long the sketch and each expansion may be."""

    max_points: int = defaults.MAX_POINTS
    max_words: int = defaults.MAX_WORDS
    sketch_tokens: int = defaults.SKETCH_TOKENS
    tokens_per_point: int = defaults.TOKENS_PER_POINT
    #: How much longer than ``tokens_per_point`` a point of a short sketch may be (`point_tokens`).
    point_stretch: float = defaults.POINT_STRETCH

    @classmethod
    def from_config(cls, config: ServiceConfig) -> Budget:
        """The configured budget of an idle system."""
        return cls(max_points=config.max_points, max_words=config.max_words, sketch_tokens=config.sketch_tokens,
                   tokens_per_point=config.tokens_per_point, point_stretch=config.point_stretch)

    def point_tokens(self, n_points: int, answer_tokens: int | None = None) -> int:
        """Expansion budget of each point of a sketch with ``n_points`` points.

        The answer's budget is ``max_points * tokens_per_point`` whatever the sketch's length: a
        three-point sketch of a question that a six-point one would cover gets points up to
        ``point_stretch`` times longer, instead of an answer half as long as the cloud's own (the
        fleet's work per request stays what `plan_budget` allowed). ``answer_tokens`` (a client's
        ``max_tokens``) caps the whole answer's expansions, at least one token a point.
        """
        n = max(1, n_points)
        stretched = min(int(self.tokens_per_point * self.point_stretch), self.max_points * self.tokens_per_point // n)
        tokens = max(self.tokens_per_point, stretched)
        if answer_tokens is not None:
            tokens = min(tokens, max(1, answer_tokens // n))
        return tokens


@dataclass(frozen=True)
class Placement:
    """Which edges expand each point, and when the cloud stops waiting for them."""

    devices: tuple[tuple[str, ...], ...]
    #: Seconds after dispatch at which each point falls back to the cloud.
    deadlines_s: tuple[float, ...]


def plan_budget(base: Budget, cloud: CloudView, edges: Sequence[EdgeView]) -> Budget:
    """The sketch and expansion budget for one request under the current load.

    Cost model: a progressive request costs the cloud the sketch (about ``max_points *
    (max_words * 1.4 + 2)`` decode tokens) plus a cheap prefill to score candidates, and
    costs the fleet ``max_points * tokens_per_point`` decode tokens. A cloud-only answer costs
    the cloud all of it. So:

    - a loaded cloud (requests queued beyond what it batches) writes shorter sketches: one
      point fewer and shorter points per queued batch, never below 3 points of 4 words,
      because sketch tokens are the only decode work it cannot hand to the edges;
    - a fleet without enough free slots for every point gets a smaller expansion budget per
      point (down to half), so queued points still finish within their deadlines, instead
      of the request waiting for whole extra batches at the edges.
    """
    overload = max(0, cloud.queue_depth - max(1, cloud.max_batch) + 1)
    steps = math.ceil(overload / max(1, cloud.max_batch))
    max_points = max(3, base.max_points - steps)
    max_words = max(4, base.max_words - steps)
    free = sum(e.free_slots for e in edges)
    tokens = base.tokens_per_point
    if edges and free < max_points:
        # Points beyond the free slots wait for a second batch: shrink each so two batches
        # take about as long as one full-length batch would.
        tokens = max(base.tokens_per_point // 2, int(base.tokens_per_point * (0.5 + 0.5 * free / max_points)))
    return Budget(max_points=max_points, max_words=max_words, sketch_tokens=base.sketch_tokens,
                  tokens_per_point=tokens, point_stretch=base.point_stretch)


def ensemble_width(n_points: int, edges: Sequence[EdgeView], max_width: int, *, replicas: int = 1) -> int:
    """Replicate each point to as many edges as free capacity allows (1 .. ``max_width``).

    Replicas only use slots that are free now: an ensemble never delays a request by
    queueing behind other requests' work. With several cloud ``replicas`` placing on one fleet,
    an edge's load is taken as at least ``replicas`` times this replica's tasks on it: until the
    edge's next heartbeat the others' tasks since its last one are unknown, and a load balancer
    gives each replica about the same share of the requests (without this, each replica widened
    its ensembles into the slots the others had just filled).
    """
    if n_points <= 0 or not edges:
        return 1
    free = sum(max(0, e.max_batch - e.load_among(replicas)) for e in edges)
    return max(1, min(max_width, len(edges), free // n_points))


def choose_mode(requested: RequestedMode, live_edges: int, suits_sketch: bool | None = None, *,
                question_fits: bool = True) -> Mode:
    """The answering mode of one request.

    An explicit ``requested`` mode wins. Under ``auto``: cloud-only when no edge is live, when
    the question (with its history) is too long to send to the edges (``question_fits`` False),
    or when the mode router judged it unsuited to a sketch (``suits_sketch`` False: code, math,
    step-by-step, ...); progressive otherwise, including when no router ran (None).
    """
    if requested in ("cloud", "sot"):
        return requested
    if requested == "progressive":
        return "progressive"
    if live_edges <= 0 or not question_fits or suits_sketch is False:
        return "cloud"
    return "progressive"


def predicted_seconds(edge: EdgeView, extra_load: int, tokens: int,
                      unmeasured_rate: float = DEFAULT_EDGE_TOKENS_PER_S) -> float:
    """Predicted time for ``edge`` to finish one more point of ``tokens`` tokens
    (at ``unmeasured_rate`` while the edge has not measured its own)."""
    rate = edge.tokens_per_s if edge.tokens_per_s > 0 else unmeasured_rate
    return finish_s(edge.load + extra_load, edge.max_batch, tokens, rate) + edge.link_delay_s


@functools.lru_cache(maxsize=1 << 16)
def _spread_weight(spread: str, device_id: str) -> float:
    # A hash, not a checksum: replicas named alike ("cloud-2", "cloud-3") must not share orders.
    digest = hashlib.blake2b(f"{spread}/{device_id}".encode(), digest_size=8).digest()
    return 1.0 + SPREAD_JITTER * int.from_bytes(digest, "big") / 2**64


def _model_name(model_id: str) -> str:
    return model_id.split("@", 1)[0]


def peer_rates(edges: Sequence[EdgeView]) -> dict[str, float]:
    """Per model (its name, any build): the median measured rate of the live edges running it.

    What to expect of an edge that has not measured its own rate yet: one that just joined, or
    that has not run a batch since the cloud started. Assuming the pessimistic default for it
    instead made the cloud pile a burst of work on the few edges it had already measured: with
    100 edges of which 18 had run a request, a burst of 200 requests left those 18 with queues
    of 29 tasks and the rest with 12, and a tenth of the answers waited seven batch rounds.
    """
    by_model: dict[str, list[float]] = {}
    for e in edges:
        if e.tokens_per_s > 0:
            by_model.setdefault(_model_name(e.model_id), []).append(e.tokens_per_s)
    return {model: statistics.median(rates) for model, rates in by_model.items()}


def predicted_cloud_seconds(cloud: CloudView, extra_points: int, tokens: int) -> float:
    """Predicted time for the cloud to expand one more point itself (after ``extra_points``)."""
    rate = cloud.tokens_per_s if cloud.tokens_per_s > 0 else DEFAULT_EDGE_TOKENS_PER_S
    batch = extra_points + 1 + cloud.queue_depth
    return float(tokens / rate * batch**BATCH_EXPONENT)


def place(
    n_points: int,
    edges: Sequence[EdgeView],
    *,
    tokens_per_point: int,
    width: int = 1,
    deadline_floor_s: float = defaults.DEADLINE_FLOOR_S,
    deadline_factor: float = defaults.DEADLINE_FACTOR,
    deadline_cap_s: float = defaults.DEADLINE_CAP_S,
    cloud: CloudView | None = None,
    cloud_takeover_factor: float = 2.0,
    spread: str | None = None,
) -> Placement:
    """Assign each point to ``width`` distinct edges (fewer when the fleet is smaller).

    Points are placed one by one on the edges predicted to finish them soonest, so the
    slowest point of the request finishes as early as the fleet allows; an edge that has not
    measured its decode rate yet is expected to run at its peers' (`peer_rates`). An empty
    assignment means the cloud expands the point itself: that happens when there are no edges, or when
    even the best edge has no free slot left and an idle ``cloud`` would finish the point
    ``cloud_takeover_factor`` times sooner (a busy fleet and an idle cloud: the cloud does
    more itself). A cloud with requests queued takes only the points no edge would accept:
    those whose best edge has to queue them and would finish after ``deadline_cap_s`` (the edge
    refuses those, so sending them would only delay the cloud's fallback by a round trip).

    The deadline of a point is ``deadline_factor`` times the slowest predicted finish among its
    edges, clamped to [deadline_floor_s, deadline_cap_s]: generous enough for a noisy device,
    short enough that a dead one costs the user little.

    Edges predicted to finish equally soon are taken in the order of their ids. With ``spread``
    (a cloud replica's id, when several share the fleet) each edge's prediction is ranked up to
    `SPREAD_JITTER` slower, by an amount of that replica's own: replicas placing from the same
    heartbeats would otherwise all pick the same few fastest idle edges, and queue there.
    """
    if not edges:
        return Placement(devices=tuple(() for _ in range(n_points)), deadlines_s=tuple(0.0 for _ in range(n_points)))
    width = max(1, min(width, len(edges)))
    extra = [0] * len(edges)
    in_cloud = 0
    devices: list[tuple[str, ...]] = []
    deadlines: list[float] = []
    # Edges ranked by (predicted finish of one more point times the edge's ``spread`` weight, 1
    # without; id), kept in a heap: a point takes the `width` best and pushes them back with one
    # more task each, so placing P points on E edges costs O(E + P log E), not a sort per point
    # (1,000 edges: ~0.3 ms a request instead of 12).
    peers = peer_rates(edges)
    unmeasured = [peers.get(_model_name(e.model_id), DEFAULT_EDGE_TOKENS_PER_S) for e in edges]
    weight = [1.0] * len(edges) if spread is None else [_spread_weight(spread, e.device_id) for e in edges]
    ranked = [(weight[i] * predicted_seconds(e, 0, tokens_per_point, unmeasured[i]), e.device_id, i)
              for i, e in enumerate(edges)]
    heapq.heapify(ranked)

    def deadline_seconds(i: int) -> float:
        """Edge ``i``'s predicted finish of the point just placed on it, for the deadline: an
        unmeasured edge is timed at the slower of its peers' rate and the default, so a newcomer
        slower than its peers is not timed out."""
        slow = min(unmeasured[i], DEFAULT_EDGE_TOKENS_PER_S)
        return predicted_seconds(edges[i], extra[i] - 1, tokens_per_point, slow)

    def must_queue(i: int) -> bool:
        """Edge ``i`` has no free slot for one more point (its own plus this plan's)."""
        return edges[i].load + extra[i] >= edges[i].max_batch

    for _ in range(n_points):
        chosen = [heapq.heappop(ranked) for _ in range(width)]
        rank, _, i = chosen[0]
        best = rank / weight[i]
        fleet_full = must_queue(i)
        # An edge that must queue the point and would finish it after the longest deadline we
        # give refuses it (same `finish_s`): sending it would only cost a round trip first.
        hopeless = [entry for entry in chosen if entry[0] / weight[entry[2]] > deadline_cap_s and must_queue(entry[2])]
        all_hopeless = len(hopeless) == len(chosen)
        if hopeless and not all_hopeless:
            for entry in hopeless:
                heapq.heappush(ranked, entry)
            chosen = [entry for entry in chosen if entry not in hopeless]
        if all_hopeless or (
                cloud is not None and cloud.queue_depth == 0 and fleet_full
                and best > cloud_takeover_factor * predicted_cloud_seconds(cloud, in_cloud, tokens_per_point)):
            for entry in chosen:
                heapq.heappush(ranked, entry)
            in_cloud += 1
            devices.append(())
            deadlines.append(0.0)
            continue
        for _, device_id, i in chosen:
            extra[i] += 1
            heapq.heappush(ranked, (weight[i] * predicted_seconds(edges[i], extra[i], tokens_per_point, unmeasured[i]),
                                    device_id, i))
        slowest = max(deadline_seconds(i) for _, _, i in chosen)
        devices.append(tuple(device_id for _, device_id, _ in chosen))
        deadlines.append(min(deadline_cap_s, max(deadline_floor_s, deadline_factor * slowest)))
    return Placement(devices=tuple(devices), deadlines_s=tuple(deadlines))
