"""The fleet simulator (tools/simulate.py) against cases worked out by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import simulate
from simulate import Mix, Sample, Work

from pice_cloud.config import ServiceConfig


def mix(**modes: list[dict[str, Any]]) -> Mix:
    """A ledger by hand: per mode, requests given as {purpose: (prefill, decode[, sequences])},
    plus "served" and "points" when not the defaults (progressive, 5)."""
    samples = {}
    for mode, requests in modes.items():
        built = []
        for r in requests:
            r = dict(r)
            served, points = r.pop("served", "cloud" if mode == "cloud" else "progressive"), r.pop("points", 5)
            work = {p: Work(v[2] if len(v) > 2 else 1, v[0], v[1]) for p, v in r.items()}
            built.append(Sample(served, points, work))
        samples[mode] = tuple(built)
    return Mix("test", samples, Work(1, 0.0, 40), "test")


def fleet(**kw: Any) -> simulate.Config:
    """One cloud at 50 tokens/s (prefill 1,000 tokens/s), five edges at 20 tokens/s, points of
    40 tokens, one edge per point, 0.1 s round trip, 20 ms batch window."""
    return simulate.Config(**{"cloud_rate": 50.0, "cloud_batch_cost": 0.0, "cloud_max_batch": 8,
                              "edges": [(20.0, 0.0, 4)] * 5, "points": 5, "tokens_per_point": 40,
                              "ensemble_width": 1, "link_delay_s": 0.1, "window_s": 0.02, "prefill_rate": 1000.0,
                              **kw})


def alone(config: simulate.Config, mode: str = "progressive") -> dict[str, Any]:
    return simulate.closed_loop(config, mode, concurrency=1, duration=0.001)


def test_one_request_takes_sketch_plus_window_plus_point_plus_link() -> None:
    result = alone(fleet(mix=mix(progressive=[{"sketch": (0, 30)}])))
    # Sketch: 30 tokens at 50/s; each point on its own edge: 40 tokens at 20/s.
    assert result["latency_p50_s"] == pytest.approx(30 / 50 + 0.02 + 40 / 20 + 0.1, abs=1e-6)
    assert result["cloud_point_share"] == 0.0
    # The cloud's GPU time is the sketch's alone.
    assert result["gpu_s_per_request"] == pytest.approx(30 / 50)


def test_the_sketch_prompt_costs_gpu_time() -> None:
    """The old model charged a sketch 6 decode tokens a heading and nothing for its prompt."""
    result = alone(fleet(mix=mix(progressive=[{"sketch": (500, 30)}])))
    # 500 prompt tokens at 1,000/s before the 30 decode steps.
    assert result["latency_p50_s"] == pytest.approx(0.5 + 30 / 50 + 0.02 + 40 / 20 + 0.1, abs=1e-6)
    assert result["gpu_s_by_purpose"] == {"sketch": pytest.approx(0.5 + 30 / 50)}
    assert result["cloud_work_per_request"] == {"sketch": {"prefill_tokens": 500, "decode_tokens": 30}}


def test_resketches_and_fallback_expansions_cost_more_than_a_clean_sketch() -> None:
    clean = alone(fleet(mix=mix(progressive=[{"sketch": (200, 30)}])))
    refused = alone(fleet(mix=mix(progressive=[{"sketch": (200, 30), "resketch": (200, 30),
                                                "fallback_expansion": (300, 40)}])))
    sketch = 0.2 + 30 / 50
    expansion = 0.3 + 40 / 50
    assert clean["gpu_s_per_request"] == pytest.approx(sketch)
    assert refused["gpu_s_by_purpose"] == {"sketch": pytest.approx(sketch), "resketch": pytest.approx(sketch),
                                           "fallback_expansion": pytest.approx(expansion)}
    assert refused["gpu_s_per_request"] == pytest.approx(2 * sketch + expansion)
    # One point's edge candidate was refused: the cloud expands it once it came back.
    assert refused["cloud_point_share"] == pytest.approx(1 / 5)
    assert refused["latency_p50_s"] == pytest.approx(2 * sketch + 0.02 + 40 / 20 + 0.1 + expansion, abs=1e-6)


def test_refused_sketches_end_in_a_cloud_only_answer() -> None:
    result = alone(fleet(mix=mix(progressive=[{"sketch": (100, 30), "resketch": (100, 30),
                                               "cloud_answer": (50, 200), "served": "cloud"}])))
    assert result["share_progressive"] == 0.0
    assert result["gpu_s_per_request"] == pytest.approx(2 * (0.1 + 0.6) + 0.05 + 200 / 50)
    assert result["latency_p50_s"] == pytest.approx(2 * (0.1 + 0.6) + 0.05 + 200 / 50, abs=1e-6)


def test_the_first_point_and_scoring_are_cloud_work_too() -> None:
    result = alone(fleet(mix=mix(progressive=[{"sketch": (0, 30), "first_point": (100, 40), "scoring": (400, 0)}])))
    assert set(result["gpu_s_by_purpose"]) == {"sketch", "first_point", "scoring"}
    # The cloud streams point 0 while the edges expand the other four; then the scoring pass.
    assert result["gpu_s_by_purpose"]["first_point"] == pytest.approx(0.1 + 40 / 50)
    assert result["gpu_s_by_purpose"]["scoring"] == pytest.approx(0.4)


def test_auto_pays_for_the_questions_its_router_answers_cloud_only() -> None:
    progressive = {"sketch": (0, 30)}
    routed = {"cloud_answer": (50, 200), "served": "cloud"}
    only_progressive = simulate.closed_loop(fleet(mix=mix(auto=[progressive])), "auto", concurrency=1, duration=20)
    half = simulate.closed_loop(fleet(mix=mix(auto=[progressive, routed])), "auto", concurrency=1, duration=20)
    assert only_progressive["share_progressive"] == 1.0
    assert only_progressive["gpu_s_per_request"] == pytest.approx(0.6)
    assert half["share_progressive"] == pytest.approx(0.5, abs=0.1)
    assert half["gpu_s_per_request"] > 1.5 * only_progressive["gpu_s_per_request"]
    assert set(half["gpu_s_by_purpose"]) == {"sketch", "cloud_answer"}


def test_embedding_work_is_reported_apart_from_the_gpu() -> None:
    sample = Sample("progressive", 5, {"sketch": Work(1, 0, 30), "selection": Work(3, 200, 0, 0.15),
                                       "route": Work(1, 20, 0, 0.02)})
    result = alone(fleet(mix=Mix("test", {"progressive": (sample,)}, Work(1, 0, 40), "test")))
    assert set(result["gpu_s_by_purpose"]) == {"sketch"}
    assert result["embedding_cpu_s_per_request"] == {"route": pytest.approx(0.02), "selection": pytest.approx(0.15)}


def test_cloud_only_requests_share_the_cloud_steps() -> None:
    config = simulate.Config(cloud_rate=10.0, cloud_batch_cost=0.5, cloud_max_batch=8, edges=[], answer_tokens=20)
    result = simulate.closed_loop(config, "cloud", concurrency=2, duration=0.001)
    # The first request's first step runs alone (0.1 s); then 19 steps of both ((1 + 0.5) / 10 s,
    # half each), and the second request's last token alone: answers at 2.95 s and 3.05 s.
    assert result["latency_p50_s"] == pytest.approx(0.1 + 19 * 0.15 + 0.1)
    assert result["gpu_s_per_request"] == pytest.approx(0.1 + 19 * 0.15 / 2)


def test_prefill_is_chunked_and_shared_by_tokens() -> None:
    """Two prompts of 600 tokens, 1,000-token chunks: step 1 prefills all of the first and 400
    of the second (1.0 s), step 2 the second's last 200 (0.2 s) while the first decodes."""
    config = simulate.Config(cloud_rate=10.0, cloud_batch_cost=0.0, cloud_max_batch=8, edges=[], prefill_rate=1000.0,
                             prefill_chunk=1000, mix=mix(cloud=[{"cloud_answer": (600, 1)}]))
    result = simulate.closed_loop(config, "cloud", concurrency=2, duration=0.001)
    # First: 0.6 s of step 1, its decode in step 2 (0.1 s); second: 0.4 + 0.2 s, then a step alone.
    assert result["gpu_s_per_request"] == pytest.approx(((0.6 + 0.1) + (0.4 + 0.2 + 0.1)) / 2)
    assert result["latency_p50_s"] == pytest.approx(1.0 + 0.3 + 0.1)


