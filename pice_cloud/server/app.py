"""The FastAPI app: routes (``POST /v1/chat/completions``, ``GET /v1/models``, ``/health``,
``/metrics``), authorisation, request parsing and the OpenAI error shape. State lives on
``app.state.pice`` (an `ApiState`), built by `create_app`; nothing is global.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pice_cloud.config import CloudConfig
from pice_cloud.errors import InputTooLongError
from pice_cloud.events import too_long_message
from pice_cloud.llm.base import LLMBackend, RawCompleter, context_tokens, count_prompt_tokens, count_tokens
from pice_cloud.llm.step_engine import StepEngine
from pice_cloud.metrics import CONTENT_TYPE, Metrics
from pice_cloud.openai_schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    conversation,
    models_list,
    parse_completion_request,
    parse_request,
)
from pice_cloud.server.admission import Admission
from pice_cloud.server.artifacts import ModelCatalog
from pice_cloud.server.completion import ChatJob, ClientGone, GuardedStream, Job, TextJob, api_error, error_response
from pice_cloud.server.state import ApiState
from pice_cloud.service import PiceService
from pice_edge.model_store import models_dir

log = logging.getLogger(__name__)


def _engine_gauges(llm: LLMBackend) -> dict[str, Any]:
    """The continuous-batching engine's figures, when the backend has one (the embedded model)."""
    engine = getattr(llm, "engine", None)
    if not isinstance(engine, StepEngine):
        return {}
    return {"engine": engine.stats, "engine_load": lambda: engine.load}


