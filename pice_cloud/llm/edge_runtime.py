"""Cloud LLM backend on an edge runtime (kind ``edge``): the site role's LLM, without torch.

A site (an OpenAI-compatible endpoint on a Jetson-class device that answers locally when the
cloud is unreachable) writes sketches, fallback expansions and whole answers with a model run by
one of `pice_edge.runtimes` (onnxruntime by default; TensorRT through its execution provider),
built the way ``pice-edge run`` builds an edge's (`pice_edge.assembly`): a device profile gives
the execution providers, precision, threads and TensorRT engine cache, and its ``site`` section
(`pice_edge.profiles.SiteRole`) the batch and the memory budget; options given here win. The
profile's own ``runtime`` is the edge role's and is not used: the site's is ``runtime`` here
(``llm.runtime``), since the edge role's may need torch (``transformers``).

Generations are continuously batched like the transformers backend's (`EmbeddedBackend`, shared
with it): streamed and non-streamed answers come out of the same loop. Counting tokens and
decoding streamed ids on the event loop use a ``tokenizers.Tokenizer`` of the backend's own, read
from the model folder's ``tokenizer.json``, and the chat template rendered with jinja2
(`pice_edge.runtimes.onnxruntime.ChatTemplate`): the runtime's tokenizer is busy on the model
thread, and transformers is not installed without torch.

Per-token log-probabilities (``logprobs`` in a chat request) are refused with
`UnavailableInModeError` (HTTP 400): the step engine keeps only each sequence's mean
log-probability, and an edge runtime has no per-position alternatives to report.

Nothing here imports torch or transformers, at import time or later (with the onnxruntime runtime).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from pice_cloud.errors import BackendError, UnavailableInModeError
from pice_cloud.llm.base import ChatRequest, Completion
from pice_cloud.llm.embedded import EmbeddedBackend
from pice_edge.assembly import EdgeSettings, kv_budget_mb, load_runtime, resolve_settings
from pice_edge.errors import ConfigError, PiceError
from pice_edge.model_store import DEFAULT_MODEL, resolve
from pice_edge.profiles import DeviceProfile, list_profiles, load_profile
from pice_edge.runtimes.base import ChatMessage, Runtime
from pice_edge.runtimes.onnxruntime import ChatTemplate

log = logging.getLogger(__name__)

#: The runtime of the site's LLM when none is named: torch-free, and steps (continuous batching).
DEFAULT_RUNTIME = "onnxruntime"


def _model_folder(runtime: Runtime, model: str | Path | None) -> Path:
    """The folder with the model's ``tokenizer.json`` and ``config.json``: the runtime's (an ONNX
    export's folder, a Hugging Face folder), else the one ``model`` names."""
    candidates: list[Path] = []
    for attribute in ("folder", "path"):
        where = getattr(runtime, attribute, None)
        if where is not None:
            path = Path(where)
            candidates.append(path if path.is_dir() else path.parent)
    if model is not None:
        with contextlib.suppress(PiceError):  # not a model name or folder: the runtime's folders only
            candidates.append(resolve(model))
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return folder
    looked = ", ".join(str(c) for c in candidates) or "nowhere: the runtime names no folder and no model was given"
    raise BackendError(f"the edge backend needs the model's tokenizer.json (looked in {looked}); pass the model folder")


class EdgeRuntimeBackend(EmbeddedBackend[Runtime]):
    """A cloud LLM on an already loaded edge runtime (see the module docstring); `load_edge_backend`
    builds one from a model, a runtime name and a device profile.

    Args:
        runtime: any `pice_edge.runtimes.base.Runtime`; a `StreamingRuntime` (onnxruntime,
            transformers) decodes step by step and streams token by token, another one generates
            whole batches and streams each answer in one piece. The backend owns it: `close`
            releases it.
        model: where the tokenizer is when the runtime does not say (a model name or folder).
        max_batch: most sequences decoded together.
        memory_budget_mb: most KV-cache MiB of the sequences in the batch (None: ``max_batch``
            alone bounds it).

    Attributes:
        settings: what `load_edge_backend` resolved (runtime, profile, precision...); None when
            the runtime was given.

    Raises:
        BackendError: no ``tokenizer.json`` beside the model, or ``tokenizers`` is not installed.
        ModelError: the model folder has no chat template.
    """

    name = "edge"

    def __init__(
        self,
        runtime: Runtime,
        *,
        model: str | Path | None = None,
        max_batch: int = 8,
        memory_budget_mb: float | None = None,
    ) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BackendError(f"the edge backend needs `tokenizers`: pip install 'pice[edge]' ({exc})") from exc
        folder = _model_folder(runtime, model)
        try:
            self._counter = Tokenizer.from_file(str(folder / "tokenizer.json"))
            config: dict[str, Any] = (
                json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
            )
        except Exception as exc:  # OSError, bad JSON, or the untyped Exception tokenizers raises
            raise BackendError(f"cannot read the tokenizer or config of {folder}: {exc}") from exc
        self._template = ChatTemplate(folder)
        context = config.get("max_position_embeddings")
        super().__init__(
            runtime,
            max_batch=max_batch,
            memory_budget_mb=memory_budget_mb,
            context_tokens=context if isinstance(context, int) and context > 0 else None,
        )
        self.settings: EdgeSettings | None = None

    def count_tokens(self, text: str) -> int:
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return self.count_tokens(self._template.render(messages))

    def _decode(self, ids: list[int]) -> str:
        return str(self._counter.decode(ids, skip_special_tokens=True))

    def _refuse_logprobs(self, requests: Sequence[ChatRequest]) -> None:
        if any(r.logprobs is not None for r in requests):
            raise UnavailableInModeError(
                f"per-token logprobs are not available from the edge LLM backend ({self.runtime.name} runtime): it "
                "keeps only each answer's mean log-probability; ask without logprobs"
            )

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        self._refuse_logprobs(requests)
        return await super().complete(requests)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Completion, None]:
        self._refuse_logprobs([request])
        async for item in super().stream(request):
            yield item

    async def close(self) -> None:
        """Stop the engine and the model thread, then release the runtime's model."""
        await super().close()
        self.runtime.close()


