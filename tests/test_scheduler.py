"""Placement and mode decisions on fixed fleet snapshots."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from pice_cloud import defaults
from pice_cloud.scheduler import EdgeView, choose_mode, peer_rates, place, predicted_seconds


def test_mode_follows_request_and_fleet() -> None:
    assert choose_mode("auto", 0) == "cloud"
    assert choose_mode("auto", 2) == "progressive"
    assert choose_mode("cloud", 5) == "cloud"
    assert choose_mode("progressive", 0) == "progressive"


def test_points_spread_over_idle_equal_edges() -> None:
    edges = [EdgeView("a", max_batch=4, tokens_per_s=20), EdgeView("b", max_batch=4, tokens_per_s=20)]
    plan = place(6, edges, tokens_per_point=80)
    flat = [d for (d,) in plan.devices]
    assert flat.count("a") == 3
    assert flat.count("b") == 3


def test_busy_edge_gets_fewer_points() -> None:
    edges = [EdgeView("idle", max_batch=4, tokens_per_s=20),
             EdgeView("busy", max_batch=4, queue_depth=8, tokens_per_s=20)]
    plan = place(4, edges, tokens_per_point=80)
    assert all(d == ("idle",) for d in plan.devices)


def test_fast_edge_gets_more_points() -> None:
    edges = [EdgeView("fast", max_batch=4, tokens_per_s=100), EdgeView("slow", max_batch=4, tokens_per_s=10)]
    plan = place(6, edges, tokens_per_point=80)
    flat = [d for (d,) in plan.devices]
    assert flat.count("fast") > flat.count("slow")


def test_ensemble_width_uses_distinct_edges_and_caps_at_fleet() -> None:
    edges = [EdgeView(x, max_batch=2) for x in "abc"]
    plan = place(3, edges, tokens_per_point=40, width=2)
    assert all(len(set(d)) == 2 for d in plan.devices)
    plan = place(2, edges[:1], tokens_per_point=40, width=3)
    assert plan.devices == (("a",), ("a",))


def test_deadline_clamped_and_grows_with_queue() -> None:
    idle = EdgeView("a", max_batch=1, tokens_per_s=20)
    loaded = EdgeView("a", max_batch=1, queue_depth=20, tokens_per_s=20)
    d_idle = place(1, [idle], tokens_per_point=80, deadline_floor_s=1, deadline_factor=3, deadline_cap_s=1000)
    d_loaded = place(1, [loaded], tokens_per_point=80, deadline_floor_s=1, deadline_factor=3, deadline_cap_s=1000)
    assert d_idle.deadlines_s[0] == pytest.approx(3 * 80 / 20)
    assert d_loaded.deadlines_s[0] > d_idle.deadlines_s[0]
    # Two ahead on a one-slot edge: 12 s predicted, so a cap of 13 s clamps the deadline (5 x 12).
    queued = EdgeView("a", max_batch=1, queue_depth=2, tokens_per_s=20)
    capped = place(1, [queued], tokens_per_point=80, deadline_cap_s=13)
    assert capped.deadlines_s[0] == 13
    floored = place(1, [EdgeView("a", tokens_per_s=1e6)], tokens_per_point=1, deadline_floor_s=5)
    assert floored.deadlines_s[0] == 5


def test_a_point_no_edge_would_accept_goes_to_the_cloud_at_once() -> None:
    # 21 tasks ahead of a one-slot edge at 4 s each: past any deadline of 60 s, so the edge would
    # refuse the task (the same `finish_s`); the cloud writes it without the round trip.
    loaded = EdgeView("a", max_batch=1, queue_depth=20, tokens_per_s=20)
    assert place(2, [loaded], tokens_per_point=80, deadline_cap_s=60).devices == ((), ())
    # An ensemble keeps the edges that would accept and drops the hopeless one.
    free = EdgeView("b", max_batch=1, tokens_per_s=20)
    plan = place(1, [loaded, free], tokens_per_point=80, width=2, deadline_cap_s=60)
    assert plan.devices == (("b",),)
    # An edge with a free slot always takes the point, however slow (it never refuses those).
    slow = EdgeView("c", max_batch=2, queue_depth=1, tokens_per_s=0.5)
    assert place(1, [slow], tokens_per_point=80, deadline_cap_s=60).devices == (("c",),)


@pytest.mark.parametrize("seed", range(20))
def test_edges_accept_what_the_cloud_placed(seed: int) -> None:
    """The edge's admission check (`pice_edge.node.EdgeNode._would_miss_deadline`: a task that
    must queue and by `finish_s` would end after its deadline is refused) accepts every task
    `place` assigned, when the edge is in the state the cloud saw."""
    import random

    from pice_edge.timing import finish_s

    rng = random.Random(seed)
    edges = [EdgeView(f"e{i}", max_batch=rng.choice([1, 2, 4, 8]), queue_depth=rng.randint(0, 30),
                      tokens_per_s=rng.uniform(2, 60), link_delay_s=rng.uniform(0, 0.5))
             for i in range(rng.randint(1, 12))]
    tokens = rng.choice([40, 80, 160])
    plan = place(rng.randint(1, 10), edges, tokens_per_point=tokens, width=rng.randint(1, 3))
    by_id = {e.device_id: e for e in edges}
    ahead = {e.device_id: e.load for e in edges}
    for devices, deadline in zip(plan.devices, plan.deadlines_s, strict=True):
        for device_id in devices:
            edge = by_id[device_id]
            if ahead[device_id] >= edge.max_batch:
                assert finish_s(ahead[device_id], edge.max_batch, tokens, edge.tokens_per_s) <= deadline
            ahead[device_id] += 1


def test_batching_is_cheaper_than_serial() -> None:
    edge = EdgeView("a", max_batch=4, tokens_per_s=20)
    # The fourth task in a batch of four finishes far sooner than four serial tasks would.
    assert predicted_seconds(edge, 3, 80) < 4 * predicted_seconds(edge, 0, 80) / 2


def test_no_edges_gives_empty_assignment() -> None:
    plan = place(3, [], tokens_per_point=80)
    assert plan.devices == ((), (), ())


# --- load-aware budget, ensemble width, cloud takeover, link delay --------------------------

from pice_cloud.scheduler import Budget, CloudView, ensemble_width, plan_budget  # noqa: E402

BASE = Budget(max_points=6, max_words=6, tokens_per_point=80)


def test_idle_system_keeps_the_full_budget() -> None:
    edges = [EdgeView("a", max_batch=4), EdgeView("b", max_batch=4)]
    assert plan_budget(BASE, CloudView(queue_depth=0, max_batch=4), edges) == BASE


def test_loaded_cloud_writes_shorter_sketches() -> None:
    edges = [EdgeView("a", max_batch=8), EdgeView("b", max_batch=8)]
    light = plan_budget(BASE, CloudView(queue_depth=4, max_batch=4), edges)
    heavy = plan_budget(BASE, CloudView(queue_depth=40, max_batch=4), edges)
    assert light.max_points < BASE.max_points
    assert heavy.max_points == 3
    assert heavy.max_words == 4
    assert heavy.tokens_per_point == BASE.tokens_per_point  # the edges are free: full expansions


def test_busy_fleet_gets_shorter_expansions() -> None:
    busy = [EdgeView("a", max_batch=4, queue_depth=4), EdgeView("b", max_batch=4, queue_depth=3)]
    budget = plan_budget(BASE, CloudView(), busy)
    assert BASE.tokens_per_point // 2 <= budget.tokens_per_point < BASE.tokens_per_point
    # Empty fleet: nothing to size for (the cloud answers alone).
    assert plan_budget(BASE, CloudView(), []) == BASE


def test_ensemble_width_only_uses_free_slots() -> None:
    idle = [EdgeView(x, max_batch=4) for x in "abc"]
    assert ensemble_width(4, idle, max_width=3) == 3
    assert ensemble_width(6, idle, max_width=3) == 2
    busy = [EdgeView(x, max_batch=4, queue_depth=4) for x in "abc"]
    assert ensemble_width(2, busy, max_width=3) == 1
    assert ensemble_width(2, [], max_width=3) == 1


def test_idle_cloud_takes_points_only_from_a_full_fleet() -> None:
    fast_idle_cloud = CloudView(queue_depth=0, tokens_per_s=200)
    full = [EdgeView("a", max_batch=1, queue_depth=3, tokens_per_s=10)]
    plan = place(2, full, tokens_per_point=80, cloud=fast_idle_cloud)
    assert plan.devices == ((), ())
    free = [EdgeView("a", max_batch=4, tokens_per_s=10)]
    assert place(2, free, tokens_per_point=80, cloud=fast_idle_cloud).devices == (("a",), ("a",))
    busy_cloud = CloudView(queue_depth=2, tokens_per_s=200)
    assert place(2, full, tokens_per_point=80, cloud=busy_cloud).devices == (("a",), ("a",))


def test_one_slow_edge_and_link_delay() -> None:
    near = EdgeView("near", max_batch=4, tokens_per_s=20, link_delay_s=0.01)
    far = EdgeView("far", max_batch=4, tokens_per_s=20, link_delay_s=5.0)
    slow = EdgeView("slow", max_batch=4, tokens_per_s=2)
    plan = place(3, [near, far, slow], tokens_per_point=80)
    flat = [d for (d,) in plan.devices]
    assert "slow" not in flat
    assert flat.count("near") >= flat.count("far")
    assert predicted_seconds(far, 0, 80) - predicted_seconds(near, 0, 80) == pytest.approx(4.99)


def test_an_unmeasured_edge_is_expected_at_its_peers_rate() -> None:
    # A burst on a fleet the cloud has measured only in part: the unmeasured edges (rate 0) of
    # the same model take their share, instead of being ranked at the pessimistic default.
    warm = [EdgeView(f"w{i}", max_batch=4, tokens_per_s=27.0, model_id="smol@b1") for i in range(2)]
    cold = [EdgeView(f"c{i}", max_batch=4, model_id="smol@b2") for i in range(8)]
    plan = place(40, [*warm, *cold], tokens_per_point=80)
    counts = Counter(d for (d,) in plan.devices)
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    # ... but a cold edge's deadline is still timed at the default (it may be slower than its peers).
    cold_deadline = next(t for (d,), t in zip(plan.devices, plan.deadlines_s, strict=True) if d.startswith("c"))
    warm_deadline = next(t for (d,), t in zip(plan.devices, plan.deadlines_s, strict=True) if d.startswith("w"))
    assert cold_deadline > warm_deadline
    # Peers running another model say nothing about this one: the default rate then.
    other = [EdgeView(f"o{i}", max_batch=4, tokens_per_s=200.0, model_id="big") for i in range(2)]
    assert peer_rates([*other, *cold]) == {"big": 200.0}
    plan = place(8, [*other, *cold], tokens_per_point=80)
    assert all(d.startswith("o") for (d,) in plan.devices)


def _place_by_sorting(n_points: int, edges: list[EdgeView], *, tokens_per_point: int, width: int,
                      cloud: CloudView | None) -> tuple[tuple[tuple[str, ...], ...], tuple[float, ...]]:
    """The placement rule written the obvious way (a sort per point): `place` must agree.
    Every edge runs the same model here: an unmeasured one is expected at the others' median."""
    from pice_cloud.scheduler import DEFAULT_EDGE_TOKENS_PER_S, predicted_cloud_seconds, predicted_seconds

    measured = [e.tokens_per_s for e in edges if e.tokens_per_s > 0]
    peer = statistics.median(measured) if measured else DEFAULT_EDGE_TOKENS_PER_S
    slow = min(peer, DEFAULT_EDGE_TOKENS_PER_S)
    width = max(1, min(width, len(edges)))
    extra = {e.device_id: 0 for e in edges}
    in_cloud, devices, deadlines = 0, [], []
    for _ in range(n_points):
        ranked = sorted(edges, key=lambda e: (predicted_seconds(e, extra[e.device_id], tokens_per_point, peer),
                                              e.device_id))
        first = ranked[0]
        best = predicted_seconds(first, extra[first.device_id], tokens_per_point, peer)
        if (cloud is not None and cloud.queue_depth == 0 and first.load + extra[first.device_id] >= first.max_batch
                and best > 2.0 * predicted_cloud_seconds(cloud, in_cloud, tokens_per_point)):
            in_cloud += 1
            devices.append(())
            deadlines.append(0.0)
            continue
        chosen = ranked[:width]
        slowest = max(predicted_seconds(e, extra[e.device_id], tokens_per_point, slow) for e in chosen)
        for e in chosen:
            extra[e.device_id] += 1
        devices.append(tuple(e.device_id for e in chosen))
        deadlines.append(min(defaults.DEADLINE_CAP_S, max(defaults.DEADLINE_FLOOR_S,
                                                          defaults.DEADLINE_FACTOR * slowest)))
    return tuple(devices), tuple(deadlines)


