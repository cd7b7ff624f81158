"""The interface of the cloud's LLM (it writes sketches, answers cloud-only requests and
expands points whose edges missed their deadline)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pice_edge.runtimes.base import ChatMessage
from pice_edge.text import OutlineFormat


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to continue; the assistant's turn is pre-filled with ``prefill``."""

    messages: Sequence[ChatMessage]
    max_tokens: int
    prefill: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    #: Return each generated token's log-probability with this many alternatives (None: none).
    logprobs: int | None = None
    #: Decode under this outline format (a sketch: `pice_edge.text.OutlineFormat`), where the
    #: backend can constrain decoding; others ignore it (the guards still check the sketch).
    outline: OutlineFormat | None = None


@dataclass(frozen=True)
class TextRequest:
    """A raw prompt to continue as it is (no chat template): the legacy completions endpoint."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability under the model, and the most likely
    alternatives at that position (OpenAI's ``logprobs.content`` entry)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    mean_logprob: float = 0.0
    #: Per-token log-probabilities, when the request asked for them (`ChatRequest.logprobs`).
    token_logprobs: tuple[TokenLogprob, ...] | None = None
    #: Seconds of the model's own work for this sequence where the engine measures them (the
    #: embedded engine: prefill plus its share of each batched step); None: the ledger uses the
    #: call's wall time instead.
    compute_s: float | None = None


@runtime_checkable
class LLMBackend(Protocol):
    """A cloud LLM. Calls are async; implementations keep model work off the event loop."""

    name: str
    model_id: str

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """Continue a batch of conversations; results in request order."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...


@runtime_checkable
class StreamingBackend(Protocol):
    """Optional: a backend that streams one conversation's continuation as it is decoded."""

    def stream(self, request: ChatRequest) -> AsyncGenerator[str | Completion, None]:
        """Text pieces as they are decoded, then the whole `Completion` (always last). The pieces
        concatenate to the completion's text, which equals what `LLMBackend.complete` returns
        for the same request."""
        ...


@runtime_checkable
class RawCompleter(Protocol):
    """Optional: a backend that can continue a raw prompt (``POST /v1/completions``)."""

    async def complete_raw(self, requests: Sequence[TextRequest]) -> list[Completion]:
        """Continue each prompt as it is; results in request order."""
        ...


@runtime_checkable
class TokenCounter(Protocol):
    """Optional: a backend that can count tokens with its model's tokenizer (for ``usage``).

    Called on the event loop, so implementations must be quick and must not share a tokenizer
    with a generation running on a worker thread.
    """

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` (no special tokens)."""
        ...

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens of the conversation as the model sees it (chat template, assistant turn opened)."""
        ...


def context_tokens(backend: object) -> int | None:
    """The model's context window in tokens (prompt and completion together), or None when the
    backend does not know it (then the engine behind it enforces its own)."""
    value = getattr(backend, "context_tokens", None)
    return value if isinstance(value, int) and value > 0 else None


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about four characters a token in English BPE vocabularies)."""
    return (len(text) + 3) // 4


def count_tokens(backend: object, text: str) -> int:
    """Tokens of ``text`` with ``backend``'s tokenizer when it has one, else an estimate."""
    return backend.count_tokens(text) if isinstance(backend, TokenCounter) else estimate_tokens(text)


def count_prompt_tokens(backend: object, messages: Sequence[ChatMessage]) -> int:
    """Prompt tokens of ``messages`` with ``backend``'s tokenizer when it has one, else an estimate."""
    if isinstance(backend, TokenCounter):
        return backend.count_prompt_tokens(messages)
    # Roughly what chat templates add per turn.
    return sum(estimate_tokens(m.content) + 4 for m in messages) + 2