def test_full_batch_cost_prices_each_token_as_in_a_full_batch() -> None:
    """Alone, a sequence pays whole steps; a cloud kept busy charges each token its share of a
    full batch: the load-independent cost, and one node's capacity."""
    config = simulate.Config(cloud_rate=10.0, cloud_batch_cost=0.5, cloud_max_batch=4, edges=[], gpus=2,
                             prefill_rate=1000.0, mix=mix(cloud=[{"cloud_answer": (100, 20)}]))
    result = alone(config, "cloud")
    token = (1 + 0.5 * 3) / 10 / 4
    assert result["gpu_s_per_request"] == pytest.approx(2 * (0.1 + 20 / 10))
    assert result["full_batch_gpu_s_per_request"] == pytest.approx(2 * (0.1 + 20 * token))
    assert result["capacity_requests_per_s"] == pytest.approx(2 / (2 * (0.1 + 20 * token)), abs=0.01)


def test_an_overloaded_cloud_serves_its_capacity_not_the_offered_load() -> None:
    # Answers of 100 tokens, one sequence at a time at 100 tokens/s: one request a second at most.
    config = simulate.Config(cloud_rate=100.0, cloud_batch_cost=0.0, cloud_max_batch=1, edges=[],
                             mix=mix(cloud=[{"cloud_answer": (0, 100)}]))
    result = simulate.open_loop(config, "cloud", rate=3.0, duration=60, warmup=10)
    assert result["requests_per_s"] == pytest.approx(1.0, abs=0.05)
    assert result["capacity_requests_per_s"] == pytest.approx(1.0)


