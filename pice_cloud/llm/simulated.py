"""A simulated cloud LLM: well-formed sketches and synthetic text at a configured decode rate,
for control-plane load tests and capacity planning (``tools/load_fleet.py``), never for answers.

Sequences share the simulated accelerator the way continuous batching does: a sequence decodes
one token per step, and a step takes longer the more sequences are in flight (``batch_cost`` of a
single sequence's step per extra one). Correctness tests never use it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence

from pice_cloud.llm.base import ChatRequest, Completion
from pice_cloud.sketch import SKETCH_PREFILL

#: Tokens decoded between two looks at the sequences in flight (fewer: closer to a step-by-step
#: engine, more event-loop wake-ups under load).
STEP_CHUNK = 8

_VERBS = ("Plan", "Check", "Measure", "Compare", "Review", "Track", "Test", "Share", "Limit", "Prepare")
_NOUNS = ("budget", "schedule", "sources", "risks", "costs", "habits", "goals", "tools", "results", "options")


class SimulatedBackend:
    """`LLMBackend` whose sketches have ``sketch_points`` distinct headings and whose other
    output is ``output_tokens`` synthetic tokens (capped by each request's ``max_tokens``).

    Args:
        tokens_per_s: decode rate of one sequence alone (a published figure for the cloud's GPU
            and model, or a measured one).
        batch_cost: extra step time per additional sequence in flight, as a share of one
            sequence's step.
        sketch_points: headings in every sketch.
        output_tokens: tokens of every answer or expansion; ``None``: the whole budget.
        sleep: how time passes (tests pass a recording one).
    """

    name = "simulated"
    streams = False

    def __init__(self, *, tokens_per_s: float = 50.0, batch_cost: float = 0.02, sketch_points: int = 5,
                 output_tokens: int | None = None, model_id: str = "simulated",
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be positive")
        self.tokens_per_s = tokens_per_s
        self.batch_cost = batch_cost
        self.sketch_points = sketch_points
        self.output_tokens = output_tokens
        self.model_id = model_id
        self.in_flight = 0
        #: Tokens decoded and calls served so far.
        self.tokens = 0
        self.calls = 0
        self._counter = itertools.count()
        self._sleep = sleep

    def _sketch(self) -> str:
        n = next(self._counter)
        headings = [f"{_VERBS[(n + i) % len(_VERBS)]} the {_NOUNS[(n + 3 * i) % len(_NOUNS)]}"
                    for i in range(self.sketch_points)]
        # The prefill opened point 1 ("1."): the text continues it.
        return " " + "\n".join(f"{i}. {h}" if i > 1 else h for i, h in enumerate(headings, 1)) + "\n"

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        results: list[Completion] = []
        counts: list[int] = []
        for request in requests:
            if request.prefill == SKETCH_PREFILL:
                text = self._sketch()
                count = min(request.max_tokens, 6 * self.sketch_points)
            else:
                count = request.max_tokens if self.output_tokens is None else min(self.output_tokens,
                                                                                   request.max_tokens)
                text = " ".join(["Simulated text of the cloud model."] * max(1, count // 6))
            counts.append(count)
            results.append(Completion(text=text, tokens=count, mean_logprob=-1.0))
        # Decode in stretches of `STEP_CHUNK` tokens, each timed at the sequences in flight then
        # (others' calls join and leave meanwhile); a sequence leaves when its tokens are out.
        self.in_flight += len(requests)
        left, decoded = len(requests), 0
        try:
            for end in sorted(set(counts)):
                while decoded < end:
                    stretch = min(STEP_CHUNK, end - decoded)
                    await self._sleep(stretch * (1.0 + self.batch_cost * (self.in_flight - 1)) / self.tokens_per_s)
                    decoded += stretch
                ended = counts.count(end)
                self.in_flight -= ended
                left -= ended
        finally:
            self.in_flight -= left
        self.tokens += sum(counts)
        self.calls += 1
        return results

    async def close(self) -> None:
        pass
