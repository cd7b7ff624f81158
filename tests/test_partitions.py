"""The cloud's own outages (issue 27, D2): the broker killed mid-request and restarted on the same
port, with real Mosquitto and real ``pice-edge run`` processes.

The cloud judges its edges' liveness from its own connection: while it cannot hear the broker no
edge expires and the time does not count against the points' deadlines; after it reconnects, the
edges get a grace to re-announce themselves, and the candidates they wrote meanwhile (queued QoS 1,
persistent sessions) are used instead of the cloud redoing their points. An edge that really died
during the outage still expires, after the grace.

First, on a fake clock, the rules themselves; then what survives a broker restart with and without
broker persistence, message by message; then the outages with real processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pice_cloud import defaults
from pice_cloud.bootstrap import System, start_system
from pice_cloud.broker import ANONYMOUS_CONFIG, PERSISTENT_CONFIG, MosquittoProcess, mosquitto_executable
from pice_cloud.events import AnswerEvent
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.progressive import ExpandInCloud, SendTask
from pice_edge.protocol import EdgeStatus
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import Mosquitto, ScriptedSketches, cloud_config, eventually
from tests.procs import EdgeProcess
from tests.progressive_support import FakeClock, Recorder, live_fleet, make_request

log = logging.getLogger(__name__)  # each outage's outcome, for the record (--log-cli-level=INFO)

QUESTION = "How can I improve my time management skills?"
#: Five points (the sketch continues the "1." prefill): the issue's "at most 1 of 5" is per answer.
SKETCH = (" Set clear daily goals\n2. Plan each morning\n3. Take short breaks\n4. Say no to distractions\n"
          "5. Review the week on Friday\n")
POINTS = 5
#: Every batch on an edge first waits this long: the edges are still working when the broker dies,
#: and publish their candidates while it is down.
EDGE_DELAY_S = 4.0
#: A point's deadline: far beyond any outage here, so a point the cloud expands shows a liveness
#: or a lost-message problem, not a deadline.
DEADLINE_S = 30.0
HEARTBEAT_S = 0.5


# --- the rules, on a fake clock -----------------------------------------------------------------

def test_no_edge_expires_while_the_cloud_is_disconnected_and_each_gets_a_grace_after() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", "b", heartbeat_s=1.0)  # expiry: 3 missed heartbeats
    clock.advance(0.5)
    fleet.disconnected()
    clock.advance(60)
    assert [e.device_id for e in fleet.live()] == ["a", "b"], "not judged while we cannot hear them"
    assert fleet.is_live("a")
    assert fleet.views() == [], "nothing is scheduled while no task could reach an edge"
    assert fleet.expires_at("a") == pytest.approx(clock.now + 1.0), "looked at again a heartbeat later"

    outage = fleet.reconnected(retry_min_s=1.0, retry_max_s=10.0)
    assert outage == pytest.approx(60)
    grace = defaults.RECONNECT_EDGE_GRACE_HEARTBEATS * 1.0 + 10.0  # retry pause: min(60 + 1, 10)
    assert fleet.expires_at("a") == pytest.approx(clock.now + grace)
    assert fleet.views() == [], "not scheduled until it re-announces itself"
    assert fleet.live() == []
    assert fleet.is_live("a"), "but the points it holds wait for it"
    clock.advance(grace - 0.1)
    fleet.update(EdgeStatus(device_id="b", online=True, max_batch=2, free_slots=2, heartbeat_s=1.0))
    assert [v.device_id for v in fleet.views()] == ["b"]
    clock.advance(0.2)
    assert [e.device_id for e in fleet.live()] == ["b"], "a did not come back within its grace: expired"


def test_a_short_outage_gives_a_short_grace() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", heartbeat_s=2.0)
    fleet.disconnected()
    clock.advance(3)
    fleet.reconnected(retry_min_s=1.0, retry_max_s=10.0)
    # 2 heartbeats + the pause after a try that just missed the broker's return (3 s + 1 s).
    assert fleet.expires_at("a") == pytest.approx(clock.now + 2 * 2.0 + 4.0)


def test_the_time_the_cloud_is_away_does_not_count_against_a_deadline() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", heartbeat_s=1.0)
    request = make_request([("a",)], fleet, deadline_s=10)
    recorder = Recorder()
    recorder(request.start(clock()))
    clock.advance(2)
    fleet.disconnected()
    recorder(request.on_disconnect(clock()))
    clock.advance(20)  # past the deadline, and past any heartbeat
    recorder(request.tick(clock()))
    assert not recorder.of(ExpandInCloud)
    fleet.reconnected(retry_min_s=1.0, retry_max_s=10.0)
    recorder(request.on_reconnect(clock()))
    assert not recorder.of(ExpandInCloud), "8 s of the deadline are left, and the edge has its grace"
    fleet.update(EdgeStatus(device_id="a", online=True, max_batch=2, free_slots=1, queue_depth=1, heartbeat_s=1.0))
    clock.advance(7.9)
    fleet.update(EdgeStatus(device_id="a", online=True, max_batch=2, free_slots=1, queue_depth=1, heartbeat_s=1.0))
    recorder(request.tick(clock()))
    assert not recorder.of(ExpandInCloud)
    clock.advance(0.2)
    recorder(request.tick(clock()))
    assert [a.points for a in recorder.of(ExpandInCloud)] == [(0,)]  # type: ignore[attr-defined]


def test_a_deadline_waits_out_an_outage_only_up_to_the_cap() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", heartbeat_s=1.0)
    request = make_request([("a",)], fleet, deadline_s=10)
    recorder = Recorder()
    recorder(request.start(clock()))
    fleet.disconnected()
    recorder(request.on_disconnect(clock()))
    cap = request._config.deadline_cap_s
    assert request.next_wakeup() == pytest.approx(clock.now + 1.0)  # the fleet's look-again
    clock.advance(10 + cap - 0.1)
    recorder(request.tick(clock()))
    assert not recorder.of(ExpandInCloud)
    clock.advance(0.2)
    recorder(request.tick(clock()))
    assert [a.points for a in recorder.of(ExpandInCloud)] == [(0,)], "a request never hangs on the broker"  # type: ignore[attr-defined]


def test_a_task_lost_in_the_outage_moves_on_when_its_edge_reports_an_empty_queue() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", "b", heartbeat_s=1.0)
    request = make_request([("a",), ("b",)], fleet, deadline_s=30)
    recorder = Recorder()
    recorder(request.start(clock()))
    clock.advance(1)
    fleet.disconnected()
    recorder(request.on_disconnect(clock()))
    clock.advance(3)
    fleet.reconnected(retry_min_s=1.0, retry_max_s=10.0)
    recorder(request.on_reconnect(clock()))
    # "a" still works on its task; "b" is idle: its candidate (or the task) was lost.
    fleet.update(EdgeStatus(device_id="a", online=True, max_batch=2, free_slots=1, queue_depth=1, heartbeat_s=1.0,
                            sent_at=time.time() + 1))
    fleet.update(EdgeStatus(device_id="b", online=True, max_batch=2, free_slots=2, queue_depth=0, heartbeat_s=1.0,
                            sent_at=time.time() + 1))
    assert fleet.task_lost("r1", 1, "b")
    assert not fleet.task_lost("r1", 0, "a")
    recorder(request.tick(clock()))
    # Placed again at once, on an edge that can take it (a has a free slot), not at the deadline.
    assert [(a.task.point, a.task.device_id) for a in recorder.of(SendTask)][-1] == (1, "a")  # type: ignore[attr-defined]
    assert not recorder.of(ExpandInCloud)


def test_an_empty_queue_sent_before_our_reconnection_proves_nothing() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", heartbeat_s=1.0)
    request = make_request([("a",)], fleet, deadline_s=30)
    Recorder()(request.start(clock()))
    clock.advance(1)
    fleet.disconnected()
    clock.advance(3)
    fleet.reconnected(retry_min_s=1.0, retry_max_s=10.0)
    # A retained status from before we were back (a task we re-sent may still be on its way).
    fleet.update(EdgeStatus(device_id="a", online=True, max_batch=2, free_slots=2, heartbeat_s=1.0,
                            sent_at=time.time() - 1), retained=True)
    assert not fleet.task_lost("r1", 0, "a")


# --- what survives a broker restart, message by message ------------------------------------------

def _broker(tmp_path: Path, persistent: bool) -> MosquittoProcess:
    if mosquitto_executable() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    return MosquittoProcess(tmp_path / ("persistent" if persistent else "in-memory"),
                            PERSISTENT_CONFIG if persistent else ANONYMOUS_CONFIG)


async def _saved(broker: MosquittoProcess, since: float) -> None:
    """Until the broker wrote its state after ``since`` (its autosave, every second)."""
    db = broker.workdir / "data" / "mosquitto.db"
    await eventually(lambda: db.exists() and db.stat().st_mtime > since + 0.1, timeout=10, what="the autosave")


@dataclass
class Inbox:
    got: list[Message] = field(default_factory=list)

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.got]


@pytest.mark.mosquitto
@pytest.mark.parametrize("persistent", [True, False], ids=["persistence", "no-persistence"])
async def test_what_survives_a_broker_restart(tmp_path: Path, persistent: bool) -> None:
    """A SIGKILL and a restart on the same port. With ``persistence true`` the broker keeps the
    retained messages, the persistent sessions with their subscriptions, and queues for them what
    arrives while their clients are away; without it, all of that is gone. Either way, what a
    client published while the broker was down (QoS 1, kept by its own MQTT client) is sent when it
    reconnects, and reaches whoever is subscribed at that moment."""
    broker = _broker(tmp_path, persistent)
    broker.start()
    settings = BrokerSettings(url=broker.url, reconnect_min_s=1.0, reconnect_max_s=1.0)
    status_topic, candidates = "pice/v1/edge/e1/status", "pice/v1/cloud/c1/candidates/#"
    # An edge and a cloud: stable ids and last wills, so persistent sessions by default. The edge
    # waits 2 s before each try: a cloud started right after the broker is back comes first.
    edge = MqttTransport(settings.model_copy(update={"reconnect_min_s": 2.0, "reconnect_max_s": 2.0}),
                         client_id="e1", will=(status_topic, b""))
    cloud_inbox = Inbox()
    cloud = MqttTransport(settings, client_id="c1", will=("pice/v1/cloud/c1/status", b""))
    cloud.add_subscription(candidates, cloud_inbox.got.append)
    spy = MqttTransport(BrokerSettings(url=broker.url))
    assert not edge.clean_session
    assert not cloud.clean_session
    assert spy.clean_session
    try:
        await edge.connect()
        await cloud.connect()
        assert await edge.publish_and_wait(status_topic, b"online", retain=True)
        if persistent:
            await _saved(broker, time.time())
        await cloud.close()  # the cloud is away (its session stays on the broker)...

        broker.kill()  # ...and the broker crashes
        await eventually(lambda: not edge.connected, what="the edge to notice")
        edge.publish("pice/v1/cloud/c1/candidates/r1/e1", b"while the broker was down")  # kept by paho
        broker.start()
        await eventually(lambda: edge.connected, timeout=15, what="the edge to reconnect")
        # Sent by the edge as it reconnected: queued for the absent cloud only if its session survived.
        assert await edge.publish_and_wait("pice/v1/cloud/c1/candidates/r2/e1", b"after the restart")

        back = MqttTransport(settings, client_id="c1", will=("pice/v1/cloud/c1/status", b""))
        back.add_subscription(candidates, cloud_inbox.got.append)
        retained = Inbox()
        spy.add_subscription(status_topic, retained.got.append)
        await back.connect()
        await spy.connect()
        try:
            if persistent:
                assert back.session_present, "the cloud's session, with its subscription, was on disk"
                await eventually(lambda: len(cloud_inbox.got) == 2, timeout=10)
                assert sorted(cloud_inbox.payloads()) == [b"after the restart", b"while the broker was down"]
                await eventually(lambda: retained.payloads() == [b"online"], timeout=5, what="the retained status")
            else:
                assert back.session_present is False, "a new session: nothing was queued for us"
                # Give a queued message every chance to show up: none does.
                assert await back.publish_and_wait("pice/v1/cloud/c1/candidates/r3/probe", b"probe")
                await eventually(lambda: b"probe" in cloud_inbox.payloads(), timeout=10)
                assert cloud_inbox.payloads() == [b"probe"], "both candidates were lost with the cloud's session"
                assert retained.payloads() == [], "the retained status was lost"
        finally:
            await back.close()

        # With the receiver subscribed first, the client's own queue delivers it in both cases.
        broker.kill()
        await eventually(lambda: not edge.connected)
        edge.publish("pice/v1/cloud/c1/candidates/r4/e1", b"second outage")
        broker.start()
        again = MqttTransport(settings, client_id="c1", will=("pice/v1/cloud/c1/status", b""))
        again.add_subscription(candidates, cloud_inbox.got.append)
        await again.connect()  # before the edge's next try (it waits a second between tries)
        try:
            await eventually(lambda: b"second outage" in cloud_inbox.payloads(), timeout=15)
        finally:
            await again.close()
    finally:
        await edge.close()
        await spy.close()
        broker.kill()


# --- outages with real processes ------------------------------------------------------------------

@pytest.fixture
async def tiny_llm(tiny_model: Path) -> AsyncIterator[ScriptedSketches]:
    inner = TransformersBackend(tiny_model, threads=1)
    yield ScriptedSketches(inner, [SKETCH])
    await inner.close()


@pytest.fixture
def edges() -> Iterator[list[EdgeProcess]]:
    started: list[EdgeProcess] = []
    yield started
    for proc in started:
        proc.kill()


def start_edges(edges: list[EdgeProcess], names: tuple[str, ...], broker: MosquittoProcess, model: Path,
                logdir: Path) -> None:
    for name in names:
        edges.append(EdgeProcess(name, broker.url, model, logdir, heartbeat=HEARTBEAT_S,
                                 fault=("--delay", str(EDGE_DELAY_S))))


def service_config(broker: MosquittoProcess) -> Any:
    return cloud_config(broker.url, edges=0, service=dict(
        max_points=POINTS, tokens_per_point=8, sketch_tokens=40, deadline_floor_s=DEADLINE_S,
        deadline_cap_s=DEADLINE_S))


@dataclass
class Watch:
    """Samples the cloud's fleet (`Fleet.live` expires edges) and connection every 50 ms: ``gone``
    says when each edge was dropped (expired, or its last will)."""

    system: System
    gone: dict[str, float] = field(default_factory=dict)
    reconnected_at: float | None = None
    task: asyncio.Task[None] | None = None

    def start(self) -> Watch:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        service = self.system.service
        known = {e.device_id for e in service.fleet.live()}
        was_connected = True
        while True:
            service.fleet.live()  # drops the expired (one that has not re-announced itself yet stays known)
            for device in {d for d in known if service.fleet.get(d) is None} - self.gone.keys():
                self.gone[device] = time.monotonic()
            connected = service.transport.connected
            if connected and not was_connected:
                self.reconnected_at = time.monotonic()
            was_connected = connected
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def held_by_every_edge(system: System, names: tuple[str, ...]) -> None:
    """Until every edge's status reports tasks in hand (its heartbeat carries its queue)."""

    def holding() -> bool:
        infos = [system.service.fleet.get(name) for name in names]
        return all(info is not None and info.status.queue_depth > 0 for info in infos)

    await eventually(holding, timeout=30, what="every edge to hold tasks")


