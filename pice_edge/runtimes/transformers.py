"""Runtime on Hugging Face transformers + torch (CPU or CUDA).

Prompts of a batch are left-padded and generated together: on a small model the cost of a
decode step grows far slower than the batch, which is where the edge's parallelism comes from.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pice_edge._memory import free_memory
from pice_edge.errors import ModelError
from pice_edge.model_store import build_id, resolve
from pice_edge.runtimes._decode import FloatArray, IntArray, LogitsPolicy, ModelShape, StepBatch
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult
from pice_edge.runtimes.outline import TokenTexts

log = logging.getLogger(__name__)

# Several in-process nodes (the single-host demo) share one copy of the weights: inference
# under no_grad only reads them. Each copy counts its users; the last `release_model` frees it.
# The key names the build as well as the folder: a rollout installs a new build in the same
# folder, and must not be handed the old weights.
@dataclass
class _Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    users: int = 0


_SHARED: dict[tuple[str, str, str, str], _Loaded] = {}
_SHARED_LOCK = threading.Lock()

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _identity(path: Path) -> str:
    """What tells two builds in one folder apart: the build id when the folder has a manifest,
    else the files' names, sizes and modification times."""
    build = build_id(path)
    if build is not None:
        return build
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:12]


def load_model(
    model: str | Path, *, device: str = "cpu", dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """Load (or reuse) a causal LM and its tokenizer from a model name or folder; give it back
    with `release_model` when done (the last user's release frees it)."""
    path = resolve(model)
    key = (str(path.resolve()), _identity(path), device, dtype)
    with _SHARED_LOCK:
        if key not in _SHARED:
            started = time.perf_counter()
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                lm = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).to(device).eval()
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"cannot load model from {path}: {exc}") from exc
            tokenizer.padding_side = "left"
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            _SHARED[key] = _Loaded(lm, tokenizer)
            log.info("loaded %s on %s (%s) in %.2fs", path, device, dtype, time.perf_counter() - started)
        loaded = _SHARED[key]
        loaded.users += 1
    return loaded.model, loaded.tokenizer, path


def release_model(model: PreTrainedModel) -> bool:
    """One user of ``model`` is done with it; the last one frees it: the shared copy is dropped,
    Python's cycles collected, CUDA's cached blocks handed back to the driver and the C heap
    trimmed, so that memory after a model switch is what the new model needs (issue 27: an edge
    kept every model it had run). True when it was freed."""
    with _SHARED_LOCK:
        key = next((k for k, v in _SHARED.items() if v.model is model), None)
        if key is None:
            return False
        loaded = _SHARED[key]
        loaded.users -= 1
        if loaded.users > 0:
            return False
        del _SHARED[key]
    on_cuda = key[2].startswith("cuda")
    del loaded, model
    free_memory(cuda=on_cuda)
    return True


