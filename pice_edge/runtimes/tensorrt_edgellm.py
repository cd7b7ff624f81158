"""Runtime on NVIDIA TensorRT Edge-LLM (Jetson Thor, Jetson Orin on JetPack 7.x; DRIVE Thor).

TensorRT Edge-LLM is NVIDIA's inference runtime for generative models on embedded platforms: a
C++ runtime with Python bindings, built from source on the device. Its high-level API,
``experimental.server.LLM``, lowers a checkpoint (a local Hugging Face folder or id) to a
TensorRT engine bundle cached under ``cache_dir`` and generates with ``SamplingParams``. This
runtime maps PICE's requests onto that API, written against
``experimental/server/runtime/engine.py`` of NVIDIA/TensorRT-Edge-LLM (the commit is named in
``tests/contracts/fake_edgellm.py``). It is imported lazily: a machine without it gets a
`RuntimeUnavailableError` that says what to install.

What that API is, and what follows for PICE:

- ``LLM.generate(prompts, sampling_params)`` takes one ``SamplingParams`` for all its prompts
  and wraps a string prompt as a user message that its C++ renderer then templates. So PICE
  sends the conversation itself (OpenAI-style messages, remembered by `format_chat`), one
  call per request, and the chat template is applied once, by the engine. The API cannot
  continue a pre-filled assistant turn: the model answers the conversation, and a pre-fill it
  echoes at the start is stripped (as `pice_cloud.llm.openai_http` does without
  ``continue_final_message``).
- Its ``SamplingParams`` has no repetition penalty (only its audio talker has one). A profile
  that asks for repetition control fails at start with a `ConfigError` that says so; a task
  that asks for it fails the same way instead of being decoded without it.
- Greedy is ``temperature=0, top_k=1, top_p=1`` (its sampler forces top-k 1 below temperature
  1e-3). Its sampler needs top-k or top-p: a sampled request's ``top_p`` 1.0 is sent as
  `TOP_P_CEILING` with top-k off.
- Log-probabilities are ``num_logprobs`` top entries per generated token
  (``List[List[LogprobEntry(token_id, logprob, token, bytes)]]``, from the raw logits); the
  mean log-probability is that of the sampled tokens, found by id.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pice_edge.errors import ConfigError, ModelError, RuntimeUnavailableError
from pice_edge.model_store import resolve
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT Edge-LLM is built from source on the device (github.com/NVIDIA/TensorRT-Edge-LLM, "
                "with its Python bindings; then put the repository and its experimental/ folder on "
                "PYTHONPATH) and needs JetPack 7.x on Jetson Thor or Orin; elsewhere choose "
                "`--runtime onnxruntime` or `--runtime transformers`")

#: ``top_p`` sent for a sampled request whose top_p is 1.0: Edge-LLM's sampler refuses neither
#: top-k nor top-p, and reads (temperature 1, top-k <= 1, top-p 1) as greedy.
TOP_P_CEILING = 0.999999
#: Top log-probabilities asked per token of a sampled request (the sampled token is usually
#: among them; the engine allows up to 50). Greedy requests need one.
SAMPLED_LOGPROBS = 8
#: Conversations remembered between `format_chat` and `generate` (a batch's worth many times over).
_REMEMBERED = 4096
_SEED_RANGE = 1 << 63


def _import_edgellm() -> tuple[Any, Any]:
    """``(LLM, SamplingParams)`` of TensorRT Edge-LLM's high-level API."""
    try:
        from experimental.server import LLM, SamplingParams  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeUnavailableError(f"the tensorrt_edgellm runtime is unavailable ({exc}). {INSTALL_HINT}") from exc
    except Exception as exc:  # its bindings fail at import time without CUDA/TensorRT
        raise RuntimeUnavailableError(f"TensorRT Edge-LLM cannot start here ({exc}). {INSTALL_HINT}") from exc
    return LLM, SamplingParams


