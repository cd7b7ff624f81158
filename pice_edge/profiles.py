"""Device profiles: one YAML file per edge device class, validated by `DeviceProfile`.

A profile says how an edge device should run its model: which runtime and execution providers,
at which precision, how large a batch and how much memory, how many CPU threads, and which
Jetson power mode it was sized for. ``pice-edge run --profile NAME`` loads one; command-line
flags override single values. A profile's optional ``site`` section (`SiteRole`) sizes the site
role on the same device: the LLM that answers locally when the cloud is unreachable, and how many
HTTP requests it takes at once (``pice_cloud.llm.edge_runtime.site_llm_overrides``).

Where profiles are found (first match wins):

1. a path to a ``.yaml`` file (``--profile ./my-board.yaml``);
2. ``$PICE_PROFILES_DIR/NAME.yaml``, for site-specific profiles;
3. the profiles shipped with the package, ``pice_edge/firmware_configs/NAME.yaml``.

The repository's top-level ``firmware_configs/`` is the source of truth; ``pice_edge/firmware_configs``
is a symbolic link to it, and the wheel carries the YAML files as package data, so an edge
installed with ``pip install pice`` (no repository checkout) finds them too.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pice_edge.errors import ConfigError
from pice_edge.prompts import EXPANSION_NO_REPEAT_NGRAM_SIZE, EXPANSION_REPETITION_PENALTY

PROFILES_ENV = "PICE_PROFILES_DIR"
_PACKAGED = "firmware_configs"

#: Runtime names a profile may ask for (the modules under ``pice_edge/runtimes``).
RuntimeName = Literal["transformers", "onnxruntime", "tensorrt_llm", "tensorrt_edgellm"]
#: Numeric precision of the weights (and activations where the runtime allows).
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
#: onnxruntime's names of the execution providers PICE knows how to configure.
ExecutionProvider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]



def _cpu_only() -> list[ExecutionProvider]:
    return ["CPUExecutionProvider"]


class SiteRole(BaseModel):
    """How the device runs the site role: an OpenAI-compatible endpoint whose own LLM (the cloud's
    backend kind ``edge``, on a `pice_edge.runtimes` runtime) answers when the cloud is unreachable.

    Sized apart from the edge role (the top-level fields): a device may run both, and the site's
    LLM writes whole answers, not short expansions.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_batch: int = Field(ge=1, le=256, description="sequences the site LLM decodes together")
    memory_budget_mb: int = Field(
        ge=64, le=1_048_576,
        description="memory the site LLM may use (weights + KV cache); its KV-cache budget is this less the weights",
    )
    max_concurrent: int = Field(ge=1, le=4096, description="HTTP requests the site answers at the same time")