@pytest.mark.parametrize("seed", range(40))
def test_place_agrees_with_the_sort_per_point_rule(seed: int) -> None:
    rng = random.Random(seed)
    edges = [EdgeView(device_id=f"e{i:02d}", max_batch=rng.choice([1, 2, 4, 8]), queue_depth=rng.randint(0, 6),
                      outstanding=rng.randint(0, 6), tokens_per_s=rng.choice([0.0, 5.0, 20.0, 80.0]),
                      link_delay_s=rng.choice([0.0, 0.05])) for i in range(rng.randint(1, 30))]
    cloud = rng.choice([None, CloudView(queue_depth=0, tokens_per_s=30.0), CloudView(queue_depth=2)])
    n, width = rng.randint(1, 8), rng.randint(1, 3)
    placement = place(n, edges, tokens_per_point=48, width=width, cloud=cloud)
    assert (placement.devices, placement.deadlines_s) == _place_by_sorting(n, edges, tokens_per_point=48,
                                                                           width=width, cloud=cloud)


def test_replicas_placing_from_one_view_prefer_different_edges() -> None:
    # Twenty idle edges whose measured rates differ by a hair: without `spread` every replica
    # would take the same fastest ones, each thinking them free.
    edges = [EdgeView(f"e{i:02d}", max_batch=1, tokens_per_s=25.0 + 0.01 * i) for i in range(20)]
    alone = place(6, edges, tokens_per_point=80)
    assert {d for (d,) in alone.devices} == {f"e{i:02d}" for i in range(14, 20)}  # the fastest six
    picks = [{d for (d,) in place(6, edges, tokens_per_point=80, spread=f"cloud-{k}").devices} for k in range(4)]
    assert all(len(p) == 6 for p in picks)
    assert len(set.union(*picks)) >= 15, picks  # four replicas' points spread over most of the fleet
    # The ranking moves; the predictions do not: deadlines are the unweighted ones.
    spread = place(6, edges, tokens_per_point=80, spread="cloud-0")
    assert max(spread.deadlines_s) <= max(alone.deadlines_s) * 1.01


