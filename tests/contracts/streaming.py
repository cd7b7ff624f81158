"""What the contract tests check of every streaming backend: the pieces, the final completion, and
the same request answered whole."""

from __future__ import annotations

from pice_cloud.llm.base import ChatRequest, Completion, StreamingBackend


async def stream_and_complete(llm: StreamingBackend, request: ChatRequest) -> tuple[list[str], Completion | None,
                                                                                  Completion]:
    """``request`` streamed (its text pieces and the final `Completion`, None if none came), then
    completed whole; the backend is closed afterwards."""
    pieces: list[str] = []
    final: Completion | None = None
    try:
        async for item in llm.stream(request):
            if isinstance(item, Completion):
                final = item
            else:
                pieces.append(item)
        (whole,) = await llm.complete([request])
    finally:
        await llm.close()
    return pieces, final, whole
