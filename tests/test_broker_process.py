"""The broker helpers the tests, benchmarks and load tools share (`pice_cloud.broker`): a free
port, waiting for a listener, and Mosquitto as a child process."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pice_cloud.broker import ANONYMOUS_CONFIG, MosquittoProcess, free_port, mosquitto_executable, wait_port
from pice_cloud.errors import CloudError
from pice_edge.transport import BrokerSettings, MqttTransport

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed")]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_wait_port_returns_once_a_port_listens_and_times_out_otherwise() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_port(server.getsockname()[1], timeout=1.0)
    with pytest.raises(TimeoutError, match="nothing listens"):
        wait_port(free_port(), timeout=0.2)


async def test_mosquitto_serves_stops_and_restarts_on_the_same_port(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path)
    assert not listening(broker.port)  # chosen, not yet bound: a URL can be handed out first
    with broker:
        assert broker.running
        client = MqttTransport(BrokerSettings(url=broker.url), client_id="helper-test")
        await client.connect(timeout=5)
        await client.close()
        broker.kill()
        assert not broker.running
        assert not listening(broker.port)
        assert broker.start() == f"mqtt://127.0.0.1:{broker.port}"
        assert listening(broker.port)
    assert not broker.running  # the block stopped it
    assert "listener" in broker.config.read_text()


def test_a_broker_that_cannot_start_says_why(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path, ANONYMOUS_CONFIG + "no_such_option {flavour}\n", values={"flavour": "x"})
    with pytest.raises(CloudError, match="did not start") as info:
        broker.start(timeout=5)
    assert "no_such_option" in str(info.value)  # the end of its log
    assert not broker.running
