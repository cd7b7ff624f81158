"""The cloud service's configuration: one typed model, from a YAML file, ``PICE_*`` environment
variables and command-line flags (highest precedence last), validated before anything starts.

    server:  {host: 127.0.0.1, port: 8000, max_concurrent: 4, max_queue: 16}
    broker:  {url: mqtt://broker.local:1883, username: pice-cloud, password: ...}   # omit: embedded broker
    llm:     {kind: transformers, model: smollm2-135m-instruct, threads: 1}
    edges:   {local: 2}                 # in-process edge nodes (default 2, or 0 with a broker)
    service: {max_points: 6, tokens_per_point: 80}

Environment variables name a field by its path: ``PICE_SERVER__PORT=9000``,
``PICE_LLM__KIND=openai``, ``PICE_BROKER__URL=mqtts://...``. Any invalid value gives one
`ConfigError` naming where it came from (file, variable or flag), the field and what is expected.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from pice_cloud import defaults
from pice_cloud.defaults import DEFAULT_MODEL
from pice_edge.errors import ConfigError
from pice_edge.profiles import RuntimeName, load_profile
from pice_edge.protocol import FLEET_NAME_PATTERN, ID_PATTERN, MAX_QUESTION_CHARS
from pice_edge.transport import BrokerSettings

ENV_PREFIX = "PICE_"
ENV_DELIMITER = "__"
BackendKind = Literal["transformers", "openai", "tensorrt_llm", "edge"]
RouterKind = Literal["embedding", "heuristic", "off"]
SelectorKind = Literal["learned", "confidence"]


class ServerConfig(BaseModel):
    """The HTTP API and its admission control."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0: any free port)")
    model_name: str = Field(default="pice", min_length=1, max_length=200,
                            description="model id served in /v1/models and responses")
    max_concurrent: int = Field(default=4, ge=1, le=4096, description="requests answered at the same time")
    max_queue: int = Field(default=16, ge=0, le=100_000,
                           description="requests waiting for a slot; beyond this the server answers 429")
    queue_timeout_s: float = Field(default=30.0, gt=0, le=3600,
                                   description="a request waiting longer than this is answered 503")
    retry_after_s: int = Field(default=2, ge=1, le=3600, description="Retry-After sent with 429 and 503")
    max_tokens_limit: int = Field(default=4096, ge=1, le=1_000_000,
                                  description="largest max_tokens a request may ask for (more: 400)")
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="longest prompt in tokens (the messages under the chat template, or a /v1/completions "
                    "prompt); longer: 400 prompt_too_long before any compute. Default: "
                    f"{defaults.CPU_MAX_PROMPT_TOKENS} when the cloud LLM runs here on a CPU (llm.kind transformers, "
                    "llm.device cpu), where a prompt's prefill grows faster than its length (one core: 2,048 tokens "
                    "6.9 s, 4,096 19 s, 7,662 held a slot 150 s); otherwise unset, and the model's context is the "
                    "only limit")
    max_body_bytes: int = Field(default=defaults.MAX_BODY_BYTES, ge=1024, le=256 * 1024 * 1024,
                                description="largest request body (more: 413, before anything is parsed)")
    body_timeout_s: float = Field(default=10.0, gt=0, le=600,
                                  description="a request body not received in full by then gets 408 (slow clients)")
    shutdown_timeout_s: float = Field(default=30.0, ge=0, le=3600,
                                      description="on SIGTERM, how long in-flight requests may still run")
    api_key: SecretStr | None = Field(default=None, description="require 'Authorization: Bearer KEY' when set")
    models_dir: str | None = Field(default=None, description="model store whose models edges may fetch from "
                                                             "/v1/pice/models (default: PICE_MODELS_DIR or "
                                                             "~/.cache/pice/models)")
    offer_models: list[str] | None = Field(default=None, description="the models offered to edges; unset: every "
                                                                     "intact model in the store, []: none")


