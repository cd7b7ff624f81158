"""What the cloud's in-process LLM backends share: one `pice_edge` runtime in this process, its
generations continuously batched by a `StepEngine` on one model thread.

`EmbeddedBackend` runs the requests (`complete`, `stream`, `complete_raw`) and owns the model
thread; a subclass brings the runtime and a tokenizer of its own for the event loop (counting
tokens, decoding streamed ids), since the runtime's is in use on the model thread:

- `pice_cloud.llm.transformers.TransformersBackend`: transformers and torch; adds per-token
  log-probabilities and candidate scoring;
- `pice_cloud.llm.edge_runtime.EdgeRuntimeBackend`: any edge runtime (onnxruntime, TensorRT...),
  no torch: the site role's LLM.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from pice_cloud.llm.base import ChatRequest, Completion, TextRequest
from pice_cloud.llm.step_engine import StepEngine
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult, Runtime

R = TypeVar("R", bound=Runtime)


def _completion(result: GenerationResult) -> Completion:
    return Completion(
        text=result.text, tokens=result.token_count, mean_logprob=result.mean_logprob, compute_s=result.compute_s
    )


class EmbeddedBackend(Generic[R]):
    """A cloud LLM on ``runtime``, run on one worker thread so the event loop never blocks and two
    generations never fight for the same cores; generations share decode steps (continuous
    batching, up to ``max_batch`` sequences whose KV caches fit ``memory_budget_mb``).

    Subclasses implement `count_tokens`, `count_prompt_tokens` and `_decode` with a tokenizer of
    their own (`pice_cloud.llm.base.TokenCounter`: never the runtime's, busy on the model thread).

    Attributes:
        runtime: the model.
        engine: the batching engine (its stats feed ``/metrics``).
        context_tokens: the model's context window (prompt + completion), None when unknown.
    """

    name: str

    def __init__(
        self,
        runtime: R,
        *,
        max_batch: int = 8,
        memory_budget_mb: float | None = None,
        context_tokens: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.model_id = runtime.model_id
        self.context_tokens = context_tokens
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pice-cloud-llm")
        self.engine = StepEngine(
            runtime,
            self._executor,
            max_batch=max_batch,
            memory_budget_bytes=None if memory_budget_mb is None else int(memory_budget_mb * 2**20),
        )

    # --- the subclass's tokenizer ------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` (no special tokens)."""
        raise NotImplementedError

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens of the conversation under the chat template, the assistant's turn opened."""
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        """Text of generated token ids, special tokens skipped (on the event loop)."""
        raise NotImplementedError

    # --- requests ------------------------------------------------------------------------------

    def _request(self, r: ChatRequest) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.runtime.format_chat(r.messages, r.prefill),
            max_new_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            seed=r.seed,
            outline=r.outline,
        )

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """Continue a batch of conversations in the shared batch; results in request order."""
        results = await asyncio.gather(*(self.engine.generate(self._request(r)) for r in requests))
        return [_completion(x) for x in results]

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Completion, None]:
        """Stream one continuation token by token (`pice_cloud.llm.base.StreamingBackend`).

        The generation joins the shared batch like `complete` (same seed, same tokens), and the
        text grows after every decode step, so the pieces concatenate to what `complete` returns.
        Closing the iterator early frees the sequence's slot at the next step. A runtime that
        cannot decode step by step streams its answer in one piece.
        """
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        job = asyncio.ensure_future(self.engine.generate(self._request(request), queue.put_nowait))
        # The engine reports tokens before it resolves the job, so the end mark comes last.
        job.add_done_callback(lambda _: queue.put_nowait(None))
        sent = ""
        try:
            while (ids := await queue.get()) is not None:
                text = self._decode(ids)
                # Hold back a trailing replacement character: a multi-byte character whose
                # remaining bytes come with the next token.
                safe = text[:-1] if text.endswith("\ufffd") else text
                if len(safe) > len(sent) and safe.startswith(sent):
                    yield safe[len(sent) :]
                    sent = safe
            result = job.result()
            if len(result.text) > len(sent) and result.text.startswith(sent):
                yield result.text[len(sent) :]
            yield _completion(result)
        finally:
            if not job.done():
                job.cancel()  # the consumer stopped reading: free the slot
                with contextlib.suppress(asyncio.CancelledError):
                    await job

    async def complete_raw(self, requests: Sequence[TextRequest]) -> list[Completion]:
        """Continue raw prompts (no chat template) in the shared batch (`pice_cloud.llm.base.RawCompleter`)."""
        results = await asyncio.gather(
            *(
                self.engine.generate(
                    GenerationRequest(
                        prompt=r.prompt,
                        max_new_tokens=r.max_tokens,
                        temperature=r.temperature,
                        top_p=r.top_p,
                        seed=r.seed,
                    )
                )
                for r in requests
            )
        )
        return [_completion(x) for x in results]

    async def close(self) -> None:
        """Stop the engine and the model thread (the runtime stays loaded: its owner closes it)."""
        await self.engine.close()
        self._executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["EmbeddedBackend"]
