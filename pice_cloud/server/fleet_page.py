"""The operator's view of a running cloud: a live fleet page (``GET /fleet``), its JSON
(``GET /fleet/state``) and the fleet's gauges on ``/metrics``.

The page is plain HTML, CSS and JavaScript shipped in the package (``pice_cloud/server/static/``,
no CDN): it polls ``/fleet/state`` and redraws the live edges (profile, runtime, model build,
slots, decode rate, last heartbeat, tasks and refusals), the requests by mode and where their
points were written, the cloud work ledger by purpose, sketch refusals by reason and the rollout.
When the MQTT broker is down it says so above the last known fleet. ``pice-cloud fleet --watch
--cloud URL`` draws the same JSON in a terminal (`pice_cloud.fleet_watch`).

Everything is read from where it already lives: `pice_cloud.fleet.Fleet` (edges),
`pice_cloud.metrics.Metrics` (requests, points, tokens), `PiceService.cloud_ledgers` (cloud work),
the service's guard counters, ``service.rollout`` and the admission gate. Two things are added
here: per-edge dispatch counts (`EdgeTally`, a tap on the fleet's dispatch accounting) and the
edges' rollout states (`RolloutStates`, a subscription to ``pice/v1/edge/+/rollout``, which the
cloud's ACL account may read).

Access: with ``server.api_key`` set, every route here needs the key, as ``Authorization: Bearer
KEY`` (scripts, ``--watch``) or as the password of HTTP basic authentication (any user name), so a
browser asks for it. ``/metrics`` stays as it is (for Prometheus).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pice_cloud.cloud_ledger import EMBEDDING_PURPOSES, PURPOSES, Work
from pice_cloud.fleet import Fleet, FleetEntry
from pice_cloud.fleet_cli import FleetView, builds_of, is_mixed, summarize
from pice_cloud.openai_schema import APIError
from pice_cloud.rollout_states import RolloutStates
from pice_edge.protocol import (
    EDGE_ROLLOUT_FILTER,
    Candidate,
    EdgeRolloutState,
    FleetRollout,
    TaskRefusal,
    runs,
)
from pice_edge.rejects import Rejections

if TYPE_CHECKING:
    from pice_cloud.server.state import ApiState

#: How long an edge that left stays on the page, marked gone (seconds).
GONE_KEPT_S = 600.0
_REALM = 'Basic realm="PICE fleet (the API key is the password)", charset="UTF-8"'
_ASSETS = {"fleet.js": "text/javascript; charset=utf-8", "fleet.css": "text/css; charset=utf-8"}


@dataclass
class EdgeCounts:
    """Dispatch to one edge since the cloud started (this replica's tasks only)."""

    tasks: int = 0
    candidates: int = 0
    refusals: int = 0


class EdgeTally:
    """Counts tasks sent to, candidates received from and tasks refused by each edge, by wrapping
    the fleet's dispatch accounting (`Fleet.task_sent`, `Fleet.candidate_received`,
    `Fleet.task_refused`) on this one `Fleet` instance; the fleet still does its own work."""

    def __init__(self, fleet: Fleet) -> None:
        self.counts: dict[str, EdgeCounts] = {}
        sent, received, refused = fleet.task_sent, fleet.candidate_received, fleet.task_refused

        def task_sent(request_id: str, point: int, device_id: str) -> None:
            self._of(device_id).tasks += 1
            sent(request_id, point, device_id)

        def candidate_received(candidate: Candidate) -> None:
            self._of(candidate.device_id).candidates += 1
            received(candidate)

        def task_refused(refusal: TaskRefusal) -> None:
            self._of(refusal.device_id).refusals += 1
            refused(refusal)

        setattr(fleet, "task_sent", task_sent)  # noqa: B010 (an instance attribute over the method)
        setattr(fleet, "candidate_received", candidate_received)  # noqa: B010
        setattr(fleet, "task_refused", task_refused)  # noqa: B010

    def _of(self, device_id: str) -> EdgeCounts:
        return self.counts.setdefault(device_id, EdgeCounts())


class GoneTracker:
    """Remembers the live edges between two looks at the fleet, so that one that left (last will,
    missed heartbeats) is shown as gone for `GONE_KEPT_S` seconds instead of vanishing."""

    def __init__(self) -> None:
        self._known: dict[str, FleetEntry] = {}
        self._gone: dict[str, tuple[FleetEntry, float]] = {}

    def update(self, rows: list[FleetEntry], now: float) -> list[dict[str, Any]]:
        """The edges gone since they were last seen live, newest look first: id, profile, model, seconds."""
        current = {r.device_id: r for r in rows if r.state == "live"}
        for device_id, entry in self._known.items():
            if device_id not in current:
                self._gone[device_id] = (entry, now)
        for device_id in current:
            self._gone.pop(device_id, None)
        for device_id in [d for d, (_, at) in self._gone.items() if now - at > GONE_KEPT_S]:
            del self._gone[device_id]
        self._known = current
        return [{"device_id": d, "profile": entry.profile, "model_id": entry.model_id, "gone_s": round(now - at, 1)}
                for d, (entry, at) in sorted(self._gone.items())]


def edges_section(fleet: Fleet, rows: list[FleetEntry], counts: dict[str, EdgeCounts] | None = None
                  ) -> list[dict[str, Any]]:
    """One dict per edge of ``rows`` (`Fleet.snapshot`): what its status says, its slots in use,
    heartbeat and timeout, and (with ``counts``) the tasks this cloud sent it."""
    edges = []
    for r in rows:
        info = fleet.get(r.device_id) if r.state == "live" else None
        tally = (counts or {}).get(r.device_id, EdgeCounts())
        heartbeat = info.status.heartbeat_s if info is not None else None
        edges.append({
            "device_id": r.device_id, "state": r.state, "profile": r.profile, "runtime": r.runtime,
            "model_id": r.model_id, "slots_total": r.max_batch,
            "slots_used": max(0, r.max_batch - r.free_slots) if r.state == "live" else None,
            "queue_depth": r.queue_depth, "tokens_per_s": r.tokens_per_s,
            "last_heartbeat_s": r.age_s, "heartbeat_s": heartbeat,
            "timeout_s": None if heartbeat is None else round(heartbeat * fleet.expiry_heartbeats, 2),
            "outstanding": info.outstanding if info is not None and counts is not None else None,
            "tasks": tally.tasks if counts is not None else None,
            "candidates": tally.candidates if counts is not None else None,
            "refusals": tally.refusals if counts is not None else None,
            "sources": list(r.sources),
        })
    return edges


def _samples(state: ApiState) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the service's own metrics (the ones ``/metrics`` serves), by name."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for metric in (state.metrics.requests, state.metrics.points, state.metrics.tokens, state.metrics.latency,
                   state.metrics.ttft):
        for family in metric.collect():
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def _by(samples: list[tuple[dict[str, str], float]], *keys: str) -> dict[str, Any]:
    """Samples nested by the values of ``keys``: {k1: {k2: value}} (summed where labels repeat)."""
    out: dict[str, Any] = {}
    for labels, value in samples:
        node = out
        for key in keys[:-1]:
            node = node.setdefault(labels.get(key, ""), {})
        leaf = labels.get(keys[-1], "")
        node[leaf] = node.get(leaf, 0) + value
    return out


