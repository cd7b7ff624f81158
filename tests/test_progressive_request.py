"""The progressive request's state machine, driven on a fake clock with no broker: every
transition (candidate, refusal, edge gone, deadline, reconnect, client gone, the cloud's and the
selector's answers) and the fleet accounting it alone writes; and the pure planner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest

from pice_cloud import defaults
from pice_cloud.config import ServiceConfig
from pice_cloud.ensemble import SelectionItem
from pice_cloud.events import GenerationOptions
from pice_cloud.progressive import (
    Choose,
    CloudExpander,
    ExpandInCloud,
    PointSampling,
    ProgressiveRequest,
    RejectionCounters,
    RequestDriver,
    SendTask,
    Settle,
    eligible,
    expansion_check,
    plan_replacement,
    plan_request,
)
from pice_cloud.scheduler import EdgeView
from pice_edge.protocol import EdgeStatus, FleetRollout, Sampling, TaskRefusal
from pice_edge.rejects import Rejections
from tests.progressive_support import QUESTION, FakeClock, Recorder, candidate, live_fleet, make_request

GOOD = "Write your goals down each Sunday and read them every morning before you start work."
OTHER = "Block two hours of the morning for deep work and keep meetings for the afternoon."


def _outstanding(fleet: object, device: str) -> int:
    return fleet.get(device).outstanding  # type: ignore[attr-defined, no-any-return]


def _settled(recorder: Recorder) -> dict[int, tuple[str, str | None, str]]:
    return {a.point.index: (a.point.source, a.point.device_id, a.point.text)  # type: ignore[attr-defined]
            for a in recorder.of(Settle)}


# --- candidates ----------------------------------------------------------------------------------

def test_start_sends_every_planned_task_and_counts_it_against_its_edge() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", "b")
    request = make_request([("a", "b"), ("b",)], fleet)
    recorder = Recorder()
    recorder(request.start(clock()))
    assert [(a.task.point, a.task.device_id) for a in recorder.of(SendTask)] == \
        [(0, "a"), (0, "b"), (1, "b")]  # type: ignore[attr-defined]
    assert (_outstanding(fleet, "a"), _outstanding(fleet, "b")) == (1, 2)
    assert request.next_wakeup() == pytest.approx(clock.now + 1.0 * fleet.expiry_heartbeats), \
        "next wake-up: when an edge would expire without a heartbeat (before the 30 s deadline)"
    with pytest.raises(RuntimeError):
        request.start(clock())


def test_a_lone_candidate_settles_its_point_at_once() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a")
    request = make_request([("a",), ("a",)], fleet)
    recorder = Recorder()
    recorder(request.start(clock()))
    recorder(request.on_candidate(candidate(1, "a", GOOD), clock()))
    assert _settled(recorder) == {1: ("edge", "a", GOOD)}
    assert request.chosen(0) is None
    assert _outstanding(fleet, "a") == 1, "the answered task no longer counts against the edge"
    assert request.accepted == 1


def test_several_candidates_go_to_the_selector_and_its_pick_settles_the_point() -> None:
    clock = FakeClock()
    request = make_request([("a", "b")], live_fleet(clock, "a", "b"))
    recorder = Recorder()
    recorder(request.start(clock()))
    recorder(request.on_candidate(candidate(0, "a", GOOD), clock()))
    assert not recorder.of(Choose), "b has not answered yet"
    recorder(request.on_candidate(candidate(0, "b", OTHER), clock()))
    [choose] = recorder.of(Choose)
    [item] = choose.items  # type: ignore[attr-defined]
    assert isinstance(item, SelectionItem)
    assert [c.device_id for c in item.candidates] == ["a", "b"]
    assert request.tick(clock()) == [], "a point being chosen is not chosen twice"
    recorder(request.on_choice(0, 1, clock()))
    assert _settled(recorder) == {0: ("edge", "b", OTHER)}
    assert request.chosen(0).candidates == 2  # type: ignore[union-attr]
    assert request.done


def test_duplicate_unassigned_unknown_and_late_candidates_are_rejected() -> None:
    clock = FakeClock()
    request = make_request([("a",), ("a", "b")], live_fleet(clock, "a", "b"))
    recorder = Recorder()
    recorder(request.start(clock()))
    recorder(request.on_candidate(candidate(0, "a", GOOD), clock()))
    recorder(request.on_candidate(candidate(0, "a", GOOD), clock()))  # QoS 1 re-delivery
    recorder(request.on_candidate(candidate(0, "b", GOOD), clock()))  # never asked for point 0
    recorder(request.on_candidate(candidate(5, "a", GOOD), clock()))
    recorder(request.on_candidate(candidate(1, "a", OTHER), clock()))
    clock.advance(31)
    recorder(request.tick(clock()))  # b missed the deadline: a's candidate is taken
    recorder(request.on_candidate(candidate(1, "b", GOOD), clock()))
    assert recorder.counters.protocol.snapshot() == {("candidate", "duplicate"): 1, ("candidate", "unassigned"): 1,
                                                     ("candidate", "unknown_point"): 1, ("candidate", "late"): 1}
    assert _settled(recorder)[1] == ("edge", "a", OTHER)
    assert request.accepted == 3


def _guarded_pair(second: str) -> tuple[FakeClock, ProgressiveRequest, Recorder]:
    """Two points on edge ``a`` under the real guard: point 0 answered with GOOD, point 1 with ``second``."""
    clock = FakeClock()
    points = ["Set clear goals", "Plan the day"]
    request = make_request([("a",), ("a",)], live_fleet(clock, "a"), points=points,
                           check=expansion_check(QUESTION, points))
    recorder = Recorder()
    recorder(request.start(clock()))
    recorder(request.on_candidate(candidate(0, "a", GOOD), clock()))
    recorder(request.on_candidate(candidate(1, "a", second), clock()))
    return clock, request, recorder


def test_a_candidate_the_guard_refuses_is_never_used_and_the_cloud_expands_the_point() -> None:
    clock, request, recorder = _guarded_pair(GOOD)  # point 1 repeats point 0
    assert recorder.counters.candidate_guard.snapshot() == {("candidate", "repeats_other_point"): 1}
    [expand] = recorder.of(ExpandInCloud)
    assert expand.points == (1,)  # type: ignore[attr-defined]
    recorder(request.on_cloud_texts(expand, {1: (OTHER, 17)}, clock()))  # type: ignore[arg-type]
    assert _settled(recorder)[1] == ("cloud", None, OTHER)
    assert request.chosen(1).tokens == 17  # type: ignore[union-attr]


def test_a_candidate_refused_for_a_repeated_sentence_is_used_without_it() -> None:
    own = "Block the first hour of each day for the one task that matters most, before any meetings or e-mail."
    _, _, recorder = _guarded_pair(f"{GOOD} {own}")
    assert recorder.counters.candidate_guard.snapshot() == {("candidate", "repeats_other_point"): 1}
    assert recorder.of(ExpandInCloud) == [], "no cloud work: the edge's own sentence is kept"
    assert _settled(recorder)[1] == ("edge", "a", own)


# --- the cloud's own expansions --------------------------------------------------------------------

def test_a_cloud_text_the_guard_refuses_is_sampled_once_more_and_both_tries_are_counted() -> None:
    clock = FakeClock()
    points = ["Set clear goals", "Plan the day"]
    request = make_request([("a",), ()], live_fleet(clock, "a"), points=points, seed=6,
                           check=expansion_check(QUESTION, points))
    recorder = Recorder()
    recorder(request.start(clock()))
    recorder(request.on_candidate(candidate(0, "a", GOOD), clock()))
    [first] = recorder.of(ExpandInCloud)
    assert first.samplings == (Sampling(seed=8),)  # type: ignore[attr-defined]
    recorder(request.on_cloud_texts(first, {1: (f"{OTHER} {GOOD}", 10)}, clock()))  # type: ignore[arg-type]
    assert recorder.counters.cloud_guard.snapshot() == {("cloud", "repeats_other_point"): 1}
    [_, again] = recorder.of(ExpandInCloud)
    assert again.attempt == 1  # type: ignore[attr-defined]
    assert again.samplings[0].temperature >= defaults.EXPANSION_RESAMPLE_TEMPERATURE  # type: ignore[attr-defined]
    assert again.samplings[0].seed not in (None, 8)  # type: ignore[attr-defined]
    recorder(request.on_cloud_texts(again, {1: (GOOD, 12)}, clock()))  # type: ignore[arg-type]
    # Both refused: the first try (the request's own sampling), without the repeated sentence.
    assert _settled(recorder)[1] == ("cloud", None, OTHER)
    assert request.chosen(1).tokens == 22, "both tries are the cloud's work"  # type: ignore[union-attr]


def test_an_edge_that_answers_while_the_cloud_expands_wins_the_point() -> None:
    clock = FakeClock()
    request = make_request([("a",)], live_fleet(clock, "a"), deadline_s=5)
    recorder = Recorder()
    recorder(request.start(clock()))
    clock.advance(6)
    recorder(request.tick(clock()))
    [expand] = recorder.of(ExpandInCloud)
    recorder(request.on_candidate(candidate(0, "a", GOOD), clock()))
    recorder(request.on_cloud_texts(expand, {0: (OTHER, 9)}, clock()))  # type: ignore[arg-type]
    assert _settled(recorder) == {0: ("edge", "a", GOOD)}
    assert len(recorder.of(Settle)) == 1, "a point is settled once"


def test_a_self_served_point_is_left_to_the_stream_and_settled_by_it() -> None:
    clock = FakeClock()
    request = make_request([(), ("a",)], live_fleet(clock, "a"), self_served=[0])
    recorder = Recorder()
    recorder(request.start(clock()))
    clock.advance(60)
    recorder(request.tick(clock()))
    assert [a.points for a in recorder.of(ExpandInCloud)] == [(1,)], "point 0 is not expanded twice"  # type: ignore[attr-defined]
    recorder(request.on_self_served(0, OTHER, 30))
    assert _settled(recorder)[0] == ("cloud", None, OTHER)
    with pytest.raises(ValueError, match="not served by the cloud"):
        request.on_self_served(1, OTHER, 3)


# --- refusals, edges gone, deadlines ---------------------------------------------------------------

def test_a_refusal_places_the_point_on_another_edge_at_once_and_then_the_cloud() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", "b")
    request = make_request([("a",)], fleet)
    recorder = Recorder()
    recorder(request.start(clock()))
    refusal = TaskRefusal(request_id="r1", point_index=0, device_id="a", reason="queue_full")
    recorder(request.on_refusal(refusal, clock()))
    recorder(request.on_refusal(refusal, clock()))  # a re-delivery counts once
    assert [a.task.device_id for a in recorder.of(SendTask)] == ["a", "b"]  # type: ignore[attr-defined]
    assert (_outstanding(fleet, "a"), _outstanding(fleet, "b")) == (0, 1)
    assert recorder.counters.protocol.snapshot() == {("refusal", "duplicate"): 1}
    recorder(request.on_refusal(TaskRefusal(request_id="r1", point_index=0, device_id="b", reason="queue_full"),
                                clock()))
    # Both full now (a refusal marks an edge full until its next status): the cloud expands it.
    assert [a.points for a in recorder.of(ExpandInCloud)] == [(0,)]  # type: ignore[attr-defined]
    assert _outstanding(fleet, "b") == 0


def test_an_edge_that_goes_quiet_loses_its_point_before_the_deadline() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", heartbeat_s=1.0)
    request = make_request([("a",)], fleet, deadline_s=30)
    recorder = Recorder()
    recorder(request.start(clock()))
    fleet.update(EdgeStatus(device_id="b", online=True, max_batch=2, free_slots=2, heartbeat_s=10.0))
    wake = request.next_wakeup()
    assert wake is not None
    assert wake < clock.now + 30
    clock.now = wake + 0.01  # a missed its heartbeats
    recorder(request.tick(clock()))
    assert [a.task.device_id for a in recorder.of(SendTask)] == ["a", "b"]  # type: ignore[attr-defined]
    assert request.points[0].expected == {"b"}


def test_an_edge_that_leaves_moves_its_points_on_now() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a")
    request = make_request([("a",), ("a",)], fleet)
    recorder = Recorder()
    recorder(request.start(clock()))
    fleet.update(EdgeStatus(device_id="a", online=False))  # its last will
    recorder(request.on_edge_gone("a", clock()))
    assert [a.points for a in recorder.of(ExpandInCloud)] == [(0, 1)], "no edge left: the cloud, in one batch"  # type: ignore[attr-defined]


def test_at_the_deadline_a_point_takes_what_arrived() -> None:
    clock = FakeClock()
    request = make_request([("a", "b", "c"), ("a",)], live_fleet(clock, "a", "b", "c", heartbeat_s=100), deadline_s=5)
    recorder = Recorder()
    recorder(request.start(clock()))
    recorder(request.on_candidate(candidate(0, "a", GOOD), clock()))
    recorder(request.on_candidate(candidate(0, "b", OTHER), clock()))
    clock.advance(4.9)
    assert request.tick(clock()) == []
    clock.advance(0.2)
    recorder(request.tick(clock()))
    [choose] = recorder.of(Choose)
    assert [item.index for item in choose.items] == [0]  # type: ignore[attr-defined]
    assert [a.points for a in recorder.of(ExpandInCloud)] == [(1,)]  # type: ignore[attr-defined]


def test_a_closed_request_releases_its_tasks_and_ignores_what_comes_later() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", "b")
    request = make_request([("a",), ("b",), ("a",)], fleet)
    recorder = Recorder()
    recorder(request.start(clock()))
    recorder(request.on_candidate(candidate(0, "a", GOOD), clock()))
    assert (_outstanding(fleet, "a"), _outstanding(fleet, "b")) == (1, 1)
    request.close()  # the client went away
    assert (_outstanding(fleet, "a"), _outstanding(fleet, "b")) == (0, 0)
    request.close()
    assert (_outstanding(fleet, "a"), _outstanding(fleet, "b")) == (0, 0), "released once"
    assert request.on_candidate(candidate(1, "b", OTHER), clock()) == []
    assert request.tick(clock.advance(100)) == []
    assert request.chosen(1) is None


# --- the driver ---------------------------------------------------------------------------------

class _Texts:
    name = model_id = "scripted"
    streams = False

    async def complete(self, requests: list[object]) -> list[object]:
        from pice_cloud.llm.base import Completion
        return [Completion(text=OTHER, tokens=11) for _ in requests]

    async def close(self) -> None:
        pass


async def test_the_driver_carries_out_actions_until_every_point_is_settled() -> None:
    from pice_cloud.cloud_meter import CloudMeter
    from pice_cloud.ensemble import ConfidenceSelector

    clock = FakeClock()
    fleet = live_fleet(clock, "a", "b", heartbeat_s=100)
    request = make_request([("a", "b"), ()], fleet)
    published: list[str] = []
    driver = RequestDriver(request, publish=lambda task: published.append(task.device_id),
                           expander=CloudExpander(CloudMeter(_Texts())),  # type: ignore[arg-type]
                           selector=ConfidenceSelector(), clock=clock,
                           counters=RejectionCounters(Rejections(), Rejections(), Rejections()))
    driver.feed(request.start(clock()))
    driver.feed(request.on_candidate(candidate(0, "a", GOOD, logprob=-2.0), clock()))
    driver.feed(request.on_candidate(candidate(0, "b", OTHER, logprob=-0.1), clock()))
    await asyncio.wait_for(driver.run(), 10)
    assert published == ["a", "b"]
    assert (await driver.point(0)).device_id == "b", "the more confident edge"
    assert (await driver.point(1)).source == "cloud"
    # The cloud's expansion is on the request's ledger, prompt included.
    work = request.ledger.by_purpose["fallback_expansion"]
    assert (work.calls, work.sequences, work.decode_tokens) == (1, 1, 11)
    assert work.prefill_tokens > 20
    assert set(request.ledger.by_purpose) == {"fallback_expansion"}


class _Down(_Texts):
    async def complete(self, requests: list[object]) -> list[object]:
        from pice_cloud.errors import BackendError
        raise BackendError("LLM server unreachable")


async def test_when_the_cloud_fails_the_waiting_points_fail_with_it_instead_of_hanging() -> None:
    from pice_cloud.cloud_meter import CloudMeter
    from pice_cloud.ensemble import ConfidenceSelector
    from pice_cloud.errors import BackendError

    clock = FakeClock()
    request = make_request([()], live_fleet(clock))
    driver = RequestDriver(request, publish=lambda task: None, expander=CloudExpander(CloudMeter(_Down())),  # type: ignore[arg-type]
                           selector=ConfidenceSelector(), clock=clock,
                           counters=RejectionCounters(Rejections(), Rejections(), Rejections()))
    driver.feed(request.start(clock()))
    with pytest.raises(BackendError):
        await asyncio.wait_for(driver.run(), 10)
    with pytest.raises(BackendError):
        await asyncio.wait_for(driver.point(0), 1)


class _SlowStream(_Texts):
    """Streams one word per 20 ms, up to 50 words (a cloud expansion that takes a second)."""

    streams = True
    stopped_after: ClassVar[list[int]] = []

    async def stream(self, request: object) -> AsyncIterator[object]:
        from pice_cloud.llm.base import Completion

        sent = 0
        try:
            for _ in range(50):
                await asyncio.sleep(0.02)
                sent += 1
                yield "word "
            yield Completion(text="word " * sent, tokens=sent)
        finally:
            _SlowStream.stopped_after.append(sent)


async def test_an_edge_that_settles_a_point_stops_the_clouds_expansion_of_it() -> None:
    from pice_cloud.cloud_meter import CloudMeter
    from pice_cloud.ensemble import ConfidenceSelector

    clock = FakeClock()
    fleet = live_fleet(clock, "a", heartbeat_s=100)
    request = make_request([("a",), ()], fleet)
    meter = CloudMeter(_SlowStream())  # type: ignore[arg-type]
    assert meter.streams
    driver = RequestDriver(request, publish=lambda task: None, expander=CloudExpander(meter),
                           selector=ConfidenceSelector(), clock=clock,
                           counters=RejectionCounters(Rejections(), Rejections(), Rejections()))
    driver.feed(request.start(clock()))
    driver.feed(request.tick(clock.advance(60)))  # point 0's deadline: the cloud expands it too
    runner = asyncio.create_task(driver.run())
    await asyncio.sleep(0.3)
    assert set(driver._in_cloud) == {0, 1}
    # The late edge's candidate wins point 0: the cloud stops expanding it, not point 1.
    driver.feed(request.on_candidate(candidate(0, "a", GOOD), clock()))
    await asyncio.wait_for(runner, 10)
    assert (await driver.point(0)).device_id == "a"
    assert (await driver.point(1)).source == "cloud"
    assert driver.cloud_cancelled == 1
    assert sorted(_SlowStream.stopped_after)[0] < 30 <= sorted(_SlowStream.stopped_after)[1] == 50
    # What the stopped expansion decoded is still on the ledger: the cloud computed it.
    work = request.ledger.by_purpose["fallback_expansion"]
    assert work.calls == 2
    assert 50 < work.decode_tokens < 80


# --- the planner --------------------------------------------------------------------------------

def _views(*ids: str, model: str = "", free: int = 2) -> list[EdgeView]:
    return [EdgeView(device_id=d, max_batch=free, tokens_per_s=20.0, model_id=model) for d in ids]


def test_the_plan_replicates_points_while_slots_are_free_and_keeps_the_first_for_the_cloud() -> None:
    config = ServiceConfig(ensemble_width=2)
    sampling = PointSampling.of(config, GenerationOptions(seed=5))
    plan = plan_request(3, _views("a", "b", "c"), config=config, sampling=sampling, tokens_per_point=40,
                        first_in_cloud=True)
    assert plan.self_served == frozenset({0})
    assert plan.devices[0] == ()
    assert [len(d) for d in plan.devices[1:]] == [2, 2]
    assert plan.cloud_points == ()
    replicas = [t.sampling for t in plan.tasks if t.point == 1]
    assert replicas[0] == sampling.point(1)
    assert replicas[1].seed != replicas[0].seed, "replicas of a point sample differently"
    assert replicas[1].temperature >= config.ensemble_temperature
    alone = plan_request(2, [], config=config, sampling=sampling, tokens_per_point=40)
    assert alone.cloud_points == (0, 1)
    assert alone.tasks == ()


def test_during_a_rollout_only_edges_on_the_new_build_take_points_when_they_have_room() -> None:
    old = _views("a", "b", model="smol@aaaaaaaaaaaa")
    new = _views("c", model="smol@bbbbbbbbbbbb", free=2)
    rollout = FleetRollout(model="smol", build="bbbbbbbbbbbb", source="http://127.0.0.1:1/v1", cloud_id="c1")
    assert [e.device_id for e in eligible(old + new, expander_model=None, rollout=rollout, points=2)] == ["c"]
    assert len(eligible(old + new, expander_model=None, rollout=rollout, points=3)) == 3, "not enough room yet"
    assert [e.device_id for e in eligible(old + new, expander_model="smol@aaaaaaaaaaaa", rollout=rollout)] == \
        ["a", "b"], "a pinned build is kept"
    assert eligible(old, expander_model="other", rollout=None) == []


def test_a_replacement_avoids_the_edges_it_must_and_needs_a_free_slot() -> None:
    config = ServiceConfig()
    edges = [*_views("a", "b"), EdgeView(device_id="c", max_batch=1, queue_depth=1)]
    task = plan_replacement(0, edges, avoid=frozenset({"a"}), config=config, sampling=Sampling(), tokens_per_point=40)
    assert task is not None
    assert task.device_id == "b"
    assert task.deadline_s >= config.deadline_floor_s
    assert plan_replacement(0, edges, avoid=frozenset({"a", "b"}), config=config, sampling=Sampling(),
                            tokens_per_point=40) is None, "c is full"


class _Scorer:
    async def score(self, requests: list[object], continuations: list[str]) -> list[float]:
        return [-float(len(c)) for c in continuations]


async def test_a_selector_that_has_the_cloud_score_candidates_puts_that_on_the_requests_ledger() -> None:
    from pice_cloud.cloud_meter import CloudMeter
    from pice_cloud.ensemble import EnsembleWeights, LearnedSelector

    clock = FakeClock()
    request = make_request([("a", "b")], live_fleet(clock, "a", "b", heartbeat_s=100))
    meter = CloudMeter(_Texts())  # type: ignore[arg-type]
    selector = LearnedSelector(EnsembleWeights(weights={"cloud_loglik": 1.0}), scorer=meter.metered_scorer(_Scorer()))
    driver = RequestDriver(request, publish=lambda task: None, expander=CloudExpander(meter), selector=selector,
                           clock=clock, counters=RejectionCounters(Rejections(), Rejections(), Rejections()))
    driver.feed(request.start(clock()))
    driver.feed(request.on_candidate(candidate(0, "a", GOOD), clock()))
    driver.feed(request.on_candidate(candidate(0, "b", OTHER), clock()))
    await asyncio.wait_for(driver.run(), 10)
    assert (await driver.point(0)).device_id == "b", "the shorter text, by the scorer"
    scoring = request.ledger.by_purpose["scoring"]
    assert (scoring.calls, scoring.sequences, scoring.decode_tokens) == (1, 2, 0)
    assert scoring.prefill_tokens > 2 * 20, "prompt and candidate, for each candidate"
    assert meter.ledger.by_purpose["scoring"].prefill_tokens == scoring.prefill_tokens


async def test_the_ledger_takes_the_engines_own_seconds_when_it_measures_them() -> None:
    from pice_cloud.cloud_meter import CloudMeter
    from pice_cloud.llm.base import ChatRequest, Completion
    from pice_edge.runtimes.base import ChatMessage

    class Measured(_Texts):
        async def complete(self, requests: list[object]) -> list[object]:
            await asyncio.sleep(0.05)  # waiting for the engine: not the request's compute
            return [Completion(text=OTHER, tokens=11, compute_s=0.25) for _ in requests]

    meter = CloudMeter(Measured())  # type: ignore[arg-type]
    request = ChatRequest([ChatMessage("user", QUESTION)], max_tokens=11)
    await meter.complete([request, request], purpose="cloud_answer")
    work = meter.ledger.by_purpose["cloud_answer"]
    assert (work.sequences, work.decode_tokens) == (2, 22)
    assert work.seconds == pytest.approx(0.5)  # 2 x 0.25, not the call's wall time
    await meter.complete([request], purpose="sketch")
    meter.llm.complete = _Texts().complete  # type: ignore[method-assign]  # an engine that does not measure:
    await meter.complete([request], purpose="resketch")  # the call's wall time stands in
    assert meter.ledger.by_purpose["sketch"].seconds == pytest.approx(0.25)
    assert 0 < meter.ledger.by_purpose["resketch"].seconds < 0.25
