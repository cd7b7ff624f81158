"""Building a configured edge node: the edge's counterpart of `pice_cloud.bootstrap`.

This is the one way an `EdgeNode` is assembled from settings; ``pice-edge run`` and the cloud's
in-process edges of the single-host setup (`pice_cloud.bootstrap`) both go through
`assemble_edge`, so a device profile's settings, its KV-cache budget and the model's build reach
every node the same way:

    device profile (YAML) + flags -> `EdgeSettings` (`resolve_settings`: flags over profile over defaults)
    `EdgeSettings` -> runtime (`load_runtime`, on a worker thread: the weights load there)
                   -> KV-cache budget of a batch (`kv_budget_mb`: flag, or profile budget less the weights)
                   -> model store name and build (`model_identity`: status reports ``NAME@BUILD``)
                   -> rollout policy (`RolloutPolicy`: a new build loads with the same settings)
                   -> `EdgeNode` (built, not started: the caller starts and stops it)

What stays with the caller: how the broker is reached (`BrokerSettings`: flags and credentials
for ``pice-edge run``, the cloud's own broker for local edges), the device id, and zeroconf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pice_edge.errors import ConfigError, PiceError
from pice_edge.model_store import DEFAULT_MODEL
from pice_edge.prompts import EXPANSION_NO_REPEAT_NGRAM_SIZE, EXPANSION_REPETITION_PENALTY

if TYPE_CHECKING:
    from pice_edge.node import EdgeNode
    from pice_edge.profiles import DeviceProfile
    from pice_edge.runtimes.base import Runtime
    from pice_edge.transport import BrokerSettings

log = logging.getLogger(__name__)

#: Execution providers of the onnxruntime runtime when neither a flag nor a profile names them.
DEFAULT_PROVIDERS: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
#: Tasks generated together when neither a flag nor a profile says.
DEFAULT_MAX_BATCH = 4
#: The smallest KV-cache budget derived from a profile (MiB): a profile whose memory budget the
#: weights nearly fill still runs batches of one.
MIN_KV_BUDGET_MB = 64.0
#: Weight files counted against a profile's memory budget.
_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data")


@dataclass(frozen=True)
class EdgeSettings:
    """What an edge runs with, resolved (`resolve_settings`): flags over profile over defaults."""

    profile: DeviceProfile | None = None
    model: str = DEFAULT_MODEL
    runtime: str = "transformers"
    max_batch: int = DEFAULT_MAX_BATCH
    threads: int | None = None
    precision: str = "fp32"
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    #: KV-cache budget of a batch (MiB) given outright; None: derived from the profile (`kv_budget_mb`).
    memory_budget_mb: float | None = None
    repetition_penalty: float = EXPANSION_REPETITION_PENALTY
    no_repeat_ngram_size: int | None = EXPANSION_NO_REPEAT_NGRAM_SIZE

    @property
    def profile_name(self) -> str:
        """The profile's name, reported in status ("" without a profile)."""
        return self.profile.name if self.profile else ""


def resolve_settings(
    profile: DeviceProfile | None = None,
    *,
    model: str | None = None,
    runtime: str | None = None,
    max_batch: int | None = None,
    threads: int | None = None,
    precision: str | None = None,
    providers: tuple[str, ...] | None = None,
    memory_budget_mb: float | None = None,
) -> EdgeSettings:
    """The settings an edge runs with: each value given here over the profile's over the
    built-in default (None means "not given"). Repetition control comes from the profile only."""
    return EdgeSettings(
        profile=profile,
        model=model or (profile.model if profile and profile.model else DEFAULT_MODEL),
        runtime=runtime or (profile.runtime if profile else "transformers"),
        max_batch=max_batch or (profile.max_batch if profile else DEFAULT_MAX_BATCH),
        threads=threads if threads is not None else (profile.threads if profile else None),
        precision=precision or (profile.precision if profile else "fp32"),
        providers=providers or (tuple(profile.execution_providers) if profile else DEFAULT_PROVIDERS),
        memory_budget_mb=memory_budget_mb,
        repetition_penalty=profile.repetition_penalty if profile else EXPANSION_REPETITION_PENALTY,
        no_repeat_ngram_size=profile.no_repeat_ngram_size if profile else EXPANSION_NO_REPEAT_NGRAM_SIZE,
    )