class LLMConfig(BaseModel):
    """The cloud LLM (sketches, cloud-only answers, fallback expansions)."""

    model_config = ConfigDict(extra="forbid")

    kind: BackendKind = Field(default="transformers",
                              description="transformers (local), openai (OpenAI-compatible HTTP server), "
                                          "tensorrt_llm (in-process, NVIDIA GPU), edge (an edge runtime in-process, "
                                          "no torch: the site role's LLM; see runtime and profile)")
    model: str = Field(default=DEFAULT_MODEL, min_length=1,
                       description="model name or folder (transformers, tensorrt_llm, edge: a Hugging Face folder or "
                                   "its ONNX export) or the remote model id")
    sketch_model: str | None = Field(
        default=None, min_length=1,
        description="a second model that writes the sketches only, run the same way as 'model' (same kind, url, "
                    "device): a fine-tuned sketcher (pice-cloud finetune --role sketcher), or a LoRA adapter's model "
                    "id on the same vLLM / llama.cpp server; cloud-only answers and fallback expansions stay on "
                    "'model' (default: 'model' writes the sketches too)")
    device: str = Field(default="cpu", description="torch device for transformers: cpu, cuda, cuda:1")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    threads: int | None = Field(default=1, ge=1, le=1024,
                                description="CPU threads of the cloud model (torch's; kind edge: the runtime's, "
                                            "default the profile's)")
    runtime: RuntimeName = Field(
        default="onnxruntime",
        description="kind edge: the edge runtime that runs the model (onnxruntime: no torch, TensorRT through its "
                    "execution provider); the profile's own runtime is its edge role's and is not used")
    profile: str | None = Field(
        default=None, min_length=1,
        description="kind edge: a device profile (a packaged name such as jetson-orin-nx-16gb, or a YAML path) whose "
                    "execution providers, precision, threads and TensorRT engine cache the model runs with, and whose "
                    "site section sizes max_batch and memory_budget_mb when they are not set here")
    url: str | None = Field(default=None, description="base URL of the OpenAI-compatible server, e.g. "
                                                      "http://127.0.0.1:8001/v1 (kind openai)")
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    max_parallel: int = Field(default=8, ge=1, le=1024, description="concurrent HTTP requests (kind openai)")
    context_tokens: int | None = Field(
        default=None, ge=16, le=10_000_000,
        description="the model's context window in tokens; default: from the model's config (transformers), "
                    "unchecked here for a remote engine (it refuses itself)")
    max_batch: int = Field(default=defaults.CLOUD_MAX_BATCH, ge=1, le=4096,
                           description="sequences decoded together (transformers, edge: continuous batching; other "
                                       "kinds: what the engine batches, for the scheduler's load estimate); kind "
                                       "edge, unset: the profile's site.max_batch")
    memory_budget_mb: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="transformers: most KV-cache megabytes of the sequences in the batch (none: max_batch alone "
                    "bounds it); edge: weights + KV cache, like a device profile's (the KV-cache budget is this less "
                    "the weights; unset: the profile's site.memory_budget_mb, none without a profile)")
    structured_outputs: Literal["none", "vllm", "llamacpp"] = Field(
        default="none",
        description="kind openai or tensorrt_llm: how the engine is asked to decode a sketch under its outline "
                    "format: vllm (guided_regex, or TensorRT-LLM's regex guide; also SGLang and trtllm-serve with a "
                    "regex backend), llamacpp (a GBNF grammar; TensorRT-LLM: its EBNF grammar guide), none (the "
                    "guards alone)")
    continue_final_message: bool = Field(
        default=False,
        description="send pre-fills as a final assistant turn to continue (vLLM, SGLang); otherwise an "
                    "echoed pre-fill is stripped from the answer",
    )

    @model_validator(mode="after")
    def _needs_url(self) -> LLMConfig:
        if self.kind == "openai" and not self.url:
            raise ValueError("llm.kind 'openai' needs llm.url, the server's base URL such as http://host:8000/v1")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"llm.url {self.url!r} must start with http:// or https://")
        for name in ("runtime", "profile"):
            if self.kind != "edge" and name in self.model_fields_set and getattr(self, name) is not None:
                raise ValueError(f"llm.{name} is for llm.kind 'edge' (the edge runtime's LLM); llm.kind is "
                                 f"{self.kind!r}")
        if self.profile is not None:
            try:
                load_profile(self.profile)
            except ConfigError as exc:
                raise ValueError(f"llm.profile: {exc}") from None
        return self


