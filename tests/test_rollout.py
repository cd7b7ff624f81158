"""Rolling a model build out to the fleet: three real edges and a real broker; the cloud offers
the build over HTTP and announces it (retained); edges fetch, verify and switch between batches
while requests run; the scheduler can pin points to a build; a build that fails verification
leaves every edge on the one it runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pice_cloud.fleet_cli import collect_view, publish_rollout, rollout_message, summarize
from pice_edge import model_store
from pice_edge.model_store import MANIFEST, build_id
from pice_edge.model_transfer import fetch_from
from pice_edge.node import EdgeNode, RolloutPolicy
from pice_edge.protocol import (
    EdgeRolloutState,
    EdgeStatus,
    FleetRollout,
    decode,
    edge_rollout_topic,
    edge_status_topic,
    runs,
)
from pice_edge.runtimes.transformers import TransformersRuntime
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import QUESTION, Api, Mosquitto, eventually, serving, started
from tests.procs import EdgeProcess

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny-exp"
SKETCH = " Set clear daily goals\n2. Plan each morning\n3. Take short breaks\n"

pytestmark = pytest.mark.mosquitto


def _install(store: Path, source: Path, marker: str) -> str:
    """Install ``source`` plus a marker file as a new build of NAME in ``store``; its build id."""
    staged = store.parent / f"src-{marker}"
    if not staged.exists():
        import shutil

        shutil.copytree(source, staged)
        (staged / "build.txt").write_text(marker)
    path = model_store.install(staged, NAME, replace=True, root=store)
    build = build_id(path)
    assert build is not None
    return build


@contextlib.asynccontextmanager
async def fleet(api: Api, broker: str, tmp_path: Path, *, follow: tuple[bool, ...],
                **policy_options: Any) -> AsyncIterator[list[EdgeNode]]:
    """Edges on build 1 (fetched from the cloud), each with its own model store
    (``policy_options``: further `RolloutPolicy` settings)."""
    nodes = []
    for i, following in enumerate(follow):
        root = tmp_path / f"edge{i}"
        path = await asyncio.to_thread(fetch_from, api.url, NAME, root=root, progress=False)
        policy = RolloutPolicy(loader=lambda p: TransformersRuntime(p, threads=1), models_root=root,
                               **policy_options)
        nodes.append(EdgeNode(TransformersRuntime(path, threads=1), device_id=f"r{i}",
                              broker=BrokerSettings(url=broker), max_batch=2, heartbeat_s=0.5,
                              model_build=build_id(path), rollout=policy if following else None))
    async with started(nodes):
        yield nodes


async def test_edges_switch_builds_while_requests_run_and_none_is_lost(
        mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "cloud-store"
    first = _install(store, tiny_model, "build 1")
    overrides = {"server": {"models_dir": str(store)}, "service": {"deadline_floor_s": 30.0}}
    async with serving(tiny_model, mosquitto.url, edges=0, overrides=overrides, sketches=[SKETCH]) as api, \
            fleet(api, mosquitto.url, tmp_path, follow=(True, True, False)) as nodes:
        service = api.system.service
        assert await service.fleet.wait_for(3, 20)
        assert {n.model_id for n in nodes} == {f"{NAME}@{first}"}
        second = _install(store, tiny_model, "build 2")
        assert second != first

        answers = []

        async def keep_asking() -> None:
            while not all(n.stats.rollouts for n in nodes[:2]) or len(answers) < 4:
                answers.append(await service.ask(QUESTION, mode="progressive"))

        asker = asyncio.create_task(keep_asking())
        await publish_rollout(mosquitto.url, rollout_message(NAME, api.url, store))
        await asyncio.wait_for(asker, 120)
        # The two following edges switched and say so; the third was told to stay.
        await eventually(lambda: {s.status.model_id for s in service.fleet.live()}
                         == {f"{NAME}@{second}", f"{NAME}@{first}"})
        assert [n.model_id for n in nodes] == [f"{NAME}@{second}", f"{NAME}@{second}", f"{NAME}@{first}"]
        assert [n.stats.rollouts for n in nodes] == [1, 1, 0]
        assert (tmp_path / "edge0" / NAME / "build.txt").read_text() == "build 2"
        for final in answers:
            assert final.stats.mode == "progressive"
            assert final.stats.points_edge + final.stats.points_cloud == 3, "a point was lost"
        assert sum(f.stats.points_edge for f in answers) > 0

        # Pinned to the new build, points go only to the edges that run it.
        service.config = service.config.model_copy(update={"expander_model": f"{NAME}@{second}"})
        for _ in range(3):
            pinned = await service.ask(QUESTION, mode="progressive")
            assert set(pinned.stats.devices) <= {"r0", "r1"}
        # During the rollout the service prefers edges on the target build.
        service.config = service.config.model_copy(update={"expander_model": None})
        assert service.rollout is not None
        assert {e.device_id for e in service._eligible(1)} == {"r0", "r1"}
        assert runs(nodes[2].model_id, NAME)
        assert not runs(nodes[2].model_id, NAME, second)


async def test_a_build_that_fails_verification_leaves_the_edges_on_theirs(
        mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "cloud-store"
    first = _install(store, tiny_model, "build 1")
    async with serving(tiny_model, mosquitto.url, edges=0, overrides={"server": {"models_dir": str(store)}},
                       sketches=[SKETCH]) as api, \
            fleet(api, mosquitto.url, tmp_path, follow=(True, True, True)) as nodes:
        service = api.system.service
        assert await service.fleet.wait_for(3, 20)
        _install(store, tiny_model, "build 2")
        # The new build's weights rot on the cloud's disk after it was announced.
        files = json.loads((store / NAME / MANIFEST).read_text())["files"]
        victim = store / NAME / max(files, key=lambda rel: files[rel]["size"])
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x01
        victim.write_bytes(bytes(data))
        await publish_rollout(mosquitto.url, rollout_message(NAME, api.url, store))
        await eventually(lambda: all(n.stats.rollouts_failed for n in nodes), timeout=60)
        assert all(n.rollout_state.startswith("failed:") and "SHA-256" in n.rollout_state for n in nodes)
        assert {n.model_id for n in nodes} == {f"{NAME}@{first}"}
        assert all(build_id(tmp_path / f"edge{i}" / NAME) == first for i in range(3)), "the old build is installed"
        final = await service.ask(QUESTION, mode="progressive")
        assert final.stats.points_edge == 3, "the fleet still serves on its build"
        await publish_rollout(mosquitto.url, None)


# --- the rollout as the fleet's desired state (issue 27: D3, D5) ---------------------------------

async def test_an_edge_started_during_a_rollout_converges_and_keeps_the_build_after_clear_and_restart(
        mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path) -> None:
    """A real `pice-edge run` started with another --model while a rollout is announced runs the
    rolled-out build; after --clear-rollout, restarted, it comes back on that build (from its own
    disk, the cloud gone), not on its --model."""
    store = tmp_path / "cloud-store"
    first = _install(store, tiny_model, "build 1")
    edge_store = tmp_path / "edge-store"
    env = {"PICE_MODELS_DIR": str(edge_store)}
    seen: list[Message] = []
    spy = MqttTransport(BrokerSettings(url=mosquitto.url))
    spy.add_subscription(edge_status_topic("p0"), seen.append)
    await spy.connect()
    edge: EdgeProcess | None = None
    try:
        async with serving(tiny_model, mosquitto.url, edges=0, overrides={"server": {"models_dir": str(store)}},
                           sketches=[SKETCH]) as api:
            await publish_rollout(mosquitto.url, rollout_message(NAME, api.url, store))
            edge = EdgeProcess("p0", mosquitto.url, tiny_model, tmp_path, env=env)
            await eventually(lambda: any(f"{NAME}@{first}" in m.payload.decode() for m in seen), timeout=120,
                             what="the new edge to converge on the rolled-out build")
        await publish_rollout(mosquitto.url, None)  # cleared; the cloud that offered the build is gone too
        edge.stop()
        restarted = time.time()
        edge = EdgeProcess("p0", mosquitto.url, tiny_model, tmp_path, env=env)
        await eventually(lambda: _first_status(seen, restarted) is not None, timeout=120,
                         what="the restarted edge's status")
        status = _first_status(seen, restarted)
        assert status is not None
        assert status.model_id == f"{NAME}@{first}", f"the restarted edge slipped back to {status.model_id}"
        assert edge.alive
        assert "instead of --model" in edge.log()
    finally:
        if edge is not None:
            edge.stop()
        await spy.close()


def _first_status(seen: list[Message], since: float) -> EdgeStatus | None:
    """The first online status in ``seen`` sent at or after ``since``."""
    for message in seen:
        if not message.payload:
            continue
        status = decode(EdgeStatus, message.payload)
        if status.online and status.sent_at >= since:
            return status
    return None


def _fleet_cli(broker: str, *extra: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pice_cloud.cli", "fleet", "--broker", broker, "--no-zeroconf",
                           "--wait", "1", *extra], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_pice_cloud_fleet_shows_a_mixed_fleet_as_such(mosquitto: Mosquitto, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    store = tmp_path / "cloud-store"
    first = _install(store, tiny_model, "build 1")
    async with serving(tiny_model, mosquitto.url, edges=0, overrides={"server": {"models_dir": str(store)}},
                       sketches=[SKETCH]) as api, \
            fleet(api, mosquitto.url, tmp_path, follow=(True, False)) as nodes:
        assert await api.system.service.fleet.wait_for(2, 20)
        clean = json.loads(await asyncio.to_thread(_fleet_cli, mosquitto.url, "--json"))
        assert clean["mixed"] is False
        assert clean["builds"] == {f"{NAME}@{first}": ["r0", "r1"]}
        second = _install(store, tiny_model, "build 2")
        await publish_rollout(mosquitto.url, rollout_message(NAME, api.url, store))
        await eventually(lambda: nodes[0].model_id == f"{NAME}@{second}", timeout=60)
        view = json.loads(await asyncio.to_thread(_fleet_cli, mosquitto.url, "--json"))
        assert view["mixed"] is True
        assert view["builds"] == {f"{NAME}@{first}": ["r1"], f"{NAME}@{second}": ["r0"]}
        assert view["rollout"]["build"] == second
        assert view["rollout_states"]["r0"]["phase"] == "switched"
        assert view["summary"][0].startswith(f"rollout {NAME}@{second}")
        assert "1 of 2 live edges run it" in view["summary"][0]
        assert any(line.strip().startswith(f"r1: runs {NAME}@{first}; not following") for line in view["summary"])

        await publish_rollout(mosquitto.url, None)
        text = await asyncio.to_thread(_fleet_cli, mosquitto.url)
        assert "mixed fleet: 2 builds among 2 live edges" in text, text
        assert "no rollout is announced" in text


async def test_a_rollback_to_a_build_on_the_edges_disk_works_with_the_cloud_gone(
        mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "cloud-store"
    first = _install(store, tiny_model, "build 1")
    api_context = serving(tiny_model, mosquitto.url, edges=0, overrides={"server": {"models_dir": str(store)}},
                          sketches=[SKETCH])
    api = await api_context.__aenter__()
    cloud_up = True
    try:
        async with fleet(api, mosquitto.url, tmp_path, follow=(True,)) as nodes:
            node = nodes[0]
            second = _install(store, tiny_model, "build 2")
            await publish_rollout(mosquitto.url, rollout_message(NAME, api.url, store))
            await eventually(lambda: node.model_id == f"{NAME}@{second}", timeout=60)
            source = api.url
            cloud_up = False
            await api_context.__aexit__(None, None, None)  # the cloud (and its store's build 1) is gone

            await publish_rollout(mosquitto.url, FleetRollout(model=NAME, build=first, source=source, cloud_id="ops"))
            await eventually(lambda: node.stats.rollouts == 2 or node.rollout_state.startswith("failed"), timeout=60)
            assert node.rollout_state == "switched", node.rollout_state
            assert node.model_id == f"{NAME}@{first}"
            assert (tmp_path / "edge0" / ".builds" / f"{NAME}@{first}" / "build.txt").read_text() == "build 1"
            await publish_rollout(mosquitto.url, None)
    finally:
        if cloud_up:
            await api_context.__aexit__(None, None, None)


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    """One proxied connection to 127.0.0.1:``port``."""
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)


async def test_a_rollout_whose_source_was_down_is_retried_with_backoff_and_says_so(
        mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "cloud-store"
    _install(store, tiny_model, "build 1")
    states: list[Message] = []
    spy = MqttTransport(BrokerSettings(url=mosquitto.url))
    spy.add_subscription(edge_rollout_topic("r0"), states.append)
    await spy.connect()
    with socket.socket() as probe:  # a port nothing listens on (yet): the source is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy: asyncio.Server | None = None
    try:
        async with serving(tiny_model, mosquitto.url, edges=0, overrides={"server": {"models_dir": str(store)}},
                           sketches=[SKETCH]) as api, \
                fleet(api, mosquitto.url, tmp_path, follow=(True,), retry_min_s=0.5) as nodes:
            node = nodes[0]
            second = _install(store, tiny_model, "build 2")
            await publish_rollout(mosquitto.url, rollout_message(NAME, f"http://127.0.0.1:{port}", store))

            def phases() -> list[EdgeRolloutState]:
                return [decode(EdgeRolloutState, m.payload) for m in states if m.payload]

            await eventually(lambda: sum(s.phase == "retrying" for s in phases()) >= 2, timeout=60,
                             what="two retries")
            retrying = [s for s in phases() if s.phase == "retrying"]
            assert [s.attempt for s in retrying[:2]] == [1, 2]
            assert all(s.retry_at is not None and "cannot reach the cloud" in s.detail for s in retrying)
            assert node.rollout_state.startswith("retrying") or node.rollout_state == "fetching"
            assert node.model_id != f"{NAME}@{second}"
            assert node.stats.rollouts_failed == 0
            view = await collect_view(mosquitto.url, zeroconf=False, wait_s=0.5)
            assert any("retrying (attempt" in line for line in summarize(view)), summarize(view)

            api_port = int(api.url.rsplit(":", 1)[1])
            proxy = await asyncio.start_server(lambda r, w: _forward(r, w, api_port), "127.0.0.1", port)
            await eventually(lambda: node.model_id == f"{NAME}@{second}", timeout=60, what="the switch")
            assert node.rollout_state == "switched"
            await eventually(lambda: phases()[-1].phase == "switched", timeout=10)
            await publish_rollout(mosquitto.url, None)
    finally:
        if proxy is not None:
            proxy.close()
        await spy.close()


# --- memory across rollouts (issue 27: D4) ----------------------------------------------------------

async def test_an_edge_frees_the_old_model_so_rss_after_four_rollouts_stays_near_fresh(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A real `pice-edge run` on a ~120 MB model rolls out four builds; its RSS then is within 10%
    of what it was fresh (it kept every model it had run: +120 MB a rollout)."""
    small = await asyncio.to_thread(model_store.build_random_model, tmp_path / "small", preset="small")
    store = tmp_path / "cloud-store"
    edge_store = tmp_path / "edge-store"
    edge: EdgeProcess | None = None
    seen: list[Message] = []
    spy = MqttTransport(BrokerSettings(url=mosquitto.url))
    spy.add_subscription(edge_status_topic("m0"), seen.append)
    await spy.connect()

    def runs_now() -> str:
        status = _first_status(list(reversed(seen)), 0)
        return status.model_id if status else ""

    try:
        async with serving(small, mosquitto.url, edges=0, overrides={"server": {"models_dir": str(store)}},
                           sketches=[SKETCH]) as api:
            edge = EdgeProcess("m0", mosquitto.url, small, tmp_path, env={"PICE_MODELS_DIR": str(edge_store)})
            service = api.system.service
            assert await service.fleet.wait_for(1, 120), edge.log()

            async def use_the_edge() -> None:
                # Weights are mapped lazily: only a generation makes them resident, as in service.
                final = await service.ask(QUESTION, mode="progressive")
                assert final.stats.points_edge >= 1

            await use_the_edge()
            process = psutil.Process(edge.proc.pid)
            fresh = process.memory_info().rss
            sizes = []
            for n in range(1, 5):
                build = await asyncio.to_thread(_install, store, small, f"build {n}")
                await publish_rollout(mosquitto.url, rollout_message(NAME, api.url, store))
                await eventually(lambda b=build: runs_now() == f"{NAME}@{b}", timeout=120,  # type: ignore[misc]
                                 what=f"rollout {n}")
                await eventually(lambda b=build: any(runs(e.status.model_id, NAME, b)  # type: ignore[misc]
                                                     for e in service.fleet.live()), timeout=30)
                await use_the_edge()
                sizes.append(process.memory_info().rss)
            await publish_rollout(mosquitto.url, None)
            # The old model is freed once the switch is done (on its worker thread): allow a moment.
            await eventually(lambda: process.memory_info().rss <= 1.10 * fresh, timeout=20,
                             what=f"RSS near fresh ({fresh / 2**20:.0f} MiB); after each rollout "
                                  f"{[round(s / 2**20) for s in sizes]} MiB, now "
                                  f"{process.memory_info().rss / 2**20:.0f} MiB")
            assert edge.alive
            logging.getLogger(__name__).info("edge RSS fresh %.0f MiB; after rollouts 1-4 %s MiB; settled %.0f MiB",
                                             fresh / 2**20, [round(s / 2**20) for s in sizes],
                                             process.memory_info().rss / 2**20)
    finally:
        if edge is not None:
            edge.stop()
        await spy.close()


