"""Per-request decisions: answering mode, sketch budget, and which edges expand which points.

Everything here is a pure, deterministic function of (request, fleet snapshot, settings) so
it can be unit-tested on fixed fleet states and replayed by a simulator.

Placement rule: a point goes to the edge whose predicted finish time is earliest, counting
the work already queued there (its reported queue plus what this cloud has sent and not yet
heard back) and the points placed earlier in the same plan. An edge generates up to
``max_batch`` tasks together; a decode step of a batch of ``b`` costs ``b ** BATCH_EXPONENT``
times a step at batch 1 (measured for SmolLM2-135M on one CPU thread: 21 tok/s at batch 1,
51 at 4 and 93 at 8, i.e. exponents 0.35 and 0.28), so piling points onto one edge is
cheaper per token but slower per point than spreading them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["cloud", "progressive"]
RequestedMode = Literal["auto", "cloud", "progressive"]

#: Decode speed assumed for an edge that has not reported one yet (tokens/s). SmolLM2-135M on
#: one free CPU core measures ~20 at batch 1; half that covers a shared or slower core, so a
#: fresh edge is not timed out before its first measurement.
DEFAULT_EDGE_TOKENS_PER_S = 10.0
BATCH_EXPONENT = 0.35


@dataclass(frozen=True)
class EdgeView:
    """The scheduler's snapshot of one live edge."""

    device_id: str
    max_batch: int = 1
    queue_depth: int = 0
    outstanding: int = 0
    tokens_per_s: float = 0.0

    @property
    def load(self) -> int:
        return max(self.queue_depth, self.outstanding)


@dataclass(frozen=True)
class Budget:
    """How long the sketch and each expansion may be."""

    max_points: int = 6
    max_words: int = 6
    sketch_tokens: int = 64
    tokens_per_point: int = 80


@dataclass(frozen=True)
class Placement:
    """Which edges expand each point, and when the cloud stops waiting for them."""

    devices: tuple[tuple[str, ...], ...]
    #: Seconds after dispatch at which each point falls back to the cloud.
    deadlines_s: tuple[float, ...]


def choose_mode(requested: RequestedMode, live_edges: int, suits_sketch: bool | None = None) -> Mode:
    """The answering mode of one request.

    An explicit ``requested`` mode wins. Under ``auto``: cloud-only when no edge is live, or when
    the mode router judged the question unsuited to a sketch (``suits_sketch`` False: code,
    math, step-by-step, ...); progressive otherwise, including when no router ran (None).
    """
    if requested == "cloud":
        return "cloud"
    if requested == "progressive":
        return "progressive"
    if live_edges <= 0 or suits_sketch is False:
        return "cloud"
    return "progressive"


def predicted_seconds(edge: EdgeView, extra_load: int, tokens: int) -> float:
    """Predicted time for ``edge`` to finish one more point of ``tokens`` tokens."""
    rate = edge.tokens_per_s if edge.tokens_per_s > 0 else DEFAULT_EDGE_TOKENS_PER_S
    size = max(1, edge.max_batch)
    ahead = edge.load + extra_load  # tasks queued before this one
    full_batches, in_last = divmod(ahead, size)
    step = tokens / rate  # seconds for one sequence decoded alone
    return float(full_batches * step * size**BATCH_EXPONENT + step * (in_last + 1) ** BATCH_EXPONENT)


def place(
    n_points: int,
    edges: Sequence[EdgeView],
    *,
    tokens_per_point: int,
    width: int = 1,
    deadline_floor_s: float = 5.0,
    deadline_factor: float = 3.0,
    deadline_cap_s: float = 60.0,
) -> Placement:
    """Assign each point to ``width`` distinct edges (fewer when the fleet is smaller).

    The deadline of a point is ``deadline_factor`` times the slowest predicted finish among its
    edges, clamped to [deadline_floor_s, deadline_cap_s]: generous enough for a noisy device,
    short enough that a dead one costs the user little.
    """
    if not edges:
        return Placement(devices=tuple(() for _ in range(n_points)), deadlines_s=tuple(0.0 for _ in range(n_points)))
    width = max(1, min(width, len(edges)))
    extra = {e.device_id: 0 for e in edges}
    devices: list[tuple[str, ...]] = []
    deadlines: list[float] = []
    for _ in range(n_points):
        ranked = sorted(edges, key=lambda e: (predicted_seconds(e, extra[e.device_id], tokens_per_point), e.device_id))
        chosen = ranked[:width]
        slowest = max(predicted_seconds(e, extra[e.device_id], tokens_per_point) for e in chosen)
        for e in chosen:
            extra[e.device_id] += 1
        devices.append(tuple(e.device_id for e in chosen))
        deadlines.append(min(deadline_cap_s, max(deadline_floor_s, deadline_factor * slowest)))
    return Placement(devices=tuple(devices), deadlines_s=tuple(deadlines))
