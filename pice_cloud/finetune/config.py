"""The configuration of one fine-tuning run: a typed model from a YAML file and command-line flags.

    role: expander            # or sketcher
    base: smollm2-135m-instruct
    data: ../shared/data/alpaca_eval/gpt-4-turbo.jsonl
    steps: 40
    data_prep: {max_examples: 960, holdout_fraction: 0.1}
    lora: {r: 16, alpha: 32}
    optim: {lr: 5.0e-4, batch_size: 8, micro_batch_size: 4}

Flags override the file (highest precedence last); every invalid value gives one `ConfigError`
naming where it came from (the file or the command line), the field and what is expected.
Defaults are the demo run's (``tools/results/finetune_*.json``): on two CPU cores shared with other
work they took 29 minutes (sketcher) and about 40 (expander), inside the hour the issue allows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pice_cloud.scheduler import Budget
from pice_edge.errors import ConfigError
from pice_edge.model_store import DEFAULT_MODEL, models_dir

Role = Literal["expander", "sketcher"]
_DEFAULT_BUDGET = Budget()
#: Every projection of a Llama-style block: attention and MLP (the DESIGN.md probe's choice).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PATH_FIELDS = ("data", "work_dir", "report_dir")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """How answers become training examples (see `pice_cloud.finetune.data`)."""

    max_points: int = Field(default=_DEFAULT_BUDGET.max_points, ge=3, le=8,
                            description="the sketch budget shown in sketcher prompts (serving default)")
    max_words: int = Field(default=_DEFAULT_BUDGET.max_words, ge=2, le=12,
                           description="longest heading in words (longer ones would be cut at serving)")
    min_points: int = Field(default=3, ge=2, le=8, description="fewest points of a usable answer")
    max_outline_points: int = Field(default=8, ge=3, le=12, description="most points of a usable answer")
    target_sentences: int = Field(default=2, ge=1, le=6,
                                  description="sentences of a point kept as its expansion (the prompt asks two)")
    min_target_words: int = Field(default=8, ge=1, le=200, description="shortest expansion target in words")
    max_target_tokens: int = Field(default=_DEFAULT_BUDGET.tokens_per_point - 8, ge=8, le=4096,
                                   description="longest expansion target (below the serving budget per point)")
    max_seq_len: int = Field(default=320, ge=32, le=8192, description="longest prompt + target in tokens")
    holdout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0,
                                    description="share of instructions kept out of training (evaluation)")
    max_examples: int | None = Field(default=None, ge=1, description="subsample the training examples to this many")
    max_line_bytes: int = Field(default=1 << 20, ge=1024, description="longest accepted JSONL line")
    skip_bad_lines: bool = Field(default=False,
                                 description="count malformed lines and go on instead of stopping at the first")

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        if self.min_points > self.max_outline_points:
            raise ValueError(f"min_points ({self.min_points}) exceeds max_outline_points ({self.max_outline_points})")
        return self


class LoraConfig(_Section):
    """The LoRA adapter (peft)."""

    r: int = Field(default=16, ge=1, le=512)
    alpha: int = Field(default=32, ge=1, le=4096)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS), min_length=1)


class OptimConfig(_Section):
    """AdamW with linear warm-up and linear decay."""

    lr: float = Field(default=5e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=8, ge=1, le=4096, description="examples per optimizer step")
    micro_batch_size: int = Field(default=4, ge=1, le=4096,
                                  description="examples per forward pass (gradient accumulation)")
    warmup_steps: int = Field(default=4, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _micro(self) -> OptimConfig:
        if self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size ({self.batch_size})")
        return self


class FinetuneConfig(_Section):
    """Everything one `pice-cloud finetune` run needs."""

    role: Role
    data: Path = Field(description="JSONL of {\"instruction\", \"output\"} records")
    base: str = Field(default=DEFAULT_MODEL, min_length=1, description="base model: store name or folder")
    name: str | None = Field(default=None, description="store name of the result (default: <base>-pice-<role>)")
    steps: int = Field(default=40, ge=1, le=1_000_000, description="optimizer steps")
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, le=1024, description="torch CPU threads (default: torch's)")
    checkpoint_every: int = Field(default=10, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1)
    work_dir: Path | None = Field(default=None,
                                  description="checkpoints and the default report folder "
                                              "(default: <models dir>/../finetune/<name>)")
    report_dir: Path | None = Field(default=None, description="where finetune_<role>.json/.png go "
                                                              "(default: the work folder)")
    eval_examples: int = Field(default=32, ge=0, description="held-out examples whose loss is measured "
                                                             "before and after training")
    store: bool = Field(default=True, description="merge the adapter and install the result in the model store")
    replace: bool = Field(default=False, description="overwrite an installed model of the same name")
    negatives_after: float | None = Field(
        default=0.5, ge=0.0, lt=1.0,
        description="sketcher: after this share of the steps, the model being trained outlines every training "
                    "instruction (greedy, the serving prompt) and each heading the serving guards call meta "
                    "('Introduction', 'Conclusion', 'The first step') becomes an unlikelihood target in its own "
                    "context (null: none)")
    negatives_outlines: int | None = Field(
        default=256, ge=1, description="sketcher: most training instructions outlined for negatives (a seeded "
                                       "sample; null: all). On 2 CPU cores SmolLM2-135M writes about 30 a minute")
    negatives_per_step: int = Field(default=4, ge=1, le=4096, description="sketcher: negatives added to each step")
    negative_weight: float = Field(default=1.0, ge=0.0, le=100.0,
                                   description="sketcher: weight of the mean unlikelihood of a step's negatives")
    data_prep: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("must be 1-64 characters of a-z 0-9 . _ - starting with a letter or digit")
        return value

    @property
    def model_name(self) -> str:
        """The result's name in the model store."""
        if self.name:
            return self.name
        stem = Path(self.base).name.lower().removesuffix("-instruct")
        stem = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._") or "model"
        return f"{stem}-pice-{self.role}"[:64]

    @property
    def work_path(self) -> Path:
        """Where checkpoints go."""
        return self.work_dir if self.work_dir is not None else models_dir().parent / "finetune" / self.model_name

    @property
    def report_path(self) -> Path:
        """The JSON report; the loss plot goes beside it with ``.png``."""
        folder = self.report_dir if self.report_dir is not None else self.work_path
        return folder / f"finetune_{self.role}.json"


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
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def _has(data: Any, loc: tuple[int | str, ...]) -> bool:
    for key in loc:
        if isinstance(data, dict) and key in data:
            data = data[key]
        else:
            return False
    return True


