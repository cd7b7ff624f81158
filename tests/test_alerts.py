"""The Prometheus alert rules and the Grafana dashboard (tools/prometheus/, tools/grafana/)
against what ``/metrics`` really exports.

- ``promtool check rules`` / ``check config`` accept the rules and the sample scrape config, and
  ``promtool test rules`` runs the rules' unit tests (Debian's ``prometheus`` package).
- A real Prometheus scrapes two real ``pice-cloud serve`` replicas (tiny model, a real
  Mosquitto, two real ``pice-edge run``) during a short load that drives each alert's condition:
  replica A writes free-form sketches the guard refuses (sketch refusals, cloud-only answers);
  replica B has one slot and a queue of one (a full queue, 429s), and the guards refuse many of
  the tiny model's expansions (fallbacks); a rollout of a build no edge can fetch was announced two
  hours ago; an edge is SIGKILLed; an invalid status is published; at the end the broker is killed. Then
  ``tools/prometheus/check_queries.py`` must find data for every dashboard panel query, every
  series every alert reads, and every alert expression (each alert fires), and Prometheus must
  report every rule healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from pice_cloud.broker import free_port
from pice_cloud.fleet_cli import publish_rollout
from pice_edge.protocol import FleetRollout, edge_status_topic
from pice_edge.transport import BrokerSettings, MqttTransport
from tests.conftest import Mosquitto, eventually
from tests.procs import EdgeProcess

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "tools" / "prometheus"
RULES = PROM_DIR / "pice_alerts.yml"
CHECK = PROM_DIR / "check_queries.py"
DASHBOARD = ROOT / "tools" / "grafana" / "pice_fleet.json"


def _tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install prometheus; .ci/run installs it)")
    return found


def test_promtool_accepts_the_rules_and_the_scrape_config_and_the_rules_pass_their_unit_tests() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROM_DIR / "prometheus.yml")],
                 ["test", "rules", str(PROM_DIR / "pice_alerts_test.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=PROM_DIR)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_the_checker_reads_every_panel_and_every_alert() -> None:
    sys.path.insert(0, str(PROM_DIR))
    try:
        import check_queries
    finally:
        sys.path.remove(str(PROM_DIR))
    panels = check_queries.dashboard_queries(DASHBOARD)
    assert len(panels) >= 30
    assert all("pice_" in expr for _, expr in panels)
    firing = check_queries.alert_queries(RULES, "firing", only=set(), skip=set())
    assert {what.split()[1] for what, _ in firing} == {
        "PiceEdgesLost", "PiceBrokerDisconnected", "PiceRolloutStuck", "PiceFallbackShareHigh",
        "PiceSketchRefusalsHigh", "PiceCloudOnlyShareHigh", "PiceRequestsRefused", "PiceAdmissionQueueFull"}
    selectors = check_queries.alert_queries(RULES, "selectors", only={"PiceFallbackShareHigh"}, skip=set())
    assert [s for _, s in selectors] == ['pice_points_total{source="cloud"}', "pice_points_total"]
    assert check_queries.substitute('rate(x{job=~"$job"}[$__rate_interval])', check_queries.DEFAULT_VARIABLES) == \
        'rate(x{job=~".+"}[5m])'


# --- the real thing ------------------------------------------------------------------------------

#: Both replicas: the tiny model, small budgets, no router (auto = progressive while edges are
#: live), the confidence selector, the guards on as users get them.
COMMON_ENV = {
    "PYTHONUNBUFFERED": "1", "PICE_DISCOVERY__ENABLED": "false", "PICE_LLM__THREADS": "1",
    "PICE_SERVICE__ROUTER": "off", "PICE_SERVICE__SELECTOR": "confidence", "PICE_SERVICE__MAX_POINTS": "3",
    "PICE_SERVICE__TOKENS_PER_POINT": "8", "PICE_SERVICE__SKETCH_TOKENS": "30",
    "PICE_SERVICE__MAX_ANSWER_TOKENS": "24",
}
#: Replica A: free-form sketches, which the tiny model writes as gibberish the guard refuses.
ENV_A = {"PICE_CLOUD_ID": "pice-a", "PICE_SERVICE__SKETCH_FORMAT": "free"}
#: Replica B: constrained sketches (they pass), so the edges expand points, one edge per point; the
#: tiny model's expansions are often empty or repeat another point, and the guards refuse them (the
#: cloud then writes the point: a fallback). One slot, a queue of one.
ENV_B = {"PICE_CLOUD_ID": "pice-b", "PICE_SERVICE__ENSEMBLE_WIDTH": "1"}


class Serve:
    """A real ``pice-cloud serve`` over the broker, no local edges, stderr to a log file."""

    def __init__(self, name: str, broker: str, model: Path, logdir: Path, env: dict[str, str], *extra: str) -> None:
        self.log = logdir / f"serve-{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pice_cloud.cli", "serve", "--broker", broker, "--edges", "0", "--port", "0",
                 "--model", str(model), "--log-level", "warning", *extra],
                stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT,
                env={**os.environ, **COMMON_ENV, "PICE_LLM__MODEL": str(model), **env})
        self.url = ""

    async def ready(self) -> str:
        def serving() -> bool:
            match = re.search(r"serving on (http://\S+)/v1", self.log.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
            assert self.proc.poll() is None, f"pice-cloud serve exited:\n{self.log.read_text()[-3000:]}"
            return bool(self.url)

        await eventually(serving, timeout=180, what=f"{self.log.name} to serve")
        return self.url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Prometheus:
    """A real Prometheus on a free loopback port, scraping ``targets`` every second with our rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        binary = _tool("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES}']\n"
            "scrape_configs:\n"
            "  - job_name: pice\n"
            "    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n")
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=subprocess.DEVNULL, stderr=out, cwd=workdir)

    async def ready(self) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            started = time.monotonic()
            while True:
                assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.url}/-/ready")).status_code == 200:
                        return
                assert time.monotonic() - started < 60, f"prometheus not ready:\n{self.log.read_text()[-3000:]}"
                await asyncio.sleep(0.2)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=10) as http:
            body = (await http.get(f"{self.url}/api/v1/query", params={"query": expr})).json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