def _field_names(sampling: Any) -> frozenset[str]:
    if dataclasses.is_dataclass(sampling):
        return frozenset(f.name for f in dataclasses.fields(sampling))
    return frozenset(inspect.signature(sampling).parameters)


def repetition_error(fields: frozenset[str], repetition_penalty: float | None,
                     no_repeat_ngram_size: int | None) -> str | None:
    """Why Edge-LLM cannot honour this repetition control (None when it can, or none is asked)."""
    asked = []
    if repetition_penalty is not None and repetition_penalty != 1.0 and "repetition_penalty" not in fields:
        asked.append(f"repetition_penalty {repetition_penalty}")
    if no_repeat_ngram_size and "no_repeat_ngram_size" not in fields:
        asked.append(f"no_repeat_ngram_size {no_repeat_ngram_size}")
    if not asked:
        return None
    return (f"TensorRT Edge-LLM's SamplingParams has no {' or '.join(a.split()[0] for a in asked)}, but "
            f"{' and '.join(asked)} is asked for; set repetition_penalty: 1.0 (and no no_repeat_ngram_size) in "
            "the device profile, or choose a runtime with repetition control (onnxruntime, transformers, "
            "tensorrt_llm)")


class TensorRTEdgeLLMRuntime:
    """`Runtime` on TensorRT Edge-LLM's ``LLM``.

    Args:
        model: model name or Hugging Face folder (`pice_edge.model_store.resolve`), or a Hugging
            Face id the engine fetches itself.
        max_batch: the engine's maximum batch size.
        engine_dir: where built engine bundles are cached (the LLM's ``cache_dir``; the
            profile's ``engine_cache_dir``); default: the engine's own cache.
        max_input_len: longest prompt in tokens the engine accepts (system turn, question and point).
        threads: ignored (GPU runtime); accepted for a uniform constructor.
        repetition_penalty, no_repeat_ngram_size: the repetition control the edge will ask for
            (its profile's); refused at start when the engine has none.
        options: further keyword arguments of ``LLM`` (``enable_in_flight_batching``, ...).

    Raises:
        ConfigError: repetition control asked for and not available.
        ModelError: the engine cannot load the model.
    """

    name = "tensorrt_edgellm"

    def __init__(self, model: str | Path = "smollm2-135m-instruct", *, max_batch: int = 8,
                 engine_dir: str | Path | None = None, max_input_len: int = 1024, threads: int | None = None,
                 repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                 **options: Any) -> None:
        llm_class, self._sampling = _import_edgellm()
        del threads
        self._fields = _field_names(self._sampling)
        problem = repetition_error(self._fields, repetition_penalty, no_repeat_ngram_size)
        if problem:
            raise ConfigError(problem)
        try:
            path = resolve(model) if not Path(str(model)).is_dir() else Path(str(model))
        except Exception:
            path = Path(str(model))  # a Hugging Face id the engine resolves itself
        self.model_id = path.name
        kwargs: dict[str, Any] = {"max_batch_size": max_batch, "max_input_len": max_input_len, **options}
        if engine_dir is not None:
            kwargs["cache_dir"] = str(Path(engine_dir).expanduser())
        log.info("loading %s with TensorRT Edge-LLM (batch %d); building its engine takes minutes once", path,
                 max_batch)
        try:
            self._llm = llm_class(model=str(path), **kwargs)
        except TypeError:
            raise
        except Exception as exc:
            raise ModelError(f"TensorRT Edge-LLM cannot load {path}: {exc}") from exc
        self._tokenizer = _tokenizer(path)
        self._lock = threading.Lock()
        self._conversations: OrderedDict[str, tuple[list[dict[str, str]], str]] = OrderedDict()

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        """The conversation rendered with the model's template (for logs, token counts and the
        prompt's identity); `generate` sends the conversation itself to the engine, which
        templates it (once)."""
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if self._tokenizer is not None:
            rendered = str(self._tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
        else:  # ChatML, SmolLM2's and Qwen's template, when no tokenizer library is installed
            rendered = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)
            rendered += "<|im_start|>assistant\n"
        prompt = rendered + prefill
        with self._lock:
            self._conversations[prompt] = (turns, prefill)
            self._conversations.move_to_end(prompt)
            while len(self._conversations) > _REMEMBERED:
                self._conversations.popitem(last=False)
        return prompt

    def _conversation(self, prompt: str) -> tuple[list[dict[str, str]] | str, str]:
        """What to send for ``prompt``: the remembered conversation and its pre-fill, or the
        prompt itself (the engine wraps it as a user message) when `format_chat` did not make it."""
        with self._lock:
            found = self._conversations.get(prompt)
        return found if found is not None else (prompt, "")

    def sampling_params(self, request: GenerationRequest, prefill: str = "") -> Any:
        """``request`` as Edge-LLM ``SamplingParams``.

        Raises:
            ConfigError: the request asks for repetition control the engine does not have.
        """
        problem = repetition_error(self._fields, request.repetition_penalty, request.no_repeat_ngram_size)
        if problem:
            raise ConfigError(problem)
        kwargs: dict[str, Any] = {"max_tokens": request.max_new_tokens}
        greedy = request.temperature <= 0
        if greedy:
            kwargs.update(temperature=0.0, top_k=1, top_p=1.0)
        else:
            kwargs.update(temperature=request.temperature, top_k=0, top_p=min(request.top_p, TOP_P_CEILING))
            if "seed" in self._fields:
                kwargs["seed"] = request.seed if request.seed is not None else random.randrange(_SEED_RANGE)
        if "num_logprobs" in self._fields:
            kwargs["num_logprobs"] = 1 if greedy else SAMPLED_LOGPROBS
        if request.repetition_penalty is not None and request.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = request.repetition_penalty
        if request.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = request.no_repeat_ngram_size
        if request.outline is not None and "guided_decoding" in self._fields:
            # The engine writes the pre-fill itself (it cannot continue one): the guide starts with it.
            kwargs["guided_decoding"] = ("regex", re.escape(prefill) + request.outline.regex())
        return self._sampling(**kwargs)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = []
        for request in requests:
            prompt, prefill = self._conversation(request.prompt)
            params = self.sampling_params(request, prefill)
            out = self._llm.generate([prompt], params)[0]
            ids = [int(t) for t in (out.token_ids or ())]
            text = _without_prefill(str(out.text), prefill)
            count = len(ids) if ids else self._count(text)
            results.append(GenerationResult(text=text, token_count=count,
                                            mean_logprob=min(0.0, mean_logprob(out.logprobs, ids))))
        return results

    def _count(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False))
        return max(1, len(text) // 4) if text else 0

    def close(self) -> None:
        for name in ("close", "shutdown"):
            method = getattr(self._llm, name, None)
            if callable(method):
                method()
                return


def mean_logprob(steps: Any, token_ids: Sequence[int]) -> float:
    """Mean log-probability of the generated tokens from Edge-LLM's logprobs (0 when absent).

    ``steps`` has one list of top-k ``LogprobEntry`` per generated token; the sampled token's
    entry is the one with its id (a sampled token outside the top-k is left out of the mean).
    """
    values = []
    for step, token in zip(steps or (), token_ids, strict=False):
        for entry in step or ():
            if int(getattr(entry, "token_id", -1)) == token:
                values.append(float(entry.logprob))
                break
    return sum(values) / len(values) if values else 0.0


def _without_prefill(text: str, prefill: str) -> str:
    """``text`` without a leading echo of ``prefill``."""
    if not prefill:
        return text
    stripped = text.lstrip()
    return stripped[len(prefill):] if stripped.startswith(prefill) else text


def _tokenizer(path: Path) -> Any:
    if not path.is_dir():  # a Hugging Face id: never reach for the network from here
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:  # an engine folder without tokenizer files
        return None