def test_a_full_fleet_sends_points_to_the_cloud() -> None:
    config = simulate.Config(cloud_rate=1000.0, cloud_batch_cost=0.0, cloud_max_batch=64, edges=[(5.0, 0.0, 1)],
                             points=5, tokens_per_point=40)
    result = simulate.closed_loop(config, "progressive", concurrency=4, duration=30)
    assert result["cloud_point_share"] > 0.5, "one slow edge cannot take 20 points at once"


def test_a_queued_cloud_writes_shorter_sketches_as_the_service_does() -> None:
    """`plan_budget`: with requests queued at a one-sequence cloud a sketch has fewer, shorter
    headings (its measured decode scaled), and fewer points go to the edges."""
    work = mix(progressive=[{"sketch": (0, 52)}])

    def loaded(**kw: Any) -> dict[str, Any]:
        return simulate.closed_loop(fleet(cloud_max_batch=1, mix=work, **kw), "progressive", concurrency=6,
                                    duration=20)

    idle = alone(fleet(cloud_max_batch=1, mix=work))
    assert idle["cloud_work_per_request"]["sketch"]["decode_tokens"] == 52
    busy, fixed = loaded(), loaded(adaptive_budget=False)
    assert fixed["cloud_work_per_request"]["sketch"]["decode_tokens"] == 52
    # Five queued: 3 points of 4 words instead of 5 of 6, 3 x 7.6 / (5 x 10.4) of the tokens.
    assert busy["cloud_work_per_request"]["sketch"]["decode_tokens"] < 40
    assert busy["requests_per_s"] > fixed["requests_per_s"]


def test_budgets_are_the_services_defaults() -> None:
    service = ServiceConfig()
    config = simulate.Config(cloud_rate=1.0, cloud_batch_cost=0.0, cloud_max_batch=1, edges=[])
    assert (config.points, config.tokens_per_point, config.answer_tokens, config.ensemble_width) == (
        service.max_points, service.tokens_per_point, service.max_answer_tokens, service.ensemble_width)
    planner = config.service
    assert (planner.deadline_floor_s, planner.deadline_factor, planner.deadline_cap_s) == (
        service.deadline_floor_s, service.deadline_factor, service.deadline_cap_s)
    args = simulate.build_parser().parse_args([])
    assert (args.points, args.tokens, args.answer_tokens, args.ensemble_width) == (
        service.max_points, service.tokens_per_point, service.max_answer_tokens, service.ensemble_width)


def test_the_projected_cloud_reproduces_its_published_benchmark() -> None:
    """NVIDIA's 5,000-in / 500-out runs: decode and prefill charged apart still add up to the
    published throughput at 1, 50 and 100 in flight."""
    for check in simulate.nim_check(seconds=600.0):
        assert abs(check["error"]) < 0.1, check
    assert 12_000 < simulate.CLOUD_70B["prefill_rate"] < 13_000


