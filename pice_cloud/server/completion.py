"""One admitted request (`Job`: a chat completion, `ChatJob`, or a legacy text completion,
`TextJob`): runs the service's event stream for it, watches the client and the shutdown, and
serialises the answer as one object or as server-sent events; `api_error` maps what answering
raised to the client's error.

A progressive answer is streamed in point order, each point as soon as it and all before it
are settled: the streamed deltas concatenate to exactly the non-streamed text. A client that
disconnects cancels its request's work; past the shutdown grace period a request still running
ends with an error event or a 503.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from pice_cloud.errors import BackendError, CloudError, InputTooLongError, UnavailableInModeError
from pice_cloud.events import AnswerEvent, AnswerStats, DeltaEvent, Event, GenerationOptions, PointEvent, render_point
from pice_cloud.llm.base import count_prompt_tokens, count_tokens
from pice_cloud.openai_schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    FinishReason,
    chunk,
    completion,
    conversation,
    error_body,
    logprobs_content,
    sse,
    text_chunk,
    text_completion,
    usage,
    usage_chunk,
)
from pice_cloud.server.state import ApiState
from pice_edge.errors import PiceError
from pice_edge.runtimes.base import ChatMessage

log = logging.getLogger(__name__)


async def _close(answer: AsyncGenerator[Event, None], tasks: list[asyncio.Future[Any]]) -> None:
    """Cancel a request's tasks, then close the service's generator (its cleanup runs)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await answer.aclose()


class ClientGone(Exception):
    """The HTTP client disconnected."""


class _Aborted(Exception):
    """The shutdown grace period ended before the request did."""


#: The request a job answers: a chat completion, or a legacy text completion.
RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)