def runtime_options(settings: EdgeSettings) -> dict[str, Any]:
    """The settings in the form the chosen runtime's constructor takes.

    Raises:
        ConfigError: the profile's precision is not available with that runtime.
    """
    options: dict[str, Any] = {"model": settings.model, "threads": settings.threads}
    profile = settings.profile
    cache = profile.engine_cache_path if profile else None
    if settings.runtime == "onnxruntime":
        # fp16 is a TensorRT build option over the fp32 export; int8/int4 are separate exports.
        options.update(providers=list(settings.providers),
                       precision="fp32" if settings.precision == "fp16" else settings.precision,
                       fp16=settings.precision == "fp16", engine_cache=str(cache) if cache else None)
        return options
    if settings.runtime == "tensorrt_edgellm":
        # Its repetition control is checked at start: an engine without it refuses the profile.
        options.update(max_batch=settings.max_batch,
                       engine_dir=str(cache / Path(settings.model).name) if cache else None,
                       repetition_penalty=settings.repetition_penalty,
                       no_repeat_ngram_size=settings.no_repeat_ngram_size)
        return options
    if profile is None:
        return options
    if settings.runtime == "transformers":
        dtypes = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
        if settings.precision not in dtypes:
            raise ConfigError(f"profile {profile.name!r}: precision {settings.precision} is not available with the "
                              "transformers runtime; use --runtime onnxruntime or another profile")
        options["dtype"] = dtypes[settings.precision]
        options["device"] = "cuda" if "CUDAExecutionProvider" in profile.execution_providers else "cpu"
    return options


def load_runtime(settings: EdgeSettings) -> Runtime:
    """The runtime ``settings`` describe, its model loaded (slow: call it off the event loop).

    Raises:
        ConfigError: a setting the runtime does not take, or a precision it does not offer.
        RuntimeUnavailableError: the runtime's library is not installed.
    """
    # Looked up at call time, not import time: tests/fault_edge.py wraps it to inject faults.
    from pice_edge.runtimes import create_runtime

    options = runtime_options(settings)
    try:
        return create_runtime(settings.runtime, **options)
    except TypeError as exc:
        if "unexpected keyword" not in str(exc):
            raise
        raise ConfigError(f"runtime {settings.runtime!r} does not take a profile setting ({exc}); "
                          "remove it from the profile or choose another runtime") from exc


def weights_mb(runtime: Runtime) -> float:
    """MiB of the weight files the runtime loaded (0 when it does not say where they are)."""
    where = getattr(runtime, "path", None)
    if where is None:
        return 0.0
    path = Path(where)
    # An ONNX export is one file with its external data beside it; a Hugging Face model a folder.
    files = [path, *path.parent.glob(path.name + ".data")] if path.is_file() else list(path.glob("*"))
    return sum(f.stat().st_size for f in files if f.is_file() and f.suffix in _WEIGHT_SUFFIXES) / 2**20


def kv_budget_mb(settings: EdgeSettings, runtime: Runtime, *, total_mb: float | None = None) -> float | None:
    """A batch's KV-cache budget (MiB): the one given outright, else a memory budget (``total_mb``,
    or the profile's) less the weights the runtime loaded (at least `MIN_KV_BUDGET_MB`); None
    without either (``max_batch`` alone bounds a batch). ``total_mb`` is for a model sized apart
    from the edge role, such as the site role's LLM (`pice_edge.profiles.SiteRole`)."""
    if settings.memory_budget_mb is not None:
        return settings.memory_budget_mb
    if total_mb is None:
        if settings.profile is None:
            return None
        total_mb = settings.profile.memory_budget_mb
    return max(MIN_KV_BUDGET_MB, total_mb - weights_mb(runtime))


