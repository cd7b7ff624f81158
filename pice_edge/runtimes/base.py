"""The interface every edge inference runtime implements.

A runtime turns a batch of fully formatted prompts into continuations, with the token count
and mean token log-probability of each (the edge's own confidence, used by the cloud's
ensemble). It is synchronous: the batching engine (`pice_edge._engine`) runs it on a worker
thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pice_edge.text import OutlineFormat


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue. ``temperature == 0`` means greedy decoding.

    Repetition control follows Hugging Face ``generate``: ``repetition_penalty`` divides the
    positive logits (multiplies the negative ones) of every token already in the sequence,
    prompt included (1.0 = off); ``no_repeat_ngram_size`` n forbids any token n-gram from
    occurring twice (0 = off). ``None`` leaves the model folder's ``generation_config.json``
    value (usually off).
    """

    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    #: Decode a numbered outline under this format (`pice_edge.runtimes.outline`); engines that
    #: cannot constrain decoding ignore it (the sketch guards still check the text).
    outline: OutlineFormat | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The continuation of one prompt."""

    text: str
    token_count: int
    #: Mean natural-log probability of the generated tokens under the model (0 when empty).
    mean_logprob: float
    #: Seconds of the model's own work for this sequence, when a batching engine measured them
    #: (its prefill, and its share of each decode step it was in); None: not measured.
    compute_s: float | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@runtime_checkable
class Runtime(Protocol):
    """A local model that generates text for batches of prompts."""

    #: Short runtime name, e.g. ``"transformers"`` or ``"onnxruntime"``.
    name: str
    #: Identifier of the loaded model, reported in status and candidates.
    model_id: str

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        """Render a conversation with the model's chat template, opening the assistant's turn
        and pre-filling it with ``prefill``."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Continue every prompt of the batch; results are in request order."""
        ...

    def close(self) -> None:
        """Release the model's memory."""
        ...


class DecodeBatch(Protocol):
    """A running batch of sequences decoded one token per `step`; new sequences may join
    between steps (continuous batching). Used from one worker thread only."""

    def add(self, key: object, request: GenerationRequest) -> None:
        """Prefill ``request``'s prompt; the sequence joins the batch at the next `step`."""
        ...

    def step(self) -> list[tuple[object, GenerationResult]]:
        """Decode one token for every live sequence; return the sequences that finished
        (end of turn or token budget), which leave the batch."""
        ...

    def __len__(self) -> int:
        """Live (unfinished) sequences."""
        ...


@runtime_checkable
class SteppingRuntime(Runtime, Protocol):
    """Optional extension of `Runtime` for step-level (continuous) batching.

    The batching engine (`pice_edge._engine`, behind `EdgeNode`) uses it when a runtime provides
    it, so tasks that arrive while others are being generated start at the next decode step
    instead of waiting for the whole batch; a runtime with only `generate` still works (batch by
    batch).
    """

    def new_batch(self) -> DecodeBatch:
        """An empty decode batch bound to this runtime's model."""
        ...

    def kv_cache_bytes(self, request: GenerationRequest) -> int:
        """Estimated KV-cache bytes of one sequence (prompt plus its whole token budget)."""
        ...


@runtime_checkable
class StreamingDecodeBatch(DecodeBatch, Protocol):
    """A `DecodeBatch` that shows its sequences' tokens as they come and lets a sequence go
    before it finishes (`pice_edge.runtimes._decode.StepBatch` does both)."""

    def progress(self) -> list[tuple[object, list[int]]]:
        """The tokens generated so far by every live sequence, by key (copies)."""
        ...

    def discard(self, key: object) -> None:
        """Drop a sequence nobody waits for any more; its slot is free at once."""
        ...


@runtime_checkable
class StreamingRuntime(SteppingRuntime, Protocol):
    """A `SteppingRuntime` whose batches stream: what the cloud's embedded model needs (streamed
    answers, and a closed stream frees its slot at the next step)."""

    def new_batch(self) -> StreamingDecodeBatch:
        """An empty streaming decode batch bound to this runtime's model."""
        ...
