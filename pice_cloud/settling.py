"""Settling the points of one progressive request: each point's text is fixed once all its
edges answered or its deadline passed.

The aggregator settles a point with exactly one usable candidate the moment it arrives; this
module does the rest: it runs the ensemble selector over points with several candidates, and
has the cloud LLM expand points no edge answered in time (none assigned, the edges went
offline, or the deadline passed). A request never waits past its points' deadlines.

An edge that stops being live while it holds a point (its last will, or missed heartbeats: a
frozen or partitioned device) does not hold the point until its deadline: the point is placed
again at once, on another edge with a free slot, else expanded by the cloud; so is a point whose
edge refused it (full: other replicas' tasks fill it). A point is re-placed at most
`defaults.MAX_REPLACEMENTS` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pice_cloud import defaults
from pice_cloud.aggregator import ChosenPoint, PendingRequest, PointState
from pice_cloud.cloud_meter import CloudMeter
from pice_cloud.ensemble import ConfidenceSelector, SelectionItem, Selector
from pice_cloud.events import EXPANSION_RESAMPLE_SEED_OFFSET, resampled
from pice_cloud.fleet import Fleet
from pice_cloud.guards import drop_repeated_sentences
from pice_cloud.llm.base import ChatRequest, Completion
from pice_edge.prompts import clean_expansion, expansion_messages
from pice_edge.protocol import Sampling
from pice_edge.rejects import Rejections

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
    #: The cloud's own expansions the guards refused, by reason (``pice_cloud_expansion_rejected``).
    rejections: Rejections | None = None

    async def run(self, question: str, points: list[str], pending: PendingRequest, deadlines_s: Sequence[float],
                  tokens_per_point: int, replace: Replacer | None = None) -> None:
        """Settle every point of ``pending``; returns when all are settled (cancel to stop).

        ``replace`` re-places a point whose edges all stopped being live before answering."""
        start = time.monotonic()
        due = [start + d for d in deadlines_s]
        replaced: Counter[int] = Counter()
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
                outstanding = state.outstanding()
                # A point is due at its deadline, or once none of the edges it still waits for is
                # live (all answered or refused, none was assigned, or the rest went offline or
                # went quiet).
                waiting = any(self.fleet.is_live(d) for d in outstanding)
                if waiting and now < due[state.index]:
                    continue
                # Re-placed: a point whose edges went quiet, or that an assigned edge refused
                # (not one whose replacement answered with a refused candidate: that is the cloud's).
                if ((outstanding or state.refused & state.expected) and not waiting and not state.usable()
                        and replace is not None and replaced[state.index] < defaults.MAX_REPLACEMENTS
                        and now < due[state.index]):
                    replaced[state.index] += 1
                    target = replace(state.index, state.expected | frozenset(state.refused))
                    if target is not None:
                        device, deadline_s = target
                        log.info("request %s: point %d re-placed on %s (%s)", pending.request_id,
                                 state.index + 1, device,
                                 ", ".join([f"{d} stopped answering" for d in sorted(outstanding)]
                                           + [f"{d} refused" for d in sorted(state.refused)]))
                        for gone in outstanding:
                            self.fleet.task_abandoned(pending.request_id, state.index, gone, answered=False)
                        state.expected = (state.expected - outstanding - state.refused) | {device}
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
                               pending.other_candidates(s.index))
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
        """The cloud LLM expands points no edge answered. Its text passes the same guard as an
        edge's: a refused one is sampled once more (another seed, temperature at least
        `defaults.EXPANSION_RESAMPLE_TEMPERATURE`); if that is refused too, the first (the
        request's own sampling; the second when the first said nothing) goes in without the
        sentences other points already say."""
        log.info("request %s: cloud expands point(s) %s", pending.request_id, [i + 1 for i in indices])
        texts = await self._cloud_texts(question, points, indices, tokens_per_point,
                                        [self.sampling(i) for i in indices])
        refused = {i: reason for i, (text, _) in texts.items()
                   if pending.check is not None and (reason := pending.check(i, text, pending.other_texts(i)))}
        if refused:
            for index, reason in refused.items():
                if self.rejections is not None:
                    self.rejections.record("cloud", reason, f"{pending.request_id}/{index}")
            log.info("request %s: cloud expansion of point(s) %s refused (%s); sampling again", pending.request_id,
                     [i + 1 for i in refused], ", ".join(sorted(set(refused.values()))))
            retry = list(refused)
            again = await self._cloud_texts(question, points, retry, tokens_per_point,
                                            [self._resampling(i) for i in retry])
            for index in retry:
                text, tokens = again[index]
                assert pending.check is not None
                if pending.check(index, text, pending.other_texts(index)) is None:
                    texts[index] = (text, texts[index][1] + tokens)
                    continue
                # Both refused: keep the first (the request's own sampling) unless it said nothing.
                first = texts[index][0]
                best = text if refused[index] == "empty" else first
                texts[index] = (drop_repeated_sentences(best, pending.other_texts(index)) or best,
                                texts[index][1] + tokens)
        for index in indices:
            text, tokens = texts[index]
            pending.settle(ChosenPoint(index, text, "cloud", None, tokens, 0))

    async def _cloud_texts(self, question: str, points: list[str], indices: list[int], tokens_per_point: int,
                           samplings: list[Sampling]) -> dict[int, tuple[str, int]]:
        requests = [ChatRequest(expansion_messages(question, points, i), max_tokens=tokens_per_point,
                                temperature=s.temperature, top_p=s.top_p, seed=s.seed)
                    for i, s in zip(indices, samplings, strict=True)]
        results: list[Completion] = await self.cloud.complete(requests)
        return {index: (clean_expansion(res.text, truncated=res.tokens >= tokens_per_point, point=points[index])
                        or points[index], res.tokens)
                for index, res in zip(indices, results, strict=True)}

    def _resampling(self, index: int) -> Sampling:
        return resampled(self.sampling(index), min_temperature=defaults.EXPANSION_RESAMPLE_TEMPERATURE,
                         seed_offset=EXPANSION_RESAMPLE_SEED_OFFSET, unseeded=index)