class EdgesConfig(BaseModel):
    """Edge nodes this process runs itself (the single-host setup); real edges join over MQTT."""

    model_config = ConfigDict(extra="forbid")

    local: int | None = Field(default=None, ge=0, le=64,
                              description=f"in-process edge nodes (default: {defaults.LOCAL_EDGES}, or 0 with an "
                                          "external broker)")
    model: str | None = Field(default=None, description="their model (default: the cloud's local model)")
    profile: str | None = Field(
        default=None, min_length=1,
        description="a device profile for them (a packaged name such as x86-cpu-dev, or a YAML path): its "
                    "KV-cache budget, precision and repetition control, as pice-edge run applies them; runtime, "
                    "max_batch and threads come from this section")
    runtime: str = "transformers"
    threads: int | None = Field(default=1, ge=1, le=1024)
    max_batch: int = Field(default=defaults.EDGE_MAX_BATCH, ge=1, le=256)
    wait_s: float = Field(default=defaults.EDGE_WAIT_S, ge=0, le=600,
                          description="how long to wait for edges at start")


class DiscoveryConfig(BaseModel):
    """Zeroconf: the cloud advertises its broker and API so edges started without --broker
    find them, and lists the edges it sees."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    interfaces: str = Field(
        default="auto", description="'auto' (loopback when server.host is loopback, else all), 'all', "
        "or comma-separated IP addresses")
    fleet: str = Field(default="default", pattern=FLEET_NAME_PATTERN,
                       description="fleet name edges join with --fleet")


class SiteConfig(BaseModel):
    """The site role (``pice-cloud site``): one OpenAI-compatible endpoint on a site that forwards
    to the cloud while the cloud answers, and answers on the site (its own LLM, its peer edges on
    the site broker) while it does not. See `pice_cloud.site`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="site", pattern=ID_PATTERN,
                      description="the site's name; its local service runs as cloud_id site-NAME by default")
    cloud_url: str | None = Field(
        default=None, max_length=500,
        description="the cloud's API, e.g. https://cloud.example:8000/v1; unset: learned from the cloud's status "
                    "on the site broker (bridged) or its zeroconf record")
    cloud_id: str | None = Field(
        default=None, pattern=ID_PATTERN,
        description="the cloud replica to follow: its MQTT status (heartbeat) over the bridged site broker counts "
                    "as a sign of life, and its going offline or silent as the uplink's loss")
    cloud_api_key: SecretStr | None = Field(default=None, description="API key the cloud requires (Bearer)")
    probe_interval_s: float = Field(default=1.0, gt=0, le=300, description="how often the cloud's /health is probed")
    probe_timeout_s: float = Field(default=2.0, gt=0, le=300,
                                   description="a probe unanswered for this long has failed (a hung cloud)")
    fail_after: int = Field(default=2, ge=1, le=100,
                            description="consecutive failed probes before new requests are answered on the site")
    recover_after: int = Field(default=2, ge=1, le=100,
                               description="consecutive answered probes before new requests go to the cloud again")
    connect_timeout_s: float = Field(default=2.0, gt=0, le=300,
                                     description="a forwarded request whose connection takes longer is answered here")
    idle_timeout_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="a forwarded stream silent for this long is finished on the site")
    request_timeout_s: float = Field(default=600.0, gt=0, le=86_400,
                                     description="a forwarded request unanswered for this long is answered here")