class TransformersRuntime:
    """`Runtime` on transformers. ``threads`` sets torch's intra-op threads (process-wide)."""

    name = "transformers"

    def __init__(
        self,
        model: str | Path = "smollm2-135m-instruct",
        *,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.model, self.tokenizer, self.path = load_model(model, device=device, dtype=dtype)
        self.model_id = self.path.name
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id]
        self._eos_ids = {int(i) for i in ids if i is not None}
        config = self.model.config.to_dict()
        self.shape = ModelShape.from_config(config)
        self.policy = LogitsPolicy.from_folder(self.path, config)
        self._kv_itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return str(rendered) + prefill

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: dict[int, GenerationResult] = {}
        # Hugging Face generate() has no outline mask: requests that carry an outline format
        # decode through our own loop, which applies it (as the service and the edges do).
        outlined = [i for i, r in enumerate(requests) if r.outline is not None]
        if outlined:
            results.update(zip(outlined, self.new_batch().run([requests[i] for i in outlined]), strict=True))

        def setting(i: int) -> tuple[float, float, float, int]:
            r = requests[i]
            # None sorts with the model's own default; -1 keeps it apart from an explicit value.
            return (r.temperature, r.top_p, -1.0 if r.repetition_penalty is None else r.repetition_penalty,
                    -1 if r.no_repeat_ngram_size is None else r.no_repeat_ngram_size)

        # One generate() call per sampling setting; in practice a batch shares one.
        order = sorted((i for i in range(len(requests)) if i not in results), key=setting)
        for _, group in groupby(order, key=setting):
            idx = list(group)
            for i, res in zip(idx, self._generate_group([requests[i] for i in idx]), strict=False):
                results[i] = res
        return [results[i] for i in range(len(requests))]

    def _generate_group(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        first = requests[0]
        enc = self.tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        sample = first.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        else:
            # Silence generation_config's sampling defaults when decoding greedily.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if first.repetition_penalty is not None:
            kwargs["repetition_penalty"] = first.repetition_penalty
        if first.no_repeat_ngram_size is not None:
            kwargs["no_repeat_ngram_size"] = first.no_repeat_ngram_size
        out = self.model.generate(
            **enc,
            max_new_tokens=max(r.max_new_tokens for r in requests),
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:]
        # Raw logits -> log-probs of the tokens actually chosen: the model's own confidence,
        # independent of the sampling temperature.
        logits = torch.stack(out.logits, dim=1).float()
        chosen = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, req in enumerate(requests):
            ids = new_tokens[row].tolist()[: req.max_new_tokens]
            length = len(ids)
            for pos, tok in enumerate(ids):
                if tok in self._eos_ids:
                    length = pos
                    break
            text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
            # The EOS token itself counts toward confidence when the model chose to stop.
            scored = min(length + (1 if length < len(ids) else 0), len(ids))
            mean = float(chosen[row, :scored].mean()) if scored else 0.0
            results.append(GenerationResult(text=text, token_count=length, mean_logprob=min(0.0, mean)))
        return results

    # --- SteppingRuntime: continuous batching through our own KV-cache loop -----------------

    def new_batch(self) -> StepBatch:
        return StepBatch(self._forward, self.shape, self.policy,
                         lambda text: list(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
                         self._decode_ids, self._token_texts)

    def _decode_ids(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    @functools.cache  # noqa: B019  (one runtime per model, kept for the process's life)
    def _token_texts(self, vocab_size: int) -> TokenTexts:
        return TokenTexts.build(self._decode_ids, vocab_size)

    def kv_cache_bytes(self, request: GenerationRequest) -> int:
        tokens = len(request.prompt) // 3 + request.max_new_tokens  # ~3.5 characters per token
        return tokens * self.shape.kv_bytes_per_token(self._kv_itemsize)

    @torch.inference_mode()
    def _forward(self, input_ids: IntArray, attention_mask: IntArray, position_ids: IntArray,
                 past: list[FloatArray]) -> tuple[FloatArray, list[FloatArray]]:
        from transformers import DynamicCache

        dev, dtype = self.device, self.model.dtype
        cache = DynamicCache(config=self.model.config)
        for i in range(self.shape.layers):
            key, value = (torch.from_numpy(past[2 * i + j]).to(dev, dtype) for j in (0, 1))
            cache.update(key, value, i)
        out = self.model(input_ids=torch.from_numpy(input_ids).to(dev),
                         attention_mask=torch.from_numpy(attention_mask).to(dev),
                         position_ids=torch.from_numpy(position_ids).to(dev),
                         cache=cache, use_cache=True, logits_to_keep=1)
        present = [t.float().cpu().numpy() for layer in _cache_of(out).layers for t in (layer.keys, layer.values)]
        return out.logits[:, -1].float().cpu().numpy(), present

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Mean log-probability of each continuation given its prompt, in one batched prefill."""
        if not prompts:
            return []
        tok = self.tokenizer
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        cont_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
        seqs = [p + c for p, c in zip(prompt_ids, cont_ids, strict=False)]
        width = max(len(s) for s in seqs)
        pad = int(tok.pad_token_id)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:].to(self.device)
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scores = []
        for i, c in enumerate(cont_ids):
            if not c:
                scores.append(0.0)
                continue
            scores.append(float(token_lp[i, width - 1 - len(c):].mean()))
        return scores

    def close(self) -> None:
        """Give the weights back: freed when no other node in this process shares them."""
        model = self.__dict__.pop("model", None)
        self.__dict__.pop("tokenizer", None)
        if model is not None:
            release_model(model)


def _cache_of(output: Any) -> Any:
    # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated).
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
