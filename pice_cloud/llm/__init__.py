"""Cloud LLM backends behind `LLMBackend`; one module each, imported lazily."""

from __future__ import annotations

from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend

__all__ = ["ChatRequest", "Completion", "LLMBackend"]