async def _until(prom: Prometheus, expr: str, *, count: int = 1, timeout: float = 120) -> None:
    """Wait until ``expr`` returns at least ``count`` series in Prometheus."""
    seen: list[int] = [0]

    async def probe() -> None:
        seen[0] = len(await prom.query(expr))

    async def poll() -> None:
        started = time.monotonic()
        while True:
            await probe()
            if seen[0] >= count:
                return
            if time.monotonic() - started > timeout:
                pytest.fail(f"Prometheus: {expr} returned {seen[0]} series, wanted {count}, for {timeout}s")
            await asyncio.sleep(0.5)

    await poll()


def _check(prom: Prometheus, *args: str) -> str:
    done = subprocess.run([sys.executable, str(CHECK), "--prometheus", prom.url, *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, f"check_queries {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


#: Questions on which the tiny model's expansions are mostly refused (empty, or repeating another
#: point): with them about two points in three end written by the cloud.
QUESTIONS = ["How to learn?", "Describe a city.", "What is the best way to cook rice?", "Why exercise?"]


async def _ask(http: httpx.AsyncClient, url: str, statuses: Counter[str], modes: Counter[str]) -> None:
    question = QUESTIONS[sum(statuses.values()) % len(QUESTIONS)]
    response = await http.post(f"{url}/v1/chat/completions", json={
        "model": "pice", "messages": [{"role": "user", "content": question}], "pice": {"mode": "progressive"}})
    statuses[str(response.status_code)] += 1
    if response.status_code == 200:
        modes[response.json()["pice"]["mode"]] += 1


@pytest.mark.mosquitto
async def test_prometheus_finds_data_for_every_panel_and_fires_every_alert_on_real_replicas(
        mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path) -> None:
    _tool("prometheus")
    edges = [EdgeProcess(name, mosquitto.url, tiny_model, tmp_path, heartbeat=1.0) for name in ("edge-a", "edge-b")]
    replica_a = Serve("a", mosquitto.url, tiny_model, tmp_path, ENV_A)
    replica_b = Serve("b", mosquitto.url, tiny_model, tmp_path, ENV_B, "--max-concurrent", "1", "--max-queue", "1")
    prom: Prometheus | None = None
    load: asyncio.Task[None] | None = None
    try:
        url_a, url_b = await replica_a.ready(), await replica_b.ready()
        async with httpx.AsyncClient(timeout=120) as http:
            async def live(url: str) -> int:
                return int((await http.get(f"{url}/health")).json()["live_edges"])

            started = time.monotonic()
            while not (await live(url_a) == 2 and await live(url_b) == 2):
                assert time.monotonic() - started < 180, "both edges live on both replicas"
                await asyncio.sleep(0.3)

            prom = Prometheus(tmp_path, [u.removeprefix("http://") for u in (url_a, url_b)])
            await prom.ready()
            await _until(prom, 'up{job="pice"} == 1', count=2)

            # Load: A answers cloud-only after refused sketches; B is kept over its capacity.
            statuses: dict[str, Counter[str]] = {"a": Counter(), "b": Counter()}
            modes: dict[str, Counter[str]] = {"a": Counter(), "b": Counter()}
            stop = asyncio.Event()

            async def keep_asking(name: str, url: str, concurrency: int) -> None:
                async def worker() -> None:
                    while not stop.is_set():
                        await _ask(http, url, statuses[name], modes[name])

                await asyncio.gather(*(worker() for _ in range(concurrency)))

            async def both() -> None:
                await asyncio.gather(keep_asking("a", url_a, 1), keep_asking("b", url_b, 4))

            load = asyncio.create_task(both())
            # An invalid edge status (counted as a rejected MQTT message), and a rollout of a build no
            # edge can fetch (its source is a closed port), announced two hours ago.
            mqtt = MqttTransport(BrokerSettings(url=mosquitto.url), client_id="alerts-test")
            await mqtt.connect()
            try:
                assert await mqtt.publish_and_wait(edge_status_topic("bogus-edge"), b"{not json", timeout=10)
            finally:
                await mqtt.close()
            await publish_rollout(mosquitto.url, FleetRollout(
                model="tiny", build="0123456789ab", source=f"http://127.0.0.1:{free_port()}", cloud_id="ops",
                issued_at=time.time() - 7200))

            # Run the load until Prometheus evaluates each load alert's condition as true (the alert is
            # pending: its `for` is longer than this test) and every refusal panel has data.
            for alert in ("PiceSketchRefusalsHigh", "PiceCloudOnlyShareHigh", "PiceFallbackShareHigh",
                          "PiceRequestsRefused", "PiceAdmissionQueueFull"):
                await _until(prom, f'ALERTS{{alertname="{alert}"}}')
            for expr in ("pice_candidate_rejected_total > 0", "pice_cloud_expansion_rejected_total > 0",
                         "pice_rejected_messages_total > 0", "pice_rollout_edges_behind == 2"):
                await _until(prom, expr)
            stop.set()
            await load
            load = None
            assert statuses["b"]["429"] > 0, statuses
            assert statuses["b"]["200"] > 0, statuses
            assert set(modes["a"]) == {"cloud"}, modes
            assert modes["b"]["progressive"] > 0, modes

            # An edge dies: both replicas see one live edge, one behind the rollout.
            edges[1].kill()
            await _until(prom, "pice_live_edges == 1", count=2)
            await _until(prom, "pice_rollout_edges_behind == 1", count=2)
            for alert in ("PiceEdgesLost", "PiceRolloutStuck"):
                await _until(prom, f'ALERTS{{alertname="{alert}"}}', count=2)  # one per replica
            await asyncio.sleep(2.5)  # two more scrapes and rule evaluations with everything in place
            at = time.time()

            # Every panel and every series the alerts read has data; every alert but the broker's fires.
            out = _check(prom, "--time", f"{at:.3f}", "--json", str(tmp_path / "selectors.json"))
            assert " 0 failed" in out
            _check(prom, "--no-dashboard", "--alerts", "firing", "--skip-alert", "PiceBrokerDisconnected",
                   "--time", f"{at:.3f}", "--json", str(tmp_path / "firing.json"))
            rules = (await http.get(f"{prom.url}/api/v1/rules")).json()["data"]["groups"]
            unhealthy = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] != "ok"]
            assert not unhealthy, unhealthy
            assert len([r for g in rules for r in g["rules"]]) == 8

            # The broker dies: both replicas say so, and the broker alert's expression holds.
            mosquitto.kill()
            await _until(prom, "pice_broker_connected == 0", count=2, timeout=60)
            await _until(prom, 'ALERTS{alertname="PiceBrokerDisconnected"}', count=2)
            _check(prom, "--no-dashboard", "--alerts", "firing", "--alert", "PiceBrokerDisconnected")
    finally:
        if load is not None:
            load.cancel()
            with contextlib.suppress(BaseException):
                await load
        if prom is not None:
            prom.stop()
        for server in (replica_a, replica_b):
            server.stop()
        for edge in edges:
            edge.stop()
