"""The OpenAI-compatible HTTP API (FastAPI + uvicorn): ``pice-cloud serve``.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``),
``GET /v1/models``, ``GET /health``, ``GET /metrics``. The official ``openai`` client works
against it unchanged; the ``pice`` request field picks the mode per request.

A progressive answer is streamed in point order, each point as soon as it and all before it
are settled: the streamed deltas concatenate to exactly the non-streamed text. A cloud-only
answer arrives as one delta when the cloud LLM finishes.

Admission is bounded: ``max_concurrent`` requests run, ``max_queue`` more wait (each at most
``queue_timeout_s``), and the rest are answered 429 with ``Retry-After`` at once, so overload
never piles up. A client that disconnects cancels its request's work (the sketch wait, the
expansions' bookkeeping, a queued cloud generation). On SIGTERM the server stops admitting
(503), lets in-flight requests finish for ``shutdown_timeout_s``, then ends those still running
with an error event or a 503, and publishes the cloud's offline status before it exits.

State lives on ``app.state.pice`` (an `ApiState`), built by `create_app`; nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pice_cloud.config import CloudConfig
from pice_cloud.errors import BackendError, CloudError
from pice_cloud.llm.base import LLMBackend, count_prompt_tokens, count_tokens
from pice_cloud.metrics import CONTENT_TYPE, Metrics
from pice_cloud.openai_schema import (
    APIError,
    ChatCompletionRequest,
    FinishReason,
    chunk,
    completion,
    conversation,
    error_body,
    models_list,
    parse_request,
    usage,
    usage_chunk,
)
from pice_cloud.service import AnswerEvent, AnswerStats, Event, PiceService, PointEvent, render_point
from pice_edge.errors import PiceError

log = logging.getLogger(__name__)


# --- admission ----------------------------------------------------------------------------------

class Admission:
    """A bounded gate: ``max_concurrent`` holders, ``max_queue`` waiters, everyone else refused.

    Slots are handed to waiters in arrival order. `drain` (shutdown) refuses newcomers and
    wakes every waiter with a refusal.
    """

    def __init__(self, max_concurrent: int, max_queue: int, *, queue_timeout_s: float, retry_after_s: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.active = 0
        self.draining = False
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def _refuse(self, status: int, message: str, code: str) -> APIError:
        return APIError(status, message, type="server_error" if status == 503 else "rate_limit_error", code=code,
                        headers={"Retry-After": str(self.retry_after_s)})

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if needed; raise `APIError` 429/503 when refused."""
        if self.draining:
            raise self._refuse(503, "the server is shutting down; retry on another instance", "shutting_down")
        if self.active < self.max_concurrent and not self.queued:
            self.active += 1
            return
        if self.queued >= self.max_queue:
            raise self._refuse(429, f"server overloaded: {self.active} requests running and {self.queued} waiting; "
                                    f"retry after {self.retry_after_s}s", "overloaded")
        slot: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await asyncio.wait({slot}, timeout=self.queue_timeout_s)
        except asyncio.CancelledError:
            if slot.done() and slot.result():
                self.release()  # handed a slot just as we were cancelled: pass it on
            slot.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(slot)
        if not slot.done():
            slot.cancel()
            raise self._refuse(503, f"no capacity within {self.queue_timeout_s:.0f}s; retry later", "queue_timeout")
        if not slot.result():
            raise self._refuse(503, "the server is shutting down; retry on another instance", "shutting_down")

    def release(self) -> None:
        """Give a slot back (to the longest waiter, if any)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self.active = max(0, self.active - 1)

    def drain(self) -> None:
        """Refuse new requests and every waiter (shutdown)."""
        self.draining = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)


# --- per-app state ------------------------------------------------------------------------------

@dataclass
class ApiState:
    """What the routes need; one per app, on ``app.state.pice``."""

    service: PiceService
    llm: LLMBackend
    config: CloudConfig
    admission: Admission
    metrics: Metrics
    #: Set when the shutdown grace period is over: requests still running end with an error.
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))
    #: Clean-up tasks of cancelled requests (strong references until they finish).
    background: set[asyncio.Future[None]] = field(default_factory=set)

    @property
    def model_ids(self) -> list[str]:
        ids = [self.config.server.model_name]
        if self.llm.model_id not in ids:
            ids.append(self.llm.model_id)
        return ids


async def _close(answer: AsyncGenerator[Event, None], tasks: list[asyncio.Future[Any]]) -> None:
    """Cancel a request's tasks, then close the service's generator (its cleanup runs)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await answer.aclose()


class _ClientGone(Exception):
    """The HTTP client disconnected."""


