"""The fleet simulator (tools/simulate.py) against cases worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import simulate


def test_one_request_takes_sketch_plus_window_plus_point_plus_link() -> None:
    config = simulate.Config(cloud_rate=50.0, cloud_batch_cost=0.0, cloud_max_batch=8, edges=[(20.0, 0.0, 4)] * 5,
                             points=5, tokens_per_point=40, link_delay_s=0.1, window_s=0.02)
    result = simulate.closed_loop(config, "progressive", concurrency=1, duration=0.001)
    # Sketch: 30 tokens at 50/s; each point on its own edge: 40 tokens at 20/s.
    assert result["latency_p50_s"] == pytest.approx(30 / 50 + 0.02 + 40 / 20 + 0.1, abs=1e-6)
    assert result["cloud_point_share"] == 0.0
    # The cloud's GPU time is the sketch's alone.
    assert result["gpu_s_per_request"] == pytest.approx(30 / 50)


def test_cloud_only_requests_share_the_cloud_steps() -> None:
    config = simulate.Config(cloud_rate=10.0, cloud_batch_cost=0.5, cloud_max_batch=8, edges=[], answer_tokens=20)
    result = simulate.closed_loop(config, "cloud", concurrency=2, duration=0.001)
    # The first request's first step runs alone (0.1 s); then 19 steps of both ((1 + 0.5) / 10 s,
    # half each), and the second request's last token alone: answers at 2.95 s and 3.05 s.
    assert result["latency_p50_s"] == pytest.approx(0.1 + 19 * 0.15 + 0.1)
    assert result["gpu_s_per_request"] == pytest.approx(0.1 + 19 * 0.15 / 2)


def test_a_full_fleet_sends_points_to_the_cloud() -> None:
    config = simulate.Config(cloud_rate=1000.0, cloud_batch_cost=0.0, cloud_max_batch=64, edges=[(5.0, 0.0, 1)],
                             points=5, tokens_per_point=40)
    result = simulate.closed_loop(config, "progressive", concurrency=4, duration=30)
    assert result["cloud_point_share"] > 0.5, "one slow edge cannot take 20 points at once"