def _reasons(counts: Rejections) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, reason), n in counts.snapshot().items():
        out[reason] = out.get(reason, 0) + n
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def rollout_section(rows: list[FleetEntry], rollout: FleetRollout | None, states: dict[str, EdgeRolloutState], *,
                    now: float, broker_url: str = "") -> dict[str, Any]:
    """The rollout part of the view: the builds on live edges, whether the fleet is mixed, the
    rollout announced (if any) with the edges on its build and those behind (with their own
    rollout state), and `pice_cloud.fleet_cli.summarize`'s lines."""
    live = [r for r in rows if r.state == "live"]
    out: dict[str, Any] = {"active": rollout is not None, "builds": builds_of(rows), "mixed": is_mixed(rows),
                           "summary": summarize(FleetView(broker_url, rows, rollout, states), now=now)}
    if rollout is None:
        return out
    on_target = [r.device_id for r in live if runs(r.model_id, rollout.model, rollout.build)]
    behind = []
    for r in live:
        if r.device_id in on_target:
            continue
        st = states.get(r.device_id)
        following = st if st is not None and (st.model, st.build) == (rollout.model, rollout.build) else None
        behind.append({"device_id": r.device_id, "running": r.model_id,
                       "phase": following.phase if following else None,
                       "detail": following.detail if following else ""})
    out.update({"target": f"{rollout.model}@{rollout.build}", "model": rollout.model, "build": rollout.build,
                "source": rollout.source, "issued_at": rollout.issued_at,
                "age_s": round(max(0.0, now - rollout.issued_at), 1),
                "on_target": on_target, "behind": behind, "done": not behind})
    return out


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


