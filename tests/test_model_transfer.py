"""Models from the cloud: a real `pice-cloud serve` on loopback offers its model store, and the
edge's fetcher downloads, resumes, verifies and installs, or refuses and leaves the installed
model as it was."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pice_edge import model_store, model_transfer
from pice_edge.errors import ModelError
from pice_edge.model_store import MANIFEST, check_manifest
from pice_edge.model_transfer import fetch_from, offered, safe_relative_path
from tests.conftest import Api, serving

NAME = "tiny-expander"


def _install(store: Path, source: Path, *, replace: bool = False) -> Path:
    return model_store.install(source, NAME, meta={"role": "expander"}, replace=replace, root=store)


@pytest.fixture
async def cloud(tmp_path: Path, tiny_model: Path, embedded_broker: str) -> AsyncIterator[tuple[Api, Path]]:
    store = tmp_path / "cloud-store"
    _install(store, tiny_model)
    async with serving(tiny_model, embedded_broker, edges=0, overrides={"server": {"models_dir": str(store)}}) as api:
        yield api, store


def _largest(folder: Path) -> str:
    files = json.loads((folder / MANIFEST).read_text())["files"]
    return max(files, key=lambda rel: files[rel]["size"])


async def test_fetch_installs_a_verified_copy_and_a_second_fetch_changes_nothing(
        cloud: tuple[Api, Path], tmp_path: Path) -> None:
    api, store = cloud
    edge = tmp_path / "edge-store"
    assert [m["name"] for m in await asyncio.to_thread(offered, api.url)] == [NAME]
    path = await asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False)
    assert path == edge / NAME
    manifest = check_manifest(path, full=True)
    assert manifest["role"] == "expander"
    assert manifest["fetched_from"] == api.url
    for rel in manifest["files"]:
        assert (path / rel).read_bytes() == (store / NAME / rel).read_bytes()
    stamp = (path / MANIFEST).stat().st_mtime_ns
    await asyncio.to_thread(fetch_from, api.url + "/v1", NAME, root=edge, progress=False)
    assert (path / MANIFEST).stat().st_mtime_ns == stamp, "already installed: nothing was downloaded again"
    assert not list(edge.glob(".pice-fetch-*")), "no staging left behind"


async def test_a_checksum_mismatch_is_refused_and_the_installed_model_stays(
        cloud: tuple[Api, Path], tmp_path: Path, tiny_model: Path) -> None:
    api, store = cloud
    edge = tmp_path / "edge-store"
    await asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False)
    before = {p.name: p.read_bytes() for p in (edge / NAME).iterdir()}
    # A new build on the cloud, one of whose files then rots on disk (same size, other bytes).
    (tiny_model / "marker.txt").write_text("build 2")
    try:
        _install(store, tiny_model, replace=True)
    finally:
        (tiny_model / "marker.txt").unlink()
    victim = store / NAME / _largest(store / NAME)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256 does not match"):
        await asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False)
    assert {p.name: p.read_bytes() for p in (edge / NAME).iterdir()} == before, "the old build is untouched"
    check_manifest(edge / NAME, full=True)


async def test_a_truncated_transfer_resumes_with_a_range_request(
        cloud: tuple[Api, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api, store = cloud
    edge = tmp_path / "edge-store"
    rel = _largest(store / NAME)
    source = (store / NAME / rel).read_bytes()
    # What an interrupted earlier run left: the first half of the largest file.
    part = edge / f".pice-fetch-{NAME}" / (rel + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(source[: len(source) // 2])
    ranges: list[tuple[str, str | None, int]] = []
    real_open = model_transfer._Client.open

    def recording(self: Any, path: str, headers: dict[str, str] | None = None) -> Any:
        response = real_open(self, path, headers)
        ranges.append((path, (headers or {}).get("Range"), response.status))
        return response

    monkeypatch.setattr(model_transfer._Client, "open", recording)
    path = await asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False)
    assert (path / rel).read_bytes() == source
    [resumed] = [r for r in ranges if r[0].endswith("/" + rel)]
    assert resumed[1:] == (f"bytes={len(source) // 2}-", 206)


async def test_a_manifest_naming_a_path_outside_the_folder_is_refused(
        cloud: tuple[Api, Path], tmp_path: Path) -> None:
    api, store = cloud
    manifest = json.loads((store / NAME / MANIFEST).read_text())
    (store / "evil.txt").write_text("x")
    manifest["files"]["../evil.txt"] = {"size": 1, "sha256": model_store.sha256_file(store / "evil.txt")}
    (store / NAME / MANIFEST).write_text(json.dumps(manifest))
    edge = tmp_path / "edge-store"
    with pytest.raises(ModelError, match="outside the model folder"):
        await asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False)
    assert not (edge / NAME).exists()
    assert not (edge / "evil.txt").exists()


async def test_a_build_other_than_the_announced_one_is_refused_before_downloading(
        cloud: tuple[Api, Path], tmp_path: Path) -> None:
    api, store = cloud
    edge = tmp_path / "edge-store"
    with pytest.raises(ModelError, match="not the announced 000000000000"):
        await asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False, expected_build="000000000000")
    assert not list(edge.rglob("*.part")), "nothing was downloaded"
    assert not (edge / NAME).exists()
    path = await asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False,
                                   expected_build=model_store.build_id(store / NAME))
    check_manifest(path, full=True)


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../x", "a\\..\\x", "", "a//b", "./a", MANIFEST])
def test_unsafe_paths(rel: str) -> None:
    with pytest.raises(ModelError):
        safe_relative_path(rel)


def test_safe_paths() -> None:
    assert str(safe_relative_path("onnx/int4/model.onnx")) == "onnx/int4/model.onnx"


async def test_concurrent_fetches_of_one_model_take_turns(cloud: tuple[Api, Path], tmp_path: Path) -> None:
    api, _ = cloud
    edge = tmp_path / "edge-store"
    paths = await asyncio.gather(*(asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False)
                                   for _ in range(3)))
    assert set(paths) == {edge / NAME}
    check_manifest(edge / NAME, full=True)
    assert sorted(p.name for p in edge.iterdir() if not p.name.startswith(".")) == [NAME]


async def test_a_full_disk_is_a_clear_error_and_the_installed_model_stays(
        cloud: tuple[Api, Path], tmp_path: Path) -> None:
    api, store = cloud
    edge = tmp_path / "edge-store"
    await asyncio.to_thread(fetch_from, api.url, NAME, root=edge, progress=False)
    (store / NAME / "padding.bin").write_bytes(os.urandom(300_000))
    manifest = json.loads((store / NAME / MANIFEST).read_text())
    digest = model_store.sha256_file(store / NAME / "padding.bin")
    manifest["files"]["padding.bin"] = {"size": 300_000, "sha256": digest}
    (store / NAME / MANIFEST).write_text(json.dumps(manifest))
    # A size-limited process: writing past 200 kB fails with EFBIG, as a full disk fails with ENOSPC.
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from pice_edge.model_transfer import fetch_from\n"
        f"fetch_from({api.url!r}, {NAME!r}, root=Path({str(edge)!r}), progress=False)\n"
    )
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True,
                                   timeout=120)
    assert proc.returncode != 0
    assert "no room for tiny-expander" in proc.stderr
    assert "run the same command again" in proc.stderr
    check_manifest(edge / NAME, full=True)
    assert "padding.bin" not in json.loads((edge / NAME / MANIFEST).read_text())["files"]


async def test_the_api_key_guards_the_models_too(tmp_path: Path, tiny_model: Path, embedded_broker: str) -> None:
    store = tmp_path / "cloud-store"
    _install(store, tiny_model)
    overrides = {"server": {"models_dir": str(store), "api_key": "s3cret"}}
    async with serving(tiny_model, embedded_broker, edges=0, overrides=overrides) as api:
        with pytest.raises(ModelError, match="--api-key"):
            await asyncio.to_thread(fetch_from, api.url, NAME, root=tmp_path / "a", progress=False)
        path = await asyncio.to_thread(fetch_from, api.url, NAME, api_key="s3cret", root=tmp_path / "b",
                                       progress=False)
        check_manifest(path, full=True)
        with pytest.raises(ModelError, match="HTTP 404"):
            await asyncio.to_thread(fetch_from, api.url, "not-offered", api_key="s3cret", root=tmp_path / "c",
                                    progress=False)


async def test_fetch_finds_the_cloud_on_zeroconf(cloud: tuple[Api, Path], tmp_path: Path) -> None:
    """``--from`` without a URL: the API the fleet's cloud advertises (loopback only here)."""
    from pice_edge.discovery import CloudAdvert, Discovery

    api, _ = cloud
    fleet = f"fetch-{os.getpid()}"
    edge = tmp_path / "edge-store"
    async with Discovery(["127.0.0.1"]) as discovery:
        await discovery.advertise_cloud(CloudAdvert(cloud_id=f"{fleet}-cloud", broker_url="mqtt://127.0.0.1:1883",
                                                    fleet=fleet, api_url=api.url + "/v1"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pice_edge.cli", "models", "fetch", NAME, "--from", "--fleet", fleet,
            "--interfaces", "127.0.0.1", env={**os.environ, "PICE_MODELS_DIR": str(edge)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert f"{NAME}: ready in {edge / NAME}" in out.decode()
    check_manifest(edge / NAME, full=True)
