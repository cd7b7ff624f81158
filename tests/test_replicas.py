"""Cloud replicas sharing one broker and one fleet: each replica gets only its own candidates,
an edge never holds more tasks than its capacity, and a refusal makes the sender place the point
elsewhere at once (another edge, else the cloud) instead of waiting for the deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from pice_cloud.bootstrap import default_cloud_id, start_system
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.progressive import Inbox, SendTask, Settle
from pice_cloud.replica import LIVE_WITHIN_HEARTBEATS, LiveReplicas, ReplicaClaim
from pice_cloud.scheduler import EdgeView, ensemble_width
from pice_edge.errors import EXIT_CONFIG
from pice_edge.node import EdgeNode
from pice_edge.protocol import (
    ID_PATTERN,
    Candidate,
    CloudStatus,
    EdgeStatus,
    ExpandTask,
    TaskRefusal,
    candidate_topic,
    cloud_status_topic,
    decode,
    encode,
    refusal_topic,
)
from pice_edge.runtimes.transformers import TransformersRuntime
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import QUESTION, Mosquitto, ScriptedSketches, cloud_config, eventually, started
from tests.progressive_support import FakeClock, live_fleet, open_request

ROOT = Path(__file__).resolve().parent.parent
SKETCH = " Set clear daily goals\n2. Plan each morning\n3. Take short breaks\n"
SMALL = {"max_points": 3, "tokens_per_point": 8, "sketch_tokens": 30, "max_answer_tokens": 16}


def test_default_replica_ids_differ_per_port_and_are_valid_topic_levels() -> None:
    a, b = default_cloud_id("http://127.0.0.1:8000/v1"), default_cloud_id("http://127.0.0.1:8001/v1")
    assert a != b
    assert a.endswith("-8000")
    assert default_cloud_id("http://127.0.0.1:8000/v1") == a, "stable: a restarted replica reuses its session"
    assert re.match(ID_PATTERN, default_cloud_id())


def test_a_task_names_its_replica_only_when_set() -> None:
    task = ExpandTask(request_id="r1", point_index=0, question="q", sketch=["p"], max_new_tokens=4,
                      deadline=time.time() + 30)
    assert b"reply_to" not in encode(task), "an edge older than reply_to still accepts it"
    named = task.model_copy(update={"reply_to": "cloud-a"})
    assert decode(ExpandTask, encode(named)).reply_to == "cloud-a"


@contextlib.asynccontextmanager
async def edges(url: str, model: Path, *, count: int, max_batch: int, max_queue: int) -> AsyncIterator[list[EdgeNode]]:
    nodes = [EdgeNode(TransformersRuntime(model, threads=1), device_id=f"e{i}", broker=BrokerSettings(url=url),
                      max_batch=max_batch, max_queue=max_queue, heartbeat_s=1.0) for i in range(count)]
    async with started(nodes):
        yield nodes


@pytest.mark.mosquitto
async def test_two_replicas_share_a_fleet_without_losing_or_overbooking(mosquitto: Mosquitto,
                                                                        tiny_model: Path) -> None:
    llms = [ScriptedSketches(TransformersBackend(tiny_model, threads=1), [SKETCH]) for _ in range(2)]
    try:
        async with edges(mosquitto.url, tiny_model, count=2, max_batch=2, max_queue=1) as nodes, \
                start_system(cloud_config(mosquitto.url, service=SMALL, cloud_id="cloud-a"),
                             llm=llms[0]) as a, \
                start_system(cloud_config(mosquitto.url, service=SMALL, cloud_id="cloud-b"),
                             llm=llms[1]) as b:  # type: ignore[arg-type]
            assert await a.service.fleet.wait_for(2, 10)
            assert await b.service.fleet.wait_for(2, 10)
            # Each knows of the other from its retained status: they share the free slots.
            await eventually(lambda: a.service.replicas.count() == b.service.replicas.count() == 2, timeout=10,
                             what="the replicas to see each other")
            # Four requests on each replica at once: 24 points for two edges that hold 3 tasks each.
            answers = await asyncio.wait_for(asyncio.gather(*[
                system.service.ask(f"{QUESTION} ({i})", mode="progressive") for i in range(4) for system in (a, b)
            ]), 120)
            rejected = {**a.service.transport.rejections.snapshot(), **b.service.transport.rejections.snapshot()}
            refused = sum(n.stats.tasks_refused for n in nodes)
            peaks = [n.stats.peak_outstanding for n in nodes]
    finally:
        for llm in llms:
            await llm.inner.close()
    for final in answers:
        assert final.stats.mode == "progressive"
        assert final.stats.points_edge + final.stats.points_cloud == 3, "a point was lost"
        assert final.text.count("**") == 6
    assert sum(f.stats.points_edge for f in answers) > 0
    assert max(peaks) <= 2 + 1, f"an edge held more than its capacity: {peaks}"
    assert refused > 0, "the edges were never full: the test did not contend"
    # Each replica saw only its own candidates: none arrived for a request it does not know.
    assert not [key for key in rejected if key[1] in {"unknown_request", "unassigned", "identity"}], rejected


def test_live_replicas_count_those_online_and_heard_from_lately() -> None:
    clock = FakeClock()
    replicas = LiveReplicas("cloud-a", clock=clock)

    def status(cloud_id: str, online: bool = True, *, topic: str | None = None) -> Message:
        body = CloudStatus(cloud_id=cloud_id, online=online, instance="x", started_at=1.0, heartbeat_s=2.0)
        return Message(topic or cloud_status_topic(cloud_id), encode(body), retain=False)

    assert replicas.count() == 1
    replicas.watch(status("cloud-a"))  # our own
    replicas.watch(status("cloud-b"))
    replicas.watch(status("cloud-c"))
    replicas.watch(status("cloud-d", topic=cloud_status_topic("cloud-b")))  # under another's name
    replicas.watch(Message(cloud_status_topic("cloud-e"), b"{not json", retain=False))
    assert replicas.count() == 3
    replicas.watch(status("cloud-c", online=False))  # stopped (or its last will)
    assert replicas.count() == 2
    clock.advance(LIVE_WITHIN_HEARTBEATS * 2.0 + 0.1)  # b stopped re-publishing: gone
    assert replicas.count() == 1


def test_replicas_share_the_free_slots_for_ensembles() -> None:
    # Six edges of 4 slots; this replica has 1 task on each since their last heartbeats (which
    # said idle): 18 slots free as far as it knows, but the others have placed about as much.
    edges = [EdgeView(f"e{i}", max_batch=4, outstanding=1) for i in range(6)]
    assert ensemble_width(6, edges, 3) == 3
    assert ensemble_width(6, edges, 3, replicas=2) == 2  # 12 free
    assert ensemble_width(6, edges, 3, replicas=4) == 1  # none free: one edge a point
    # An idle fleet is idle for every replica.
    idle = [EdgeView(f"e{i}", max_batch=4) for i in range(6)]
    assert ensemble_width(6, idle, 3, replicas=4) == 3


def _refusal(request_id: str, point: int, device: str) -> Message:
    refusal = TaskRefusal(request_id=request_id, point_index=point, device_id=device, reason="queue_full")
    return Message(refusal_topic("cloud-a", request_id, device), encode(refusal), retain=False)


def test_a_candidate_frees_its_slot_before_the_edges_next_status() -> None:
    """An edge's status that follows its candidate may arrive after the next request is placed:
    the queue that status reported no longer holds the answered task, so the next request sees
    the slot free instead of a full edge (which would send the point to the cloud)."""
    from pice_cloud.fleet import Fleet

    fleet = Fleet()
    fleet.update(EdgeStatus(device_id="e1", online=True, max_batch=2, free_slots=0, queue_depth=2))
    for point in (0, 1):
        fleet.task_sent("r1", point, "e1")
    assert [v.free_slots for v in fleet.views()] == [0]
    fleet.candidate_received(Candidate(request_id="r1", point_index=0, device_id="e1", text="x", token_count=1,
                                       mean_logprob=-1.0, latency_s=0.1))
    assert [v.free_slots for v in fleet.views()] == [1]
    fleet.candidate_received(Candidate(request_id="r1", point_index=1, device_id="e1", text="x", token_count=1,
                                       mean_logprob=-1.0, latency_s=0.1))
    assert [v.free_slots for v in fleet.views()] == [2]
    # The edge's own word wins again once it speaks: another replica's tasks fill it.
    fleet.update(EdgeStatus(device_id="e1", online=True, max_batch=2, free_slots=1, queue_depth=1))
    assert [v.free_slots for v in fleet.views()] == [1]


def test_a_refused_point_is_placed_on_another_edge_at_once() -> None:
    clock = FakeClock()
    fleet = live_fleet(clock, "a", "b")
    inbox = Inbox(clock=clock)
    request, recorder = open_request(inbox, [("a",)], fleet)
    assert fleet.get("a").outstanding == 1  # type: ignore[union-attr]
    inbox.handle_refusal(_refusal("r1", 0, "a"))
    # The edge is full until its next status; its refused task no longer counts against it.
    [view_a] = [v for v in fleet.views() if v.device_id == "a"]
    assert view_a.free_slots == 0
    assert fleet.get("a").outstanding == 0  # type: ignore[union-attr]
    sent = [a.task.device_id for a in recorder.of(SendTask)]  # type: ignore[attr-defined]
    assert sent == ["a", "b"], "re-placed at once, away from the edge that refused"
    cand = Candidate(request_id="r1", point_index=0, device_id="b", text="Write your goals down every week.",
                     token_count=8, mean_logprob=-0.5, latency_s=0.1)
    inbox.handle_candidate(Message(candidate_topic("r1", "b", "cloud-a"), encode(cand), retain=False))
    [settled] = recorder.of(Settle)
    assert (settled.point.source, settled.point.device_id) == ("edge", "b")  # type: ignore[attr-defined]
    assert request.done
    fleet.update(EdgeStatus(device_id="a", online=True, max_batch=2, free_slots=2))
    assert [v.free_slots for v in fleet.views() if v.device_id == "a"] == [2], "a new status clears it"


def test_refusals_that_do_not_match_a_task_are_counted_not_used() -> None:
    clock = FakeClock()
    inbox = Inbox(clock=clock)
    request, _ = open_request(inbox, [("a",)], live_fleet(clock, "a"))
    forged = TaskRefusal(request_id="r1", point_index=0, device_id="b", reason="queue_full")
    inbox.handle_refusal(Message(refusal_topic("cloud-a", "r1", "a"), encode(forged), retain=False))
    inbox.handle_refusal(_refusal("r1", 0, "b"))  # b was never asked
    inbox.handle_refusal(Message(refusal_topic("cloud-a", "r1", "a"), b"{not json", retain=False))
    inbox.handle_refusal(_refusal("gone", 0, "a"))  # answered already: nothing to do
    assert request.points[0].refused == set()
    inbox.handle_refusal(_refusal("r1", 0, "a"))
    inbox.handle_refusal(_refusal("r1", 0, "a"))  # a QoS 1 re-delivery counts once
    assert request.points[0].refused == {"a"}
    assert inbox.rejections.snapshot() == {("refusal", "identity"): 1, ("refusal", "unassigned"): 1,
                                           ("refusal", "json"): 1, ("refusal", "duplicate"): 1}


@pytest.mark.mosquitto
async def test_a_site_broker_bridges_edges_to_the_central_broker(tmp_path: Path, tiny_model: Path) -> None:
    """The topic lines of tools/mosquitto/bridge.conf between two real brokers: edges on the
    site broker serve a cloud on the central one."""
    shipped = (ROOT / "tools" / "mosquitto" / "bridge.conf").read_text().splitlines()
    (tmp_path / "central").mkdir()
    (tmp_path / "site").mkdir()
    central = Mosquitto(tmp_path / "central")
    central.start()
    kept = [ln for ln in shipped if ln.split(" ", 1)[0] in {"topic", "bridge_protocol_version", "cleansession",
                                                             "try_private"}]
    bridge = "\n".join(["connection pice-test-site", f"address 127.0.0.1:{central.port}",
                        "remote_clientid pice-bridge-test", "restart_timeout 1", *kept])
    site = Mosquitto(tmp_path / "site", template="bridged.conf", bridge=bridge)
    site.start()
    llm = ScriptedSketches(TransformersBackend(tiny_model, threads=1), [SKETCH])
    try:
        async with edges(site.url, tiny_model, count=2, max_batch=2, max_queue=2), \
                start_system(cloud_config(central.url, service=SMALL, cloud_id="central-cloud"),
                             llm=llm) as system:  # type: ignore[arg-type]
            assert await system.service.fleet.wait_for(2, 20), "edge statuses did not cross the bridge"
            final = await asyncio.wait_for(system.service.ask(QUESTION, mode="progressive"), 60)
    finally:
        await llm.inner.close()
        site.kill()
        central.kill()
    assert final.stats.mode == "progressive"
    assert final.stats.points_cloud == 0, "tasks or candidates did not cross the bridge"
    assert final.stats.points_edge == 3


# --- one cloud_id, one process (issue 27, D1) --------------------------------------------------

def test_the_claim_is_an_optional_addition_and_the_later_start_gives_way() -> None:
    assert b"instance" not in encode(CloudStatus(cloud_id="c", online=True)), "older readers still accept it"
    claim = ReplicaClaim("c")
    older = CloudStatus(cloud_id="c", online=True, instance="a" * 16, started_at=claim.started_at - 5)
    newer = CloudStatus(cloud_id="c", online=True, instance="b" * 16, started_at=claim.started_at + 5)
    assert claim.yields_to(older)
    assert not claim.yields_to(newer)
    assert claim.yields_to(CloudStatus(cloud_id="c", online=True)), "a replica older than the claim never yields"
    assert decode(CloudStatus, encode(claim.status(True))).instance == claim.instance


def _serve(mosquitto: Mosquitto, model: Path, cloud_id: str, log: Path) -> subprocess.Popen[bytes]:
    """A real ``pice-cloud serve`` on a free port over ``mosquitto``, no local edges; stderr to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PICE_CLOUD_ID": cloud_id, "PICE_DISCOVERY__ENABLED": "false",
           "PICE_SERVICE__ROUTER": "off", "PICE_SERVICE__SELECTOR": "confidence"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pice_cloud.cli", "serve", "--broker", mosquitto.url,
                                 "--edges", "0", "--port", "0", "--model", str(model), "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=ROOT)


