"""Cloud LLM backend on a local Hugging Face model (default: the bundled SmolLM2).

Generations are continuously batched (`pice_cloud.llm.embedded.EmbeddedBackend`, shared with the
torch-free `pice_cloud.llm.edge_runtime` backend, over `pice_cloud.llm.step_engine.StepEngine`, a driver
of the batching engine the edges run too): concurrent sketches, answers and expansions share decode
steps, and streamed and non-streamed answers come out of the same loop, so they are the same text
for the same seed.
Requests for per-token log-probabilities with alternatives run alone on the model thread (the
step engine keeps only the chosen token's log-probability).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pice_cloud.llm.base import ChatRequest, Completion, TokenLogprob
from pice_cloud.llm.embedded import EmbeddedBackend
from pice_edge.model_store import DEFAULT_MODEL
from pice_edge.runtimes.base import ChatMessage
from pice_edge.runtimes.transformers import TransformersRuntime


def _generate_with_logprobs(runtime: TransformersRuntime, request: ChatRequest) -> Completion:
    """One request with per-token log-probabilities (raw model distribution, as vLLM reports
    them) and ``request.logprobs`` alternatives; same sampling settings as `_generate_streaming`."""
    import torch

    assert request.logprobs is not None
    model, tokenizer = runtime.model, runtime.tokenizer
    prompt = runtime.format_chat(request.messages, request.prefill)
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    enc = {k: v.to(runtime.device) for k, v in enc.items()}
    kwargs: dict[str, Any] = {"do_sample": request.temperature > 0}
    if request.temperature > 0:
        kwargs.update(temperature=request.temperature, top_p=request.top_p)
        if request.seed is not None:
            torch.manual_seed(request.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=request.max_tokens, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, output_logits=True, **kwargs)
    new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    logprobs = torch.log_softmax(torch.stack(out.logits, dim=1)[0].float(), dim=-1)
    ids: list[int] = []
    entries: list[TokenLogprob] = []
    for pos, token in enumerate(new):
        if token in runtime._eos_ids:  # the runtime's own end-of-sequence set
            break
        ids.append(token)
        top_values, top_ids = logprobs[pos].topk(request.logprobs) if request.logprobs else (None, None)
        top = () if top_ids is None or top_values is None else tuple(
            (tokenizer.decode([int(i)]), float(v)) for v, i in zip(top_values.tolist(), top_ids.tolist(), strict=True))
        entries.append(TokenLogprob(tokenizer.decode([token]), float(logprobs[pos, token]), top))
    text = tokenizer.decode(ids, skip_special_tokens=True)
    mean = sum(e.logprob for e in entries) / len(entries) if entries else 0.0
    return Completion(text=text, tokens=len(ids), mean_logprob=mean, token_logprobs=tuple(entries))


class TransformersBackend(EmbeddedBackend[TransformersRuntime]):
    """Runs the model on one worker thread, so the event loop never blocks and two
    generations never fight for the same cores; generations share decode steps (continuous
    batching, up to ``max_batch`` sequences whose KV caches fit ``memory_budget_mb``)."""

    name = "transformers"

    def __init__(self, model: str | Path = DEFAULT_MODEL, *, device: str = "cpu",
                 dtype: str = "float32", threads: int | None = None, max_batch: int = 8,
                 memory_budget_mb: int | None = None) -> None:
        runtime = TransformersRuntime(model, device=device, dtype=dtype, threads=threads)
        # The model's context window (prompt + completion), from its config.
        super().__init__(runtime, max_batch=max_batch, memory_budget_mb=memory_budget_mb,
                         context_tokens=getattr(runtime.model.config, "max_position_embeddings", None))
        self._counter: Any = None

    def _tokenizer(self) -> Any:
        # A tokenizer of our own for counting on the event loop: a fast tokenizer used by two
        # threads at once can fail ("Already borrowed") while the worker thread generates.
        if self._counter is None:
            from transformers import AutoTokenizer

            self._counter = AutoTokenizer.from_pretrained(self.runtime.path)
        return self._counter

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer()(text, add_special_tokens=False)["input_ids"])

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        rendered = self._tokenizer().apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
        )
        return self.count_tokens(str(rendered))

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer().decode(ids, skip_special_tokens=True))

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        if any(r.logprobs is not None for r in requests):
            loop = asyncio.get_running_loop()
            return [await loop.run_in_executor(self._executor, _generate_with_logprobs, self.runtime, r)
                    for r in requests]
        return await super().complete(requests)

    async def score(self, requests: Sequence[ChatRequest], continuations: Sequence[str]) -> list[float]:
        """Mean token log-likelihood of each continuation as the reply to its request (one
        batched prefill on the model's worker thread; nothing is decoded)."""
        if not requests:
            return []
        prompts = [self.runtime.format_chat(r.messages, r.prefill) for r in requests]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.runtime.score, prompts, list(continuations))