class FleetPage:
    """What the page shows, computed on demand from the running service (`snapshot`)."""

    def __init__(self, state: ApiState, *, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        service = state.service
        self.tally = EdgeTally(service.fleet)
        self.rollout_states = RolloutStates(service.transport.rejections)
        service.transport.add_subscription(EDGE_ROLLOUT_FILTER, self.rollout_states.handle)
        self._clock = clock
        self.started = clock()
        self._gone = GoneTracker()
        self._broker_down_since: float | None = None

    # --- pieces ---------------------------------------------------------------------------

    def _broker(self, now: float) -> dict[str, Any]:
        transport = self.state.service.transport
        connected = transport.connected
        if connected:
            self._broker_down_since = None
        elif self._broker_down_since is None:
            self._broker_down_since = now
        since = now if self._broker_down_since is None else self._broker_down_since
        out: dict[str, Any] = {"url": transport.settings.url, "connected": connected, "message": None}
        if not connected:
            # The transport's last connection error, where it keeps one (diagnostic only).
            reason = getattr(transport, "_last_error", None)
            out["down_since"] = since
            out["message"] = (
                f"The MQTT broker {transport.settings.url} is unreachable"
                f"{f' ({reason})' if reason else ''}, for {now - since:.0f} s: no tasks reach the edges and every "
                "request is answered by the cloud alone. The edges below are the last ones heard, as they were "
                "then; the cloud reconnects by itself.")
        return out

    def _edges(self, now: float) -> tuple[list[FleetEntry], list[dict[str, Any]], list[dict[str, Any]]]:
        fleet = self.state.service.fleet
        rows = fleet.snapshot()
        return rows, edges_section(fleet, rows, self.tally.counts), self._gone.update(rows, now)

    def _requests(self) -> dict[str, Any]:
        samples = _samples(self.state)
        by_mode = _by(samples.get("pice_requests_total", []), "mode", "outcome")
        counts = _by(samples.get("pice_request_latency_seconds_count", []), "mode")
        sums = _by(samples.get("pice_request_latency_seconds_sum", []), "mode")
        ttft_counts = _by(samples.get("pice_time_to_first_token_seconds_count", []), "mode")
        ttft_sums = _by(samples.get("pice_time_to_first_token_seconds_sum", []), "mode")
        latency = {mode: {"mean_s": round(sums.get(mode, 0) / n, 3) if n else None,
                          "mean_first_token_s": round(ttft_sums.get(mode, 0) / ttft_counts[mode], 3)
                          if ttft_counts.get(mode) else None}
                   for mode, n in counts.items()}
        points = {k: int(v) for k, v in _by(samples.get("pice_points_total", []), "source").items()}
        tokens = {k: int(v) for k, v in _by(samples.get("pice_generated_tokens_total", []), "where").items()}
        finished = {mode: int(outcomes.get("ok", 0)) for mode, outcomes in by_mode.items()}
        ok = sum(finished.values())
        admission = self.state.admission
        return {
            "by_mode": {mode: {k: int(v) for k, v in outcomes.items()} for mode, outcomes in sorted(by_mode.items())},
            "finished": ok, "latency": latency, "points": points, "tokens": tokens,
            "cloud_only_share": _share(finished.get("cloud", 0), ok),
            "fallback_share": _share(points.get("cloud", 0), points.get("cloud", 0) + points.get("edge", 0)),
            "in_flight": admission.active, "queued": admission.queued,
            "max_concurrent": admission.max_concurrent, "max_queue": admission.max_queue,
            "rejected": sum(int(o.get("rejected", 0)) for o in by_mode.values()),
        }

    def _ledger(self, edge_tokens: int) -> dict[str, Any]:
        work: dict[str, Work] = {}
        for ledger in self.state.service.cloud_ledgers():
            for purpose, item in ledger.by_purpose.items():
                work.setdefault(purpose, Work()).add(item)
        purposes = []
        llm, embeddings = Work(), Work()
        for purpose in PURPOSES:
            if purpose not in work:
                continue
            item = work[purpose]
            kind = "embedding" if purpose in EMBEDDING_PURPOSES else "llm"
            (embeddings if kind == "embedding" else llm).add(item)
            purposes.append({"purpose": purpose, "kind": kind, **item.as_dict()})
        cloud_answer = work.get("cloud_answer", Work()).decode_tokens
        return {
            "purposes": purposes, "llm": llm.as_dict(), "embeddings": embeddings.as_dict(),
            # Tokens the edges decoded: work a cloud-only service would have done itself.
            "edge_decode_tokens": edge_tokens,
            "edge_share_of_decoding": _share(edge_tokens, edge_tokens + llm.decode_tokens),
            # The cloud LLM's decoding spent on whole answers (cloud-only mode, or after refused sketches).
            "cloud_only_decode_tokens": cloud_answer,
            "cloud_only_share_of_cloud_decoding": _share(cloud_answer, llm.decode_tokens),
        }

    def _guards(self) -> dict[str, Any]:
        service = self.state.service
        return {"sketch_refused": _reasons(service.sketch_rejections),
                "sketch_repaired": _reasons(service.sketch_repairs),
                "candidate_refused": _reasons(service.inbox.quality),
                "cloud_expansion_refused": _reasons(service.cloud_expansion_rejections)}

    # --- the whole view -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The page's data: one JSON-able dict (the shape ``pice-cloud fleet --watch`` draws too)."""
        now = self._clock()
        state = self.state
        broker = self._broker(now)
        rows, edges, gone = self._edges(now)
        requests = self._requests()
        admission = state.admission
        status = ("shutting_down" if admission.draining else
                  "ok" if broker["connected"] and any(r.state == "live" for r in rows) else "degraded")
        return {
            "time": now,
            "cloud": {"id": state.service.cloud_id, "status": status, "uptime_s": round(now - self.started, 1),
                      "llm": {"backend": state.llm.name, "model": state.llm.model_id},
                      "expander_model": state.service.config.expander_model},
            "broker": broker,
            "edges": edges, "gone": gone,
            "live_edges": sum(1 for e in edges if e["state"] == "live"),
            "requests": requests,
            "ledger": self._ledger(requests["tokens"].get("edge", 0)),
            "guards": self._guards(),
            "rollout": rollout_section(rows, state.service.rollout, dict(self.rollout_states.states), now=now,
                                       broker_url=broker["url"]),
        }

    # --- /metrics --------------------------------------------------------------------------

    def collector(self) -> Collector:
        return _FleetCollector(self)


class _FleetCollector(Collector):
    """The fleet's gauges on ``/metrics``: per edge, the rollout, the broker link and the
    admission limits (for the alert rules in tools/prometheus/)."""

    def __init__(self, page: FleetPage) -> None:
        self._page = page

    def collect(self) -> Iterator[Metric]:
        page = self._page
        service = page.state.service
        fleet = service.fleet
        rows = fleet.snapshot()
        live = [r for r in rows if r.state == "live"]
        yield _gauge("pice_broker_connected", "1 while the cloud is connected to its MQTT broker",
                     1 if service.transport.connected else 0)
        admission = page.state.admission
        yield _gauge("pice_admission_slots", "Requests answered at the same time (server.max_concurrent)",
                     admission.max_concurrent)
        yield _gauge("pice_admission_queue_limit", "Requests that may wait for a slot (server.max_queue); "
                     "past it they get 429", admission.max_queue)
        labels = ["device_id"]
        info = GaugeMetricFamily("pice_edge_info", "A live edge (value 1), with its profile, runtime and model build",
                                 labels=["device_id", "profile", "runtime", "model_id"])
        slots = GaugeMetricFamily("pice_edge_slots", "Batch slots of a live edge", labels=labels)
        used = GaugeMetricFamily("pice_edge_slots_used", "Batch slots in use on a live edge (from its status)",
                                 labels=labels)
        queue = GaugeMetricFamily("pice_edge_queue_depth", "Tasks waiting on a live edge (from its status)",
                                  labels=labels)
        rate = GaugeMetricFamily("pice_edge_decode_tokens_per_second",
                                 "A live edge's measured decode rate of one sequence (batch-1 equivalent)",
                                 labels=labels)
        age = GaugeMetricFamily("pice_edge_heartbeat_age_seconds", "Seconds since a live edge's last status",
                                labels=labels)
        for r in live:
            info.add_metric([r.device_id, r.profile, r.runtime, r.model_id], 1)
            slots.add_metric([r.device_id], r.max_batch)
            used.add_metric([r.device_id], max(0, r.max_batch - r.free_slots))
            queue.add_metric([r.device_id], r.queue_depth or 0)
            rate.add_metric([r.device_id], r.tokens_per_s or 0.0)
            age.add_metric([r.device_id], r.age_s)
        yield from (info, slots, used, queue, rate, age)
        tasks = CounterMetricFamily("pice_edge_tasks", "Tasks sent to an edge by this cloud", labels=labels)
        answered = CounterMetricFamily("pice_edge_candidates", "Candidates accepted from an edge", labels=labels)
        refused = CounterMetricFamily("pice_edge_task_refusals", "Tasks an edge refused (it was full)", labels=labels)
        for device_id, counts in sorted(page.tally.counts.items()):
            tasks.add_metric([device_id], counts.tasks)
            answered.add_metric([device_id], counts.candidates)
            refused.add_metric([device_id], counts.refusals)
        yield from (tasks, answered, refused)
        rollout = service.rollout
        yield _gauge("pice_rollout_active", "1 while a model rollout is announced on pice/v1/fleet/rollout",
                     1 if rollout is not None else 0)
        behind = [] if rollout is None else [r for r in live if not runs(r.model_id, rollout.model, rollout.build)]
        yield _gauge("pice_rollout_edges_behind", "Live edges not yet on the announced rollout's build (0 without "
                     "a rollout)", len(behind))
        failed = sum(1 for r in behind if (st := page.rollout_states.states.get(r.device_id)) is not None
                     and rollout is not None and (st.model, st.build) == (rollout.model, rollout.build)
                     and st.phase == "failed")
        yield _gauge("pice_rollout_edges_failed", "Live edges whose rollout attempt failed (they stay on their build)",
                     failed)
        if rollout is not None:
            started = GaugeMetricFamily("pice_rollout_issued_timestamp_seconds", "When the announced rollout was "
                                        "issued (Unix time)", labels=["model", "build"])
            started.add_metric([rollout.model, rollout.build], rollout.issued_at)
            yield started


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


# --- access and routes ------------------------------------------------------------------------

def _authorized(request: Request, api_key: str | None) -> bool:
    """The API key as a bearer token, or as the password of basic authentication."""
    if api_key is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(credentials.encode(), api_key.encode())
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(decoded.partition(":")[2].encode(), api_key.encode())
    return False


def _asset(name: str) -> str:
    return resources.files("pice_cloud.server").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def fleet_router(page: FleetPage, api_key: str | None) -> APIRouter:
    """``/fleet`` (the page), ``/fleet/assets/{fleet.js,fleet.css}`` and ``/fleet/state`` (JSON)."""
    router = APIRouter()
    nocache = {"Cache-Control": "no-store"}

    def check(request: Request) -> None:
        if not _authorized(request, api_key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY', or the key as the "
                                "password of basic authentication)", type="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": _REALM})

    @router.get("/fleet", response_class=HTMLResponse)
    async def fleet_html(request: Request) -> Response:
        if not _authorized(request, api_key):
            return HTMLResponse("<!doctype html><title>PICE fleet</title><p>This cloud has an API key: open the page "
                                "again and give the key as the password (any user name).</p>", status_code=401,
                                headers={"WWW-Authenticate": _REALM, **nocache})
        return HTMLResponse(_asset("fleet.html"), headers=nocache)

    @router.get("/fleet/assets/{name}")
    async def fleet_asset(name: str, request: Request) -> Response:
        check(request)
        if name not in _ASSETS:
            raise APIError(404, f"no asset {name!r}", code="not_found")
        return Response(_asset(name), media_type=_ASSETS[name], headers=nocache)

    @router.get("/fleet/state")
    async def fleet_state(request: Request) -> JSONResponse:
        check(request)
        return JSONResponse(page.snapshot(), headers=nocache)

    return router


def install_fleet_page(app: FastAPI) -> FleetPage:
    """Add the fleet page's routes to ``app`` (made by `create_app`) and its gauges to the app's
    ``/metrics``; returns the page (also on ``app.state.fleet_page``)."""
    state: ApiState = app.state.pice
    page = FleetPage(state)
    state.metrics.registry.register(page.collector())
    key = state.config.server.api_key
    app.include_router(fleet_router(page, key.get_secret_value() if key else None))
    app.state.fleet_page = page
    return page
