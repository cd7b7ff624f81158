"""Cloud LLM backend on a local Hugging Face model (default: the bundled SmolLM2)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pice_cloud.llm.base import ChatRequest, Completion, TextRequest
from pice_edge.model_store import DEFAULT_MODEL
from pice_edge.runtimes.base import ChatMessage, GenerationRequest
from pice_edge.runtimes.transformers import TransformersRuntime


class TransformersBackend:
    """Runs the model on one worker thread: requests are serialised (batched by the caller),
    so the event loop never blocks and two generations never fight for the same cores."""

    name = "transformers"

    def __init__(self, model: str | Path = DEFAULT_MODEL, *, device: str = "cpu",
                 dtype: str = "float32", threads: int | None = None) -> None:
        self.runtime = TransformersRuntime(model, device=device, dtype=dtype, threads=threads)
        self.model_id = self.runtime.model_id
        #: The model's context window (prompt + completion), from its config.
        self.context_tokens: int | None = getattr(self.runtime.model.config, "max_position_embeddings", None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pice-cloud-llm")
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

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        if not requests:
            return []
        gen = [
            GenerationRequest(
                prompt=self.runtime.format_chat(r.messages, r.prefill),
                max_new_tokens=r.max_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                seed=r.seed,
            )
            for r in requests
        ]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self.runtime.generate, gen)
        return [Completion(text=x.text, tokens=x.token_count, mean_logprob=x.mean_logprob) for x in results]

    async def complete_raw(self, requests: Sequence[TextRequest]) -> list[Completion]:
        """Continue raw prompts (no chat template) on the model's worker thread."""
        if not requests:
            return []
        gen = [GenerationRequest(prompt=r.prompt, max_new_tokens=r.max_tokens, temperature=r.temperature,
                                 top_p=r.top_p, seed=r.seed) for r in requests]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self.runtime.generate, gen)
        return [Completion(text=x.text, tokens=x.token_count, mean_logprob=x.mean_logprob) for x in results]

    async def score(self, requests: Sequence[ChatRequest], continuations: Sequence[str]) -> list[float]:
        """Mean token log-likelihood of each continuation as the reply to its request (one
        batched prefill on the model's worker thread; nothing is decoded)."""
        if not requests:
            return []
        prompts = [self.runtime.format_chat(r.messages, r.prefill) for r in requests]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.runtime.score, prompts, list(continuations))

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
