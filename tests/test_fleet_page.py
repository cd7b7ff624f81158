"""The fleet page (``GET /fleet``) in a real headless Chromium (Debian's, driven by Playwright),
against a real Mosquitto, the real cloud API and two real ``pice-edge run`` processes.

It must show both edges and a finished request, show a SIGKILLed edge gone within its heartbeat
timeout, and say so when the broker is down; the page and its JSON are behind the API key.
Screenshots go to ``tmp_path``, and also to ``$PICE_SCREENSHOTS_DIR`` when that is set
(``PICE_SCREENSHOTS_DIR=tools/results`` refreshes the committed ones).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pice_cloud.broker import free_port
from pice_cloud.fleet_cli import publish_rollout
from pice_cloud.server.fleet_page import EdgeTally, _authorized
from pice_edge.protocol import FleetRollout
from tests.conftest import Mosquitto, eventually, serving
from tests.procs import EdgeProcess

pytestmark = pytest.mark.mosquitto

KEY = "fleet-page-test-key"
#: The edges' heartbeat in this test; the cloud drops an edge after 3 missed ones (`Fleet`).
HEARTBEAT_S = 2.0


def _chromium() -> str:
    """Debian's Chromium, or skip with what to install."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")


def _save(path: Path) -> None:
    target = os.environ.get("PICE_SCREENSHOTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


async def test_the_page_shows_two_edges_a_finished_request_then_a_killed_edge_gone_and_the_broker_down(
        mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install "
                                                                         "playwright; .ci/run installs it)")
    edges = [EdgeProcess(name, mosquitto.url, tiny_model, tmp_path, heartbeat=HEARTBEAT_S)
             for name in ("edge-a", "edge-b")]
    try:
        async with serving(tiny_model, mosquitto.url, edges=0, overrides={"server": {"api_key": KEY}}) as api:
            fleet = api.system.service.fleet
            await eventually(lambda: len(fleet.live()) == 2, timeout=180, what="both edge processes live")
            timeout_s = HEARTBEAT_S * fleet.expiry_heartbeats

            # Behind the key: nothing without it, the page and its data with it (bearer or basic).
            async with httpx.AsyncClient(base_url=api.url) as http:
                for path in ("/fleet", "/fleet/state", "/fleet/assets/fleet.js"):
                    refused = await http.get(path)
                    assert refused.status_code == 401, path
                    assert refused.headers["www-authenticate"].startswith("Basic")
                assert (await http.get("/fleet/state", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
                assert (await http.get("/fleet", auth=("operator", KEY))).status_code == 200
                assert (await http.get("/fleet", auth=("operator", "wrong"))).status_code == 401

            client = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            try:
                for mode in ("progressive", "cloud"):
                    answer = await client.chat.completions.create(
                        model="pice", messages=[{"role": "user", "content": "How can I sleep better?"}],
                        extra_body={"pice": {"mode": mode}})
                    info: Any = answer.model_extra["pice"] if answer.model_extra else {}
                    assert info["mode"] == mode
            finally:
                await client.close()
            # A rollout whose source is down (a closed port): the edges keep retrying it.
            await publish_rollout(mosquitto.url, FleetRollout(
                model="tiny", build="0123456789ab", source=f"http://127.0.0.1:{free_port()}", cloud_id="ops"))

            async with playwright_api.async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                try:
                    context = await browser.new_context(http_credentials={"username": "operator", "password": KEY},
                                                        viewport={"width": 1440, "height": 1100})
                    page = await context.new_page()
                    errors: list[str] = []
                    page.on("pageerror", lambda exc: errors.append(str(exc)))
                    response = await page.goto(f"{api.url}/fleet?interval=0.5")
                    assert response is not None
                    assert response.status == 200

                    # Both edges live, with their profile, runtime, build, slots and heartbeat.
                    for device in ("edge-a", "edge-b"):
                        row = page.locator(f'#edges tr[data-device="{device}"][data-state="live"]')
                        await row.wait_for(timeout=15_000)
                        cells = await row.locator("td").all_inner_texts()
                        assert cells[0] == device
                        assert cells[1] == "live"
                        assert cells[3] == "transformers"
                        assert cells[4] == "tiny"
                        assert cells[5].endswith("/4")  # slots used/total
                        assert "ago" in cells[8]
                    # The finished requests: counted under their modes, the progressive one's points
                    # written by the edges, the sketch and the cloud-only answer on the cloud work ledger.
                    for mode in ("progressive", "cloud"):
                        ok = page.locator(f'#requests tr[data-mode="{mode}"] td[data-outcome="ok"]')
                        await ok.wait_for(timeout=15_000)
                        assert await ok.inner_text() == "1"
                    assert await page.locator('[data-card="finished"] .v').inner_text() == "2"
                    assert await page.locator('#ledger tr[data-purpose="cloud_answer"]').count() == 1
                    edge_points = await page.locator('#points [data-points="edge"]').inner_text()
                    assert int(edge_points.split()[-1]) >= 1
                    assert await page.locator('#ledger tr[data-purpose="sketch"]').count() == 1
                    tasks = sum([int(t) for t in await page.locator("#edges tbody tr td:nth-child(10)")
                                 .all_inner_texts()])
                    assert tasks >= int(edge_points.split()[-1])
                    # The rollout: announced, no edge on its build yet, each edge retrying its source.
                    await page.locator('#rollout [data-rollout="in-progress"]').wait_for(timeout=15_000)
                    assert "tiny@0123456789ab" in await page.locator("#rollout").inner_text()
                    for device in ("edge-a", "edge-b"):
                        await page.locator(f'#rollout li[data-device="{device}"]', has_text="retrying").wait_for(
                            timeout=30_000)
                    assert await page.locator("#broker-banner").is_hidden()
                    live_png = tmp_path / "fleet_page_live.png"
                    await page.screenshot(path=str(live_png), full_page=True)
                    _save(live_png)

                    # SIGKILL one edge: the page shows it gone within its heartbeat timeout.
                    killed_at = time.monotonic()
                    edges[1].kill()
                    await page.locator('#gone li[data-device="edge-b"]').wait_for(timeout=timeout_s * 1000)
                    took = time.monotonic() - killed_at
                    assert took <= timeout_s, f"shown gone after {took:.1f}s (heartbeat timeout {timeout_s}s)"
                    assert await page.locator('#edges tr[data-device="edge-b"]').count() == 0
                    assert await page.locator('#edges tr[data-device="edge-a"][data-state="live"]').count() == 1
                    assert await page.locator("#live-count").inner_text() == "1 live"
                    gone_png = tmp_path / "fleet_page_edge_gone.png"
                    await page.screenshot(path=str(gone_png), full_page=True)
                    _save(gone_png)

                    # The broker goes down: a clear message, and the page keeps updating.
                    mosquitto.kill()
                    banner = page.locator("#broker-banner")
                    await banner.wait_for(state="visible", timeout=15_000)
                    text = await banner.inner_text()
                    assert mosquitto.url in text
                    assert "unreachable" in text
                    assert "cloud alone" in text
                    assert await page.locator("#cloud-status").inner_text() == "degraded"
                    down_png = tmp_path / "fleet_page_broker_down.png"
                    await page.screenshot(path=str(down_png), full_page=True)
                    _save(down_png)
                    assert not errors, f"JavaScript errors on the page: {errors}"
                finally:
                    await browser.close()
    finally:
        for edge in edges:
            edge.stop()


def test_the_key_is_taken_as_a_bearer_token_or_a_basic_password_and_nothing_else() -> None:
    import base64

    class Req:
        def __init__(self, header: str | None) -> None:
            self.headers = {"authorization": header} if header is not None else {}

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def check(header: str | None, key: str | None = "k3y") -> bool:
        return _authorized(Req(header), key)  # type: ignore[arg-type]

    assert check(None, key=None)
    assert check("Bearer k3y")
    assert check(basic("anyone", "k3y"))
    assert check(basic("", "k3y"))
    assert not check(None)
    assert not check("Bearer k3")
    assert not check(basic("k3y", "x"))
    assert not check("Basic !!!notbase64")
    assert not check("Digest k3y")
    assert not check("k3y")


def test_the_tally_counts_dispatch_per_edge_and_the_fleet_still_does_its_accounting() -> None:
    from pice_cloud.fleet import Fleet
    from pice_edge.protocol import Candidate, EdgeStatus, TaskRefusal

    fleet = Fleet()
    fleet.update(EdgeStatus(device_id="e1", online=True, max_batch=2, free_slots=2))
    tally = EdgeTally(fleet)
    fleet.task_sent("r1", 0, "e1")
    fleet.task_sent("r1", 1, "e1")
    assert fleet.get("e1").outstanding == 2  # type: ignore[union-attr]
    fleet.candidate_received(Candidate(request_id="r1", point_index=0, device_id="e1", text="x", token_count=1,
                                       mean_logprob=-1.0, latency_s=0.1))
    fleet.task_refused(TaskRefusal(request_id="r1", point_index=1, device_id="e1", reason="queue_full"))
    assert fleet.get("e1").outstanding == 0  # type: ignore[union-attr]
    counts = tally.counts["e1"]
    assert (counts.tasks, counts.candidates, counts.refusals) == (2, 1, 1)


async def test_fleet_watch_draws_the_clouds_view_and_the_brokers_view(mosquitto: Mosquitto, tiny_model: Path) -> None:
    """``pice-cloud fleet --watch --cloud URL`` (a real process) draws the cloud's whole view; the
    broker-only view draws the edges and the rollout from a kept connection."""
    from rich.console import Console

    from pice_cloud.fleet_watch import broker_source, watch

    async with serving(tiny_model, mosquitto.url, edges=2, overrides={"server": {"api_key": KEY}}) as api:
        await eventually(lambda: len(api.system.service.fleet.live()) == 2, timeout=60, what="two local edges")
        client = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": "Why walk?"}],
                                                 extra_body={"pice": {"mode": "progressive"}})
        finally:
            await client.close()

        async def cli(*extra: str, key: str | None = KEY) -> tuple[int, str]:
            env = {k: v for k, v in os.environ.items() if k != "PICE_API_KEY"}
            env.update({"COLUMNS": "200", **({"PICE_API_KEY": key} if key else {})})
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pice_cloud.cli", "fleet", "--watch", "--cloud", api.url, "--watch-count", "1",
                *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
                cwd=Path(__file__).parents[1])
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
            return proc.returncode or 0, out.decode()

        rc, out = await cli()
        assert rc == 0, out
        for expected in ("local-edge-1", "local-edge-2", "live", "progressive", "Cloud work", "sketch",
                         "points by the edges", "no rollout announced", "Refusals"):
            assert expected in out, f"{expected!r} not in:\n{out}"
        rc, out = await cli(key=None)
        assert rc != 0
        assert "API key" in out

        console = Console(record=True, width=200)
        async with broker_source(mosquitto.url, credentials=None, fleet_name="pice", interfaces="all",
                                 zeroconf=False) as read:
            for _ in range(100):
                if (await read())["live_edges"] == 2:
                    break
                await asyncio.sleep(0.1)
            assert await watch(read, interval=0.1, console=console, count=2) == 0
        text = console.export_text()
        assert "local-edge-1" in text
        assert "local-edge-2" in text
        assert "Edges (2 live)" in text
        assert "give --cloud" in text
        assert "Cloud work" not in text