def load_edge_backend(
    model: str | Path = DEFAULT_MODEL,
    *,
    runtime: str = DEFAULT_RUNTIME,
    profile: str | DeviceProfile | None = None,
    threads: int | None = None,
    max_batch: int | None = None,
    memory_budget_mb: float | None = None,
    precision: str | None = None,
    providers: Sequence[str] | None = None,
) -> EdgeRuntimeBackend:
    """The site's LLM: ``model`` on the edge ``runtime``, set up from a device ``profile`` the way
    ``pice-edge run`` sets up an edge (`pice_edge.assembly.resolve_settings`, `load_runtime`).
    Slow (the weights load here): call it off the event loop.

    Each value given here wins over the profile's; None takes it from the profile:

    - ``threads``, ``precision``, ``providers``: the profile's, else the runtime's defaults;
    - ``max_batch``: the profile's ``site.max_batch``, else its edge ``max_batch``;
    - ``memory_budget_mb``: weights plus KV cache, like a profile's (the KV-cache budget is this
      less the loaded weights, `pice_edge.assembly.kv_budget_mb`): the profile's
      ``site.memory_budget_mb``, else its edge ``memory_budget_mb``; none without a profile.

    Raises:
        ConfigError: the profile is missing or invalid, or a setting the runtime cannot take.
        RuntimeUnavailableError: the runtime's library is not installed.
        ModelNotFoundError, ModelError: the model (or its ONNX export) is missing or unreadable.
        BackendError: no tokenizer beside the model.
    """
    device = load_profile(profile) if isinstance(profile, str) else profile
    site = device.site if device is not None else None
    if device is not None and site is None:
        log.info(
            "profile %s has no site section: the site LLM runs with the edge role's batch and memory budget",
            device.name,
        )
    settings = resolve_settings(
        device,
        model=str(model),
        runtime=runtime,
        max_batch=max_batch or (site.max_batch if site else None),
        threads=threads,
        precision=precision,
        providers=tuple(providers) if providers else None,
    )
    loaded = load_runtime(settings)
    try:
        total = memory_budget_mb if memory_budget_mb is not None else (site.memory_budget_mb if site else None)
        backend = EdgeRuntimeBackend(
            loaded,
            model=settings.model,
            max_batch=settings.max_batch,
            memory_budget_mb=kv_budget_mb(settings, loaded, total_mb=total),
        )
    except BaseException:
        loaded.close()
        raise
    backend.settings = settings
    log.info(
        "edge LLM backend: %s on %s (profile %s, max_batch %d, KV budget %s MiB)",
        backend.model_id,
        settings.runtime,
        settings.profile_name or "none",
        settings.max_batch,
        "unbounded" if backend.engine.memory_budget_bytes is None else backend.engine.memory_budget_bytes >> 20,
    )
    return backend


def site_llm_overrides(profile: str) -> dict[str, Any]:
    """The configuration overrides (nested like `pice_cloud.config.load_config`'s) that run the
    site role as ``profile``'s ``site`` section sizes it: the LLM on an edge runtime (kind
    ``edge``) with its batch and memory budget, and the HTTP requests answered at once.

    Raises:
        ConfigError: the profile is missing or invalid, or has no ``site`` section (the message
            names the profiles that have one).
    """
    device = load_profile(profile)
    if device.site is None:
        sized = [name for name in sorted(list_profiles()) if _has_site_section(name)]
        raise ConfigError(
            f"profile {device.name!r} was not sized for the site role: add a `site:` section (max_batch, "
            "memory_budget_mb, max_concurrent; see firmware_configs/README.md) to its file, or pick one of: "
            f"{', '.join(sized) or 'none'}"
        )
    return {
        "llm": {
            "kind": "edge",
            "profile": profile,
            "max_batch": device.site.max_batch,
            "memory_budget_mb": device.site.memory_budget_mb,
        },
        "server": {"max_concurrent": device.site.max_concurrent},
    }


def _has_site_section(name: str) -> bool:
    try:
        return load_profile(name).site is not None
    except ConfigError:
        return False  # a broken profile elsewhere in the search path is not a suggestion


__all__ = ["DEFAULT_RUNTIME", "EdgeRuntimeBackend", "load_edge_backend", "site_llm_overrides"]
