"""Zeroconf discovery on 127.0.0.1 only: real mDNS, real edge processes, real Mosquitto.

Every test uses its own fleet name and ids, so tests (and other runs on this host) that share
the loopback mDNS group never see each other's services.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

from pice_cloud.broker import free_port
from pice_cloud.fleet import Fleet
from pice_edge.discovery import (
    MAX_TXT_ENTRY_BYTES,
    CloudAdvert,
    Discovery,
    DiscoveryError,
    EdgeAdvert,
    Peer,
    TxtRecordError,
    parse_interfaces,
    txt_properties,
)
from pice_edge.errors import EXIT_UNAVAILABLE, ConfigError
from pice_edge.protocol import EDGE_STATUS_FILTER
from pice_edge.transport import BrokerSettings, MqttTransport
from tests.conftest import Mosquitto, eventually

LOOPBACK = ["127.0.0.1"]
ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 1.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def run_cli(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """A CLI as a subprocess, awaited without blocking this loop (which answers mDNS queries)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- TXT records and URLs (no network) -----------------------------------------------------------

def test_txt_entries_fit_255_bytes_descriptive_values_truncated() -> None:
    props = EdgeAdvert(device_id="e1", model_id="m" * 400, profile="p" * 300).properties()
    for key, value in props.items():
        assert len(f"{key}={value}".encode()) <= MAX_TXT_ENTRY_BYTES
    assert props["model"] == "m" * (MAX_TXT_ENTRY_BYTES - len("model="))
    assert props["id"] == "e1"
    # Multi-byte characters are cut at a character boundary, never into invalid UTF-8.
    assert txt_properties({"model": "é" * 200})["model"] == "é" * ((MAX_TXT_ENTRY_BYTES - 6) // 2)


def test_identifying_txt_values_that_do_not_fit_are_a_clear_error() -> None:
    advert = CloudAdvert(cloud_id="c1", broker_url="mqtt://" + "h" * 300 + ":1883")
    with pytest.raises(TxtRecordError, match=r"'broker' is \d+ bytes.*255.*shorten the broker"):
        advert.properties()


def test_cloud_broker_url_is_rewritten_to_the_advertised_address() -> None:
    def cloud(broker: str, *addresses: str) -> Peer:
        return Peer(kind="cloud", name="c._pice-cloud._tcp.local.", id="c", fleet="f", protocol="1",
                    addresses=addresses, port=1883, properties={"broker": broker})

    # "my own address" -> the address the announcement came from
    assert cloud("mqtt://0.0.0.0:1883", "192.168.1.20").broker_url() == "mqtt://192.168.1.20:1883"
    assert cloud("mqtts://user@127.0.0.1:8883", "10.0.0.5").broker_url() == "mqtts://user@10.0.0.5:8883"
    # same host (loopback announcement): keep it; a real host name: keep it
    assert cloud("mqtt://127.0.0.1:1883", "127.0.0.1").broker_url() == "mqtt://127.0.0.1:1883"
    assert cloud("mqtt://broker.lan:1883", "10.0.0.5").broker_url() == "mqtt://broker.lan:1883"
    with pytest.raises(DiscoveryError, match="invalid broker URL"):
        cloud("http://x", "10.0.0.5").broker_url()


def test_interfaces_option() -> None:
    assert parse_interfaces("all") == "all"
    assert parse_interfaces("127.0.0.1, 10.0.0.2") == ["127.0.0.1", "10.0.0.2"]
    with pytest.raises(ConfigError, match="'eth0' is not an IP address"):
        parse_interfaces("eth0")


# --- real mDNS on 127.0.0.1 ----------------------------------------------------------------------

async def test_name_clash_is_renamed_and_both_stay_visible() -> None:
    fleet = unique("clash")
    device = unique("edge")
    async with Discovery(LOOPBACK) as a, Discovery(LOOPBACK) as b, Discovery(LOOPBACK) as observer:
        first = await a.advertise_edge(EdgeAdvert(device_id=device, fleet=fleet))
        second = await b.advertise_edge(EdgeAdvert(device_id=device, fleet=fleet))
        assert first.name != second.name
        assert second.name.startswith(device)
        peers = [p for p in await observer.browse(2.0) if p.fleet == fleet]
        assert sorted(p.name for p in peers) == sorted([first.name, second.name])
        assert {p.id for p in peers} == {device}  # the id travels in TXT, not in the service name


async def test_free_slot_changes_reach_browsers_and_goodbye_removes() -> None:
    fleet = unique("slots")
    seen: dict[str, str | None] = {}
    async with Discovery(LOOPBACK) as edge, Discovery(LOOPBACK) as observer:
        ad = await edge.advertise_edge(EdgeAdvert(device_id=unique("edge"), fleet=fleet, free_slots=4, max_batch=4))
        observer.watch(lambda name, peer: seen.__setitem__(name, peer.properties["slots"] if peer else None),
                       clouds=False)
        await eventually(lambda: seen.get(ad.name) == "4", 10, "the edge's first announcement")
        for slots in (3, 2, 1):  # a burst is coalesced; the last value wins
            ad.set_free_slots(slots)
        await eventually(lambda: seen.get(ad.name) == "1", 10, "the TXT update")
        await ad.withdraw()
        await eventually(lambda: ad.name in seen and seen[ad.name] is None, 10, "the goodbye")


async def test_edge_without_cloud_fails_with_a_fix(tiny_model: Path) -> None:
    rc, _, err = await run_cli("pice_edge.cli", "run", "--model", str(tiny_model), "--fleet", unique("nocloud"),
                               "--interfaces", "127.0.0.1", "--discover-timeout", "1")
    assert rc == EXIT_UNAVAILABLE  # the cloud may still be starting: systemd restarts the edge
    assert "no PICE cloud of fleet" in err
    assert "--broker mqtt://HOST:PORT" in err
    assert "Traceback" not in err


@pytest.mark.mosquitto
async def test_three_edges_and_cloud_discover_each_other_and_a_killed_edge_leaves(
    mosquitto: Mosquitto, tiny_model: Path
) -> None:
    fleet_name = unique("fleet")
    ids = [f"{fleet_name}-edge-{i}" for i in range(3)]
    expiry_s = 3.0 * HEARTBEAT_S  # Fleet's default expiry_heartbeats

    async with Discovery(LOOPBACK) as discovery:
        # The cloud: advertises its broker, and keeps a fleet from MQTT statuses and zeroconf.
        await discovery.advertise_cloud(CloudAdvert(cloud_id=f"{fleet_name}-cloud", broker_url=mosquitto.url,
                                                    fleet=fleet_name, api_url="http://127.0.0.1:8000"))
        fleet = Fleet()
        fleet.watch_zeroconf(discovery, fleet_name)
        transport = MqttTransport(BrokerSettings(url=mosquitto.url), client_id=f"{fleet_name}-cloud")
        transport.add_subscription(EDGE_STATUS_FILTER, fleet.handle_status)
        await transport.connect()

        # Three edges, none told where the broker is.
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pice_edge.cli", "run", "--model", str(tiny_model), "--device-id", device,
                "--fleet", fleet_name, "--interfaces", "127.0.0.1", "--heartbeat", str(HEARTBEAT_S),
                "--max-batch", "2", "--log-level", "warning",
                cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
            for device in ids
        ]
        try:
            def both_sources() -> bool:
                rows = fleet.snapshot()
                return [(r.device_id, r.state, r.sources) for r in rows] == [
                    (d, "live", ("mqtt", "zeroconf")) for d in ids
                ]

            await eventually(both_sources, 120, "three edges live over MQTT and seen on zeroconf")
            row = fleet.snapshot()[0]
            assert (row.runtime, row.model_id, row.max_batch) == ("transformers", tiny_model.name, 2)
            assert row.addresses == ("127.0.0.1",)

            # `pice-edge discover` lists the three edges and the cloud (with its broker).
            rc, out, err = await run_cli("pice_edge.cli", "discover", "--interfaces", "127.0.0.1",
                                         "--fleet", fleet_name, "--timeout", "4", "--json")
            assert rc == 0, err
            peers = json.loads(out)
            assert sorted(p["id"] for p in peers if p["kind"] == "edge") == ids
            clouds = [p for p in peers if p["kind"] == "cloud"]
            assert [c["broker_url"] for c in clouds] == [mosquitto.url]
            assert clouds[0]["properties"]["api"] == "http://127.0.0.1:8000"
            assert {p["properties"]["batch"] for p in peers if p["kind"] == "edge"} == {"2"}

            # `pice-cloud fleet` finds the broker through zeroconf too, and sees the same fleet.
            rc, out, err = await run_cli("pice_cloud.cli", "fleet", "--interfaces", "127.0.0.1",
                                         "--fleet", fleet_name, "--wait", "2", "--json")
            assert rc == 0, err
            listed = json.loads(out)
            assert listed["broker"] == mosquitto.url
            assert [(e["device_id"], e["state"]) for e in listed["edges"]] == [(d, "live") for d in ids]

            # SIGKILL one edge: no goodbye, no clean disconnect; it must leave the fleet within
            # the heartbeat timeout (its last will does it at once; expiry is the backstop).
            victim = procs[1]
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            took = await eventually(lambda: ids[1] not in {r.device_id for r in fleet.snapshot()},
                                    expiry_s + 2.0, "the killed edge to leave the fleet")
            assert took <= expiry_s + 2.0
            assert [e.device_id for e in fleet.live()] == [ids[0], ids[2]]

            # A clean stop: offline status plus zeroconf goodbye; exit code 0.
            for proc in (procs[0], procs[2]):
                proc.send_signal(signal.SIGTERM)
            for proc in (procs[0], procs[2]):
                assert await asyncio.wait_for(proc.wait(), 30) == 0
            await eventually(lambda: fleet.snapshot() == [], 10, "stopped edges to leave")
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await transport.close()