class _Aborted(Exception):
    """The shutdown grace period ended before the request did."""


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class _Job:
    """One admitted chat completion: runs the service and watches the client and the shutdown."""

    def __init__(self, state: ApiState, request: ChatCompletionRequest, http: Request) -> None:
        self.state = state
        self.request = request
        self.http = http
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.question, self.messages = conversation(request)
        self.started = time.perf_counter()
        self.mode = request.pice.mode
        self.first_content_s: float | None = None
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.state.admission.release()

    async def _watch_disconnect(self) -> None:
        # The body is read, so the next ASGI message is the disconnect (or the response's end).
        while True:
            message = await self.http.receive()
            if message["type"] == "http.disconnect":
                return

    async def events(self) -> AsyncGenerator[Event, None]:
        """The service's events; raises `_ClientGone` / `_Aborted`, closing the service's work."""
        answer = self.state.service.answer(self.question, mode=self.request.pice.mode,
                                           max_tokens=self.request.token_limit, messages=self.messages)
        watcher = asyncio.ensure_future(self._watch_disconnect())
        aborted = asyncio.ensure_future(self.state.aborted.wait())
        step: asyncio.Future[Event] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(answer))
                await asyncio.wait({step, watcher, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if watcher.done():
                    raise _ClientGone
                if aborted.done():
                    raise _Aborted
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                step = None
                yield event
        finally:
            # Cancelling the pending step ends the service's generator inside its await, which
            # runs its cleanup (supervisor cancelled, edges released, request closed).
            # The caller may itself be under cancellation (Starlette cancels the response when
            # the client goes, and anyio re-cancels every await in that scope): run the cleanup
            # as its own task, held by the state so it is not garbage-collected half-way.
            cleanup = asyncio.ensure_future(_close(answer, [t for t in (step, watcher, aborted) if t is not None]))
            self.state.background.add(cleanup)
            cleanup.add_done_callback(self.state.background.discard)
            await asyncio.shield(cleanup)

    def finish(self, final: AnswerEvent) -> tuple[FinishReason, dict[str, int], dict[str, Any]]:
        """finish_reason, usage and the ``pice`` extension of a finished answer; records metrics."""
        stats = final.stats
        limit = min(self.request.token_limit or self.state.service.settings.max_answer_tokens,
                    self.state.service.settings.max_answer_tokens)
        finish: FinishReason = "length" if stats.mode == "cloud" and stats.cloud_tokens >= limit else "stop"
        llm = self.state.llm
        # Cloud-only: the answer is exactly what the LLM generated, so its own count is exact. A
        # progressive answer adds headings to what the models wrote: count the text itself.
        completion_tokens = stats.cloud_tokens if stats.mode == "cloud" else count_tokens(llm, final.text)
        use = usage(count_prompt_tokens(llm, self.messages), completion_tokens, stats.cloud_tokens, stats.edge_tokens)
        self.record(stats, "ok")
        return finish, use, _pice_info(stats)

    def record(self, stats: AnswerStats | None, outcome: str) -> None:
        m = self.state.metrics
        mode = stats.mode if stats is not None else self.mode
        m.requests.labels(mode, outcome).inc()
        if stats is None or outcome != "ok":
            return
        m.latency.labels(mode).observe(time.perf_counter() - self.started)
        if self.first_content_s is not None:
            m.ttft.labels(mode).observe(self.first_content_s)
        m.points.labels("edge").inc(stats.points_edge)
        m.points.labels("cloud").inc(stats.points_cloud)
        m.tokens.labels("cloud").inc(stats.cloud_tokens)
        m.tokens.labels("edge").inc(stats.edge_tokens)

    def _content_started(self) -> None:
        if self.first_content_s is None:
            self.first_content_s = time.perf_counter() - self.started

    async def run(self) -> dict[str, Any]:
        """The whole answer as a ``chat.completion`` object."""
        final: AnswerEvent | None = None
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                if isinstance(event, AnswerEvent):
                    final = event
        if final is None:  # the service always ends with an AnswerEvent
            raise CloudError("the service ended without an answer")
        self._content_started()
        finish, use, info = self.finish(final)
        return completion(self.id, self.request.model, final.text, finish, use, info, self.created)

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """Server-sent events: the role, one delta per point (or the cloud answer), the finish."""
        model = self.request.model
        try:
            yield _sse(chunk(self.id, model, self.created, {"role": "assistant", "content": ""}))
            sent = 0
            final: AnswerEvent | None = None
            # aclosing: if our consumer stops (Starlette cancels the response when the client goes),
            # closing this generator must close the service's work now, not when GC gets to it.
            async with contextlib.aclosing(self.events()) as events:
                async for event in events:
                    if isinstance(event, PointEvent):
                        p = event.point
                        text = ("\n\n" if sent else "") + render_point(p.index, event.heading, p.text)
                    elif isinstance(event, AnswerEvent):
                        final = event
                        # A cloud-only answer arrives whole; a progressive one was streamed already.
                        text = event.text if event.stats.mode == "cloud" else ""
                    else:
                        continue
                    if text:
                        self._content_started()
                        sent += 1
                        yield _sse(chunk(self.id, model, self.created, {"content": text}))
            if final is None:
                raise CloudError("the service ended without an answer")
            finish, use, info = self.finish(final)
            yield _sse(chunk(self.id, model, self.created, {}, finish, pice=info))
            if self.request.stream_options is not None and self.request.stream_options.include_usage:
                yield _sse(usage_chunk(self.id, model, self.created, use))
            yield _sse("[DONE]")
        except _ClientGone:
            log.info("%s: client disconnected; request cancelled", self.id)
            self.record(None, "cancelled")
        except (asyncio.CancelledError, GeneratorExit):
            # The response was abandoned (client gone, seen by Starlette first; or shutdown).
            self.record(None, "cancelled")
            raise
        except Exception as exc:
            error = _api_error(exc)
            self.record(None, "error")
            yield _sse(error_body(error))
            yield _sse("[DONE]")
        finally:
            self.release()


def _pice_info(stats: AnswerStats) -> dict[str, Any]:
    return {"mode": stats.mode, "points_edge": stats.points_edge, "points_cloud": stats.points_cloud,
            "devices": stats.devices, "sketch_s": round(stats.sketch_s, 4),
            "first_point_s": round(stats.first_token_s, 4), "total_s": round(stats.total_s, 4)}


def _api_error(exc: BaseException) -> APIError:
    """Map an exception from answering a request to what the client is told."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, _Aborted):
        return APIError(503, "the server shut down before this request finished; retry", type="server_error",
                        code="shutting_down")
    if isinstance(exc, BackendError):
        log.warning("LLM backend failed: %s", exc)
        return APIError(502, f"the LLM backend failed: {exc}", type="server_error", code="backend_error")
    log.error("request failed", exc_info=exc)
    detail = str(exc) if isinstance(exc, PiceError) else type(exc).__name__
    return APIError(500, f"internal error while answering: {detail}", type="server_error", code="internal_error")


class _GuardedStream(StreamingResponse):
    """Releases the job's admission slot even when the stream never started (client gone early)."""

    def __init__(self, job: _Job) -> None:
        self._events = job.stream()
        super().__init__(self._events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette abandons the iterator when the client disconnects; close it (and with it
            # the request's work) now.
            try:
                await self._events.aclose()
            finally:
                self._job.release()


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)


# --- the app ------------------------------------------------------------------------------------

def create_app(service: PiceService, llm: LLMBackend, config: CloudConfig) -> FastAPI:
    """The FastAPI app serving ``service``; its state is on ``app.state.pice``."""
    server_cfg = config.server
    admission = Admission(server_cfg.max_concurrent, server_cfg.max_queue, queue_timeout_s=server_cfg.queue_timeout_s,
                          retry_after_s=server_cfg.retry_after_s)
    metrics = Metrics(service.transport.rejections, live_edges=lambda: len(service.fleet.live()),
                      queued=lambda: admission.queued, in_flight=lambda: admission.active)
    state = ApiState(service=service, llm=llm, config=config, admission=admission, metrics=metrics)
    app = FastAPI(title="PICE", description="Progressive inference across cloud and edge; OpenAI-compatible API",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pice = state
    api_key = server_cfg.api_key.get_secret_value() if server_cfg.api_key else None

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        code=code))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        try:
            req = await _parse(request, state)
        except APIError:
            metrics.requests.labels("unknown", "invalid").inc()
            raise
        try:
            await admission.acquire()
        except APIError:
            metrics.requests.labels(req.pice.mode, "rejected").inc()
            raise
        job = _Job(state, req, request)
        if req.stream:
            return _GuardedStream(job)
        try:
            return JSONResponse(await job.run())
        except _ClientGone:
            log.info("%s: client disconnected; request cancelled", job.id)
            job.record(None, "cancelled")
            return Response(status_code=499)
        except Exception as exc:
            job.record(None, "error")
            return _error_response(_api_error(exc))
        finally:
            job.release()

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(models_list(state.model_ids, state.created))

    @app.get("/health")
    async def health() -> JSONResponse:
        live = [e.device_id for e in service.fleet.live()]
        connected = service.transport.connected
        if admission.draining:
            status = "shutting_down"
        elif connected and live:
            status = "ok"
        else:
            status = "degraded"  # cloud-only answers still work
        body = {"status": status, "broker_connected": connected, "llm_loaded": True,
                "llm": {"backend": llm.name, "model": llm.model_id}, "live_edges": len(live), "edges": live,
                "in_flight": admission.active, "queued": admission.queued}
        return JSONResponse(body, status_code=503 if admission.draining else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _parse(request: Request, state: ApiState) -> ChatCompletionRequest:
    limit = state.config.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
    async def read() -> bytes:
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        return bytes(body)

    # A client that trickles its body (slow-loris) must not hold a connection and a task forever.
    wait = state.config.server.body_timeout_s
    try:
        body = await asyncio.wait_for(read(), timeout=wait)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {wait:g}s", code="request_timeout") from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    req = parse_request(data, max_tokens_limit=state.config.server.max_tokens_limit)
    if req.model not in state.model_ids:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                            f"{', '.join(repr(i) for i in state.model_ids)} (see GET /v1/models)",
                       param="model", code="model_not_found")
    return req


# --- running it ---------------------------------------------------------------------------------

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


def _llm_options(config: CloudConfig) -> dict[str, Any]:
    llm = config.llm
    if llm.kind == "transformers":
        return {"device": llm.device, "dtype": llm.dtype, "threads": llm.threads}
    if llm.kind == "openai":
        return {"url": llm.url, "api_key": llm.api_key.get_secret_value() if llm.api_key else None,
                "timeout_s": llm.timeout_s, "max_parallel": llm.max_parallel,
                "continue_final_message": llm.continue_final_message}
    return {}


async def serve(config: CloudConfig, *, on_ready: Callable[[str], None] | None = None,
                handle_signals: bool = True, log_level: str = "warning") -> None:
    """Run `pice-cloud serve`: the LLM, the broker (embedded unless configured), the local
    edges, the service and the HTTP API, until SIGTERM/SIGINT; then shut down gracefully.

    Raises:
        PiceError: the model, broker or address could not be set up (clear message).
    """
    from pice_cloud.assembly import build_router, build_selector
    from pice_cloud.llm import create_backend
    from pice_cloud.local import local_system

    sock = bind(config.server.host, config.server.port)
    url = url_of(sock)
    llm: LLMBackend | None = None
    discovery: Any = None
    try:
        llm = create_backend(config.llm.kind, model=config.llm.model, **_llm_options(config))
        router = await asyncio.to_thread(build_router, config.service.router)
        selector = await asyncio.to_thread(build_selector, config.service.selector, llm,
                                           config.service.ensemble_width)
        async with local_system(
            llm, broker_settings=config.broker, edges=config.local_edges, edge_model=config.edge_model,
            edge_runtime=config.edges.runtime, edge_threads=config.edges.threads, max_batch=config.edges.max_batch,
            settings=config.service.to_settings(), wait_edges_s=config.edges.wait_s, cloud_id=config.cloud_id,
            api_url=url + "/v1", router=router,
        ) as system:
            system.service.selector = selector
            discovery = await _advertise(config, system.service, system.broker_url, url + "/v1")
            app = create_app(system.service, llm, config)
            server = ApiServer(app, handle_signals=handle_signals, log_level=log_level)
            task = asyncio.create_task(server.run_on(sock))
            listening = asyncio.ensure_future(server.listening.wait())
            await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
            listening.cancel()
            if server.listening.is_set():
                live = [e.device_id for e in system.service.fleet.live()]
                log.warning("serving %s (LLM %s/%s) at %s/v1; broker %s; edges: %s", config.server.model_name,
                            llm.name, llm.model_id, url, system.broker_url, ", ".join(live) or "none")
                if on_ready is not None:
                    on_ready(url)
            await task
            log.warning("HTTP server stopped; publishing offline status")
    finally:
        sock.close()
        if discovery is not None:
            await discovery.close()
        if llm is not None:
            await llm.close()


async def _advertise(config: CloudConfig, service: PiceService, broker_url: str, api_url: str) -> Any:
    """Advertise the cloud and its broker on zeroconf and watch for edges (``discovery``)."""
    disc = config.discovery
    if not disc.enabled:
        return None
    from pice_edge.discovery import CloudAdvert, Discovery, parse_interfaces

    interfaces = disc.interfaces
    if interfaces == "auto":
        # Advertise where we serve: a loopback-only service stays off the LAN.
        interfaces = "127.0.0.1" if config.server.host.startswith("127.") or config.server.host == "localhost" \
            else "all"
    discovery = Discovery(parse_interfaces(interfaces))
    try:
        await discovery.start()
        await discovery.advertise_cloud(CloudAdvert(cloud_id=config.cloud_id, broker_url=broker_url,
                                                    fleet=disc.fleet, api_url=api_url))
        service.fleet.watch_zeroconf(discovery, disc.fleet)
    except Exception as exc:
        # Discovery is a convenience: edges can always be given --broker.
        log.warning("zeroconf advertisement failed (%s); edges need --broker %s", exc, broker_url)
        await discovery.close()
        return None
    log.info("advertised cloud %s (broker %s) on zeroconf, fleet %s", config.cloud_id, broker_url, disc.fleet)
    return discovery


def install_sigterm_as_exit() -> None:
    """Outside the server's life (model loading), make SIGTERM end the process like Ctrl-C."""
    def _raise(sig: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