def create_app(service: PiceService, llm: LLMBackend, config: CloudConfig) -> FastAPI:
    """The FastAPI app serving ``service``; its state is on ``app.state.pice``."""
    server_cfg = config.server
    admission = Admission(server_cfg.max_concurrent, server_cfg.max_queue, queue_timeout_s=server_cfg.queue_timeout_s,
                          retry_after_s=server_cfg.retry_after_s)
    metrics = Metrics(service.transport.rejections, live_edges=lambda: len(service.fleet.live()),
                      queued=lambda: admission.queued, in_flight=lambda: admission.active,
                      sketch_rejections=service.sketch_rejections, candidate_rejections=service.inbox.quality,
                      sketch_repairs=service.sketch_repairs,
                      cloud_expansion_rejections=service.cloud_expansion_rejections,
                      cloud_work=service.cloud_ledgers,
                      round_trips=lambda: (service.fleet.round_trips, service.fleet.round_trip_overhead_s),
                      **_engine_gauges(llm))
    state = ApiState(service=service, llm=llm, config=config, admission=admission, metrics=metrics)
    app = FastAPI(title="PICE", description="Progressive inference across cloud and edge; OpenAI-compatible API",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pice = state
    api_key = server_cfg.api_key.get_secret_value() if server_cfg.api_key else None

    @app.exception_handler(APIError)
    async def _onapi_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
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
            check_limits(req, state)
        except APIError:
            metrics.requests.labels("unknown", "invalid").inc()
            raise
        try:
            await admission.acquire()
        except APIError:
            metrics.requests.labels(req.pice.mode, "rejected").inc()
            raise
        return await _respond(ChatJob(state, req, request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """The legacy endpoint: a raw prompt continued by the cloud LLM (always cloud-only)."""
        authorize(request)
        try:
            req = await _parse_completion(request, state)
        except APIError:
            metrics.requests.labels("cloud", "invalid").inc()
            raise
        try:
            await admission.acquire()
        except APIError:
            metrics.requests.labels("cloud", "rejected").inc()
            raise
        return await _respond(TextJob(state, req, request))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(models_list(state.model_ids, state.created))

    catalog = ModelCatalog(Path(server_cfg.models_dir).expanduser() if server_cfg.models_dir else models_dir(),
                           server_cfg.offer_models)

    @app.get("/v1/pice/models")
    async def offered_models(request: Request) -> JSONResponse:
        """The models edges can fetch from here (``pice-edge models fetch NAME --from URL``)."""
        authorize(request)
        return JSONResponse(await asyncio.to_thread(catalog.listing))

    @app.get("/v1/pice/models/{name}/manifest")
    async def model_manifest(name: str, request: Request) -> JSONResponse:
        authorize(request)
        return await asyncio.to_thread(catalog.manifest, name)

    @app.get("/v1/pice/models/{name}/files/{path:path}")
    async def model_file(name: str, path: str, request: Request) -> FileResponse:
        authorize(request)
        return await asyncio.to_thread(catalog.file, name, path)

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
        body = {"status": status, "broker_connected": connected,
                "llm": {"backend": llm.name, "model": llm.model_id}, "live_edges": len(live), "edges": live,
                "in_flight": admission.active, "queued": admission.queued,
                # Cloud replicas sharing the broker's edges (this one included).
                "replicas": service.replicas.count()}
        describe = getattr(service.selector, "describe", None)
        if callable(describe):
            body["selector"] = describe()
        for name, section in state.health_sections.items():
            body[name] = section()
        return JSONResponse(body, status_code=503 if admission.draining else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    from pice_cloud.server.fleet_page import install_fleet_page

    install_fleet_page(app)  # GET /fleet (the operator's page), /fleet/state; fleet gauges on /metrics
    return app


async def _respond(job: Job[Any]) -> Response:
    """Run an admitted job: a stream of server-sent events, or one JSON body."""
    if job.request.stream:
        return GuardedStream(job)
    try:
        return JSONResponse(await job.run())
    except ClientGone:
        log.info("%s: client disconnected; request cancelled", job.id)
        job.record(None, "cancelled")
        return Response(status_code=499)
    except Exception as exc:
        job.record(None, "error")
        return error_response(api_error(exc))
    finally:
        job.release()


async def _parse_completion(request: Request, state: ApiState) -> CompletionRequest:
    data = await _read_json(request, state)
    req = parse_completion_request(data, max_tokens_limit=state.config.server.max_tokens_limit)
    _check_model(req.model, state)
    if not isinstance(state.llm, RawCompleter):
        raise APIError(400, f"this server's LLM backend ({state.llm.name}) cannot continue raw prompts; use "
                            "/v1/chat/completions", code="unsupported_endpoint")
    check_context(state, lambda: count_tokens(state.llm, req.text), req.max_tokens, param="prompt")
    return req


#: How a context-length refusal names what took the tokens, by the parameter that holds it.
_CONTEXT_WORDING: dict[str, tuple[str, str]] = {
    "prompt": ("the prompt takes", ""),
    "messages": ("the messages take", " for the answer"),
}


def check_context(state: ApiState, prompt_tokens: Callable[[], int], asked: int | None, *,
                  param: Literal["prompt", "messages"]) -> None:
    """Refuse a request whose prompt does not fit: the prompt and the answer together past the
    cloud model's context window (unchecked when the window is unknown: a remote engine refuses
    itself), or the prompt alone past the operator's limit (`CloudConfig.prompt_token_limit`,
    ``server.max_prompt_tokens``). The prompt is tokenized once, and only when a limit applies.

    Args:
        prompt_tokens: counts the prompt's tokens.
        asked: the answer's ``max_tokens`` (None: the service's cap).
        param: the parameter that holds the prompt, named in the error.

    Raises:
        APIError: 400 ``context_length_exceeded`` (with the window and the counts), or 400
            ``prompt_too_long`` (with the limit and the count). The context is checked first: a
            prompt past it cannot be answered by any server configuration.
    """
    window = context_tokens(state.llm)
    limit = state.config.prompt_token_limit
    if window is None and limit is None:
        return
    prompt = prompt_tokens()
    takes, purpose = _CONTEXT_WORDING[param]
    if window is not None:
        answer = state.answer_tokens(asked)
        if prompt + answer > window:
            raise APIError(400, f"this model's maximum context length is {window} tokens; {takes} {prompt} and up "
                                f"to {answer} more were asked{purpose} ({prompt + answer}); shorten the {param} or "
                                "lower max_tokens", param=param, code="context_length_exceeded")
    if limit is not None and prompt > limit:
        raise APIError(400, f"this server takes prompts of at most {limit} tokens; {takes} {prompt}: shorten the "
                            f"{param} (the operator sets the limit with server.max_prompt_tokens)",
                       param=param, code="prompt_too_long")


def check_limits(req: ChatCompletionRequest, state: ApiState) -> None:
    """Refuse, before admission and before any compute, a request that cannot be answered as
    asked: a question too long for progressive mode (under ``auto`` a long question is answered
    cloud-only instead), or a conversation that does not fit the model's context with the
    tokens asked for.

    The service refuses a too-long question too (`InputTooLongError`, for every caller); it is
    checked here as well because by the time the service runs, a streamed response has already
    answered 200, and a request that can never succeed must not wait for, or hold, a slot. Both
    refusals reach the client through the one mapping, `api_error`.

    Raises:
        APIError: 400 in OpenAI's shape, naming the limit.
    """
    question, messages = conversation(req)
    limit = state.service.config.max_question_chars
    mode = req.pice.mode
    if mode in ("progressive", "sot") and len(question) > limit:
        raise api_error(InputTooLongError(too_long_message(len(question), limit, mode)))
    check_context(state, lambda: count_prompt_tokens(state.llm, messages), req.token_limit, param="messages")


async def _parse(request: Request, state: ApiState) -> ChatCompletionRequest:
    data = await _read_json(request, state)
    req = parse_request(data, max_tokens_limit=state.config.server.max_tokens_limit)
    _check_model(req.model, state)
    return req


def _check_model(model: str, state: ApiState) -> None:
    if model not in state.model_ids:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                            f"{', '.join(repr(i) for i in state.model_ids)} (see GET /v1/models)",
                       param="model", code="model_not_found")


async def _read_json(request: Request, state: ApiState) -> Any:
    """The request body as JSON: size-limited (413) and time-limited (408) before parsing."""
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
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