class ServiceConfig(BaseModel):
    """The request path: sketch and expansion budgets, ensemble width, per-point deadlines.

    `pice_cloud.service.PiceService` takes this model as it is: there is no second settings class.
    """

    model_config = ConfigDict(extra="forbid")

    max_points: int = Field(default=defaults.MAX_POINTS, ge=1, le=20)
    max_words: int = Field(default=defaults.MAX_WORDS, ge=2, le=30)
    sketch_tokens: int = Field(default=defaults.SKETCH_TOKENS, ge=8, le=4096)
    tokens_per_point: int = Field(default=defaults.TOKENS_PER_POINT, ge=1, le=4096)
    point_stretch: float = Field(
        default=defaults.POINT_STRETCH, ge=1.0, le=8.0,
        description="a sketch with fewer than max_points points gives each point up to this many times "
                    "tokens_per_point, so the answer's budget (max_points x tokens_per_point) does not shrink with "
                    "the point count (1: every point gets tokens_per_point)")
    max_answer_tokens: int = Field(default=defaults.MAX_ANSWER_TOKENS, ge=1, le=1_000_000,
                                   description="longest cloud-only answer")
    ensemble_width: int = Field(
        default=defaults.ENSEMBLE_WIDTH, ge=1, le=16,
        description="most candidates per point (distinct edges); replicas only use free slots, so width falls to 1 "
                    "under load")
    first_point: Literal["edge", "cloud"] = Field(
        default=defaults.FIRST_POINT,
        description="who expands a progressive answer's first point: the edges, or the cloud, which streams it "
                    "token by token while the edges expand the rest (the answer starts right after the sketch)")
    ensemble_temperature: float = Field(
        default=defaults.ENSEMBLE_TEMPERATURE, ge=0.0, le=2.0,
        description="sampling temperature of a point's second and later replicas (the first keeps the request's), "
                    "so that candidates differ")
    deadline_floor_s: float = Field(default=defaults.DEADLINE_FLOOR_S, gt=0, le=3600)
    deadline_factor: float = Field(
        default=defaults.DEADLINE_FACTOR, gt=0, le=100,
        description="a point waits for a live edge up to this many times its predicted finish (within the floor "
                    "and cap) before the cloud expands it itself: lower trades cloud work for latency")
    deadline_cap_s: float = Field(default=defaults.DEADLINE_CAP_S, gt=0, le=3600)
    temperature: float = Field(default=defaults.TEMPERATURE, ge=0.0, le=2.0, description="edge sampling (0: greedy)")
    top_p: float = Field(default=defaults.TOP_P, gt=0.0, le=1.0)
    router: RouterKind = Field(
        default="embedding", description="mode router for 'auto' requests (embedding falls back to heuristic "
        "when all-minilm-l6-v2 is not fetched)")
    selector: SelectorKind = Field(
        default="learned", description="how one of several candidates of a point is chosen (ensemble_width > 1)")
    adaptive_budget: bool = Field(default=True, description="shorten sketches and expansions under load")
    sketch_guard: bool = Field(
        default=True, description="check each sketch (too few, duplicate, meta, cut or restating headings); a failed "
                                  "one is re-sampled once, then the request is answered cloud-only")
    sketch_format: Literal["constrained", "free"] = Field(
        default="constrained",
        description="constrained: the cloud LLM decodes the sketch under its outline format (3 to max_points "
                    "numbered headings of at most max_words words; the embedded backend masks tokens, an HTTP "
                    "engine gets llm.structured_outputs), so refusals for its form become rare; free: as written")
    expander_model: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[0-9a-f]{12})?$",
        description="points go only to edges running this model (NAME) or build (NAME@BUILD, as edges report "
                    "it); unset: any edge")
    expansion_guard: bool = Field(
        default=True, description="refuse candidates that are empty, echo the prompt, start a letter, repeat "
                                  "another point or themselves; the next candidate or the cloud expands the point")
    max_question_chars: int = Field(
        default=defaults.MAX_QUESTION_CHARS, ge=1, le=MAX_QUESTION_CHARS,
        description="longest question (with its chat history) answered progressively: longer ones are answered "
                    "cloud-only under mode auto and refused (400) under progressive and sot")


# The YAML file's content for the settings class being built (a source between the
# environment and the defaults); a context variable rather than a class attribute so that
# two configs can be loaded concurrently.
_FILE_DATA: ContextVar[dict[str, Any]] = ContextVar("pice_config_file_data", default={})  # noqa: B039


