"""Runtime on onnxruntime (CPU, CUDA or TensorRT execution provider); needs ``pice[edge]``.

The model is the ONNX export of a Hugging Face folder made by ``tools/export_onnx.py`` (see
`pice_edge.runtimes.onnx_export`); tokenizer and chat template are read with ``tokenizers`` and
``jinja2``, so an onnxruntime edge installs neither torch nor transformers. Decoding is our own
KV-cache loop (`pice_edge.runtimes._decode`), step-level so that tasks join a running batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pice_edge.errors import ModelError, ModelNotFoundError, RuntimeUnavailableError
from pice_edge.model_store import resolve
from pice_edge.runtimes._decode import FloatArray, IntArray, LogitsPolicy, ModelShape, StepBatch
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult
from pice_edge.runtimes.onnx_export import PRECISIONS, default_output, onnx_file

log = logging.getLogger(__name__)

#: Short names accepted in provider lists (device profiles use these).
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_PROVIDERS = ("tensorrt", "cuda", "cpu")
_CPU = "CPUExecutionProvider"


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"the onnxruntime runtime needs onnxruntime ({exc}); install it with `pip install 'pice[edge]'` "
            "(on Jetson, take onnxruntime-gpu from NVIDIA's index)"
        ) from exc
    return onnxruntime


def select_providers(requested: Sequence[str], available: Sequence[str], *, engine_cache: Path | None = None,
                     fp16: bool = False, trt_profile: dict[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The requested providers this onnxruntime build has, in order, with their options; CPU last.

    Unknown or unavailable names are skipped with a warning that lists what is available. The
    TensorRT provider's options are onnxruntime's documented ``trt_*`` provider options
    (onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html); ``trt_profile``
    (`tensorrt_profile`) adds the explicit shape ranges of its engine.
    """
    chosen: list[tuple[str, dict[str, Any]]] = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            log.warning("execution provider %r is not available in this onnxruntime build (available: %s); "
                        "falling back to the next one", name, ", ".join(available))
            continue
        if any(full == c for c, _ in chosen):
            continue
        options: dict[str, Any] = {}
        if full == "TensorrtExecutionProvider":
            # Building a TensorRT engine takes minutes on a Jetson: cache it across restarts.
            cache = engine_cache or Path.home() / ".cache" / "pice" / "trt-engines"
            cache.mkdir(parents=True, exist_ok=True)
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                       "trt_fp16_enable": fp16, **(trt_profile or {})}
        chosen.append((full, options))
    if not any(c == _CPU for c, _ in chosen):
        chosen.append((_CPU, {}))
    return chosen