def bench_json(path: Path) -> Path:
    """What tools/bench.py writes: light-load requests, each with its ``cloud_work``."""
    def outcome(mode: str, served: str, work: dict[str, tuple[int, int]], points: int = 0) -> dict[str, Any]:
        return {"mode": mode, "ok": True, "served": served, "points_edge": points, "points_cloud": 0,
                "cloud_work": {p: {"calls": 1, "sequences": 1, "prefill_tokens": a, "decode_tokens": b, "seconds": 0.1}
                               for p, (a, b) in work.items()}}

    light = [outcome("cloud", "cloud", {"cloud_answer": (60, 400)}),
             outcome("pice", "progressive", {"sketch": (450, 40), "selection": (200, 0)}, points=4),
             outcome("pice", "cloud", {"sketch": (450, 40), "resketch": (450, 40), "cloud_answer": (60, 400)}),
             outcome("pice-router", "cloud", {"route": (15, 0), "cloud_answer": (60, 400)}),
             outcome("llamacpp", "cloud", {"cloud_answer": (60, 400)})]
    path.write_text(json.dumps({"environment": {"max_points": 6, "tokens_per_point": 80}, "rows": [],
                                "light_load": light}))
    return path


def test_the_ledger_is_read_from_a_bench_json(tmp_path: Path) -> None:
    loaded = simulate.load_mix(bench_json(tmp_path / "bench.json"), tokens_per_point=80)
    assert loaded is not None
    assert {m: len(s) for m, s in loaded.modes.items()} == {"cloud": 1, "progressive": 2, "auto": 1}
    first = loaded.modes["progressive"][0]
    assert (first.served, first.points, first.work["sketch"].prefill) == ("progressive", 4, 450)
    # No measured fallback expansion: one is priced as the sketch's prompt plus the sketch.
    assert (loaded.fallback.prefill, loaded.fallback.decode) == (490, 80)
    assert loaded.measured_at == {"max_points": 6, "tokens_per_point": 80}
    (tmp_path / "old.json").write_text(json.dumps({"rows": []}))
    assert simulate.load_mix(tmp_path / "old.json", tokens_per_point=80) is None


def test_validation_compares_the_modelled_cloud_work_with_the_measured_ledger(tmp_path: Path) -> None:
    settings = {"concurrency": 2, "duration": 4.0, "points": 3, "tokens": 8, "ensemble_width": 1, "edge_rate": 100.0,
                "edge_batch": 4, "edge_batch_cost": 0.0, "edge_queue": 4, "cloud_rate": 200.0,
                "cloud_batch_cost": 0.0}
    ledger = {"sketch": {"calls": 1, "sequences": 1, "prefill_tokens": 120.0, "decode_tokens": 18.0, "seconds": 0.1},
              "total": {"calls": 1, "sequences": 1, "prefill_tokens": 120.0, "decode_tokens": 18.0, "seconds": 0.1}}
    row = {"edges": 4, "replicas": 1, "light": {"cloud_work_per_request": ledger},
           "throughput": {"seconds": 5.0, "requests_per_s": 4.0, "latency_p50_s": 0.4, "cloud_point_share": 0.0,
                          "cloud_work_per_request": ledger}}
    path = tmp_path / "load_fleet.json"
    path.write_text(json.dumps({"settings": settings, "rows": [row]}))
    [check] = simulate.validate(path)["rows"]
    assert check["cloud_work"]["sketch"] == {"measured": {"prefill_tokens": 120.0, "decode_tokens": 18.0},
                                             "simulated": {"prefill_tokens": 120.0, "decode_tokens": 18.0}}
    assert check["cloud_decode_error"] == 0.0
    assert check["cloud_prefill_error"] == 0.0
    # The run's measured round-trip overhead is the re-run's link delay (loopback's without one).
    assert check["link_delay_s"] == simulate.VALIDATION_LINK_DELAY_S
    row["throughput"]["round_trip_overhead_s"] = 0.5
    path.write_text(json.dumps({"settings": settings, "rows": [row]}))
    [slow] = simulate.validate(path)["rows"]
    assert slow["link_delay_s"] == 0.5
    assert slow["simulated"]["latency_p50_s"] >= check["simulated"]["latency_p50_s"] + 0.5
