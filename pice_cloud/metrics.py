"""Prometheus metrics of the cloud service (served at ``GET /metrics``).

Each server owns its own `CollectorRegistry` (no module globals), so two servers in one
process, as in the tests, count separately. Values that already live elsewhere (the fleet, the
admission queue, the transport's rejection counters) are read at scrape time rather than
mirrored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from pice_cloud.cloud_ledger import PURPOSES, CloudLedger, Work
from pice_edge.rejects import Rejections

if TYPE_CHECKING:
    from pice_cloud.llm.step_engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; from a tiny model on loopback to a long answer on a slow fleet.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class _RejectionsCollector(Collector):
    """Inbound MQTT messages the cloud refused (malformed, wrong identity, duplicate, late...)."""

    def __init__(self, rejections: Rejections) -> None:
        self._rejections = rejections

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("pice_rejected_messages", "Inbound MQTT messages refused, by source and reason",
                                     labels=["source", "kind"])
        for (source, kind), count in sorted(self._rejections.snapshot().items()):
            family.add_metric([source, kind], count)
        yield family


class _QualityCollector(Collector):
    """Sketches and candidates the guards refused (well-formed messages, text not good enough)."""

    def __init__(self, name: str, help_text: str, counts: Rejections) -> None:
        self._name, self._help, self._counts = name, help_text, counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._help, labels=["reason"])
        for (_, reason), count in sorted(self._counts.snapshot().items()):
            family.add_metric([reason], count)
        yield family


class _CloudWorkCollector(Collector):
    """The cloud LLM's work by purpose, from the meters' ledgers (`pice_cloud.cloud_ledger`)."""

    def __init__(self, ledgers: Callable[[], Sequence[CloudLedger]]) -> None:
        self._ledgers = ledgers

    def collect(self) -> Iterator[Metric]:
        work: dict[str, Work] = {}
        for ledger in self._ledgers():
            for purpose, item in ledger.by_purpose.items():
                work.setdefault(purpose, Work()).add(item)
        tokens = CounterMetricFamily("pice_cloud_work_tokens", "Tokens the cloud LLM computed, by purpose and phase "
                                     "(prefill: prompt tokens; decode: generated tokens)", labels=["purpose", "phase"])
        seconds = CounterMetricFamily("pice_cloud_work_seconds", "Wall time of the cloud LLM's calls, by purpose",
                                      labels=["purpose"])
        calls = CounterMetricFamily("pice_cloud_work_calls", "Calls to the cloud LLM, by purpose", labels=["purpose"])
        for purpose in PURPOSES:
            item = work.get(purpose, Work())
            tokens.add_metric([purpose, "prefill"], item.prefill_tokens)
            tokens.add_metric([purpose, "decode"], item.decode_tokens)
            seconds.add_metric([purpose], item.seconds)
            calls.add_metric([purpose], item.calls)
        yield from (tokens, seconds, calls)


class _RoundTripCollector(Collector):
    """What a task's round trip to an edge takes beyond the edge's own time (queue and
    generation): network, broker and both ends' event loops (`Fleet.round_trip_overhead_s`)."""

    def __init__(self, read: Callable[[], tuple[int, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        count, total = self._read()
        yield SummaryMetricFamily("pice_edge_round_trip_overhead_seconds",
                                  "Round trip of an edge task (sent to candidate in) less the edge's own time",
                                  count_value=count, sum_value=total)


class Metrics:
    """The service's counters, histograms and gauges."""

    def __init__(self, rejections: Rejections, *, live_edges: Callable[[], float], queued: Callable[[], float],
                 in_flight: Callable[[], float], sketch_rejections: Rejections | None = None,
                 candidate_rejections: Rejections | None = None, sketch_repairs: Rejections | None = None,
                 cloud_expansion_rejections: Rejections | None = None, engine: EngineStats | None = None,
                 engine_load: Callable[[], float] | None = None,
                 cloud_work: Callable[[], Sequence[CloudLedger]] | None = None,
                 round_trips: Callable[[], tuple[int, float]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pice_requests", "Chat completion requests, by mode and outcome "
                                "(ok, invalid, rejected, error, cancelled)", ["mode", "outcome"], registry=r)
        self.latency = Histogram("pice_request_latency_seconds", "Time from admission to the last token, by mode",
                                 ["mode"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pice_time_to_first_token_seconds", "Time from admission to the first content, by mode",
                              ["mode"], buckets=_LATENCY_BUCKETS, registry=r)
        self.points = Counter("pice_points", "Sketch points expanded, by where (edge, or cloud fallback)",
                              ["source"], registry=r)
        self.tokens = Counter("pice_generated_tokens", "Tokens generated, by where (cloud, edge)", ["where"],
                              registry=r)
        Gauge("pice_admission_queue_depth", "Requests waiting for an admission slot", registry=r).set_function(queued)
        Gauge("pice_requests_in_flight", "Requests being answered", registry=r).set_function(in_flight)
        Gauge("pice_live_edges", "Edges currently live", registry=r).set_function(live_edges)
        if engine is not None and engine_load is not None:
            # The embedded backend's continuous batching (`pice_cloud.llm.step_engine`).
            Gauge("pice_cloud_batch_requests", "Cloud generations in the batch or waiting for a slot",
                  registry=r).set_function(engine_load)
            Gauge("pice_cloud_batch_steps", "Decode steps the cloud model has run",
                  registry=r).set_function(lambda: engine.steps)
            Gauge("pice_cloud_batch_mean_size", "Mean sequences per cloud decode step",
                  registry=r).set_function(lambda: engine.rows / engine.steps if engine.steps else 0.0)
            Gauge("pice_cloud_batch_joined_running", "Cloud generations that joined a running batch",
                  registry=r).set_function(lambda: engine.joined_running)
        r.register(_RejectionsCollector(rejections))
        if cloud_work is not None:
            r.register(_CloudWorkCollector(cloud_work))
        if round_trips is not None:
            r.register(_RoundTripCollector(round_trips))
        r.register(_QualityCollector("pice_sketch_rejected", "Sketches refused by the guards, by reason",
                                     sketch_rejections or Rejections()))
        r.register(_QualityCollector("pice_candidate_rejected", "Edge expansions refused by the guards, by reason",
                                     candidate_rejections or Rejections()))
        r.register(_QualityCollector("pice_sketch_repaired", "Sketches used after leaving faulty headings out, "
                                     "by the first reason", sketch_repairs or Rejections()))
        r.register(_QualityCollector("pice_cloud_expansion_rejected", "The cloud's own point expansions refused "
                                     "by the guards (then sampled again), by reason",
                                     cloud_expansion_rejections or Rejections()))

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