async def _until_serving_or_exit(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> str | None:
    """The API URL once ``proc`` serves; None when it exits first."""
    found: list[str] = []

    def ready() -> bool:
        match = re.search(r"serving on (http://\S+)/v1", log.read_text(errors="replace"))
        if match:
            found.append(match.group(1))
        return bool(found) or proc.poll() is not None

    await eventually(ready, timeout=timeout, what=f"{proc.args} to serve or exit")
    return found[0] if found else None


@pytest.mark.mosquitto
async def test_a_second_replica_with_the_same_cloud_id_refuses_to_start(mosquitto: Mosquitto, tiny_model: Path,
                                                                       tmp_path: Path) -> None:
    """Issue 27's reproduction: two ``pice-cloud serve`` with PICE_CLOUD_ID=cloud-r1 on one broker.
    The second exits with status 2 and says who holds the id and what to change; the first keeps
    its broker connection (no flapping) and its claim."""
    statuses: list[Message] = []
    watcher = MqttTransport(BrokerSettings(url=mosquitto.url))
    watcher.add_subscription(cloud_status_topic("cloud-r1"), statuses.append)
    await watcher.connect()
    first = _serve(mosquitto, tiny_model, "cloud-r1", tmp_path / "r1.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        url = await _until_serving_or_exit(first, tmp_path / "r1.log")
        assert url is not None, (tmp_path / "r1.log").read_text()
        holder = decode(CloudStatus, statuses[-1].payload)
        assert holder.online
        assert holder.instance
        assert holder.api_url == url + "/v1"

        second = _serve(mosquitto, tiny_model, "cloud-r1", tmp_path / "r2.log")
        assert await _until_serving_or_exit(second, tmp_path / "r2.log") is None, "the second replica served"
        assert second.wait(timeout=10) == EXIT_CONFIG
        said = (tmp_path / "r2.log").read_text()
        assert "cloud_id 'cloud-r1' is held by another running replica" in said, said
        assert url in said, "names the holder"
        assert "PICE_CLOUD_ID" in said, "says what to change"
        assert "Traceback" not in said

        # The first replica was never disturbed: connected throughout, its claim the last word.
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/health")).json()["broker_connected"] is True
        assert "lost MQTT broker" not in (tmp_path / "r1.log").read_text()
        claims = [decode(CloudStatus, m.payload) for m in statuses]
        assert {c.instance for c in claims} == {holder.instance}, "only the holder ever published"
        assert all(c.online for c in claims)
    finally:
        await watcher.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


@pytest.mark.mosquitto
async def test_replicas_that_claim_one_id_at_once_leave_the_earlier_one_holding_it(
        mosquitto: Mosquitto, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes that both passed the start-up check (they started at the same moment, or
    the broker delivered the claim late): the one that took the session second sees the other's
    claim on its (re)subscription; the later-started one gives way and leaves the broker, the
    other keeps the id and its connection."""
    llm = TransformersBackend(tiny_model, threads=1)
    try:
        async with start_system(cloud_config(mosquitto.url, service=SMALL, cloud_id="cloud-x"),
                                llm=llm) as a:
            assert a.claim is not None
            connects = a.service.transport.connect_count

            async def no_probe(self: ReplicaClaim, settings: BrokerSettings, *, timeout: float = 10.0) -> None:
                return None  # as if the check had run before the holder announced itself

            monkeypatch.setattr(ReplicaClaim, "probe", no_probe)
            async with start_system(cloud_config(mosquitto.url, service=SMALL, cloud_id="cloud-x"),
                                    llm=llm) as b:
                assert b.claim is not None
                await eventually(lambda: b.claim is not None and b.claim.lost is not None, timeout=30,
                                 what="the later replica to give way")
                assert "is held by another running replica" in str(b.claim.lost)
                assert "PICE_CLOUD_ID" in str(b.claim.lost)
                await eventually(lambda: not b.service.transport.connected, timeout=10)
            assert a.claim.lost is None
            await eventually(lambda: a.service.transport.connected, timeout=30, what="the holder to reconnect")
            # The holder's claim is the retained status again, and nothing takes its session any more.
            seen: list[Message] = []
            spy = MqttTransport(BrokerSettings(url=mosquitto.url))
            spy.add_subscription(a.claim.topic, seen.append)
            await spy.connect()
            try:
                await eventually(lambda: any(not m.retain for m in seen), timeout=10, what="a heartbeat")
                live = [decode(CloudStatus, m.payload) for m in seen if not m.retain]
                assert all(s.instance == a.claim.instance and s.online for s in live)
                settled = a.service.transport.connect_count
                assert settled <= connects + 2
                count = len(seen)
                await eventually(lambda: len(seen) >= count + 2, timeout=10, what="two more heartbeats")
                assert a.service.transport.connect_count == settled, "the holder's connection is left alone"
            finally:
                await spy.close()
    finally:
        await llm.close()


@pytest.mark.mosquitto
async def test_a_stale_claim_without_heartbeats_does_not_block_a_restart(mosquitto: Mosquitto,
                                                                         tiny_model: Path) -> None:
    """A holder that died while the broker was down left "online" retained with no last will:
    no heartbeat follows it, so a replica started with that id takes it after a short wait."""
    stale = CloudStatus(cloud_id="cloud-y", online=True, api_url="http://old:8000/v1", instance="deadbeef",
                        started_at=time.time() - 3600, heartbeat_s=0.4)
    writer = MqttTransport(BrokerSettings(url=mosquitto.url))
    await writer.connect()
    assert await writer.publish_and_wait(cloud_status_topic("cloud-y"), encode(stale), retain=True)
    await writer.close()
    llm = TransformersBackend(tiny_model, threads=1)
    try:
        async with start_system(cloud_config(mosquitto.url, service=SMALL, cloud_id="cloud-y"), llm=llm) as system:
            assert system.claim is not None
            assert system.claim.lost is None
            assert system.service.transport.connected
    finally:
        await llm.close()