class DeviceProfile(BaseModel):
    """One device class's settings. Unknown fields are errors (a typo must not pass silently)."""

    # strict: YAML has real types, so `max_batch: "8"` or `threads: true` is a mistake, not a value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="profile name; equals the file's stem")
    description: str = Field(default="", max_length=500, description="the hardware, in words")
    runtime: RuntimeName = Field(default="transformers", description="inference runtime")
    execution_providers: list[ExecutionProvider] = Field(
        default_factory=_cpu_only,
        min_length=1,
        description="onnxruntime providers in order of preference; the first available one runs",
    )
    precision: Precision = "fp32"
    max_batch: int = Field(default=4, ge=1, le=256, description="most tasks generated together")
    memory_budget_mb: int = Field(ge=64, le=1_048_576, description="memory the runtime may use (weights + KV cache)")
    engine_cache_dir: str | None = Field(
        default=None, description="where TensorRT engines are cached (built once per device, minutes)"
    )
    power_mode: str | None = Field(default=None, max_length=64, description="nvpmodel mode name the values assume")
    threads: int | None = Field(default=None, ge=1, le=1024, description="CPU threads; None = runtime default")
    ensemble_temperature: float = Field(
        default=0.7, ge=0.0, le=2.0,
        description="deprecated, ignored: the cloud sets each replica's sampling in its task "
                    "(service.ensemble_temperature); accepted so that older profile files still load",
    )
    model: str | None = Field(default=None, max_length=500, description="default model name or folder")
    repetition_penalty: float = Field(
        default=EXPANSION_REPETITION_PENALTY, ge=1.0, le=2.0,
        description="repetition penalty of expansions (Hugging Face semantics, 1.0 = off); a task's own wins",
    )
    no_repeat_ngram_size: int | None = Field(
        default=EXPANSION_NO_REPEAT_NGRAM_SIZE, ge=0, le=32,
        description="never repeat a token n-gram of this size within an expansion and its prompt (0 = off); "
        "unset: the model folder's generation_config.json decides",
    )
    site: SiteRole | None = Field(
        default=None,
        description="how the device runs the site role (its own LLM and endpoint); unset: the profile was not "
                    "sized for the site role",
    )

    @field_validator("execution_providers")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a provider twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if self.execution_providers[-1] != "CPUExecutionProvider":
            # Without CPU last, a missing GPU library makes onnxruntime fail instead of falling back.
            raise ValueError("execution_providers must end with CPUExecutionProvider (the fallback)")
        if self.runtime == "transformers" and self.precision in ("int8", "int4"):
            raise ValueError(f"precision {self.precision} needs runtime onnxruntime, tensorrt_llm or tensorrt_edgellm")
        return self

    @property
    def engine_cache_path(self) -> Path | None:
        """`engine_cache_dir` with ``~`` and environment variables expanded."""
        if self.engine_cache_dir is None:
            return None
        return Path(os.path.expandvars(self.engine_cache_dir)).expanduser()

    @property
    def uses_gpu(self) -> bool:
        return self.execution_providers[0] != "CPUExecutionProvider"


def packaged_dir() -> Path:
    """The folder of profiles shipped with the package."""
    return Path(str(resources.files("pice_edge") / _PACKAGED))


def search_dirs() -> list[Path]:
    """Folders searched for a profile name, in order."""
    dirs = []
    env = os.environ.get(PROFILES_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(packaged_dir())
    return dirs


def list_profiles() -> dict[str, Path]:
    """Every profile name that `find_profile` resolves, with its file (earlier folders win)."""
    found: dict[str, Path] = {}
    for folder in search_dirs():
        if folder.is_dir():
            for file in sorted(folder.glob("*.yaml")):
                found.setdefault(file.stem, file)
    return found


def find_profile(name_or_path: str | os.PathLike[str]) -> Path:
    """The YAML file for a profile name or path.

    Raises:
        ConfigError: no such file or name; the message lists the known names.
    """
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"profile file {path} does not exist")
        return path
    profiles = list_profiles()
    if text not in profiles:
        where = ", ".join(str(d) for d in search_dirs())
        raise ConfigError(
            f"unknown profile {text!r}; known profiles: {', '.join(sorted(profiles)) or 'none'} "
            f"(searched {where}; pass a path to a .yaml file for your own)"
        )
    return profiles[text]


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load and validate a profile by name or path.

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping, or fails validation; the
            message names the file and the field.
    """
    path = find_profile(name_or_path)
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read profile ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return parse_profile(data, source=path)


def parse_profile(data: Any, *, source: Path) -> DeviceProfile:
    """Validate already-parsed YAML ``data`` read from ``source`` (used in errors and for the name)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a profile must be a YAML mapping of field: value")
    data = {"name": source.stem, **data}
    if data["name"] != source.stem:
        raise ConfigError(f"{source}: field 'name': {data['name']!r} must equal the file name {source.stem!r}")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(profile)"
            msg = "unknown field (check the spelling; see firmware_configs/README.md)" \
                if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{source}: field '{where}': {msg}")
        raise ConfigError("\n".join(lines)) from exc


__all__ = [
    "PROFILES_ENV",
    "DeviceProfile",
    "SiteRole",
    "find_profile",
    "list_profiles",
    "load_profile",
    "packaged_dir",
    "parse_profile",
    "search_dirs",
]