def tensorrt_profile(shape: ModelShape, *, max_batch: int, max_tokens: int) -> dict[str, str]:
    """The TensorRT engine's shape ranges for the decoder export, as onnxruntime's
    ``trt_profile_{min,opt,max}_shapes`` options (``name:d0xd1x...`` joined by commas).

    The export's inputs are all dynamic: ``input_ids`` and ``position_ids`` [batch, new tokens],
    ``attention_mask`` [batch, past + new], ``past_key_values.{i}.key|value`` [batch, kv heads,
    past, head dim] (`pice_edge.runtimes.onnx_export`). Without explicit ranges the TensorRT
    provider builds its engine for the shapes it has seen and rebuilds it whenever a longer
    sequence or a larger batch comes, which on a Jetson takes minutes each time; with them one
    engine serves every batch up to ``max_batch`` sequences of up to ``max_tokens`` tokens
    (prompt and generated), tuned for decoding (one new token, half the context).
    """
    if max_batch < 1 or max_tokens < 2:
        raise ModelError(f"a TensorRT profile needs max_batch >= 1 and max_tokens >= 2 (got {max_batch}, {max_tokens})")

    def shapes(batch: int, new: int, past: int, mask: int) -> str:
        dims: dict[str, tuple[int, ...]] = {"input_ids": (batch, new), "attention_mask": (batch, mask),
                                            "position_ids": (batch, new)}
        for layer in range(shape.layers):
            for kind in ("key", "value"):
                dims[f"past_key_values.{layer}.{kind}"] = (batch, shape.kv_heads, past, shape.head_dim)
        return ",".join(f"{name}:{'x'.join(str(d) for d in sizes)}" for name, sizes in dims.items())

    return {"trt_profile_min_shapes": shapes(1, 1, 0, 1),
            "trt_profile_opt_shapes": shapes(max_batch, 1, max_tokens // 2, max_tokens // 2 + 1),
            "trt_profile_max_shapes": shapes(max_batch, max_tokens, max_tokens - 1, max_tokens)}


def _locate(model: str | Path, precision: str) -> tuple[Path, Path]:
    """(ONNX folder, .onnx file) for a model name, a Hugging Face folder or an ONNX folder."""
    path = Path(str(model)).expanduser()
    if path.is_dir() and onnx_file(path, precision).is_file():
        return path, onnx_file(path, precision)
    hf = resolve(model)
    folder = default_output(hf)
    file = onnx_file(folder, precision)
    if not file.is_file():
        raise ModelNotFoundError(
            f"no {precision} ONNX export of {hf} (looked for {file}); create it with "
            f"`python tools/export_onnx.py --model {model} --precision {precision}`"
        )
    return folder, file


class ChatTemplate:
    """The model's chat template rendered as transformers does (sandboxed jinja2)."""

    def __init__(self, folder: Path) -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise RuntimeUnavailableError(f"chat templates need jinja2: pip install 'pice[edge]' ({exc})") from exc
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        source = (folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").is_file() \
            else config.get("chat_template")
        if not isinstance(source, str):
            raise ModelError(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json)")

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self._specials = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}

    def render(self, messages: Sequence[ChatMessage]) -> str:
        return str(self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                          add_generation_prompt=True, **self._specials))


