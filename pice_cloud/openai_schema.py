"""The slice of OpenAI's chat-completions schema PICE serves, and its error shape.

Requests are validated here (pydantic models mirroring OpenAI's); responses and stream chunks
are built here; every error the HTTP API returns is an `APIError` turned into
``{"error": {"message", "type", "param", "code"}}`` by `error_body`. The HTTP routes
(`pice_cloud.server`) and the request service (`pice_cloud.service`) know nothing of each
other's types.

Extensions (ignored by clients that do not know them):

- request ``"pice": {"mode": "auto" | "progressive" | "cloud"}`` (the ``openai`` client sends
  it with ``extra_body``);
- response ``usage.cloud_tokens`` / ``usage.edge_tokens`` (tokens generated in the cloud and at
  the edges) and ``pice`` (mode, points expanded at the edge and in the cloud, the devices, and
  ``cloud_work``: what the cloud LLM computed for the request, by purpose, from
  `pice_cloud.cloud_ledger`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pice_cloud.llm.base import TokenLogprob
from pice_cloud.scheduler import RequestedMode
from pice_edge.runtimes.base import ChatMessage

#: Roles accepted in ``messages``; ``developer`` is OpenAI's newer name for ``system``.
SUPPORTED_ROLES = ("system", "developer", "user", "assistant")



def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """A request's ``stop`` field (one string, a list, or none) as a tuple."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)

class APIError(Exception):
    """An error answered to an HTTP client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(exc: APIError) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI's API writes it."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    """One message of the conversation; content is a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class PiceOptions(BaseModel):
    """The ``pice`` extension field of a request."""

    model_config = ConfigDict(extra="forbid")

    mode: RequestedMode = "auto"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


#: Most stop strings per request (OpenAI's limit).
MAX_STOP_STRINGS = 4
#: Most alternatives per token in ``top_logprobs`` (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