def test_a_short_sketch_shares_the_answers_budget_among_its_points() -> None:
    # 6 x 80 tokens: three points get twice as long, five a little longer, six (or more) the budget.
    assert [BASE.point_tokens(n) for n in (3, 4, 5, 6)] == [160, 120, 96, 80]
    assert BASE.point_tokens(7) == 80  # never below tokens_per_point
    # The stretch is capped: one point is not given the whole answer's budget.
    assert BASE.point_tokens(1) == 160
    assert Budget(max_points=6, tokens_per_point=80, point_stretch=1.0).point_tokens(3) == 80
    # Under load `plan_budget` shrinks the budget first, and the stretch shares what is left.
    busy = [EdgeView("a", max_batch=4, queue_depth=4), EdgeView("b", max_batch=4, queue_depth=3)]
    loaded = plan_budget(BASE, CloudView(), busy)
    assert loaded.point_tokens(3) == min(2 * loaded.tokens_per_point, 6 * loaded.tokens_per_point // 3)
    assert loaded.point_tokens(3) < BASE.point_tokens(3)
    # A client's max_tokens caps the whole answer's expansions (at least a token a point).
    assert BASE.point_tokens(4, answer_tokens=100) == 25
    assert BASE.point_tokens(3, answer_tokens=1000) == 160
    assert BASE.point_tokens(5, answer_tokens=2) == 1
