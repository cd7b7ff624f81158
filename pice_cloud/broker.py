"""Brokers this process runs: the embedded MQTT broker (amqtt, in process) for the single-host
default, and a Mosquitto child process for the tests, the benchmarks and the load tools.

Production fleets use an external broker (Mosquitto, EMQX, HiveMQ...): PICE speaks plain
MQTT 3.1.1 so any of them works; `tools/mosquitto/` has a hardened configuration.

    port = free_port()                          # a free loopback port, for any server
    with MosquittoProcess(workdir) as broker:   # anonymous Mosquitto on loopback, stopped after
        ... broker.url ...
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Protocol

from pice_cloud.errors import CloudError

log = logging.getLogger(__name__)


class Broker(Protocol):
    """A broker this process runs; `start` returns its ``mqtt://`` URL."""

    async def start(self) -> str: ...

    async def stop(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (another process may take it before it is
    bound: callers bind it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Return once something accepts TCP connections on ``host:port``.

    Raises:
        TimeoutError: nothing listens there after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s")
        time.sleep(0.05)


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


_DEBIAN_MOSQUITTO: Final = "/usr/sbin/mosquitto"


def mosquitto_executable() -> str | None:
    """Mosquitto's executable: on ``PATH``, or where Debian installs it (outside a user's
    ``PATH``); None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return _DEBIAN_MOSQUITTO if Path(_DEBIAN_MOSQUITTO).exists() else None

#: An anonymous broker on one loopback listener, in memory. `MosquittoProcess` fills in
#: ``{port}`` (and ``{data}``, a folder for persistence, where a configuration wants one).
ANONYMOUS_CONFIG: Final = "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
#: The same broker with persistence, as a deployment runs it: retained messages, persistent
#: sessions (their subscriptions) and the QoS 1 messages queued for them are written to ``{data}``
#: every second and at shutdown, and read back when it starts again on the same port (a
#: crash, SIGKILL, loses at most the last second).
PERSISTENT_CONFIG: Final = (ANONYMOUS_CONFIG.replace("persistence false", "persistence true")
                            + "persistence_location {data}/\nautosave_interval 1\n")


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


class MosquittoProcess:
    """A Mosquitto broker as a child process of this one, for tests, benchmarks and load tools
    (a deployment runs its own, under systemd: see tools/mosquitto/).

    The port is chosen when the object is made, so that URLs can be handed out before the
    broker starts (a broker that comes up last), and it stays the same across `kill` and
    `start` (a broker restart). Its configuration and log are files in ``workdir``.

    Args:
        workdir: folder for ``mosquitto.conf``, ``mosquitto.log`` and ``data/``.
        config: the configuration as a template: ``{port}`` and ``{data}`` are filled in, and
            ``values`` fill its other placeholders.
        scheme: ``mqtt``, or ``mqtts`` where the configuration's listener has TLS.
        port: the listener's port (default: a free one).
        values: the template's other placeholders.

    Raises:
        CloudError: Mosquitto is not installed.
    """

    def __init__(self, workdir: Path, config: str = ANONYMOUS_CONFIG, *, scheme: str = "mqtt",
                 port: int | None = None, values: Mapping[str, object] | None = None) -> None:
        executable = mosquitto_executable()
        if executable is None:
            raise CloudError("mosquitto is not installed (apt-get install mosquitto)")
        self.executable = executable
        self.port = port or free_port()
        self.workdir = workdir
        self.scheme = scheme
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "mosquitto.conf"
        text = config.format(port=self.port, data=data, **(values or {}))
        if _running_as_root() and not any(line.split()[:1] == ["user"] for line in text.splitlines()):
            # Started by root, Mosquitto drops to the `mosquitto` user, which can neither reach a
            # private folder (a test's tmp_path is 0700) nor write ``{data}``: persistence would fail,
            # with nothing but a line in its log. A child broker runs as its parent does.
            text += "user root\n"
        self.config.write_text(text)
        #: Mosquitto's output (a file, not a pipe: a chatty broker must never block on a full pipe).
        self.log_path = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> str:
        """Start the broker and wait until it accepts connections; returns its URL.

        Raises:
            CloudError: it exited or did not listen within ``timeout`` seconds (with the end
                of its log).
        """
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([self.executable, "-c", str(self.config)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self.url
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.kill()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise CloudError(f"mosquitto did not start on port {self.port} within {timeout:g}s; its log: {tail}")

    def kill(self) -> None:
        """SIGKILL: no goodbye to its clients (a crash, a power cut)."""
        if self.proc is not None:
            self.proc.kill()
            self._reap()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it does not exit in ``timeout`` seconds."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MosquittoProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
