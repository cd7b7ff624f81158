"""Cloud LLM backend on an OpenAI-compatible HTTP server.

That is how most operators run a GPU model: TensorRT-LLM's ``trtllm-serve``, vLLM, SGLang and
llama.cpp's ``llama-server`` all expose ``POST /v1/chat/completions``; so does another
``pice-cloud serve`` (in cloud-only mode it is a plain OpenAI-compatible server).

A pre-filled assistant turn (the sketch starts with ``"1."``) has no place in the standard
API. With ``continue_final_message`` (vLLM, SGLang) it is sent as a final assistant message
the server continues; otherwise the model answers freely and a pre-fill it echoes at the start
is stripped, so callers always get the continuation after the pre-fill.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import httpx

from pice_cloud.errors import BackendError
from pice_cloud.llm.base import ChatRequest, Completion, TextRequest, TokenLogprob, estimate_tokens

log = logging.getLogger(__name__)


class OpenAIHTTPBackend:
    """`LLMBackend` over ``{base_url}/chat/completions``; a batch becomes concurrent requests.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added if missing).
        model: the model id the server serves (see its ``GET /v1/models``).
        api_key: sent as ``Authorization: Bearer``.
        timeout_s: per request.
        max_parallel: most requests in flight at once (the server batches them).
        continue_final_message: send pre-fills as an assistant turn to continue (vLLM, SGLang).
        structured_outputs: how a sketch's outline format (`ChatRequest.outline`) is sent: ``vllm``
            (``guided_regex``), ``llamacpp`` (a GBNF ``grammar``) or ``none`` (not sent).
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 max_parallel: int = 8, continue_final_message: bool = False,
                 context_tokens: int | None = None, structured_outputs: str = "none") -> None:
        if structured_outputs not in ("none", "vllm", "llamacpp"):
            raise BackendError(f"structured_outputs {structured_outputs!r}: choose none, vllm or llamacpp")
        self.structured_outputs = structured_outputs
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.model_id = model
        #: The engine's context window when configured (llm.context_tokens); None: the engine checks.
        self.context_tokens = context_tokens
        self.continue_final_message = continue_final_message
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self._limit = asyncio.Semaphore(max_parallel)

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        messages: list[dict[str, str]] = [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {"model": self.model_id, "messages": messages, "max_tokens": request.max_tokens,
                                "temperature": request.temperature, "top_p": request.top_p, "stream": False}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.logprobs is not None:
            body.update(logprobs=True, top_logprobs=request.logprobs)
        if request.prefill and self.continue_final_message:
            messages.append({"role": "assistant", "content": request.prefill})
            body.update(continue_final_message=True, add_generation_prompt=False)
        if request.outline is not None and self.structured_outputs != "none":
            # Without the pre-fill continued, the engine writes it too: the format starts with it.
            lead = "" if self.continue_final_message else request.prefill
            if self.structured_outputs == "vllm":
                body["guided_regex"] = re.escape(lead) + request.outline.regex()
            else:
                body["grammar"] = request.outline.gbnf(lead=lead)
        return body

    async def _post(self, path: str, body: dict[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """POST ``body`` to ``path``: the response and its first choice, or a `BackendError` that
        says what went wrong (unreachable, an error status, or not a ``kind`` completion)."""
        async with self._limit:
            try:
                response = await self._client.post(path, json=body)
            except httpx.HTTPError as exc:
                raise BackendError(f"LLM server {self.base_url} unreachable: {type(exc).__name__}: {exc}; "
                                   "check llm.url and that the server runs") from exc
        if response.status_code != 200:
            raise BackendError(f"LLM server {self.base_url} answered {response.status_code}: "
                               f"{_error_message(response)}")
        try:
            data = response.json()
            choice = data["choices"][0]
            if not isinstance(choice, dict):
                raise TypeError(type(choice).__name__)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"LLM server {self.base_url} sent a response that is not a {kind} completion: "
                               f"{response.text[:200]!r}") from exc
        return data, choice

    async def _one(self, request: ChatRequest) -> Completion:
        data, choice = await self._post("/chat/completions", self._body(request), "chat")
        try:
            text = choice["message"]["content"] or ""
        except (KeyError, TypeError) as exc:
            raise BackendError(f"LLM server {self.base_url} sent a response that is not a chat completion: "
                               f"{str(data)[:200]!r}") from exc
        if request.prefill and not self.continue_final_message:
            stripped = text.lstrip()
            if stripped.startswith(request.prefill):
                text = stripped[len(request.prefill):]
        usage = data.get("usage") or {}
        tokens = usage.get("completion_tokens")
        if not isinstance(tokens, int):
            tokens = estimate_tokens(text)
        return Completion(text=text, tokens=tokens, token_logprobs=_logprobs(choice, request))

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Completion, None]:
        """Stream one continuation from the engine (``"stream": true``, server-sent events) as it
        decodes (`StreamingBackend`). The token count comes from the engine's final usage chunk
        (``stream_options.include_usage``) when it sends one, else an estimate. Closing the
        iterator early closes the connection, which vLLM, llama.cpp and trtllm-serve take as
        "stop generating"."""
        body = {**self._body(request), "stream": True, "stream_options": {"include_usage": True}}
        strip = request.prefill if request.prefill and not self.continue_final_message else ""
        text, held, tokens = "", "", None
        async with self._limit:
            try:
                async with self._client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise BackendError(f"LLM server {self.base_url} answered {response.status_code}: "
                                           f"{_error_message(response)}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue  # blank separators, comments, "event:" lines
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        piece, used = _stream_chunk(data, self.base_url)
                        tokens = used if used is not None else tokens
                        if not piece:
                            continue
                        if strip:
                            # Hold the start back until we know whether it echoes the pre-fill.
                            held += piece
                            if len(held.lstrip()) < len(strip) and strip.startswith(held.lstrip()):
                                continue
                            piece, strip = _without_prefill(held, strip), ""
                            if not piece:
                                continue
                        text += piece
                        yield piece
            except httpx.HTTPError as exc:
                raise BackendError(f"LLM server {self.base_url} unreachable: {type(exc).__name__}: {exc}; "
                                   "check llm.url and that the server runs") from exc
        if strip and held:  # the whole answer was shorter than the pre-fill
            rest = _without_prefill(held, strip)
            text += rest
            if rest:
                yield rest
        yield Completion(text=text, tokens=tokens if isinstance(tokens, int) else estimate_tokens(text))

    async def complete_raw(self, requests: Sequence[TextRequest]) -> list[Completion]:
        """Raw prompts through the engine's own ``/v1/completions``."""
        return list(await asyncio.gather(*(self._one_raw(r) for r in requests)))

    async def _one_raw(self, request: TextRequest) -> Completion:
        body: dict[str, Any] = {"model": self.model_id, "prompt": request.prompt, "max_tokens": request.max_tokens,
                                "temperature": request.temperature, "top_p": request.top_p, "stream": False}
        if request.seed is not None:
            body["seed"] = request.seed
        data, choice = await self._post("/completions", body, "text")
        try:
            text = choice["text"] or ""
        except (KeyError, TypeError) as exc:
            raise BackendError(f"LLM server {self.base_url} sent a response that is not a text completion: "
                               f"{str(data)[:200]!r}") from exc
        tokens = (data.get("usage") or {}).get("completion_tokens")
        return Completion(text=text, tokens=tokens if isinstance(tokens, int) else estimate_tokens(text))

    async def close(self) -> None:
        await self._client.aclose()


def _stream_chunk(data: str, where: str) -> tuple[str, int | None]:
    """(content delta, completion tokens if this chunk carries usage) of one streamed chunk."""
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise BackendError(f"LLM server {where} streamed a chunk that is not JSON: {data[:200]!r}") from exc
    if not isinstance(chunk, dict):
        raise BackendError(f"LLM server {where} streamed a chunk that is not an object: {data[:200]!r}")
    if "error" in chunk:
        raise BackendError(f"LLM server {where} failed mid-stream: {str(chunk['error'])[:300]}")
    usage = chunk.get("usage") or {}
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    piece = ""
    choices = chunk.get("choices") or []
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        piece = content if isinstance(content, str) else ""
    return piece, tokens if isinstance(tokens, int) else None


def _without_prefill(text: str, prefill: str) -> str:
    """``text`` without a leading echo of ``prefill`` (as `OpenAIHTTPBackend.complete` strips it)."""
    stripped = text.lstrip()
    return stripped[len(prefill):] if stripped.startswith(prefill) else text


def _logprobs(choice: Any, request: ChatRequest) -> tuple[TokenLogprob, ...] | None:
    """The engine's ``logprobs.content`` as `TokenLogprob` entries (None when not asked or not sent)."""
    if request.logprobs is None:
        return None
    content = (choice.get("logprobs") or {}).get("content")
    if not isinstance(content, list):
        raise BackendError("the LLM server did not return logprobs although they were asked for; it may not "
                           "support them")
    try:
        return tuple(TokenLogprob(str(e["token"]), float(e["logprob"]),
                                  tuple((str(t["token"]), float(t["logprob"])) for t in e.get("top_logprobs") or ()))
                     for e in content)
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendError(f"the LLM server sent malformed logprobs: {exc}") from exc


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (ValueError, AttributeError):
        pass
    return response.text[:200]
