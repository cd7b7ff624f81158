"""Settling the points of one progressive request: each point's text is fixed once all its
edges answered or its deadline passed.

The aggregator settles a point with exactly one usable candidate the moment it arrives; this
module does the rest: it runs the ensemble selector over points with several candidates, and
has the cloud LLM expand points no edge answered in time (none assigned, the edges went
offline, or the deadline passed). A request never waits past its points' deadlines.

An edge that stops being live while it holds a point (its last will, or missed heartbeats: a
frozen or partitioned device) does not hold the point until its deadline: the point is placed
again at once, on another edge with a free slot (once per point), else expanded by the cloud.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pice_cloud import defaults
from pice_cloud.aggregator import ChosenPoint, PendingRequest, PointState
from pice_cloud.cloud_meter import CloudMeter
from pice_cloud.ensemble import ConfidenceSelector, SelectionItem, Selector
from pice_cloud.fleet import Fleet
from pice_cloud.llm.base import ChatRequest
from pice_edge.prompts import clean_expansion, expansion_messages
from pice_edge.protocol import Sampling

log = logging.getLogger(__name__)

#: Places point ``index`` on another edge, avoiding the given devices: returns the edge and the
#: point's new deadline (seconds from now), or None when no edge has room.
Replacer = Callable[[int, frozenset[str]], "tuple[str, float] | None"]


@dataclass(frozen=True)
class PointSettler:
    """Settles the points of pending requests, by ensemble choice or cloud expansion."""

    fleet: Fleet
    selector: Selector
    cloud: CloudMeter
    #: Point index -> its sampling (the request's, with the point's derived seed).
    sampling: Callable[[int], Sampling] = lambda index: Sampling()

    async def run(self, question: str, points: list[str], pending: PendingRequest, deadlines_s: Sequence[float],
                  tokens_per_point: int, replace: Replacer | None = None) -> None:
        """Settle every point of ``pending``; returns when all are settled (cancel to stop).

        ``replace`` re-places a point whose edges all stopped being live before answering."""
        start = time.monotonic()
        due = [start + d for d in deadlines_s]
        replaced: set[int] = set()
        while True:
            now = time.monotonic()
            missing: list[int] = []
            to_choose: list[PointState] = []
            if pending.reconnected_at is not None:
                # The broker connection dropped while we waited: what was lost will not come.
                grace_end = pending.reconnected_at + defaults.RECONNECT_GRACE_S
                due = [min(d, grace_end) for d in due]
            for state in pending.points:
                if state.settled or state.index in pending.self_served:
                    continue
                outstanding = state.expected - state.received.keys()
                # A point is due at its deadline, or once none of the edges it still waits for is
                # live (all answered, none was assigned, or the rest went offline or went quiet).
                waiting = any(self.fleet.is_live(d) for d in outstanding)
                if waiting and now < due[state.index]:
                    continue
                if (outstanding and not waiting and not state.usable() and replace is not None
                        and state.index not in replaced and now < due[state.index]):
                    replaced.add(state.index)
                    target = replace(state.index, state.expected)
                    if target is not None:
                        device, deadline_s = target
                        log.info("request %s: point %d re-placed on %s (%s stopped answering)", pending.request_id,
                                 state.index + 1, device, ", ".join(sorted(outstanding)))
                        for gone in outstanding:
                            self.fleet.task_abandoned(pending.request_id, state.index, gone, answered=False)
                        state.expected = (state.expected - outstanding) | {device}
                        due[state.index] = now + deadline_s
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
            waiting_for = [s for s in pending.points if not s.settled and s.index not in pending.self_served]
            wake = [due[s.index] for s in waiting_for]
            if not wake:
                return
            # Also wake when an edge we wait for would stop being live (a missed heartbeat).
            for s in waiting_for:
                wake += [t for d in s.expected - s.received.keys()
                         if (t := self.fleet.expires_at(d)) is not None and t > now]
            pending.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pending.wakeup.wait(), timeout=max(0.0, min(wake) - time.monotonic()) + 0.01)

    async def _choose(self, question: str, points: list[str], pending: PendingRequest,
                      states: list[PointState], tokens_per_point: int) -> None:
        """Run the ensemble selector over every point that has several candidates."""
        items = [SelectionItem(question, points, s.index, s.usable(), tokens_per_point,
                               [c.text for o in pending.points if o.index != s.index for c in o.usable()])
                 for s in states]
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
        log.info("request %s: cloud expands point(s) %s", pending.request_id, [i + 1 for i in indices])
        requests = []
        for i in indices:
            sampling = self.sampling(i)
            requests.append(ChatRequest(expansion_messages(question, points, i), max_tokens=tokens_per_point,
                                        temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed))
        results = await self.cloud.complete(requests)
        for index, res in zip(indices, results, strict=True):
            text = clean_expansion(res.text, truncated=res.tokens >= tokens_per_point, point=points[index]) \
                or points[index]
            pending.settle(ChosenPoint(index, text, "cloud", None, res.tokens, 0))