class CloudConfig(BaseSettings):
    """Everything `pice-cloud serve` needs; see the module docstring for the sources."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, extra="forbid",
                                      nested_model_default_partial_update=True)

    cloud_id: str | None = Field(
        default=None, pattern=ID_PATTERN,
        description="this replica's id: its MQTT client id and the topic level edges answer it on; must be unique "
                    "among the replicas sharing a broker (default: cloud-HOST-PORT, or cloud-HOST-PID without a port)")
    server: ServerConfig = Field(default_factory=ServerConfig)
    broker: BrokerSettings | None = Field(default=None, description="external MQTT broker; omit for the "
                                                                    "embedded one on loopback")
    llm: LLMConfig = Field(default_factory=LLMConfig)
    edges: EdgesConfig = Field(default_factory=EdgesConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    site: SiteConfig | None = Field(default=None, description="the site role (pice-cloud site): forward to "
                                   "the cloud while it answers, answer on the site while it does not")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init kwargs) over environment over the YAML file over defaults.
        return init_settings, env_settings, InitSettingsSource(settings_cls, _FILE_DATA.get())

    @property
    def local_edges(self) -> int:
        """In-process edges to start: explicit, else 2 on the embedded broker and 0 on an external one
        (and 0 on a site, whose peers are edge processes on the site broker)."""
        if self.edges.local is not None:
            return self.edges.local
        if self.site is not None:
            return 0
        return defaults.LOCAL_EDGES if self.broker is None else 0

    @property
    def edge_model(self) -> str:
        """The local edges' model: explicit, else the cloud's own local model, else SmolLM2."""
        if self.edges.model:
            return self.edges.model
        return self.llm.model if self.llm.kind == "transformers" else DEFAULT_MODEL

    @property
    def prompt_token_limit(self) -> int | None:
        """Most prompt tokens a request may send (None: only the model's context limits it):
        ``server.max_prompt_tokens`` when set, else `defaults.CPU_MAX_PROMPT_TOKENS` for the
        embedded model on a CPU, whose prefill would otherwise hold a slot for minutes."""
        if self.server.max_prompt_tokens is not None:
            return self.server.max_prompt_tokens
        if self.llm.kind == "transformers" and self.llm.device == "cpu":
            return defaults.CPU_MAX_PROMPT_TOKENS
        return None

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked (for --print-config and logs)."""
        return self.model_dump(mode="json")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections (server, broker, llm, edges, "
                          f"service), got {type(data).__name__}")
    return data


def _lookup(data: Any, loc: tuple[int | str, ...]) -> bool:
    for key in loc:
        found = key in data if isinstance(data, dict) else (
            isinstance(data, list) and isinstance(key, int) and key < len(data))
        if found:
            data = data[key]
        else:
            return False
    return True


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """Field names allowed at the parent of ``loc`` (to say what is expected of an unknown key)."""
    model: Any = CloudConfig
    for key in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(getattr(model, "model_fields", {}))


def _describe(exc: ValidationError, path: Path | None, file_data: dict[str, Any],
              flags: dict[str, Any]) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        env_name = ENV_PREFIX + ENV_DELIMITER.join(str(p) for p in loc).upper()
        if _lookup(flags, loc):
            source = "command line"
        elif env_name in os.environ:
            source = f"environment variable {env_name}"
        elif path is not None and (_lookup(file_data, loc) or not loc or err["type"] != "extra_forbidden"):
            source = f"config file {path}"
        else:
            source = "configuration"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(loc)
            expected = f"unknown field (expected one of: {', '.join(allowed)})" if allowed else "unknown field"
            problems.append(f"{source}: {field}: {expected}")
            continue
        message = str(err["msg"]).removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{source}: {field}: {message}{shown}")
    return "invalid configuration: " + "; ".join(problems)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> CloudConfig:
    """Build the effective configuration from ``path`` (YAML), ``PICE_*`` variables and ``overrides``.

    ``overrides`` (from command-line flags) is nested like the file: ``{"server": {"port": 9000}}``.

    Raises:
        ConfigError: the file is missing or malformed, or a value is invalid; the message names
            where the value came from, the field and what is expected.
    """
    file_path = Path(path) if path is not None else None
    file_data = _read_yaml(file_path) if file_path is not None else {}
    flags = overrides or {}
    token = _FILE_DATA.set(file_data)
    try:
        return CloudConfig(**flags)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file_path, file_data, flags)) from None
    finally:
        _FILE_DATA.reset(token)


def dump_config(config: CloudConfig) -> str:
    """The configuration as YAML, secrets masked."""
    return yaml.safe_dump(config.redacted(), sort_keys=False)