async def outage(system: System, broker: MosquittoProcess, names: tuple[str, ...], seconds: float,
                 kill: EdgeProcess | None = None) -> tuple[AnswerEvent, float, Watch]:
    """One request; the broker is killed once every edge holds tasks and restarted ``seconds`` later
    on the same port (``kill``: an edge that dies during the outage)."""
    service = system.service
    assert await service.fleet.wait_for(len(names), 60)
    watch = Watch(system).start()
    started = time.monotonic()
    request = asyncio.create_task(asyncio.wait_for(service.ask(QUESTION, mode="progressive"), 120))
    try:
        await held_by_every_edge(system, names)
        broker.kill()
        if kill is not None:
            kill.kill()
        await asyncio.sleep(seconds)
        broker.start()
        final = await request
        took = time.monotonic() - started
    finally:
        await watch.stop()
    assert final.stats.points_edge + final.stats.points_cloud == POINTS, "every point answered"
    assert final.text.count("**") == 2 * POINTS
    return final, took, watch


@pytest.mark.mosquitto
@pytest.mark.parametrize("seconds", [3.0, 12.0], ids=["3s", "12s"])
async def test_a_broker_outage_mid_request_expires_no_edge_and_the_edges_answer(
        tmp_path: Path, tiny_model: Path, tiny_llm: ScriptedSketches, edges: list[EdgeProcess],
        seconds: float) -> None:
    """The broker (with persistence, as deployed) dies while both edges work on their points and
    comes back ``seconds`` later: no edge expires, and the candidates the edges wrote meanwhile
    arrive (queued in the cloud's persistent session): at most 1 of the 5 points is the cloud's."""
    broker = Mosquitto(tmp_path)
    broker.start()
    names = ("e1", "e2")
    try:
        start_edges(edges, names, broker, tiny_model, tmp_path)
        async with start_system(service_config(broker), llm=tiny_llm) as system:  # type: ignore[arg-type]
            final, took, watch = await outage(system, broker, names, seconds)
            log.info("%gs broker outage: answered in %.1fs, %d of %d points by the cloud, devices %s, edges gone %s",
                     seconds, took, final.stats.points_cloud, POINTS, final.stats.devices, watch.gone)
            assert watch.gone == {}, "an edge was expired while the cloud was the one offline"
            assert final.stats.points_cloud <= 1
            assert took < DEADLINE_S, "no point waited for its deadline"
            assert all(proc.alive for proc in edges)
    finally:
        broker.kill()