class OnnxRuntime:
    """`Runtime` (and `SteppingRuntime`) on onnxruntime.

    Args:
        model: model name, Hugging Face folder (its ``onnx/`` export is used) or ONNX folder.
        precision: ``fp32``, ``int8`` or ``int4`` (which export to load).
        providers: execution providers in order of preference (``tensorrt``, ``cuda``, ``cpu`` or
            onnxruntime's full names); unavailable ones are skipped, CPU is always the last resort.
        threads: intra-op threads (default: all cores).
        engine_cache: TensorRT engine cache folder.
        fp16: let TensorRT build fp16 engines.
        max_batch, max_tokens: with the TensorRT provider, build one engine for batches of up to
            ``max_batch`` sequences of up to ``max_tokens`` tokens (`tensorrt_profile`); without
            them TensorRT rebuilds its engine whenever the shapes outgrow the ones it has seen.

    Attributes:
        provider: the execution provider that actually runs the model.
    """

    name = "onnxruntime"

    def __init__(self, model: str | Path = "smollm2-135m-instruct", *, precision: str = "fp32",
                 providers: Sequence[str] = DEFAULT_PROVIDERS, threads: int | None = None,
                 engine_cache: str | Path | None = None, fp16: bool = False, max_batch: int | None = None,
                 max_tokens: int | None = None) -> None:
        ort = _import_ort()
        if precision not in PRECISIONS:
            raise ModelError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise RuntimeUnavailableError(f"the onnxruntime runtime needs `tokenizers`: pip install 'pice[edge]' "
                                          f"({exc})") from exc
        self.folder, self.path = _locate(model, precision)
        self.precision = precision
        hf_name = self.folder.parent.name if self.folder.name == "onnx" else self.folder.name
        self.model_id = hf_name if precision == "fp32" else f"{hf_name}-{precision}"
        try:
            config = json.loads((self.folder / "config.json").read_text())
            self.shape = ModelShape.from_config(config)
            self.policy = LogitsPolicy.from_folder(self.folder, config)
            self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read the model files in {self.folder}: {exc}") from exc
        self.template = ChatTemplate(self.folder)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        profile = None
        if max_batch is not None or max_tokens is not None:
            context = int(config.get("max_position_embeddings") or 2048)
            profile = tensorrt_profile(self.shape, max_batch=max_batch or 1, max_tokens=min(max_tokens or context,
                                                                                            context))
        chosen = select_providers(providers, ort.get_available_providers(),
                                  engine_cache=Path(engine_cache) if engine_cache else None, fp16=fp16,
                                  trt_profile=profile)
        if profile is None and any(c == "TensorrtExecutionProvider" for c, _ in chosen):
            log.warning("TensorRT runs %s without explicit shape ranges: it rebuilds its engine whenever a batch "
                        "or a sequence outgrows the shapes seen so far (minutes on a Jetson); pass max_batch and "
                        "max_tokens", self.path.name)
        started = time.perf_counter()
        try:
            try:
                self.session: Any = ort.InferenceSession(str(self.path), options, providers=[c for c, _ in chosen],
                                                         provider_options=[o for _, o in chosen])
            except Exception as exc:
                # TensorRT wants ranges for every dynamic input of every subgraph it runs; when it
                # splits the graph (an operator it lacks), the inner inputs have none: go on without.
                if profile is None or "profiles" not in str(exc):
                    raise
                log.warning("TensorRT refused the explicit shape ranges (%s); loading without them", exc)
                chosen = select_providers(providers, ort.get_available_providers(),
                                          engine_cache=Path(engine_cache) if engine_cache else None, fp16=fp16)
                self.session = ort.InferenceSession(str(self.path), options, providers=[c for c, _ in chosen],
                                                    provider_options=[o for _, o in chosen])
        except Exception as exc:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph...)
            raise ModelError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        #: The provider that actually runs the graph (the first one the session accepted).
        self.provider: str = self.session.get_providers()[0]
        wanted = chosen[0][0]
        if self.provider != wanted:
            log.warning("asked for %s but onnxruntime runs %s", wanted, self.provider)
        log.info("onnxruntime %s loaded %s (%s) on %s in %.2fs (threads=%s)", ort.__version__, self.path.name,
                 precision, self.provider, time.perf_counter() - started, threads or "all")
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._kv_inputs = [f"past_key_values.{i}.{kind}" for i in range(self.shape.layers) for kind in ("key", "value")]

    # --- Runtime ---------------------------------------------------------------------------

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        return self.template.render(messages) + prefill

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self.new_batch().run(requests)

    def close(self) -> None:
        # Dropping the session frees the weights and any device memory.
        self.session = None

    # --- SteppingRuntime -------------------------------------------------------------------

    def new_batch(self) -> StepBatch:
        return StepBatch(self._forward, self.shape, self.policy, self._encode, self._decode)

    def kv_cache_bytes(self, request: GenerationRequest) -> int:
        # Prompt length estimated from characters (~3.5 per token for English BPE) to keep
        # admission cheap; the cache is fp32 whatever the weights' precision.
        tokens = len(request.prompt) // 3 + request.max_new_tokens
        return tokens * self.shape.kv_bytes_per_token(4)

    # --- internals -------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _forward(self, input_ids: IntArray, attention_mask: IntArray, position_ids: IntArray,
                 past: list[FloatArray]) -> tuple[FloatArray, list[FloatArray]]:
        if self.session is None:
            raise ModelError("the onnxruntime session is closed")
        feed: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                "position_ids": position_ids}
        feed.update(zip(self._kv_inputs, past, strict=True))
        outputs = self.session.run(self._outputs, feed)
        return np.asarray(outputs[0]), list(outputs[1:])


def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime (empty when it is not installed)."""
    try:
        ort = _import_ort()
    except RuntimeUnavailableError:
        return []
    return list(ort.get_available_providers())