def _describe(exc: ValidationError, path: Path | None, file_data: dict[str, Any], flags: dict[str, Any]) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        if _has(flags, loc):
            source = "command line"
        elif path is not None and (_has(file_data, loc) or err["type"] != "missing"):
            source = f"config file {path}"
        else:
            source = "configuration"
        if err["type"] == "extra_forbidden":
            problems.append(f"{source}: {field}: unknown field")
            continue
        if err["type"] == "missing":
            hint = f" (give --{field.replace('_', '-')} or set it in the config file)" if len(loc) == 1 else ""
            problems.append(f"{source}: {field}: required{hint}")
            continue
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{source}: {field}: {str(err['msg']).removeprefix('Value error, ')}{shown}")
    return "invalid fine-tuning configuration: " + "; ".join(problems)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_finetune_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """The effective configuration from ``path`` (YAML) with ``overrides`` (flags, nested like the file).

    Raises:
        ConfigError: the file is missing or malformed, or a value is invalid; the message names
            the file or the command line, the field and what is expected.
    """
    file_path = Path(path) if path is not None else None
    file_data = _read_yaml(file_path) if file_path is not None else {}
    if file_path is not None:
        # Paths in a file are relative to the file, so a config travels with its data.
        for key in _PATH_FIELDS:
            value = file_data.get(key)
            if isinstance(value, str) and not Path(value).expanduser().is_absolute():
                file_data[key] = str(file_path.parent / value)
    flags = overrides or {}
    try:
        return FinetuneConfig.model_validate(_merge(file_data, flags))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file_path, file_data, flags)) from None
