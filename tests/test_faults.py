"""Faults with real processes: edges and clouds killed with SIGKILL, the broker killed and restarted.

The cloud service runs in the test's process (so the test can watch its fleet and counters); the
edges are real ``pice-edge run`` processes on the tiny model (``tests.fault_edge`` where a fault
is injected: a slow runtime, or every candidate published twice), over a real Mosquitto with
persistence. Each test checks that no request is lost or hangs past its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pice_cloud.bootstrap import System, start_system
from pice_cloud.broker import free_port
from pice_cloud.events import AnswerEvent
from pice_cloud.llm.transformers import TransformersBackend
from pice_edge.errors import EXIT_CONFIG, EXIT_UNAVAILABLE
from pice_edge.protocol import (
    CLOUD_STATUS_FILTER,
    EDGE_STATUS_FILTER,
    CloudStatus,
    EdgeStatus,
    cloud_candidates_filter,
    decode,
    edge_tasks_topic,
)
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import Mosquitto, cloud_config, eventually
from tests.procs import EdgeProcess

pytestmark = pytest.mark.mosquitto
log = logging.getLogger(__name__)  # the outcome of each fault, for the record (--log-cli-level=INFO)

QUESTION = "How can I improve my time management skills?"  # the tiny model sketches 2 points
DEADLINE_S = 4.0
# The cloud's own fallback (a batched expansion on the tiny model) plus scheduling noise on a
# busy CI machine: what a request may take beyond its point deadline.
SLACK_S = 10.0


def settings(deadline_s: float = DEADLINE_S) -> dict[str, Any]:
    """The ``service`` section: a small budget and a fixed per-point deadline."""
    return dict(max_points=4, tokens_per_point=8, sketch_tokens=40, deadline_floor_s=deadline_s,
                deadline_cap_s=deadline_s)


@pytest.fixture
async def tiny_llm(tiny_model: Path) -> AsyncIterator[TransformersBackend]:
    llm = TransformersBackend(tiny_model, threads=1)
    yield llm
    await llm.close()


@pytest.fixture
def edges(tmp_path: Path) -> Iterator[list[EdgeProcess]]:
    """Edge processes the test starts; any still running at the end are killed."""
    started: list[EdgeProcess] = []
    yield started
    for proc in started:
        proc.kill()


def start_edge(edges: list[EdgeProcess], device_id: str, broker: Mosquitto, model: Path, logdir: Path,
               **kwargs: object) -> EdgeProcess:
    proc = EdgeProcess(device_id, broker.url, model, logdir, **kwargs)  # type: ignore[arg-type]
    edges.append(proc)
    return proc


async def answer(system: System, mode: str = "progressive", limit: float = DEADLINE_S + SLACK_S + 20
                 ) -> tuple[AnswerEvent, float]:
    """One request, bounded: a hang fails the test instead of stalling the suite."""
    started = time.monotonic()
    final = await asyncio.wait_for(system.service.ask(QUESTION, mode=mode), limit)  # type: ignore[arg-type]
    return final, time.monotonic() - started


async def spy(url: str, topic_filter: str) -> tuple[MqttTransport, list[Message]]:
    got: list[Message] = []
    transport = MqttTransport(BrokerSettings(url=url))
    transport.add_subscription(topic_filter, got.append)
    await transport.connect()  # returns once the SUBACK is in
    return transport, got


async def test_edge_killed_while_holding_tasks(mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend,
                                               edges: list[EdgeProcess], tmp_path: Path) -> None:
    # "doomed" holds its tasks (a 60 s runtime delay) until it is killed; "steady" is healthy.
    doomed = start_edge(edges, "doomed", mosquitto, tiny_model, tmp_path, fault=("--delay", "60"))
    start_edge(edges, "steady", mosquitto, tiny_model, tmp_path)
    watcher, tasks_seen = await spy(mosquitto.url, edge_tasks_topic("doomed"))
    try:
        async with start_system(cloud_config(mosquitto.url, edges=0, service=settings(30)), llm=tiny_llm) as system:
            assert await system.service.fleet.wait_for(2, 60)
            request = asyncio.create_task(answer(system))
            await eventually(lambda: bool(tasks_seen), timeout=30)

            def doomed_holds_a_task() -> bool:  # its heartbeat (0.5 s) reports the queue
                info = system.service.fleet.get("doomed")
                return info is not None and info.status.queue_depth > 0

            await eventually(doomed_holds_a_task, timeout=10, what="the task in doomed's queue")
            doomed.kill()
            final, took = await request
            log.info("edge killed holding %d task(s): answered in %.1fs, %d point(s) by the cloud",
                     len(tasks_seen), took, final.stats.points_cloud)

            assert [d for d in final.stats.devices if d == "doomed"] == []
            # The dead edge's points were placed again: on the survivor, which has free slots.
            assert len(tasks_seen) >= 1
            assert final.stats.points_cloud == 0
            assert final.stats.devices == ["steady"]
            assert final.stats.points_edge + final.stats.points_cloud == final.text.count("**") // 2
            # The last will settled them at once: far sooner than the 30 s point deadline.
            assert took < 30
            assert system.service.fleet.get("doomed") is None
            # The next request uses the survivor only.
            again, _ = await answer(system)
            assert again.stats.devices == ["steady"]
            assert again.stats.points_cloud == 0
    finally:
        await watcher.close()


async def test_all_edges_gone_degrades_to_cloud_only(mosquitto: Mosquitto, tiny_model: Path,
                                                     tiny_llm: TransformersBackend, edges: list[EdgeProcess],
                                                     tmp_path: Path) -> None:
    # Heartbeats every 30 s: only the last will can tell the cloud quickly that they are gone.
    procs = [start_edge(edges, f"gone-{i}", mosquitto, tiny_model, tmp_path, heartbeat=30) for i in (1, 2)]
    async with start_system(cloud_config(mosquitto.url, edges=0, service=settings()), llm=tiny_llm) as system:
        assert await system.service.fleet.wait_for(2, 60)
        for proc in procs:
            proc.kill()
        await eventually(lambda: system.service.fleet.live() == [], timeout=10)
        final, took = await answer(system, mode="auto")
        log.info("all edges gone: mode=%s, answered in %.1fs", final.stats.mode, took)
        assert final.stats.mode == "cloud"
        assert final.text
        assert final.stats.points_edge == 0


async def test_broker_killed_and_restarted_mid_request(mosquitto: Mosquitto, tiny_model: Path,
                                                       tiny_llm: TransformersBackend, edges: list[EdgeProcess],
                                                       tmp_path: Path) -> None:
    for name in ("e1", "e2"):
        start_edge(edges, name, mosquitto, tiny_model, tmp_path)
    # A 30 s point deadline: a point that waited for it would show.
    async with start_system(cloud_config(mosquitto.url, edges=0, service=settings(30)), llm=tiny_llm) as system:
        service = system.service
        assert await service.fleet.wait_for(2, 60)
        first = await answer(system)
        assert first[0].stats.points_edge >= 1

        request = asyncio.create_task(answer(system, limit=60))
        await eventually(lambda: service.inbox.in_flight == 1, timeout=30)  # tasks are out
        mosquitto.kill()
        await eventually(lambda: not service.transport.connected, what="the cloud to notice the broker is gone")
        mosquitto.start()
        restarted_at = time.monotonic()  # the fleet's clock
        # In flight: it completes with the edges' candidates (queued in the cloud's persistent
        # session, or re-sent by the edges), or, for what the crash lost, the cloud's own expansion
        # after a short grace once the cloud is back: no point waits for its 30 s deadline.
        final, took = await request
        log.info("broker restarted mid-request: answered in %.1fs, edge/cloud points %d/%d",
                 took, final.stats.points_edge, final.stats.points_cloud)
        assert final.stats.points_edge + final.stats.points_cloud == first[0].stats.points_edge
        assert took < 15

        # Everyone reconnects and resubscribes by themselves; then requests succeed at the edges.
        await eventually(lambda: system.service.transport.connected, timeout=20)
        # Both edges heard from since the restart (not only not yet expired): they are subscribed again.
        await eventually(lambda: {e.device_id for e in service.fleet.live() if e.last_seen >= restarted_at}
                         == {"e1", "e2"}, timeout=30)
        # A subscription not re-made fails every request. Under CI load the first request after
        # the restart was once seen to go wholly to the cloud (cause not pinned down: see the
        # per-request counts if it recurs), so up to three are asked.
        served: list[tuple[int, int]] = []
        for _ in range(3):
            after, _ = await answer(system)
            served.append((after.stats.points_edge, after.stats.points_cloud))
            if after.stats.points_edge >= 1 and after.stats.points_cloud == 0:
                break
        edge_points, cloud_points = served[-1]
        assert edge_points >= 1, f"edge/cloud points per request: {served}"
        assert cloud_points == 0, f"candidates did not come back ({served}): a subscription was not re-made"
        assert system.service.transport.connect_count == 2
        # The broker lost our retained status in the crash; we published it again on reconnect.
        status_spy, statuses = await spy(mosquitto.url, CLOUD_STATUS_FILTER)
        try:
            await eventually(lambda: bool(statuses), timeout=10, what="the cloud's retained status")
            assert decode(CloudStatus, statuses[0].payload).online
        finally:
            await status_spy.close()
    for proc in edges:
        assert proc.alive
        assert "lost MQTT broker" in proc.log()


async def test_slow_edge_late_candidates_are_ignored(mosquitto: Mosquitto, tiny_model: Path,
                                                     tiny_llm: TransformersBackend, edges: list[EdgeProcess],
                                                     tmp_path: Path) -> None:
    start_edge(edges, "slow", mosquitto, tiny_model, tmp_path, fault=("--delay", "3"))
    watcher, candidates = await spy(mosquitto.url, cloud_candidates_filter("+"))
    try:
        async with start_system(cloud_config(mosquitto.url, edges=0, service=settings(1.0)), llm=tiny_llm) as system:
            rejections = system.service.transport.rejections
            assert await system.service.fleet.wait_for(1, 60)
            final, took = await answer(system)
            n = final.stats.points_cloud
            assert n >= 1
            assert final.stats.points_edge == 0, "the deadline passed: the cloud expanded every point"
            assert took < 1.0 + SLACK_S
            # The slow edge answers later anyway: every candidate is counted as late, none used.
            await eventually(lambda: len(candidates) == n, timeout=30)
            await eventually(lambda: rejections.count("candidate", "late") == n)
            assert system.service.inbox.accepted == 0
            assert rejections.count() == n
            log.info("slow edge: answered in %.1fs by the cloud, %d late candidate(s) ignored", took, n)
    finally:
        await watcher.close()


async def test_duplicate_candidates_are_deduplicated(mosquitto: Mosquitto, tiny_model: Path,
                                                     tiny_llm: TransformersBackend, edges: list[EdgeProcess],
                                                     tmp_path: Path) -> None:
    start_edge(edges, "twice", mosquitto, tiny_model, tmp_path, fault=("--duplicate",))
    watcher, candidates = await spy(mosquitto.url, cloud_candidates_filter("+"))
    try:
        async with start_system(cloud_config(mosquitto.url, edges=0, service=settings(30)), llm=tiny_llm) as system:
            rejections = system.service.transport.rejections
            assert await system.service.fleet.wait_for(1, 60)
            final, _ = await answer(system)
            n = final.stats.points_edge
            assert n >= 1
            assert final.stats.points_cloud == 0
            assert final.text.count("**") == 2 * n, "each point once"
            await eventually(lambda: len(candidates) == 2 * n)
            # The second copy arrives while the request is open (duplicate) or just after (late).
            await eventually(lambda: rejections.count("candidate") == n)
            assert rejections.count("candidate", "duplicate") + rejections.count("candidate", "late") == n
            assert system.service.inbox.accepted == n
            log.info("duplicating edge: %d point(s), %d duplicate(s) dropped", n, n)
    finally:
        await watcher.close()


def _cloud_process(broker: Mosquitto, model: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pice_cloud.cli", "ask", QUESTION, "--broker", broker.url, "--edges", "0",
           "--model", str(model), "--mode", "progressive", "--max-points", "4", "--tokens-per-point", "400",
           "--wait-edges", "60"]
    # The tiny random model's sketches would never pass the guards.
    env = {**os.environ, "PICE_SERVICE__SKETCH_GUARD": "false", "PICE_SERVICE__EXPANSION_GUARD": "false"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).parents[1], env=env)


def _kill_after_sketch(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    first = proc.stdout.readline()  # "Sketch:" is written and flushed before the tasks go out
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    return first


async def test_cloud_restarted_while_edges_run(mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend,
                                               edges: list[EdgeProcess], tmp_path: Path) -> None:
    # Heartbeats every 5 s: the new cloud learns of the edges from their retained status.
    for name in ("r1", "r2"):
        start_edge(edges, name, mosquitto, tiny_model, tmp_path, heartbeat=5)
    watcher, statuses = await spy(mosquitto.url, EDGE_STATUS_FILTER)
    await eventually(lambda: {m.topic for m in statuses} >= {"pice/v1/edge/r1/status", "pice/v1/edge/r2/status"},
                     timeout=60)
    await watcher.close()

    # The first cloud is a real process, killed (SIGKILL) right after its sketch.
    cloud = _cloud_process(mosquitto, tiny_model)
    first_line = await asyncio.get_running_loop().run_in_executor(None, _kill_after_sketch, cloud)
    assert first_line.startswith("Sketch:")
    cloud_status, retained = await spy(mosquitto.url, CLOUD_STATUS_FILTER)
    await eventually(lambda: bool(retained))
    await cloud_status.close()
    assert decode(CloudStatus, retained[-1].payload).online is False, "the dead cloud's last will"

    # Edges kept running and kept their retained status; a new cloud sees them at once.
    assert all(proc.alive for proc in edges)
    # The expansion guard off: whether it refuses the random model's text is chance, not the
    # subject here (a refused candidate is rewritten by the cloud, which this test counts).
    service = {**settings(30), "expansion_guard": False}
    async with start_system(cloud_config(mosquitto.url, edges=0, service=service), llm=tiny_llm) as system:
        assert await system.service.fleet.wait_for(2, 2.0), "retained statuses did not register the edges"
        for info in system.service.fleet.live():
            assert isinstance(info.status, EdgeStatus)
            assert info.status.online
        final, _ = await answer(system)
        assert final.stats.points_edge >= 1
        assert final.stats.points_cloud == 0
        assert set(final.stats.devices) <= {"r1", "r2"}
        log.info("cloud restarted: new cloud saw %d edges from retained status, answer by %s",
                 len(system.service.fleet.live()), final.stats.devices)
    assert final.text.startswith("1. **")


async def answer_while_frozen(system: System, frozen: EdgeProcess, frozen_tasks: list[Message]
                              ) -> tuple[AnswerEvent, float]:
    """One request, with ``frozen`` stopped (SIGSTOP) once it holds a task of it, resumed after."""
    request = asyncio.create_task(answer(system, limit=60))
    await eventually(lambda: bool(frozen_tasks), timeout=30, what="a task for the edge to freeze")
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        return await request
    finally:
        frozen.proc.send_signal(signal.SIGCONT)


async def test_frozen_edge_points_are_replaced_at_once(mosquitto: Mosquitto, tiny_model: Path,
                                                       tiny_llm: TransformersBackend, edges: list[EdgeProcess],
                                                       tmp_path: Path) -> None:
    """SIGSTOP: no last will, no goodbye; the edge just goes quiet. Its points must move on when
    its heartbeats stop (3 x 0.5 s), not wait for the 30 s point deadline."""
    delay = ("--delay", "2")  # each batch takes 2 s more: a device with real work to do
    frozen = start_edge(edges, "frozen", mosquitto, tiny_model, tmp_path, fault=delay)
    # Its heartbeat is slower: on a loaded host a 0.5 s one can miss its 1.5 s expiry, and a
    # steady edge taken for dead sends its points to the cloud (not what these tests are about).
    start_edge(edges, "steady", mosquitto, tiny_model, tmp_path, fault=delay, heartbeat=2.0)
    watcher, frozen_tasks = await spy(mosquitto.url, edge_tasks_topic("frozen"))
    try:
        async with start_system(cloud_config(mosquitto.url, edges=0, service=settings(30)), llm=tiny_llm) as system:
            assert await system.service.fleet.wait_for(2, 60)
            normal, normal_s = await answer(system, limit=60)
            assert set(normal.stats.devices) == {"frozen", "steady"}
            frozen_tasks.clear()
            final, took = await answer_while_frozen(system, frozen, frozen_tasks)
            log.info("edge frozen holding %d task(s): answered in %.1fs (normal %.1fs, %.2fx); devices %s, "
                     "cloud points %d", len(frozen_tasks), took, normal_s, took / normal_s, final.stats.devices,
                     final.stats.points_cloud)
            assert "frozen" not in final.stats.devices
            assert final.stats.points_edge + final.stats.points_cloud == final.text.count("**") // 2
            # Re-placed on the steady edge (a free slot) rather than expanded by the cloud.
            assert final.stats.points_cloud == 0
            assert final.stats.devices == ["steady"]
            # Detection (1.5 s) plus one more batch on the steady edge: far from the 30 s deadline.
            assert took < normal_s + 2 * 2 + 1.5 + SLACK_S
    finally:
        await watcher.close()


async def test_frozen_edge_costs_nothing_when_replicas_cover_its_points(
        mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend, edges: list[EdgeProcess],
        tmp_path: Path) -> None:
    """The default configuration (ensemble on): with free slots, every point is also at the other
    edge, so a frozen edge costs no re-placement and no extra batch: the answer arrives as soon
    as the survivor's candidates do (measured ~1.0x normal; the target is 1.5x)."""
    delay = ("--delay", "2")
    frozen = start_edge(edges, "frozen", mosquitto, tiny_model, tmp_path, fault=delay)
    # Its heartbeat is slower: on a loaded host a 0.5 s one can miss its 1.5 s expiry, and a
    # steady edge taken for dead sends its points to the cloud (not what these tests are about).
    start_edge(edges, "steady", mosquitto, tiny_model, tmp_path, fault=delay, heartbeat=2.0)
    watcher, frozen_tasks = await spy(mosquitto.url, edge_tasks_topic("frozen"))
    steady_watcher, steady_tasks = await spy(mosquitto.url, edge_tasks_topic("steady"))
    try:
        config = cloud_config(mosquitto.url, edges=0, service={**settings(30), "ensemble_width": 2})
        async with start_system(config, llm=tiny_llm) as system:
            assert await system.service.fleet.wait_for(2, 60)
            normal, normal_s = await answer(system, limit=60)
            assert normal.stats.points_cloud == 0
            frozen_tasks.clear()
            steady_tasks.clear()
            final, took = await answer_while_frozen(system, frozen, frozen_tasks)
            points = final.stats.points_edge + final.stats.points_cloud
            log.info("edge frozen, replicas on: answered in %.1fs (normal %.1fs, %.2fx)", took, normal_s,
                     took / normal_s)
            assert final.stats.devices == ["steady"]
            assert final.stats.points_cloud == 0
            # Every point was already at the steady edge: nothing had to be placed again.
            assert len(steady_tasks) == points == len(frozen_tasks)
            assert took < 1.5 * normal_s + 1.0
    finally:
        await watcher.close()
        await steady_watcher.close()


