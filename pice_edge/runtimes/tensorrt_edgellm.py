"""Runtime on NVIDIA TensorRT Edge-LLM (Jetson Thor, Jetson Orin on JetPack 7.2; DRIVE Thor).

TensorRT Edge-LLM is NVIDIA's inference runtime for generative models on embedded platforms: a
C++ runtime with Python bindings, built from source on the device (NVIDIA's installation guide;
``tensorrt-edgellm`` on PyPI carries the quantization/ONNX-export half). Its high-level API,
``experimental.server.LLM``, exports a Hugging Face folder to ONNX, builds a TensorRT engine and
loads it (or loads a pre-built engine folder), and generates for a batch of prompts with
``SamplingParams``. This runtime maps PICE's requests onto that API. It is imported lazily: a
machine without it gets a `RuntimeUnavailableError` that says what to install.

The engine is built once per model and ``max_batch`` and cached in ``engine_dir`` (the profile's
``engine_cache_dir``), so a restart loads it in seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pice_edge.errors import ModelError, RuntimeUnavailableError
from pice_edge.model_store import resolve
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT Edge-LLM is built from source on the device (github.com/NVIDIA/TensorRT-Edge-LLM, "
                "with -DBUILD_PYTHON_BINDINGS=ON; then put the repository and its experimental/ folder on "
                "PYTHONPATH) and needs JetPack 7.x on Jetson Thor or Orin; elsewhere choose "
                "`--runtime onnxruntime` or `--runtime transformers`")


def _import_edgellm() -> tuple[Any, Any]:
    """``(LLM, SamplingParams)`` of TensorRT Edge-LLM's high-level API."""
    try:
        from experimental.server import LLM, SamplingParams  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeUnavailableError(f"the tensorrt_edgellm runtime is unavailable ({exc}). {INSTALL_HINT}") from exc
    except Exception as exc:  # its bindings fail at import time without CUDA/TensorRT
        raise RuntimeUnavailableError(f"TensorRT Edge-LLM cannot start here ({exc}). {INSTALL_HINT}") from exc
    return LLM, SamplingParams


class TensorRTEdgeLLMRuntime:
    """`Runtime` on TensorRT Edge-LLM's ``LLM``.

    Args:
        model: model name or Hugging Face folder (exported and built on first use), or a folder
            holding a built engine (``config.json`` of an engine: loaded as it is).
        max_batch: the engine's maximum batch size.
        engine_dir: where the built engine is cached (default: ``<model>/edgellm-engine-b<N>``).
        max_input_len: longest prompt in tokens the engine accepts (question + outline + point).
        threads: ignored (GPU runtime); accepted for a uniform constructor.
    """

    name = "tensorrt_edgellm"

    def __init__(self, model: str | Path = "smollm2-135m-instruct", *, max_batch: int = 8,
                 engine_dir: str | Path | None = None, max_input_len: int = 1024, threads: int | None = None,
                 **options: Any) -> None:
        llm_class, self._sampling = _import_edgellm()
        del threads
        path = resolve(model) if not Path(str(model)).is_dir() else Path(str(model))
        self.model_id = path.name
        engine = Path(engine_dir).expanduser() if engine_dir else path / f"edgellm-engine-b{max_batch}"
        try:
            if (engine / "config.json").is_file():
                self._llm = llm_class(engine_dir=str(engine), max_batch_size=max_batch, **options)
            else:
                log.info("building a TensorRT Edge-LLM engine for %s (batch %d) in %s; this takes minutes once",
                         path, max_batch, engine)
                self._llm = llm_class(model=str(path), engine_dir=str(engine), max_batch_size=max_batch,
                                      max_input_len=max_input_len, **options)
        except Exception as exc:
            raise ModelError(f"TensorRT Edge-LLM cannot load {path}: {exc}") from exc
        self._tokenizer = _tokenizer(path)

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if self._tokenizer is not None:
            rendered = self._tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            return str(rendered) + prefill
        # ChatML, SmolLM2's and Qwen's template, when no tokenizer library is installed.
        text = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)
        return f"{text}<|im_start|>assistant\n{prefill}"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        params = [self._sampling(max_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                 **_optional(r)) for r in requests]
        outputs = self._llm.generate([r.prompt for r in requests], params)
        results = []
        for out in outputs:
            text = str(getattr(out, "text", ""))
            ids = getattr(out, "token_ids", None)
            count = len(ids) if ids is not None else self._count(text)
            logprobs = getattr(out, "logprobs", None) or []
            values = [float(v) for v in logprobs if isinstance(v, (int, float))]
            mean = sum(values) / len(values) if values else 0.0
            results.append(GenerationResult(text=text, token_count=count, mean_logprob=min(0.0, mean)))
        return results

    def _count(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False))
        return max(1, len(text) // 4) if text else 0

    def close(self) -> None:
        for name in ("shutdown", "close"):
            method = getattr(self._llm, name, None)
            if callable(method):
                method()
                return


def _optional(request: GenerationRequest) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if request.seed is not None:
        params["seed"] = request.seed
    if request.repetition_penalty is not None and request.repetition_penalty != 1.0:
        params["repetition_penalty"] = request.repetition_penalty
    return params


def _tokenizer(path: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:  # an engine folder without tokenizer files
        return None
