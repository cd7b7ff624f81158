"""MQTT transport against a real Mosquitto: reconnect, resubscribe, oversize, handler faults."""

from __future__ import annotations

import pytest

from pice_edge.errors import TransportError
from pice_edge.transport import BrokerSettings, Message, MqttTransport, parse_broker_url
from tests.conftest import Mosquitto, eventually

pytestmark = pytest.mark.mosquitto


def test_broker_url_parsing() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1884") == ("mqtt", "127.0.0.1", 1884)
    assert parse_broker_url("mqtts://broker.local") == ("mqtts", "broker.local", 8883)
    for bad in ("http://x:1", "mqtt://:1883", "mqtt://h:notaport"):
        with pytest.raises(ValueError, match="broker URL"):
            parse_broker_url(bad)
    with pytest.raises(ValueError, match="mqtt://"):
        BrokerSettings(url="tcp://localhost")


async def test_unreachable_broker_is_a_clear_error(mosquitto: Mosquitto) -> None:
    port = mosquitto.port
    mosquitto.kill()
    transport = MqttTransport(BrokerSettings(url=f"mqtt://127.0.0.1:{port}"))
    with pytest.raises(TransportError, match=rf"127.0.0.1:{port}.*check that the broker runs"):
        await transport.connect(timeout=1.0)
    await transport.close()


async def test_reconnects_and_resubscribes_after_broker_restart(mosquitto: Mosquitto) -> None:
    got: list[Message] = []
    settings = BrokerSettings(url=mosquitto.url, reconnect_min_s=1, reconnect_max_s=1)
    sub = MqttTransport(settings, client_id="sub")
    pub = MqttTransport(settings, client_id="pub")
    hooks: list[int] = []
    sub.on_connect(lambda: hooks.append(1))
    sub.add_subscription("pice/test/#", got.append)
    await sub.connect()
    await pub.connect()
    try:
        assert await pub.publish_and_wait("pice/test/a", b"one")
        await eventually(lambda: len(got) == 1)

        mosquitto.kill()
        await eventually(lambda: not sub.connected and not pub.connected)
        mosquitto.start()  # same port; clean sessions, so only a resubscribe brings messages back
        await eventually(lambda: sub.connected and pub.connected, timeout=15)
        await eventually(lambda: len(hooks) == 2)  # hooks run once the resubscription is acknowledged
        assert await pub.publish_and_wait("pice/test/b", b"two")
        await eventually(lambda: [m.payload for m in got] == [b"one", b"two"])
        assert sub.connect_count == 2
    finally:
        await sub.close()
        await pub.close()


async def test_oversized_and_faulty_handlers_are_counted_not_fatal(mosquitto: Mosquitto) -> None:
    got: list[Message] = []
    small = MqttTransport(BrokerSettings(url=mosquitto.url, max_payload_bytes=1024), client_id="small")
    big = MqttTransport(BrokerSettings(url=mosquitto.url, max_payload_bytes=1 << 20), client_id="big")

    def broken(message: Message) -> None:
        raise RuntimeError("handler bug")

    small.add_subscription("pice/x/ok", got.append)
    small.add_subscription("pice/x/#", broken)
    await small.connect()
    await big.connect()
    try:
        with pytest.raises(TransportError, match="over max_payload_bytes"):
            small.publish("pice/x/ok", b"x" * 2048)
        assert await big.publish_and_wait("pice/x/ok", b"x" * 4096)
        assert await big.publish_and_wait("pice/x/ok", b"fine")
        await eventually(lambda: len(got) == 1)
        assert got[0].payload == b"fine"
        counts = small.rejections.snapshot()
        assert counts[("mqtt", "too_large")] == 1
        assert counts[("handler", "RuntimeError")] == 1  # the oversized one never reached it
        assert small.connected, "a faulty handler must not kill the network thread"
    finally:
        await small.close()
        await big.close()


async def test_handlers_of_one_filter_share_its_subscription(mosquitto: Mosquitto) -> None:
    first: list[bytes] = []
    second: list[bytes] = []
    sub = MqttTransport(BrokerSettings(url=mosquitto.url), client_id="shared")
    pub = MqttTransport(BrokerSettings(url=mosquitto.url), client_id="pub")

    def one(message: Message) -> None:
        first.append(message.payload)

    def two(message: Message) -> None:
        second.append(message.payload)

    sub.add_subscription("pice/s/#", one)
    sub.add_subscription("pice/s/#", one)  # the same handler again: still once
    await sub.connect()
    await sub.subscribe("pice/s/#", two)  # already subscribed: no wait, both get every message
    await pub.connect()
    try:
        assert await pub.publish_and_wait("pice/s/a", b"1")
        await eventually(lambda: first == [b"1"] and second == [b"1"])
        sub.unsubscribe("pice/s/#", one)  # the other still gets them
        assert await pub.publish_and_wait("pice/s/a", b"2")
        await eventually(lambda: second == [b"1", b"2"])
        sub.unsubscribe("pice/s/#", two)  # the last one: the broker subscription ends
        await sub.subscribe("pice/t", one)  # acknowledged after the UNSUBSCRIBE
        assert await pub.publish_and_wait("pice/s/a", b"3")
        assert await pub.publish_and_wait("pice/t", b"t")
        await eventually(lambda: first[-1:] == [b"t"])
        assert first == [b"1", b"t"]
        assert second == [b"1", b"2"]
    finally:
        await sub.close()
        await pub.close()
