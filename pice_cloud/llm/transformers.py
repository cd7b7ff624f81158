"""Cloud LLM backend on a local Hugging Face model (default: the bundled SmolLM2)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pice_cloud.llm.base import ChatRequest, Completion, TextRequest, TokenLogprob
from pice_edge.model_store import DEFAULT_MODEL
from pice_edge.runtimes.base import ChatMessage, GenerationRequest
from pice_edge.runtimes.transformers import TransformersRuntime


class _Stopped(Exception):
    """Ends a streamed generation early (the consumer stopped reading)."""


def _generate_streaming(runtime: TransformersRuntime, request: GenerationRequest,
                        push: Callable[[list[int]], None], stop: threading.Event) -> None:
    """``model.generate`` for one request with the settings `TransformersRuntime.generate`
    uses (greedy, or sampling with the request's seed), pushing each new token as it comes."""
    import torch

    model, tokenizer = runtime.model, runtime.tokenizer
    enc = tokenizer([request.prompt], return_tensors="pt", add_special_tokens=False)
    enc = {k: v.to(runtime.device) for k, v in enc.items()}
    kwargs: dict[str, Any] = {"do_sample": request.temperature > 0}
    if request.temperature > 0:
        kwargs.update(temperature=request.temperature, top_p=request.top_p)
        if request.seed is not None:
            torch.manual_seed(request.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)

    class Streamer:
        prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt itself
                self.prompt_seen = True
                return
            if stop.is_set():
                raise _Stopped
            push([int(t) for t in value.reshape(-1).tolist()])

        def end(self) -> None:
            pass

    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=request.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                       streamer=Streamer(), **kwargs)


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
        if any(r.logprobs is not None for r in requests):
            loop = asyncio.get_running_loop()
            return [await loop.run_in_executor(self._executor, _generate_with_logprobs, self.runtime, r)
                    for r in requests]
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

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Completion, None]:
        """Stream one continuation token by token (`StreamingBackend`).

        The generation runs on the model's worker thread like `complete`, with the same
        settings as `TransformersRuntime.generate` gives one request (same seed, same tokens), so
        the pieces concatenate to what `complete` returns. Closing the iterator early stops the
        generation at the next token.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        gen = GenerationRequest(prompt=self.runtime.format_chat(request.messages, request.prefill),
                                max_new_tokens=request.max_tokens, temperature=request.temperature,
                                top_p=request.top_p, seed=request.seed)

        def push(item: list[int] | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                _generate_streaming(self.runtime, gen, push, stop)
                push(None)
            except _Stopped:
                push(None)
            except BaseException as exc:  # handed to the consumer, raised there
                push(exc)

        future = loop.run_in_executor(self._executor, work)
        ids: list[int] = []
        sent = ""
        eos = self.runtime._eos_ids  # the runtime's own end-of-sequence set
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                for token in item:
                    if token in eos or len(ids) >= request.max_tokens:
                        stop.set()
                        break
                    ids.append(token)
                text = self.runtime.tokenizer.decode(ids, skip_special_tokens=True)
                # Hold back a trailing replacement character: a multi-byte character whose
                # remaining bytes come with the next token.
                safe = text[:-1] if text.endswith("\ufffd") else text
                if len(safe) > len(sent) and safe.startswith(sent):
                    yield safe[len(sent):]
                    sent = safe
                if stop.is_set():
                    break
            text = self.runtime.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent):]
            yield Completion(text=text, tokens=len(ids))
        finally:
            stop.set()
            await asyncio.shield(future)

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
