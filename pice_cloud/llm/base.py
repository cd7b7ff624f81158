"""The interface of the cloud's LLM (it writes sketches, answers cloud-only requests and
expands points whose edges missed their deadline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pice_edge.runtimes.base import ChatMessage


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to continue; the assistant's turn is pre-filled with ``prefill``."""

    messages: Sequence[ChatMessage]
    max_tokens: int
    prefill: str = ""
    temperature: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    mean_logprob: float = 0.0


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
