"""Placement and mode decisions on fixed fleet snapshots."""

from __future__ import annotations

import pytest

from pice_cloud.scheduler import EdgeView, choose_mode, place, predicted_seconds


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
    capped = place(1, [loaded], tokens_per_point=80, deadline_cap_s=7)
    assert capped.deadlines_s[0] == 7
    floored = place(1, [EdgeView("a", tokens_per_s=1e6)], tokens_per_point=1, deadline_floor_s=5)
    assert floored.deadlines_s[0] == 5


def test_batching_is_cheaper_than_serial() -> None:
    edge = EdgeView("a", max_batch=4, tokens_per_s=20)
    # The fourth task in a batch of four finishes far sooner than four serial tasks would.
    assert predicted_seconds(edge, 3, 80) < 4 * predicted_seconds(edge, 0, 80) / 2


def test_no_edges_gives_empty_assignment() -> None:
    plan = place(3, [], tokens_per_point=80)
    assert plan.devices == ((), (), ())