@pytest.mark.mosquitto
async def test_an_edge_that_died_during_the_outage_expires_after_the_grace(
        tmp_path: Path, tiny_model: Path, tiny_llm: ScriptedSketches, edges: list[EdgeProcess]) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    names = ("steady", "doomed")
    try:
        start_edges(edges, names, broker, tiny_model, tmp_path)
        doomed = edges[1]
        async with start_system(service_config(broker), llm=tiny_llm) as system:  # type: ignore[arg-type]
            final, took, watch = await outage(system, broker, names, 3.0, kill=doomed)
            log.info("edge killed during a 3 s outage: answered in %.1fs, %d point(s) by the cloud, devices %s; "
                     "gone (s after the cloud reconnected): %s", took, final.stats.points_cloud, final.stats.devices,
                     {d: round(t - watch.reconnected_at, 1) if watch.reconnected_at else "before"
                      for d, t in watch.gone.items()})
            assert "steady" not in watch.gone
            assert "doomed" in watch.gone, "a dead edge still expires"
            assert watch.reconnected_at is not None
            assert watch.gone["doomed"] > watch.reconnected_at, "not while the cloud was offline: after its grace"
            # Its grace: 2 heartbeats + one reconnection pause (at most the outage + 1 s, at most
            # reconnect_max_s); the cloud itself came back on paho's back-off, after ~7 s.
            after = watch.gone["doomed"] - watch.reconnected_at
            heartbeats = defaults.RECONNECT_EDGE_GRACE_HEARTBEATS * HEARTBEAT_S
            assert heartbeats <= after < heartbeats + BrokerSettings().reconnect_max_s + 2.0
            assert "doomed" not in final.stats.devices
            assert system.service.fleet.get("doomed") is None
            assert took < DEADLINE_S
    finally:
        broker.kill()


@pytest.mark.mosquitto
async def test_without_broker_persistence_lost_candidates_move_on_without_waiting_for_the_deadline(
        tmp_path: Path, tiny_model: Path, tiny_llm: ScriptedSketches, edges: list[EdgeProcess]) -> None:
    """A broker without persistence loses the cloud's session in the restart: candidates an edge
    sends before the cloud has re-subscribed are lost. No edge expires; a point whose edge then
    reports an empty queue is placed again (or expanded by the cloud) at once, not at its 30 s
    deadline."""
    broker = _broker(tmp_path, persistent=False)
    broker.start()
    names = ("e1", "e2")
    try:
        start_edges(edges, names, broker, tiny_model, tmp_path)
        async with start_system(service_config(broker), llm=tiny_llm) as system:  # type: ignore[arg-type]
            final, took, watch = await outage(system, broker, names, 3.0)
            log.info("3 s outage without persistence: answered in %.1fs, %d point(s) by the cloud, devices %s; "
                     "session present after reconnecting: %s", took, final.stats.points_cloud, final.stats.devices,
                     system.service.transport.session_present)
            assert system.service.transport.session_present is False
            assert watch.gone == {}
            assert took < DEADLINE_S
    finally:
        broker.kill()
