"""The embedded MQTT broker (amqtt, in process) for the single-host default.

Production fleets use an external broker (Mosquitto, EMQX, HiveMQ...): PICE speaks plain
MQTT 3.1.1 so any of them works; `tools/mosquitto/` has a hardened configuration.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Protocol

from pice_cloud.errors import CloudError

log = logging.getLogger(__name__)


class Broker(Protocol):
    """A broker this process runs; `start` returns its ``mqtt://`` URL."""

    async def start(self) -> str: ...

    async def stop(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """amqtt in this process's event loop, anonymous, bound to ``host`` (loopback by default)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> str:
        try:
            from amqtt.broker import Broker as AmqttBroker
        except ImportError as exc:
            raise CloudError("the embedded broker needs amqtt: pip install 'pice[cloud]'") from exc
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = AmqttBroker(config, loop=asyncio.get_running_loop())
        try:
            await self._broker.start()
        except Exception as exc:
            raise CloudError(f"cannot start the embedded MQTT broker on {self.url}: {exc}") from exc
        log.info("embedded MQTT broker listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._broker is not None:
            try:
                await self._broker.shutdown()
            except Exception:
                log.debug("embedded broker shutdown failed", exc_info=True)
            self._broker = None