@pytest.mark.mosquitto
async def test_fleet_command_lists_zeroconf_only_edge_as_seen(mosquitto: Mosquitto) -> None:
    fleet_name = unique("seen")
    device = f"{fleet_name}-edge"
    async with Discovery(LOOPBACK) as discovery:
        await discovery.advertise_edge(EdgeAdvert(device_id=device, fleet=fleet_name, profile="x86-cpu-dev",
                                                  runtime="transformers", model_id="tiny", free_slots=3, max_batch=4))
        rc, out, err = await run_cli("pice_cloud.cli", "fleet", "--broker", mosquitto.url, "--interfaces",
                                     "127.0.0.1", "--fleet", fleet_name, "--wait", "2")
    assert rc == 0, err
    header, line = out.strip().splitlines()
    assert header.split() == ["DEVICE", "STATE", "PROFILE", "RUNTIME", "MODEL", "TOK/S", "QUEUE", "FREE", "AGE",
                              "SOURCES"]
    assert line.split()[:8] == [device, "seen", "x86-cpu-dev", "transformers", "tiny", "-", "-", "3/4"]
    assert line.split()[-1] == "zeroconf"


def test_fleet_command_without_broker_or_cloud_is_a_clear_error() -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "pice_cloud.cli", "fleet", "--interfaces", "127.0.0.1", "--fleet", unique("none"),
         "--wait", "1"], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ},
    )
    assert proc.returncode == EXIT_UNAVAILABLE
    assert "no PICE cloud of fleet" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pice_cloud.cli", "fleet", "--broker", f"mqtt://127.0.0.1:{free_port()}",
         "--no-zeroconf", "--wait", "1"], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )
    assert proc.returncode == EXIT_UNAVAILABLE
    assert "cannot connect to MQTT broker" in proc.stderr
