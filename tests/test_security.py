"""Trust: the production Mosquitto configuration (tools/mosquitto/) on a real broker.

A throw-away CA, broker certificate and three accounts (the cloud and two edges) are made with
the shipped scripts; the broker runs the production configuration with only paths and port
changed. Then: legitimate clients work end to end over TLS, and no edge can publish as another,
read another's tasks, or get in without the right password and certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from pice_cloud.config import ServiceConfig
from pice_cloud.fleet import Fleet
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.progressive import Inbox
from pice_cloud.service import PiceService
from pice_edge.errors import ConfigError, TransportError
from pice_edge.node import EdgeNode
from pice_edge.protocol import (
    CANDIDATES_FILTER,
    EDGE_STATUS_FILTER,
    Candidate,
    CloudStatus,
    EdgeStatus,
    ExpandTask,
    candidate_topic,
    cloud_status_topic,
    edge_status_topic,
    edge_tasks_topic,
    encode,
    refusal_topic,
)
from pice_edge.runtimes.transformers import TransformersRuntime
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import Mosquitto, eventually
from tests.procs import EdgeProcess
from tests.progressive_support import live_fleet, open_request

pytestmark = pytest.mark.mosquitto

TOOLS = Path(__file__).parents[1] / "tools" / "mosquitto"
ACCOUNTS = ("pice-cloud", "edge-a", "edge-b")
# Random per run, so a password that shows up in a log cannot be a coincidence.
PASSWORDS = {name: f"pw-{name}-{secrets.token_hex(8)}" for name in ACCOUNTS}


def _tools_available() -> None:
    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install openssl mosquitto)")


def _script(*args: str | Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, the broker certificate for 127.0.0.1, and the three accounts."""
    _tools_available()
    pki = tmp_path_factory.mktemp("pki")
    _script(TOOLS / "make_ca.sh", "-d", "2", pki, "127.0.0.1", "localhost")
    for name in ACCOUNTS:
        _script(TOOLS / "add_device.sh", "-d", "2", pki, name, env={"PICE_DEVICE_PASSWORD": PASSWORDS[name]})
    return pki


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, with a client certificate for edge-a: what an attacker could make."""
    _tools_available()
    rogue = tmp_path_factory.mktemp("rogue")
    _script(TOOLS / "make_ca.sh", "-d", "2", rogue, "127.0.0.1")
    _script(TOOLS / "add_device.sh", "-d", "2", rogue, "edge-a", env={"PICE_DEVICE_PASSWORD": "x"})
    return rogue


def install_snippet(confd: Path, pki: Path, port: int) -> Path:
    """tools/mosquitto/pice.conf as the README installs it into conf.d; only the PKI folder and
    the port differ (a loopback listener on a free port)."""
    confd.mkdir(exist_ok=True)
    text = (TOOLS / "pice.conf").read_text()
    assert "listener 8883\n" in text
    text = text.replace("/etc/mosquitto/pice/acl", str(TOOLS / "acl")).replace("/etc/mosquitto/pice/", f"{pki}/")
    target = confd / "pice.conf"
    target.write_text(text.replace("listener 8883\n", f"listener {port} 127.0.0.1\n"))
    return target


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Path) -> Iterator[Mosquitto]:
    confd = tmp_path / "conf.d"
    broker = Mosquitto(tmp_path, "secure.conf", scheme="mqtts", user=getpass.getuser(), confd=confd)
    install_snippet(confd, pki, broker.port)
    broker.start()
    yield broker
    broker.kill()


def creds(broker: Mosquitto, pki: Path, name: str, **over: object) -> BrokerSettings:
    values: dict[str, object] = {
        "url": broker.url, "username": name, "password": SecretStr(PASSWORDS.get(name, "")),
        "ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "clients" / f"{name}.crt"),
        "key_file": str(pki / "clients" / f"{name}.key"), "reconnect_min_s": 1, "reconnect_max_s": 1,
    }
    values.update(over)
    return BrokerSettings.model_validate(values)


@pytest.fixture
async def clients(secure_broker: Mosquitto, pki: Path) -> AsyncIterator[dict[str, MqttTransport]]:
    """Connected raw transports for the cloud and both edges (client id == username)."""
    made = {name: MqttTransport(creds(secure_broker, pki, name), client_id=name) for name in ACCOUNTS}
    for transport in made.values():
        await transport.connect(timeout=5)
    yield made
    for transport in made.values():
        await transport.close()


def _candidate(request_id: str, device_id: str, text: str = "text") -> Candidate:
    return Candidate(request_id=request_id, point_index=0, device_id=device_id, text=text, token_count=1,
                     mean_logprob=-0.1, latency_s=0.1)


# --- the configuration ---------------------------------------------------------------------

def test_snippet_is_a_conf_d_file_for_debians_stock_mosquitto() -> None:
    """What the stock main file sets must not be set again (Mosquitto refuses a duplicate
    persistence_location), and the security settings are all there."""
    directives = [ln.split(None, 1) for ln in (TOOLS / "pice.conf").read_text().splitlines()
                  if ln.strip() and not ln.startswith("#")]
    keys = {d[0] for d in directives}
    assert not keys & {"pid_file", "persistence", "persistence_location", "log_dest", "include_dir"}
    assert ["allow_anonymous", "false"] in directives
    assert ["require_certificate", "true"] in directives
    assert ["per_listener_settings", "false"] in directives


def test_acl_confines_edges_with_username_patterns() -> None:
    rules = [ln.split() for ln in (TOOLS / "acl").read_text().splitlines() if ln and not ln.startswith("#")]
    patterns = {(r[1], r[2]) for r in rules if r[0] == "pattern"}
    assert patterns == {
        ("readwrite", "pice/v1/edge/%u/status"),
        ("write", "pice/v1/edge/%u/rollout"),
        ("write", "pice/v1/candidates/+/%u"),
        ("write", "pice/v1/cloud/+/candidates/+/%u"),
        ("write", "pice/v1/cloud/+/refusals/+/%u"),
        ("read", "pice/v1/edge/%u/tasks"),
        ("read", "pice/v1/cloud/+/status"),
        ("read", "pice/v1/fleet/rollout"),
    }
    # Topics the protocol module builds match the ACL's shapes.
    assert candidate_topic("r1", "edge-a") == "pice/v1/candidates/r1/edge-a"
    assert candidate_topic("r1", "edge-a", "cloud-1") == "pice/v1/cloud/cloud-1/candidates/r1/edge-a"
    assert refusal_topic("cloud-1", "r1", "edge-a") == "pice/v1/cloud/cloud-1/refusals/r1/edge-a"
    assert cloud_status_topic("cloud-1") == "pice/v1/cloud/cloud-1/status"


# --- legitimate clients -----------------------------------------------------------------------

async def test_cloud_and_edges_answer_over_tls_with_acl(secure_broker: Mosquitto, pki: Path,
                                                        tiny_model: Path) -> None:
    """The ACL gives every party what it needs: a progressive answer works end to end."""
    llm = TransformersBackend(tiny_model, threads=1)
    nodes = [EdgeNode(TransformersRuntime(tiny_model, threads=1), device_id=name,
                      broker=creds(secure_broker, pki, name), heartbeat_s=1.0) for name in ("edge-a", "edge-b")]
    cloud = MqttTransport(creds(secure_broker, pki, "pice-cloud"), client_id="pice-cloud",
                          will=(cloud_status_topic("pice-cloud"),
                                encode(CloudStatus(cloud_id="pice-cloud", online=False))))
    # The tiny random model's sketches would never pass the guards.
    service = PiceService(llm, cloud, config=ServiceConfig(max_points=3, tokens_per_point=8, sketch_tokens=30,
                                                           sketch_guard=False, expansion_guard=False))
    try:
        for node in nodes:
            await node.start(connect_timeout=5)
        await cloud.connect(timeout=5)
        assert await cloud.publish_and_wait(cloud_status_topic("pice-cloud"), encode(CloudStatus(cloud_id="pice-cloud",
                                                                                   online=True)), retain=True)
        assert await service.fleet.wait_for(2, 10)
        final = await asyncio.wait_for(service.ask("How do I learn to cook?", mode="progressive"), 60)
        assert final.stats.mode == "progressive"
        assert final.stats.points_edge >= 1
        assert final.stats.points_cloud == 0, "a task or candidate was blocked by the ACL"
        assert set(final.stats.devices) <= {"edge-a", "edge-b"}
        assert cloud.rejections.count() == 0
    finally:
        await cloud.close()
        for node in nodes:
            await node.stop()
        await llm.close()


# --- what an edge must not be able to do ------------------------------------------------------

async def test_edge_cannot_publish_as_another_device(clients: dict[str, MqttTransport]) -> None:
    cloud, mallory = clients["pice-cloud"], clients["edge-a"]
    inbox = Inbox(rejections=cloud.rejections)
    fleet = Fleet(rejections=cloud.rejections)
    await cloud.subscribe(CANDIDATES_FILTER, inbox.handle_candidate)
    await cloud.subscribe(EDGE_STATUS_FILTER, fleet.handle_status)
    stolen: list[Message] = []
    await clients["edge-b"].subscribe(edge_tasks_topic("edge-b"), stolen.append)
    pending, _ = open_request(inbox, [("edge-a", "edge-b")], fleet)

    # edge-a forges edge-b's candidate and status, and writes a task into edge-b's queue ...
    await mallory.publish_and_wait(candidate_topic("r1", "edge-b"), encode(_candidate("r1", "edge-b", "forged")))
    await mallory.publish_and_wait(edge_status_topic("edge-b"), encode(EdgeStatus(device_id="edge-b", online=True)))
    task = ExpandTask(request_id="r1", point_index=0, question="q", sketch=["p"], max_new_tokens=4,
                      deadline=time.time() + 30)
    await mallory.publish_and_wait(edge_tasks_topic("edge-b"), encode(task))
    # ... then publishes its own candidate and status, which must arrive (same connection, in order).
    await mallory.publish_and_wait(candidate_topic("r1", "edge-a"), encode(_candidate("r1", "edge-a")))
    await mallory.publish_and_wait(edge_status_topic("edge-a"), encode(EdgeStatus(device_id="edge-a", online=True)))
    # The forgeries went first on the same connection: had the broker passed them on, they would
    # have reached the cloud before these.
    await eventually(lambda: "edge-a" in pending.points[0].received and fleet.get("edge-a") is not None)

    # The broker dropped the forgeries: the cloud never saw them (nothing even to reject).
    assert set(pending.points[0].received) == {"edge-a"}
    assert fleet.get("edge-b") is None
    assert cloud.rejections.count() == 0
    assert stolen == []
    assert mallory.connected, "Mosquitto drops a denied QoS 1 publish but keeps the client"


async def test_edge_cannot_read_another_edges_tasks(clients: dict[str, MqttTransport]) -> None:
    cloud = clients["pice-cloud"]
    seen_by_a: list[str] = []
    seen_by_b: list[str] = []
    for topic_filter in (edge_tasks_topic("edge-b"), "pice/v1/edge/+/tasks", "#"):
        # Refused at SUBSCRIBE, or granted and filtered per message: either way nothing may arrive.
        with contextlib.suppress(TransportError):
            await clients["edge-a"].subscribe(topic_filter, lambda m: seen_by_a.append(m.topic))
    await clients["edge-b"].subscribe(edge_tasks_topic("edge-b"), lambda m: seen_by_b.append(m.topic))
    task = ExpandTask(request_id="r2", point_index=0, question="secret question", sketch=["p"], max_new_tokens=4,
                      deadline=time.time() + 30)
    assert await cloud.publish_and_wait(edge_tasks_topic("edge-b"), encode(task))
    assert await cloud.publish_and_wait(edge_tasks_topic("edge-a"), encode(task))
    # edge-b's task went out first: on edge-a's connection it would have come before edge-a's own.
    await eventually(lambda: bool(seen_by_b) and bool(seen_by_a))
    assert seen_by_b == [edge_tasks_topic("edge-b")]
    assert set(seen_by_a) == {edge_tasks_topic("edge-a")}, "edge-a read a task that was not its own"


# --- who gets in ------------------------------------------------------------------------------

async def _refused(settings: BrokerSettings, timeout: float = 5.0) -> tuple[str, float]:
    transport = MqttTransport(settings)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as info:
            await transport.connect(timeout=timeout)
    finally:
        await transport.close()
    return str(info.value), time.monotonic() - started


async def test_anonymous_client_is_refused(secure_broker: Mosquitto, pki: Path) -> None:
    # A valid client certificate is not enough: the broker also wants an account.
    message, took = await _refused(creds(secure_broker, pki, "edge-a", username=None, password=None))
    assert re.search(r"refused us \((broker refused: )?Not authorized", message), message
    assert took < 4, "a refusal must not wait for the connect timeout"


async def test_wrong_password_is_refused_and_never_logged(secure_broker: Mosquitto, pki: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + secrets.token_hex(8)
    settings = creds(secure_broker, pki, "edge-a", password=SecretStr(wrong))
    message, took = await _refused(settings)
    assert "refused us" in message
    assert "check the username, password" in message
    assert took < 4
    # And a successful login logs nothing secret either.
    good = creds(secure_broker, pki, "edge-a")
    transport = MqttTransport(good, client_id="edge-a")
    await transport.connect(timeout=5)
    await transport.close()
    shown = caplog.text + message + repr(settings) + repr(good) + str(good.model_dump())
    assert "connected to MQTT broker" in caplog.text
    assert wrong not in shown
    assert PASSWORDS["edge-a"] not in shown


async def test_broker_certificate_from_another_ca_is_refused(secure_broker: Mosquitto, pki: Path,
                                                             rogue_pki: Path) -> None:
    message, took = await _refused(creds(secure_broker, pki, "edge-a", ca_file=str(rogue_pki / "ca.crt")))
    assert "certificate verify failed" in message
    assert took < 4


async def test_client_certificate_from_another_ca_is_refused(secure_broker: Mosquitto, pki: Path,
                                                             rogue_pki: Path) -> None:
    # The right password with a certificate the fleet CA did not sign: the TLS handshake fails.
    settings = creds(secure_broker, pki, "edge-a", cert_file=str(rogue_pki / "clients" / "edge-a.crt"),
                     key_file=str(rogue_pki / "clients" / "edge-a.key"))
    message, _ = await _refused(settings, timeout=3)
    assert "cannot connect to MQTT broker" in message or "refused" in message


def test_missing_tls_file_is_a_config_error(tmp_path: Path) -> None:
    settings = BrokerSettings(url="mqtts://127.0.0.1:1", ca_file=str(tmp_path / "nope.crt"))
    with pytest.raises(ConfigError, match=r"ca_file=.*nope\.crt"):
        MqttTransport(settings)
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        BrokerSettings(cert_file="a.crt")
    with pytest.raises(ValueError, match="must not carry credentials"):
        BrokerSettings(url="mqtt://edge:hunter2@127.0.0.1:1883")


# --- the cloud's own check, without the broker's help ------------------------------------------

async def test_inbox_ignores_mismatched_device_on_permissive_broker(mosquitto: Mosquitto) -> None:
    cloud = MqttTransport(BrokerSettings(url=mosquitto.url), client_id="cloud")
    mallory = MqttTransport(BrokerSettings(url=mosquitto.url), client_id="edge-a")
    inbox = Inbox(rejections=cloud.rejections)
    cloud.add_subscription(CANDIDATES_FILTER, inbox.handle_candidate)
    await cloud.connect()
    await mallory.connect()
    try:
        pending, _ = open_request(inbox, [("edge-a", "edge-b")], live_fleet(time.monotonic, "edge-a", "edge-b"),
                                  request_id="r3")
        # The anonymous broker lets anyone publish anywhere; the payload claims edge-b.
        assert await mallory.publish_and_wait(candidate_topic("r3", "edge-a"), encode(_candidate("r3", "edge-b")))
        assert await mallory.publish_and_wait(candidate_topic("r3", "edge-a"), encode(_candidate("r3", "edge-a")))
        await eventually(lambda: "edge-a" in pending.points[0].received)
        assert "edge-b" not in pending.points[0].received
        assert cloud.rejections.count("candidate", "identity") == 1
        assert inbox.accepted == 1
    finally:
        await cloud.close()
        await mallory.close()


# --- the pice-edge command with credentials ------------------------------------------------------

def _tls_flags(pki: Path, name: str) -> tuple[str, ...]:
    return ("--ca-file", str(pki / "ca.crt"), "--cert-file", str(pki / "clients" / f"{name}.crt"),
            "--key-file", str(pki / "clients" / f"{name}.key"))


async def test_edge_cli_takes_credentials_from_env_and_file(secure_broker: Mosquitto, pki: Path,
                                                            tiny_model: Path, tmp_path: Path) -> None:
    fleet = Fleet()
    cloud = MqttTransport(creds(secure_broker, pki, "pice-cloud"), client_id="pice-cloud")
    cloud.add_subscription(EDGE_STATUS_FILTER, fleet.handle_status)
    await cloud.connect(timeout=5)
    # edge-a: password in the environment; edge-b: in the file add_device.sh wrote. Both log at
    # debug level, and neither may print a password.
    debug = ("--log-level", "debug")
    procs = [
        EdgeProcess("edge-a", secure_broker.url, tiny_model, tmp_path, extra=(*_tls_flags(pki, "edge-a"), *debug),
                    env={"PICE_BROKER_PASSWORD": PASSWORDS["edge-a"]}),
        EdgeProcess("edge-b", secure_broker.url, tiny_model, tmp_path,
                    extra=(*_tls_flags(pki, "edge-b"), *debug, "--password-file",
                           str(pki / "clients" / "edge-b.password")),
                    env={"PICE_BROKER_PASSWORD": ""}),
    ]
    try:
        assert await fleet.wait_for(2, 60), "edges with credentials did not register"
        assert {e.device_id for e in fleet.live()} == {"edge-a", "edge-b"}
    finally:
        await cloud.close()
        for proc in procs:
            proc.stop()
    for proc in procs:
        out = proc.log()
        assert "connected to MQTT broker" in out
        for password in PASSWORDS.values():
            assert password not in out


async def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """A PICE command as a subprocess, awaited (this loop keeps serving MQTT meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PICE_BROKER_PASSWORD": "", **(env or {})}, cwd=Path(__file__).parents[1])
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_every_command_takes_the_same_credentials(secure_broker: Mosquitto, pki: Path, tiny_model: Path,
                                                        tmp_path: Path) -> None:
    """The documented flags work for the edge, `doctor`, and the cloud's `ask` and `fleet`
    (`serve` shares `ask`'s loader); a wrong device id is reported, not served in silence."""
    cloud_creds = (*_tls_flags(pki, "pice-cloud"), "--password-file", str(pki / "clients" / "pice-cloud.password"))
    edge = EdgeProcess("edge-a", secure_broker.url, tiny_model, tmp_path,
                       extra=(*_tls_flags(pki, "edge-a"), "--password-file",
                              str(pki / "clients" / "edge-a.password")))
    try:
        rc, out, err = await _cli("pice_edge.cli", "doctor", "--model", str(tiny_model), "--broker", secure_broker.url,
                                  "--device-id", "edge-a", *_tls_flags(pki, "edge-a"), "--password-file",
                                  str(pki / "clients" / "edge-a.password"), "--json")
        checks = {c["name"]: c for c in json.loads(out)["checks"]}
        assert checks["broker"]["status"] == "ok", checks["broker"]
        assert checks["acl"]["status"] == "ok", checks["acl"]
        await eventually(lambda: " serving " in edge.log() or not edge.alive, timeout=90, what="edge-a serving")
        assert edge.alive, edge.log()
        # The fleet as the cloud's account sees it (the username defaults to pice-cloud).
        rc, out, err = await _cli("pice_cloud.cli", "fleet", "--broker", secure_broker.url, "--no-zeroconf",
                                  "--wait", "3", "--json", *cloud_creds)
        assert rc == 0, err
        assert [e["device_id"] for e in json.loads(out)["edges"]] == ["edge-a"]
        rc, out, err = await _cli("pice_cloud.cli", "ask", "Hi?", "--model", str(tiny_model), "--mode", "cloud",
                                  "--broker", secure_broker.url, "--json", *cloud_creds)
        assert rc == 0, err
        assert json.loads(out)["stats"]["mode"] == "cloud"
        # The same account, from the environment instead of flags.
        env = {"PICE_BROKER_CA_FILE": str(pki / "ca.crt"),
               "PICE_BROKER_CERT_FILE": str(pki / "clients" / "pice-cloud.crt"),
               "PICE_BROKER_KEY_FILE": str(pki / "clients" / "pice-cloud.key"),
               "PICE_BROKER_PASSWORD": PASSWORDS["pice-cloud"]}
        rc, out, err = await _cli("pice_cloud.cli", "fleet", "--broker", secure_broker.url, "--no-zeroconf",
                                  "--wait", "1", "--json", env=env)
        assert rc == 0, err
    finally:
        edge.stop()
    # edge-b's account, another device id: the ACL would drop its status; it says so and stops.
    wrong = ("--device-id", "not-edge-b", "--username", "edge-b", *_tls_flags(pki, "edge-b"), "--password-file",
             str(pki / "clients" / "edge-b.password"))
    rc, out, err = await _cli("pice_edge.cli", "doctor", "--model", str(tiny_model), "--broker", secure_broker.url,
                              "--json", *wrong)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert rc == 1
    assert checks["acl"]["status"] == "fail"
    assert "--device-id equal to the broker username (edge-b)" in checks["acl"]["fix"]
    wrong_edge = EdgeProcess("not-edge-b", secure_broker.url, tiny_model, tmp_path, extra=wrong[2:])
    try:
        await eventually(lambda: "did not come back from the broker" in wrong_edge.log() or not wrong_edge.alive,
                         timeout=90, what="the edge to report its invisible status")
        assert wrong_edge.alive, wrong_edge.log()  # it keeps trying: a fixed ACL lets the next heartbeat through
        assert "the device id must equal the broker username (edge-b)" in wrong_edge.log()
    finally:
        wrong_edge.stop()


def test_edge_cli_wrong_password_is_a_clear_error(secure_broker: Mosquitto, pki: Path, tiny_model: Path,
                                                  tmp_path: Path) -> None:
    proc = EdgeProcess("edge-a", secure_broker.url, tiny_model, tmp_path, extra=_tls_flags(pki, "edge-a"),
                       env={"PICE_BROKER_PASSWORD": "not-the-password"})
    assert proc.proc.wait(timeout=120) == 2
    out = proc.log()
    assert "refused us" in out
    assert "Traceback" not in out
    assert "not-the-password" not in out