def test_a_new_build_in_the_same_folder_loads_its_own_weights_and_the_last_user_frees_them(tmp_path: Path) -> None:
    """A rollout installs the new build where the old one was: the process's shared copy of the
    weights is keyed by build, not folder alone (it handed the old weights to the new build), and
    released when its last runtime closes."""
    from pice_edge.runtimes import transformers as hf

    store = tmp_path / "store"
    builds = []
    for seed in (1, 2):
        source = model_store.build_random_model(tmp_path / f"seed{seed}", seed=seed)
        builds.append(model_store.install(source, NAME, replace=True, root=store))
        if seed == 1:
            old = TransformersRuntime(store / NAME, threads=1)
            twin = TransformersRuntime(store / NAME, threads=1)  # a second user of the same copy
            assert twin.model is old.model
    new = TransformersRuntime(store / NAME, threads=1)
    assert new.model is not old.model
    assert builds[0] == builds[1] == store / NAME
    reference = TransformersRuntime(tmp_path / "seed2", threads=1).model  # build 2 from its own folder
    assert all((a == b).all() for a, b in zip(new.model.parameters(), reference.parameters(), strict=True))
    weights = old.model
    twin.close()
    assert any(entry.model is weights for entry in hf._SHARED.values()), "still used by the other runtime"
    old.close()
    assert not any(entry.model is weights for entry in hf._SHARED.values()), "the last user freed it"
    del weights
