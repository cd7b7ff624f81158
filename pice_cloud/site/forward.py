"""The site's front door: completions go to the cloud while it answers, to the site's own PICE
service while it does not, and each request is answered exactly once.

`SiteForwarder` is ASGI middleware around the site's own app (`pice_cloud.server.create_app`
on the site's LLM and broker). For ``POST /v1/chat/completions`` and ``/v1/completions`` while
`Uplink.route` is ``"cloud"`` it forwards the request body to the cloud and relays the answer.
Everything else (``/health``, ``/metrics``, ``/v1/models``, and every request while the route
is ``"site"``) is the site app's.

What happens when the cloud fails a forwarded request depends on what the client has seen:

- **Nothing yet** (connection refused or slow, no response, a 429/5xx, a non-streamed answer
  that never came, a stream that broke before its first text): the same request is answered by
  the site app, as if it had come in while the route was ``"site"``. The client sees one answer.
- **Part of a streamed answer**: the site's LLM continues the text the client already has
  (its prefill), streamed as it is written, and the stream ends normally,
  ``pice.served_by = "cloud+site"``. Nothing is sent twice and nothing is lost.

A forwarded request gives up on the cloud when the uplink goes down (`Uplink.down`, set by the
probes or another request's failure), when the connection takes ``connect_timeout_s``, when a
stream is silent for ``idle_timeout_s``, or after ``request_timeout_s``. Only a failure that says
the cloud is gone (refused, reset, a connection closed mid-answer, 502/503/504) takes the site off
the cloud for every request at once; a slow or failed answer is that request's own (it is
answered here) and the probes judge whether the cloud still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pice_cloud.cloud_meter import CloudMeter
from pice_cloud.config import CloudConfig
from pice_cloud.errors import CloudError
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend, TextRequest, count_tokens
from pice_cloud.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    FinishReason,
    chunk,
    conversation,
    sse,
    stop_strings,
    text_chunk,
    usage,
    usage_chunk,
)
from pice_cloud.server.admission import Admission
from pice_cloud.site.uplink import Uplink

log = logging.getLogger(__name__)

#: The routes forwarded to the cloud while it answers.
FORWARDED = frozenset({"/v1/chat/completions", "/v1/completions"})
#: Cloud answers that send this request to the site instead: the cloud is busy or failing (429,
#: 5xx), or refuses the site itself (401, 403: a wrong ``site.cloud_api_key``; 404: a wrong
#: ``site.cloud_url``), which the site's own client could not have caused or fixed.
ANSWER_HERE = frozenset({401, 403, 404, 429, 500, 502, 503, 504})
#: Of those, the ones that mean the cloud itself is gone (a 503 only when it is shutting down:
#: a busy cloud's queue timeout is a 503 too).
UNWELL = frozenset({502, 504})
#: A request that has passed through a site carries this header: a site never forwards it again
#: (two sites that took each other for the cloud would pass a request back and forth).
SITE_HEADER = "x-pice-site"
#: Where an answer came from (``pice.served_by``; the site app's own say "site" or "device").
ServedBy = Literal["cloud", "cloud+site"]

T = TypeVar("T")


class _GiveUp(Exception):
    """The cloud will not answer this request; the message says why (control flow only: the
    request is then answered on the site)."""

    def __init__(self, reason: str, *, unwell: bool = True) -> None:
        super().__init__(reason)
        self.unwell = unwell


@dataclass
class _Stream:
    """What the client has been sent of a forwarded stream."""

    text: str = ""
    started: bool = False
    finished: FinishReason | None = None
    done: bool = False
    #: id, model and created of the cloud's chunks (a continuation keeps them).
    ident: dict[str, Any] = field(default_factory=dict)


def _events(buffer: bytearray) -> list[bytes]:
    """Complete server-sent events taken off the front of ``buffer`` (each with its separator)."""
    out: list[bytes] = []
    while True:
        cut = [(i, n) for sep, n in ((b"\n\n", 2), (b"\r\n\r\n", 4)) if (i := buffer.find(sep)) >= 0]
        if not cut:
            return out
        i, n = min(cut)
        out.append(bytes(buffer[: i + n]))
        del buffer[: i + n]


def _data(event: bytes) -> str:
    return "\n".join(line[5:].strip() for line in event.decode("utf-8", "replace").splitlines()
                     if line.startswith("data:"))


class SiteForwarder:
    """ASGI middleware: forward completions to the cloud while `uplink` says so (see the module
    docstring); ``app`` answers the rest.

    Args:
        app: the site's own app (answers on the site).
        uplink: where requests go, and the HTTP client to the cloud.
        llm: the site's LLM (continues a cloud stream that broke half-way).
        config: the site's configuration (API key, body limit, the ``site`` section).
        admission: the site app's admission: a continuation is the site LLM's work like any
            other answer, and takes a slot.
        meter: the site LLM's meter: a continuation is on its ledger (``/metrics``).
        count: called with where each completion was sent: cloud, site or cloud+site (metrics).
        draining: whether the server is shutting down (nothing new is forwarded then).
    """

    def __init__(self, app: ASGIApp, *, uplink: Uplink, llm: LLMBackend, config: CloudConfig, admission: Admission,
                 meter: CloudMeter, count: Callable[[str], None] | None = None,
                 draining: Callable[[], bool] | None = None) -> None:
        assert config.site is not None
        self.app, self.uplink, self.llm, self.config = app, uplink, llm, config
        self._admission, self._meter = admission, meter
        self.site = config.site
        self._count = count or (lambda _: None)
        self._draining = draining or (lambda: False)
        key = config.server.api_key
        self._api_key = key.get_secret_value() if key else None
        cloud_key = self.site.cloud_api_key
        self._cloud_auth = f"Bearer {cloud_key.get_secret_value()}" if cloud_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in FORWARDED:
            await self.app(scope, receive, send)
            return
        if (self.uplink.route != "cloud" or self.uplink.cloud_url is None or self._draining()
                or not self._authorized(scope) or any(k == SITE_HEADER.encode() for k, _ in scope["headers"])):
            self._count("site")
            await self.app(scope, receive, send)
            return
        body, whole = await self._read_body(receive)
        replay = _replay(body, whole, receive)
        if not whole:  # too large, or the client went: the site app says so properly
            await self.app(scope, replay, send)
            return
        try:
            request = json.loads(body)
            stream = bool(request.get("stream")) if isinstance(request, dict) else False
        except ValueError:
            await self.app(scope, replay, send)  # the site app answers the 400
            return
        if not isinstance(request, dict):
            await self.app(scope, replay, send)
            return
        try:
            served = await self._forward(scope, body, request, stream, receive, send)
        except _GiveUp as exc:
            if exc.unwell:
                self.uplink.report_failure(str(exc))
            log.warning("site: %s %s answered on the site: %s", scope["method"], scope["path"], exc)
            self._count("site")
            await self.app(scope, replay, send)
            return
        self._count(served)

    def _authorized(self, scope: Scope) -> bool:
        """The site's own API key, checked before anything leaves for the cloud (the site app
        answers the 401)."""
        if self._api_key is None:
            return True
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, f"Bearer {self._api_key}".encode("latin-1"))

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        """The request body and whether it is whole: reading stops past ``server.max_body_bytes``
        (the site app reads the rest and refuses it) or when the client goes."""
        limit = self.config.server.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), False
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"".join(chunks), False
            if not message.get("more_body", False):
                return b"".join(chunks), True

    def _headers(self, scope: Scope) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if self._cloud_auth and self.uplink.url_configured:
            # The key goes only to the configured cloud, never to one found on zeroconf.
            headers["authorization"] = self._cloud_auth
        for name, value in scope["headers"]:
            if name in (b"x-request-id", b"user-agent"):
                headers[name.decode("latin-1")] = value.decode("latin-1")
        headers[SITE_HEADER] = self.site.name
        return headers

    async def _race(self, work: Awaitable[T], timeout: float, what: str) -> T:
        """``work``, unless the uplink goes down or ``timeout`` passes first (`_GiveUp`)."""
        task: asyncio.Future[T] = asyncio.ensure_future(work)
        down: asyncio.Future[Any] = asyncio.ensure_future(self.uplink.down.wait())
        try:
            finished, _ = await asyncio.wait([task, down], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request was cancelled (client gone, shutdown): so is its work
            task.cancel()
            raise
        finally:
            down.cancel()
        if task in finished:
            return task.result()
        task.cancel()
        await asyncio.wait([task])  # let it unwind; its outcome no longer matters
        if finished:
            raise _GiveUp(f"the uplink went down while waiting for {what}", unwell=False)
        # Slow is not gone: the probes judge whether the cloud still answers.
        raise _GiveUp(f"no {what} from the cloud within {timeout:g}s", unwell=False)

    async def _forward(self, scope: Scope, body: bytes, request: dict[str, Any], stream: bool,
                       receive: Receive, send: Send) -> ServedBy:
        url = f"{self.uplink.cloud_url}{scope['path']}"
        timeout = httpx.Timeout(self.site.request_timeout_s, connect=self.site.connect_timeout_s)
        started = time.monotonic()
        try:
            upstream = self.uplink.client.build_request("POST", url, content=body, headers=self._headers(scope),
                                                        timeout=timeout)
            response = await self._race(self.uplink.client.send(upstream, stream=True),
                                        self.site.request_timeout_s, "response")
        except _GiveUp:
            raise
        except Exception as exc:  # refused, reset, a bad URL: nothing reached the client
            raise _GiveUp(f"{url}: {type(exc).__name__}: {exc}", unwell=_gone(exc)) from exc
        try:
            if response.status_code in ANSWER_HERE:
                await self._refused(response)
            if response.status_code != 200 or not stream:
                left = self.site.request_timeout_s - (time.monotonic() - started)
                try:
                    content = await self._race(response.aread(), max(left, 0.001), "answer")
                except _GiveUp:
                    raise
                except Exception as exc:
                    raise _GiveUp(f"the cloud's answer broke off: {type(exc).__name__}: {exc}",
                                  unwell=_gone(exc)) from exc
                await _send_whole(send, response.status_code, _tagged(content, response.status_code),
                                  response.headers.get("content-type", "application/json"))
                return "cloud"
            return await self._relay(response, scope, request, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await response.aclose()

    async def _refused(self, response: httpx.Response) -> None:
        """A 401/403/404/429/5xx from the cloud: this request is answered on the site.

        Raises:
            _GiveUp: always; ``unwell`` when the answer says the cloud is going (502, 504, a 503
                ``shutting_down``).
        """
        status = response.status_code
        code = ""
        with contextlib.suppress(Exception):
            body = json.loads(await response.aread())
            code = str(body.get("error", {}).get("code") or "") if isinstance(body, dict) else ""
        if status in (401, 403, 404):
            log.error("site: the cloud answered %d (%s) to a forwarded request: check site.cloud_url and "
                      "site.cloud_api_key; answering on the site", status, code or "no code")
        raise _GiveUp(f"the cloud answered {status}{f' ({code})' if code else ''}",
                      unwell=status in UNWELL or (status == 503 and code == "shutting_down"))

    async def _relay(self, response: httpx.Response, scope: Scope, request: dict[str, Any], receive: Receive,
                     send: Send) -> ServedBy:
        """Relay a streamed answer event by event; finish it here if the cloud stops half-way.

        Raises:
            _GiveUp: the cloud failed before any text reached the client (the site answers all of it).
        """
        sent = _Stream()
        held: list[bytes] = []  # opening chunks, held until the first text: a failure before it is invisible
        buffer = bytearray()
        chunks = response.aiter_bytes()
        gone = asyncio.ensure_future(_disconnected(receive))
        failure: str | None = None
        unwell = False  # whether the failure says the cloud is gone (not just slow or failing one answer)
        try:
            while not sent.done:
                if gone.done():
                    log.info("site: client disconnected; forwarded request cancelled")
                    return "cloud"
                try:
                    piece = await self._race(anext(chunks), self.site.idle_timeout_s, "stream data")
                except StopAsyncIteration:
                    failure, unwell = "the cloud's stream ended before [DONE]", True
                    break
                except _GiveUp as exc:
                    failure = str(exc)
                    break
                except Exception as exc:  # a broken connection, or anything else: the answer must not be lost
                    failure, unwell = f"the cloud's stream broke: {type(exc).__name__}: {exc}", _gone(exc)
                    break
                buffer.extend(piece)
                for event in _events(buffer):
                    problem = self._take(event, sent)
                    if problem is not None:
                        failure = problem
                        break
                    if not sent.started:
                        held.append(event)
                        if sent.text or sent.finished:
                            await _start_stream(send)
                            sent.started = True
                            for e in held:
                                await send({"type": "http.response.body", "body": e, "more_body": True})
                            held.clear()
                    else:
                        await send({"type": "http.response.body", "body": event, "more_body": True})
                if failure is not None:
                    break
        finally:
            gone.cancel()
        if sent.done:
            if not sent.started:  # an answer without text: what was held goes out now
                await _start_stream(send)
                for e in held:
                    await send({"type": "http.response.body", "body": e, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return "cloud"
        if gone.done() and not gone.cancelled():
            return "cloud"  # the client left: nothing to finish
        assert failure is not None
        if not sent.started:
            raise _GiveUp(failure, unwell=unwell)
        if unwell:
            self.uplink.report_failure(failure)
        log.warning("site: the cloud stopped half-way through a stream (%s); finishing it on the site", failure)
        await self._continue(scope["path"], request, sent, send)
        return "cloud+site"

    @staticmethod
    def _take(event: bytes, sent: _Stream) -> str | None:
        """Note what ``event`` tells the client; returns a failure when it is an error event."""
        data = _data(event)
        if not data:
            return None
        if data == "[DONE]":
            sent.done = True
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            return "the cloud sent an unreadable event"
        if not isinstance(payload, dict):
            return "the cloud sent an unreadable event"
        if "error" in payload:
            message = payload["error"].get("message") if isinstance(payload["error"], dict) else payload["error"]
            return f"the cloud's stream ended with an error: {message}"
        for key in ("id", "model", "created"):
            if key in payload:
                sent.ident[key] = payload[key]
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str):
                sent.text += text
            if choice.get("finish_reason"):
                sent.finished = choice["finish_reason"]
        return None

    async def _continue(self, path: str, request: dict[str, Any], sent: _Stream, send: Send) -> None:
        """End a broken stream: the rest of the answer from the site's LLM, after what was sent."""
        ident = {"request_id": sent.ident.get("id", "chatcmpl-site"), "model": sent.ident.get("model", "pice"),
                 "created": int(sent.ident.get("created", time.time()))}
        chat = path == "/v1/chat/completions"
        if sent.finished is not None:
            # The answer's end reached the client; only the stream's end mark is missing.
            await send({"type": "http.response.body", "body": sse("[DONE]"), "more_body": False})
            return
        admitted = False
        try:
            # Refused (the site is full or shutting down): the error event below says so.
            await self._admission.acquire()
            admitted = True
            info = {"served_by": "cloud+site", "mode": "cloud", "continued_at_chars": len(sent.text)}

            async def emit(piece: str) -> None:
                # The rest of a chat answer streams as the site's LLM writes it, like the cloud's did.
                await send({"type": "http.response.body", "more_body": True, "body": sse(
                    chunk(ident["request_id"], ident["model"], ident["created"], {"content": piece}))})

            added, finish = await self._rest(chat, request, sent.text, emit if chat else None)
            if chat:
                events = [chunk(ident["request_id"], ident["model"], ident["created"], {}, finish, pice=info)]
            else:
                events = [text_chunk(ident["request_id"], ident["model"], ident["created"], added, finish, pice=info)]
            options = request.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                completion_tokens = count_tokens(self.llm, sent.text + added)
                events.append(usage_chunk(ident["request_id"], ident["model"], ident["created"],
                                          usage(0, completion_tokens, count_tokens(self.llm, added), 0)))
            for payload in events:
                await send({"type": "http.response.body", "body": sse(payload), "more_body": True})
        except Exception as exc:
            log.exception("site: could not finish a broken stream")
            error = {"error": {"message": f"the cloud stopped half-way and the site could not finish the answer: "
                                          f"{exc}", "type": "server_error", "code": "site_continuation_failed"}}
            await send({"type": "http.response.body", "body": sse(error), "more_body": True})
        finally:
            if admitted:
                self._admission.release()
        await send({"type": "http.response.body", "body": sse("[DONE]"), "more_body": False})

    async def _rest(self, chat: bool, request: dict[str, Any], text: str,
                    emit: Callable[[str], Awaitable[None]] | None = None) -> tuple[str, FinishReason]:
        """The site LLM's continuation of ``text`` (the answer so far) and its finish reason, with
        the request's own sampling settings and stop strings. With ``emit`` (chat only) the
        continuation is also handed over piece by piece as it is written, when the site's LLM
        streams (a tail that could open a stop string is held until it cannot).

        Raises:
            CloudError: the site's LLM cannot continue this kind of request.
        """
        cap = self.config.service.max_answer_tokens
        if chat:
            req = ChatCompletionRequest.model_validate(request)
            asked = min(req.token_limit or cap, cap)
            left = asked - count_tokens(self.llm, text)
            if left <= 0:
                return "", "length"
            _, messages = conversation(req)
            chat_request = ChatRequest(messages=messages, max_tokens=left, prefill=text,
                                       temperature=req.temperature or 0.0,
                                       top_p=req.top_p if req.top_p is not None else 1.0, seed=req.seed)
            stops = req.stop_strings
            if emit is not None and self._meter.streams:
                return await self._stream_rest(chat_request, text, stops, left, emit)
            # The rest of a cloud-only answer: on the site's ledger as one.
            done = (await self._meter.complete([chat_request], purpose="cloud_answer"))[0]
        else:
            raw = CompletionRequest.model_validate(request)
            if getattr(self.llm, "complete_raw", None) is None:
                raise CloudError(f"the site's LLM ({self.llm.name}) cannot continue raw text")
            prompts = [raw.prompt] if isinstance(raw.prompt, str) else raw.prompt
            if len(prompts) != 1:
                raise CloudError("a stream of several prompts cannot be continued on the site")
            asked = min(raw.token_limit or cap, cap)
            left = asked - count_tokens(self.llm, text)
            if left <= 0:
                return "", "length"
            text_request = TextRequest(prompt=prompts[0] + text, max_tokens=left, temperature=raw.temperature or 0.0,
                                       top_p=raw.top_p if raw.top_p is not None else 1.0, seed=raw.seed)
            done = (await self._meter.complete_raw([text_request], purpose="completion"))[0]
            stops = stop_strings(raw.stop)
        added, stopped = _cut_at_stop(text, done.text, stops)
        if emit is not None and added:
            await emit(added)
        return added, ("stop" if stopped or done.tokens < left else "length")

    async def _stream_rest(self, request: ChatRequest, text: str, stops: tuple[str, ...], left: int,
                           emit: Callable[[str], Awaitable[None]]) -> tuple[str, FinishReason]:
        """`_rest` for a chat answer, streamed: each new piece goes to ``emit`` at once."""
        hold = max((len(stop) for stop in stops), default=1) - 1
        raw, shown, tokens, stopped = "", "", None, False
        # The rest of a cloud-only answer: on the site's ledger as one (the meter records it,
        # also when a stop string ends the stream early).
        async with contextlib.aclosing(self._meter.stream(request, purpose="cloud_answer")) as pieces:
            async for piece in pieces:
                if isinstance(piece, Completion):
                    tokens = piece.tokens
                    continue
                raw += piece
                cut, stopped = _cut_at_stop(text, raw, stops)
                visible = cut if stopped or not hold else cut[: max(0, len(cut) - hold)]
                if len(visible) > len(shown):
                    await emit(visible[len(shown):])
                    shown = visible
                if stopped:
                    break  # closing the stream stops the generation
        added, stopped = _cut_at_stop(text, raw, stops)
        if len(added) > len(shown):
            await emit(added[len(shown):])
        decoded = tokens if tokens is not None else count_tokens(self.llm, raw)
        return added, ("stop" if stopped or decoded < left else "length")