class Job(abc.ABC, Generic[RequestT]):
    """One admitted request: runs the service's answer for it, watches the client and the
    shutdown, and serialises the answer (whole, or as server-sent events). Subclasses say which
    answer to open and how its objects look (`ChatJob`, `TextJob`).

    Args:
        question: what the service answers (the sketch's question).
        messages: the conversation, for a cloud-only answer (empty: ``question`` alone).
        mode: the mode asked for, recorded in metrics until the service says which it chose.
    """

    #: Prefix of the response's id (OpenAI's: ``chatcmpl-`` for chat, ``cmpl-`` for text).
    id_prefix: ClassVar[str]

    def __init__(self, state: ApiState, request: RequestT, http: Request, *, question: str,
                 messages: list[ChatMessage], mode: str) -> None:
        self.state = state
        self.request: RequestT = request
        self.http = http
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.question, self.messages = question, messages
        self.started = time.perf_counter()
        self.mode = mode
        self.first_content_s: float | None = None
        self._released = False
        #: OpenAI's logprobs object of the answer, once known (asked-for, cloud-only answers).
        self._logprobs: dict[str, Any] | None = None

    @abc.abstractmethod
    def _open_answer(self) -> AsyncGenerator[Event, None]:
        """The service's event stream for this request."""

    @abc.abstractmethod
    def _prompt_tokens(self) -> int:
        """The request's prompt in the cloud model's tokens (usage)."""

    @abc.abstractmethod
    def _whole(self, text: str, finish: FinishReason, use: dict[str, int], info: dict[str, Any]) -> dict[str, Any]:
        """The whole answer as one response object."""

    @abc.abstractmethod
    def _opening_chunks(self) -> list[dict[str, Any]]:
        """What a stream starts with, before any text."""

    @abc.abstractmethod
    def _delta(self, text: str) -> dict[str, Any]:
        """One streamed piece of the answer."""

    @abc.abstractmethod
    def _closing_chunk(self, finish: FinishReason, info: dict[str, Any]) -> dict[str, Any]:
        """The stream's last chunk: the finish reason and the ``pice`` extension."""

    @abc.abstractmethod
    def _usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        """The usage chunk (``stream_options.include_usage``)."""

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
        """The service's events; raises `ClientGone` / `_Aborted`, closing the service's work."""
        answer = self._open_answer()
        watcher = asyncio.ensure_future(self._watch_disconnect())
        aborted = asyncio.ensure_future(self.state.aborted.wait())
        step: asyncio.Future[Event] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(answer))
                await asyncio.wait({step, watcher, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if watcher.done():
                    raise ClientGone
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
        limit = self.state.answer_tokens(self.request.token_limit)
        cut_by_limit = (stats.mode == "cloud" and stats.cloud_tokens >= limit and not stats.stopped) \
            or stats.length_capped
        finish: FinishReason = "length" if cut_by_limit else "stop"
        llm = self.state.llm
        # Cloud-only: the answer is exactly what the LLM generated, so its own count is exact. A
        # progressive answer adds headings to what the models wrote, and a stop string cuts what
        # was generated: count the text itself.
        exact = stats.mode == "cloud" and not stats.stopped
        completion_tokens = stats.cloud_tokens if exact else count_tokens(llm, final.text)
        use = usage(self._prompt_tokens(), completion_tokens, stats.cloud_tokens, stats.edge_tokens)
        self.record(stats, "ok")
        return finish, use, _pice_info(stats, self.state.served_by(stats))

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
        if final.logprobs is not None:
            self._logprobs = logprobs_content(final.logprobs)
        self._content_started()
        finish, use, info = self.finish(final)
        return self._whole(final.text, finish, use, info)

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """Server-sent events: the role, one delta per point (or the cloud answer), the finish."""
        try:
            for opening in self._opening_chunks():
                yield sse(opening)
            sent = 0
            final: AnswerEvent | None = None
            # aclosing: if our consumer stops (Starlette cancels the response when the client goes),
            # closing this generator must close the service's work now, not when GC gets to it.
            async with contextlib.aclosing(self.events()) as events:
                async for event in events:
                    if isinstance(event, DeltaEvent):
                        text = event.text
                    elif isinstance(event, PointEvent):
                        p = event.point
                        text = "" if event.streamed else ("\n\n" if sent else "") + render_point(p.index, event.heading,
                                                                                                  p.text)
                    elif isinstance(event, AnswerEvent):
                        final = event
                        if event.logprobs is not None:
                            self._logprobs = logprobs_content(event.logprobs)
                        # A cloud-only answer from a backend that cannot stream arrives whole here;
                        # otherwise its pieces (or a progressive answer's points) went out already.
                        text = event.text if event.stats.mode == "cloud" and not sent else ""
                    else:
                        continue
                    if text:
                        self._content_started()
                        sent += 1
                        yield sse(self._delta(text))
            if final is None:
                raise CloudError("the service ended without an answer")
            finish, use, info = self.finish(final)
            yield sse(self._closing_chunk(finish, info))
            if self.request.stream_options is not None and self.request.stream_options.include_usage:
                yield sse(self._usage_chunk(use))
            yield sse("[DONE]")
        except ClientGone:
            log.info("%s: client disconnected; request cancelled", self.id)
            self.record(None, "cancelled")
        except (asyncio.CancelledError, GeneratorExit):
            # The response was abandoned (client gone, seen by Starlette first; or shutdown).
            self.record(None, "cancelled")
            raise
        except Exception as exc:
            error = api_error(exc)
            self.record(None, "error")
            yield sse(error_body(error))
            yield sse("[DONE]")
        finally:
            self.release()


def _pice_info(stats: AnswerStats, served_by: str) -> dict[str, Any]:
    return {"served_by": served_by, "mode": stats.mode, "points_edge": stats.points_edge,
            "points_cloud": stats.points_cloud, "devices": stats.devices, "sketch_s": round(stats.sketch_s, 4),
            "schedule_s": round(stats.schedule_s, 6),
            "first_content_s": round(stats.first_token_s, 4), "first_point_s": round(stats.first_text_s, 4),
            "total_s": round(stats.total_s, 4),
            "route_probability": None if stats.route_probability is None else round(stats.route_probability, 4),
            "sketch_rejected": stats.sketch_rejected, "sketch_repaired": stats.sketch_repaired,
            "cloud_work": stats.cloud_work.as_dict()}


def api_error(exc: BaseException) -> APIError:
    """Map an exception from answering a request to what the client is told."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, _Aborted):
        return APIError(503, "the server shut down before this request finished; retry", type="server_error",
                        code="shutting_down")
    if isinstance(exc, InputTooLongError):
        return APIError(400, str(exc), param="messages", code="question_too_long")
    if isinstance(exc, UnavailableInModeError):
        return APIError(400, str(exc), code="unsupported_parameter")
    if isinstance(exc, BackendError):
        log.warning("LLM backend failed: %s", exc)
        return APIError(502, f"the LLM backend failed: {exc}", type="server_error", code="backend_error")
    log.error("request failed", exc_info=exc)
    detail = str(exc) if isinstance(exc, PiceError) else type(exc).__name__
    return APIError(500, f"internal error while answering: {detail}", type="server_error", code="internal_error")


class GuardedStream(StreamingResponse):
    """Releases the job's admission slot even when the stream never started (client gone early)."""

    def __init__(self, job: Job[Any]) -> None:
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


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)


class ChatJob(Job[ChatCompletionRequest]):
    """One admitted chat completion (``POST /v1/chat/completions``): the service's answer to the
    conversation, in the mode asked for, as one ``chat.completion`` or as its chunks."""

    id_prefix = "chatcmpl-"

    def __init__(self, state: ApiState, request: ChatCompletionRequest, http: Request) -> None:
        question, messages = conversation(request)
        super().__init__(state, request, http, question=question, messages=messages, mode=request.pice.mode)

    def _open_answer(self) -> AsyncGenerator[Event, None]:
        """The service's event stream for this request."""
        req = self.request
        options = GenerationOptions(temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                    stop=req.stop_strings, logprobs=req.logprob_alternatives)
        return self.state.service.answer(self.question, mode=req.pice.mode, max_tokens=req.token_limit,
                                         messages=self.messages, options=options)

    def _prompt_tokens(self) -> int:
        return count_prompt_tokens(self.state.llm, self.messages)

    def _whole(self, text: str, finish: FinishReason, use: dict[str, int], info: dict[str, Any]) -> dict[str, Any]:
        return completion(self.id, self.request.model, text, finish, use, info, self.created, self._logprobs)

    def _opening_chunks(self) -> list[dict[str, Any]]:
        return [chunk(self.id, self.request.model, self.created, {"role": "assistant", "content": ""})]

    def _delta(self, text: str) -> dict[str, Any]:
        return chunk(self.id, self.request.model, self.created, {"content": text}, logprobs=self._logprobs)

    def _closing_chunk(self, finish: FinishReason, info: dict[str, Any]) -> dict[str, Any]:
        return chunk(self.id, self.request.model, self.created, {}, finish, pice=info)

    def _usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return usage_chunk(self.id, self.request.model, self.created, use)


class TextJob(Job[CompletionRequest]):
    """One admitted legacy completion (``POST /v1/completions``): the prompt continued by the
    cloud LLM as it is, as one ``text_completion`` or as server-sent events."""

    id_prefix = "cmpl-"

    def __init__(self, state: ApiState, request: CompletionRequest, http: Request) -> None:
        super().__init__(state, request, http, question=request.text, messages=[], mode="cloud")

    def _open_answer(self) -> AsyncGenerator[Event, None]:
        req = self.request
        options = GenerationOptions(temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                    stop=req.stop_strings)
        return self.state.service.complete_text(req.text, max_tokens=req.max_tokens, options=options)

    def _prompt_tokens(self) -> int:
        return count_tokens(self.state.llm, self.request.text)

    def _whole(self, text: str, finish: FinishReason, use: dict[str, int], info: dict[str, Any]) -> dict[str, Any]:
        return text_completion(self.id, self.request.model, text, finish, use, info, self.created)

    def _opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def _delta(self, text: str) -> dict[str, Any]:
        return text_chunk(self.id, self.request.model, self.created, text)

    def _closing_chunk(self, finish: FinishReason, info: dict[str, Any]) -> dict[str, Any]:
        return text_chunk(self.id, self.request.model, self.created, "", finish, pice=info)

    def _usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.request.model, "choices": [], "usage": use}
