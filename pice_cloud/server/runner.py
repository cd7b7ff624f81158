"""Running the API: the listening socket, uvicorn with PICE's graceful shutdown, and
`serve` (the whole of ``pice-cloud serve``: the system from `pice_cloud.bootstrap`, the app,
the server, until SIGTERM/SIGINT).

On SIGTERM the server stops admitting (503), lets in-flight requests finish for
``shutdown_timeout_s``, then ends those still running with an error event or a 503, and
publishes the cloud's offline status before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from pice_cloud.bootstrap import start_system
from pice_cloud.config import CloudConfig
from pice_cloud.errors import CloudError
from pice_cloud.server.app import create_app
from pice_cloud.server.state import ApiState

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port); `CloudError` when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CloudError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or "
                         "stop what uses it") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


class ApiServer(uvicorn.Server):
    """uvicorn serving an app built by `create_app`, with PICE's graceful shutdown.

    The first SIGTERM/SIGINT drains admission at once and ends the requests still running after
    ``shutdown_timeout_s``. ``handle_signals=False`` leaves signals alone (tests, embedding).
    """

    def __init__(self, app: FastAPI, *, handle_signals: bool = True, log_level: str = "warning") -> None:
        self.state: ApiState = app.state.pice
        timeout = self.state.config.server.shutdown_timeout_s
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=int(timeout) + 5, timeout_keep_alive=5)
        super().__init__(config)
        self._handle_signals = handle_signals
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self._handle_signals:
            yield
            return
        with super().capture_signals():
            yield

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two steps of the event loop (signal.signal).
        self.begin_shutdown()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its shutdown; we exit normally instead.
        self._captured_signals.clear()

    def begin_shutdown(self) -> None:
        """Stop admitting; in-flight requests get ``shutdown_timeout_s`` to finish."""
        if self._draining:
            return
        self._draining = True
        state = self.state
        log.warning("shutting down: refusing new requests, %d in flight get %.0fs to finish",
                    state.admission.active, state.config.server.shutdown_timeout_s)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        assert self._loop is not None
        self.state.admission.drain()
        self._abort_timer = self._loop.call_later(self.state.config.server.shutdown_timeout_s, self.state.aborted.set)

    async def run_on(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until shut down."""
        self._loop = asyncio.get_running_loop()
        try:
            await self.serve(sockets=[sock])
        finally:
            if self._abort_timer is not None:
                self._abort_timer.cancel()


@contextlib.asynccontextmanager
async def running(app: FastAPI, sock: socket.socket, *, handle_signals: bool = False) -> AsyncIterator[ApiServer]:
    """Serve ``app`` on ``sock`` in a task of this loop until the block ends (tests, embedding)."""
    server = ApiServer(app, handle_signals=handle_signals)
    task = asyncio.create_task(server.run_on(sock))
    listening = asyncio.ensure_future(server.listening.wait())
    await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
    listening.cancel()
    if task.done():
        task.result()
        raise CloudError("the HTTP server stopped during start-up")
    try:
        yield server
    finally:
        server.begin_shutdown()
        server.should_exit = True
        await task


async def serve(config: CloudConfig, *, on_ready: Callable[[str], None] | None = None,
                handle_signals: bool = True, log_level: str = "warning") -> None:
    """Run `pice-cloud serve`: the system ``config`` describes (`pice_cloud.bootstrap`) behind
    the HTTP API, until SIGTERM/SIGINT; then shut down gracefully.

    Raises:
        CloudIdClashError: another live replica holds this replica's cloud_id (at start, or
            found while serving: this process started later and gave way).
        PiceError: the model, broker or address could not be set up (clear message).
    """
    sock = bind(config.server.host, config.server.port)
    url = url_of(sock)
    try:
        async with start_system(config, api_url=url + "/v1") as system, contextlib.AsyncExitStack() as roles:
            app = create_app(system.service, system.llm, config)
            if config.site is not None:
                # A site's front door: forward to the cloud while it answers (`pice_cloud.site`).
                from pice_cloud.site import site_role

                await roles.enter_async_context(site_role(app, system))
            server = ApiServer(app, handle_signals=handle_signals, log_level=log_level)
            task = asyncio.create_task(server.run_on(sock))
            listening = asyncio.ensure_future(server.listening.wait())
            await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
            listening.cancel()
            if server.listening.is_set():
                live = [e.device_id for e in system.service.fleet.live()]
                log.warning("serving %s (LLM %s/%s) at %s/v1; broker %s; edges: %s", config.server.model_name,
                            system.llm.name, system.llm.model_id, url, system.broker_url, ", ".join(live) or "none")
                if on_ready is not None:
                    on_ready(url)
            # Until the server stops (SIGTERM), or this process gives its cloud_id up to another
            # replica that holds it (`pice_cloud.replica`): then it drains and exits with the clash.
            claim = system.claim
            lost = asyncio.ensure_future(claim.lost_event.wait()) if claim is not None else None
            await asyncio.wait({task, *([lost] if lost else [])}, return_when=asyncio.FIRST_COMPLETED)
            if lost is not None and not lost.done():
                lost.cancel()
            elif lost is not None:
                server.begin_shutdown()
                server.should_exit = True
            await task
            if claim is not None and claim.lost is not None:
                raise claim.lost
            log.warning("HTTP server stopped; publishing offline status")
    finally:
        sock.close()


def install_sigterm_as_exit() -> None:
    """Outside the server's life (model loading), make SIGTERM end the process like Ctrl-C."""
    def _raise(sig: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