def _cut_at_stop(before: str, added: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``added`` cut before the first stop string in ``before + added`` that ends inside it (a
    stop string may begin in what was already sent); whether one was found."""
    if not stops or not added:
        return added, False
    reach = max(len(stop) for stop in stops) - 1
    tail = before[-reach:] if reach > 0 else ""
    window = tail + added
    hits = [i for stop in stops if stop and (i := window.find(stop)) >= 0 and i + len(stop) > len(tail)]
    if not hits:
        return added, False
    return added[: max(0, min(hits) - len(tail))], True


def _gone(exc: BaseException) -> bool:
    """Whether a failed forward says the cloud is gone (refused, reset, closed mid-answer) rather
    than slow (a timeout: the probes judge) or wrongly addressed (a bad URL)."""
    return isinstance(exc, httpx.TransportError) and not isinstance(
        exc, (httpx.TimeoutException, httpx.UnsupportedProtocol))


def _tagged(content: bytes, status: int) -> bytes:
    """The cloud's whole answer, with ``pice.served_by`` set when the cloud did not say."""
    if status != 200:
        return content
    try:
        data = json.loads(content)
    except ValueError:
        return content
    if isinstance(data, dict):
        pice = data.setdefault("pice", {})
        if isinstance(pice, dict):
            pice.setdefault("served_by", "cloud")
        return json.dumps(data, separators=(",", ":")).encode()
    return content


async def _send_whole(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode("latin-1")),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _start_stream(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _replay(body: bytes, whole: bool, receive: Receive) -> Receive:
    """A ``receive`` that gives the body read so far again, then the client's own messages (the
    rest of the body when it was not ``whole``, then the disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": not whole}
        return await receive()

    return replay
