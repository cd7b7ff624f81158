"""A TCP link on loopback that a drill can cut: the site's uplink to the cloud in miniature.

`TcpLink` listens on a free loopback port and relays every connection to a target. It can be
switched at any moment, for the connections it carries and the ones to come:

- ``"pass"``: relay both ways;
- ``"hang"``: accept, relay nothing, answer nothing (a link that black-holes packets, or a cloud
  that accepts and never answers); carried connections stall;
- ``"refuse"``: stop listening (connection refused) and drop carried connections (a cloud
  process that died, a link that resets).

Used by tests/test_site.py and tools/site_drill.py for the cloud's HTTP API and the site
broker's MQTT bridge; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

log = logging.getLogger(__name__)

Mode = Literal["pass", "hang", "refuse"]
_CHUNK = 65536


class TcpLink:
    """A relay from ``127.0.0.1:port`` to ``target_host:target_port`` (see the module docstring)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.mode: Mode = "pass"
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: Bytes relayed towards the target and back (for a drill's record).
        self.sent = self.received = 0

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> TcpLink:
        await self._listen()
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def set(self, mode: Mode) -> None:
        """Switch the link (see the module docstring)."""
        if mode == self.mode:
            return
        log.info("link :%d -> %s:%d: %s", self.port, *self.target, mode)
        previous, self.mode = self.mode, mode
        if mode == "pass":
            self._flowing.set()
            if previous == "refuse":
                await self._listen()
            return
        self._flowing.clear()
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            self._drop()

    def _drop(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            await self._flowing.wait()  # a connection made while the link hangs waits, silent
            if self.mode == "refuse":
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(up_writer)
            pipes = [asyncio.ensure_future(self._pipe(reader, up_writer, True)),
                     asyncio.ensure_future(self._pipe(up_reader, writer, False))]
            self._pipes.update(pipes)
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                    self._pipes.discard(pipe)
                self._writers.discard(up_writer)
                up_writer.transport.abort()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return
            await self._flowing.wait()  # what arrives while the link hangs is held, not delivered
            if self.mode == "refuse":
                return
            writer.write(data)
            await writer.drain()
            if upstream:
                self.sent += len(data)
            else:
                self.received += len(data)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._drop()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        self._pipes.clear()

    async def __aenter__(self) -> TcpLink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