def model_identity(model: str) -> tuple[str | None, str | None]:
    """The model store's name and the build of the folder ``model`` names; (None, None) when it
    is not a model folder with a manifest (the node then reports the runtime's model id)."""
    from pice_edge import model_store

    try:
        path = model_store.resolve(model)
    except PiceError:
        return None, None
    build = model_store.build_id(path)
    return (path.name, build) if build else (None, None)


def _adopted_settings(settings: EdgeSettings, root: Path, device_id: str) -> EdgeSettings:
    """``settings`` with the model this edge adopted from the fleet's rollout (`pice_edge.rollout`),
    when it has one and the build is intact on this disk: a restart keeps the build the fleet
    chose, whatever ``--model`` says (``--no-rollout`` ignores both)."""
    from pice_edge.rollout import adopted, adopted_path, local_build

    record = adopted(root, device_id)
    if record is None:
        return settings
    if model_identity(settings.model) == (record.model, record.build):
        return settings
    folder = local_build(root, record.model, record.build, [Path(record.path)])
    if folder is None:
        log.warning("edge %s adopted %s@%s from the fleet's rollout, but that build is no longer intact on this disk; "
                    "starting on %s (the fleet's rollout, if still announced, brings it back)", device_id,
                    record.model, record.build, settings.model)
        return settings
    log.warning("edge %s: starting on %s@%s, the build the fleet's rollout gave it (%s), instead of --model %s; "
                "--no-rollout ignores rollouts, or delete %s", device_id, record.model, record.build, folder,
                settings.model, adopted_path(root, device_id))
    return dataclasses.replace(settings, model=str(folder))


async def assemble_edge(
    settings: EdgeSettings,
    *,
    device_id: str,
    broker: BrokerSettings,
    profile_name: str | None = None,
    heartbeat_s: float = 2.0,
    follow_rollout: bool = False,
    api_key: str | None = None,
) -> EdgeNode:
    """Build the edge node ``settings`` describe (not started: the caller starts and stops it).

    The runtime loads on a worker thread, so the caller's event loop keeps serving (mDNS
    queries, signals, other nodes) while the weights load.

    Args:
        settings: what the node runs (`resolve_settings`).
        device_id: the node's id (its MQTT client id and topic level).
        broker: how the node reaches the MQTT broker.
        profile_name: the profile name reported in status (default: the settings' profile's).
        heartbeat_s: status interval in seconds.
        follow_rollout: fetch, verify and switch to the build the fleet's rollout announces,
            loading it with these same settings; ``api_key`` is the cloud's, for the download.
            The node starts on the build it adopted from an earlier rollout, when that build is
            intact on this disk (`pice_edge.rollout`), instead of ``settings.model``.

    Raises:
        ConfigError: a setting the runtime cannot take.
        RuntimeUnavailableError: the runtime's library is not installed.
    """
    from pice_edge.node import EdgeNode
    from pice_edge.rollout import RolloutPolicy

    rollout = RolloutPolicy(loader=lambda path: load_runtime(dataclasses.replace(settings, model=str(path))),
                            api_key=api_key) if follow_rollout else None
    if rollout is not None:
        settings = await asyncio.to_thread(_adopted_settings, settings, rollout.root, device_id)
    runtime = await asyncio.to_thread(load_runtime, settings)
    model_name, build = model_identity(settings.model)
    return EdgeNode(runtime, device_id=device_id, broker=broker,
                    profile=settings.profile_name if profile_name is None else profile_name,
                    max_batch=settings.max_batch, heartbeat_s=heartbeat_s,
                    memory_budget_mb=kv_budget_mb(settings, runtime),
                    repetition_penalty=settings.repetition_penalty,
                    no_repeat_ngram_size=settings.no_repeat_ngram_size,
                    model_name=model_name, model_build=build, rollout=rollout)