class Supervisor:
    """What the systemd units do: restart the command when it exits with anything but 0 or
    EXIT_CONFIG (``Restart=on-failure``, ``RestartPreventExitStatus=2``), after ``restart_s``."""

    def __init__(self, cmd: list[str], log_path: Path, restart_s: float = 1.0) -> None:
        self.cmd, self.log_path, self.restart_s = cmd, log_path, restart_s
        self.exits: list[int] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with open(self.log_path, "ab") as log:  # noqa: ASYNC230 (a local file, opened once per start)
                self.proc = await asyncio.create_subprocess_exec(*self.cmd, stdout=asyncio.subprocess.DEVNULL,
                                                                 stderr=log, cwd=Path(__file__).parents[1])
            code = await self.proc.wait()
            self.exits.append(code)
            if code in (0, EXIT_CONFIG):
                return
            await asyncio.sleep(self.restart_s)  # RestartSec

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def test_broker_up_last_the_fleet_comes_up_by_itself(tmp_path: Path, tiny_model: Path) -> None:
    """A power cut that brings the broker up last: the edge and the cloud started first give up
    with EXIT_UNAVAILABLE, are restarted as the units would, and come up once the broker does."""
    broker = Mosquitto(tmp_path)  # its port is chosen now; nothing listens there yet
    edge = Supervisor([sys.executable, "-m", "pice_edge.cli", "run", "--broker", broker.url, "--no-zeroconf",
                       "--device-id", "late-edge", "--model", str(tiny_model), "--threads", "1", "--heartbeat", "0.5"],
                      tmp_path / "edge.log")
    port = free_port()
    cloud = Supervisor([sys.executable, "-m", "pice_cloud.cli", "serve", "--broker", broker.url, "--port", str(port),
                        "--model", str(tiny_model), "--edges", "0"], tmp_path / "cloud.log")
    try:
        await eventually(lambda: bool(edge.exits) and bool(cloud.exits), timeout=120,
                         what="both to give up on the missing broker once")
        assert edge.exits[0] == EXIT_UNAVAILABLE, (tmp_path / "edge.log").read_text()[-2000:]
        assert cloud.exits[0] == EXIT_UNAVAILABLE, (tmp_path / "cloud.log").read_text()[-2000:]
        broker.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def health() -> dict[str, Any]:
                try:
                    return dict((await http.get("/health")).json())
                except httpx.HTTPError:
                    return {}

            seen: dict[str, Any] = {}

            async def poll() -> None:
                while seen.get("edges") != ["late-edge"]:
                    seen.update(await health())
                    await asyncio.sleep(0.5)

            await asyncio.wait_for(poll(), 120)
        assert seen["status"] == "ok"
    finally:
        await edge.stop()
        await cloud.stop()
        broker.kill()
