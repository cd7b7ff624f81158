"""Rolling a model build out to the fleet: three real edges and a real broker; the cloud offers
the build over HTTP and announces it (retained); edges fetch, verify and switch between batches
while requests run; the scheduler can pin points to a build; a build that fails verification
leaves every edge on the one it runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pice_cloud.fleet_cli import publish_rollout, rollout_message
from pice_edge import model_store
from pice_edge.model_store import MANIFEST, build_id
from pice_edge.model_transfer import fetch_from
from pice_edge.node import EdgeNode, RolloutPolicy
from pice_edge.protocol import runs
from pice_edge.runtimes.transformers import TransformersRuntime
from pice_edge.transport import BrokerSettings
from tests.conftest import QUESTION, Api, Mosquitto, eventually, serving, started

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
async def fleet(api: Api, broker: str, tmp_path: Path, *, follow: tuple[bool, ...]) -> AsyncIterator[list[EdgeNode]]:
    """Edges on build 1 (fetched from the cloud), each with its own model store."""
    nodes = []
    for i, following in enumerate(follow):
        root = tmp_path / f"edge{i}"
        path = await asyncio.to_thread(fetch_from, api.url, NAME, root=root, progress=False)
        policy = RolloutPolicy(loader=lambda p: TransformersRuntime(p, threads=1), models_root=root)
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