#: OpenAI request parameters PICE does not implement, with the value that means "not used":
#: a request that sets one to anything else is refused with a 400 naming it, never silently
#: served without it. (vLLM's rule: implemented, or refused.)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "tool calling is not supported: PICE serves text answers"),
    "tool_choice": ((None, "none"), "tool calling is not supported: PICE serves text answers"),
    "functions": ((None, []), "function calling is not supported: PICE serves text answers"),
    "function_call": ((None, "none"), "function calling is not supported: PICE serves text answers"),
    "response_format": ((None, {"type": "text"}), "only plain text answers are supported (response_format "
                                                   "{'type': 'text'})"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    # Chat declares these (cloud-only answers); the legacy endpoint refuses them.
    "logprobs": ((None, False), "logprobs are not supported on /v1/completions; use /v1/chat/completions"),
    "top_logprobs": ((None, 0), "logprobs are not supported on /v1/completions; use /v1/chat/completions"),
    "presence_penalty": ((None, 0, 0.0), "presence_penalty is not supported; repetition is controlled by the "
                                         "edges' device profiles"),
    "frequency_penalty": ((None, 0, 0.0), "frequency_penalty is not supported; repetition is controlled by the "
                                          "edges' device profiles"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported (no reasoning model)"),
    "web_search_options": ((None,), "web search is not supported"),
    "verbosity": ((None,), "verbosity is not supported"),
    # Legacy completions.
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "best_of": ((None, 1), "best_of is not supported"),
}
#: OpenAI parameters that do not change an answer; accepted and ignored (documented).
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
           "parallel_tool_calls")


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body. OpenAI parameters PICE does not implement are refused
    (`UNSUPPORTED`) unless set to their "not used" value; unknown parameters are refused."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    pice: PiceOptions = Field(default_factory=PiceOptions)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return stop_strings(self.stop)

    @property
    def logprob_alternatives(self) -> int | None:
        """None: no logprobs; else how many alternatives per token (``top_logprobs``)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` body (the legacy endpoint): a prompt continued by the cloud LLM."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str | list[str]
    #: OpenAI's default for this endpoint.
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return stop_strings(self.stop)

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check_parameters(request: BaseModel) -> None:
    """Refuse what would otherwise be dropped in silence: an OpenAI parameter PICE does not
    implement, set to a value that would change the answer, or a parameter nobody knows.

    Raises:
        APIError: 400 naming the parameter (``code`` ``unsupported_parameter`` or
            ``unknown_parameter``).
    """
    for name, value in (request.model_extra or {}).items():
        if name in UNSUPPORTED:
            unused, why = UNSUPPORTED[name]
            if value in unused:
                continue
            raise APIError(400, f"unsupported parameter '{name}': {why}; remove it (see the README's compatibility "
                                "table)", param=name, code="unsupported_parameter")
        if name not in IGNORED:
            raise APIError(400, f"unrecognized request argument supplied: '{name}'", param=name,
                           code="unknown_parameter")
    stop = getattr(request, "stop_strings", ())
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"'stop' takes 1 to {MAX_STOP_STRINGS} non-empty strings", param="stop",
                       code="invalid_value")


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        param = _param(loc)
        if err["type"] == "missing":
            raise APIError(400, f"missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter") from None
        code = "invalid_type" if err["type"].endswith(("_type", "_parsing")) or "type" in err["type"] \
            else "invalid_value"
        raise APIError(400, f"invalid value for '{param}': {err['msg']}", param=param, code=code) from None


def _check_token_limit(limit: int | None, param: str, max_tokens_limit: int) -> None:
    if limit is not None and limit > max_tokens_limit:
        raise APIError(400, f"{param} is too large: {limit}; this server allows at most {max_tokens_limit}",
                       param=param, code="invalid_value")


def parse_completion_request(data: Any, *, max_tokens_limit: int) -> CompletionRequest:
    """Validate a ``/v1/completions`` body; raise `APIError` (400) naming the first bad parameter."""
    request = _validate(CompletionRequest, data)
    if isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise APIError(400, "prompt must be one string (a list of several prompts is not supported)",
                       param="prompt", code="invalid_value")
    if not request.text.strip():
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
    check_parameters(request)
    _check_token_limit(request.max_tokens, "max_tokens", max_tokens_limit)
    return request


def parse_request(data: Any, *, max_tokens_limit: int) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raise `APIError` (400) naming the first bad parameter."""
    request = _validate(ChatCompletionRequest, data)
    for i, message in enumerate(request.messages):
        if message.role not in SUPPORTED_ROLES:
            raise APIError(400, f"unsupported role {message.role!r} in messages[{i}]: this server accepts "
                                f"{', '.join(SUPPORTED_ROLES)} (no tools or functions)",
                           param=f"messages[{i}].role", code="unsupported_role")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"unsupported content part {part.type!r} in messages[{i}]: only text "
                                        "is accepted", param=f"messages[{i}].content[{j}]", code="unsupported_content")
    if not any(m.role == "user" and m.text().strip() for m in request.messages):
        raise APIError(400, "messages must contain a non-empty user message", param="messages",
                       code="invalid_value")
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
    check_parameters(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if request.logprobs and request.pice.mode in ("progressive", "sot"):
        raise APIError(400, f"logprobs are available for cloud-only answers; mode {request.pice.mode!r} writes the "
                            "answer from several models' expansions: use mode 'cloud' or 'auto' (which then answers "
                            "cloud-only)", param="logprobs", code="unsupported_parameter")
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    _check_token_limit(request.token_limit, param, max_tokens_limit)
    return request


def conversation(request: ChatCompletionRequest) -> tuple[str, list[ChatMessage]]:
    """The question to sketch (the last user turn, with earlier turns as context) and the
    conversation as chat messages (for a cloud-only answer)."""
    messages = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in request.messages]
    last_user = max(i for i, m in enumerate(messages) if m.role == "user" and m.content.strip())
    question = messages[last_user].content.strip()
    earlier = [m for m in messages[:last_user] if m.content.strip()]
    if earlier:
        context = "\n".join(f"{m.role.capitalize()}: {m.content.strip()}" for m in earlier)
        question = f"{context}\n\nQuestion: {question}"
    return question, messages


# --- responses ----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


def usage(prompt_tokens: int, completion_tokens: int, cloud_tokens: int, edge_tokens: int) -> dict[str, int]:
    """OpenAI's usage plus where the generated tokens came from."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cloud_tokens": cloud_tokens,
        "edge_tokens": edge_tokens,
    }


def logprobs_content(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``choices[].logprobs`` object for generated tokens."""
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion(request_id: str, model: str, text: str, finish: FinishReason, usage_: dict[str, int],
               pice: dict[str, Any], created: int | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish}],
        "usage": usage_,
        "pice": pice,
    }


def chunk(request_id: str, model: str, created: int, delta: dict[str, Any], finish: FinishReason | None = None,
          logprobs: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        **extra,
    }


def text_completion(request_id: str, model: str, text: str, finish: FinishReason, usage_: dict[str, int],
                    pice: dict[str, Any], created: int) -> dict[str, Any]:
    """A ``text_completion`` object (the legacy endpoint)."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage_, "pice": pice}


def text_chunk(request_id: str, model: str, created: int, text: str, finish: FinishReason | None = None,
               **extra: Any) -> dict[str, Any]:
    """One streamed piece of a ``text_completion``."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}


def usage_chunk(request_id: str, model: str, created: int, usage_: dict[str, int]) -> dict[str, Any]:
    """The final chunk sent when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage_}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying ``data`` (an object as compact JSON, or a mark like ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def models_list(ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "pice"}
                                       for i in ids]}
