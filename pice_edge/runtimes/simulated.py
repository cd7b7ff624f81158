"""A simulated runtime: synthetic text at a configured decode rate, for load tests and capacity
planning (hundreds of light edge nodes in one process), never for answers.

It behaves like a model where the control plane can tell: a batch takes as long as decoding its
longest sequence, one token per step, and a step takes longer the more sequences it holds
(``batch_cost``: each extra sequence adds that share of a single sequence's step time; decode is
memory-bound, so on GPUs and Jetsons the share is small). The text is a deterministic function
of the prompt and seed, so runs repeat. Correctness tests never use it.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence

from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult

_WORDS = ("the", "edge", "point", "answer", "plan", "model", "time", "cloud", "batch", "token", "fleet", "device",
          "clear", "simple", "each", "step", "result", "goal", "quickly", "carefully", "better", "often")


class SimulatedRuntime:
    """`Runtime` whose output is synthetic text, produced at ``tokens_per_s`` per sequence.

    Args:
        tokens_per_s: decode rate of one sequence alone (e.g. from ``tools/bench_edge.py`` or a
            device's published figure).
        batch_cost: extra step time per additional sequence in a batch, as a share of a
            single sequence's step (0: batching is free; 1: no gain from batching).
        output_tokens: tokens each sequence generates (capped by its ``max_new_tokens``);
            ``None``: the whole budget.
        prefill_tokens_per_s: prompt processing rate; the prompt's length in words (a stand-in
            for tokens) costs that much time once per batch.
        model_id: reported in status and candidates.
        sleep: how time passes (tests pass a fake clock's sleep).
    """

    name = "simulated"

    def __init__(self, *, tokens_per_s: float = 20.0, batch_cost: float = 0.1, output_tokens: int | None = None,
                 prefill_tokens_per_s: float = 0.0, model_id: str = "simulated",
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be positive")
        if batch_cost < 0:
            raise ValueError("batch_cost must be at least 0")
        self.tokens_per_s = tokens_per_s
        self.batch_cost = batch_cost
        self.output_tokens = output_tokens
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.model_id = model_id
        self._sleep = sleep
        #: Simulated seconds spent so far (for checks of the cost model).
        self.busy_s = 0.0

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        turns = "".join(f"<{m.role}>{m.content}\n" for m in messages)
        return f"{turns}<assistant>{prefill}"

    def batch_seconds(self, token_counts: Sequence[int], prompt_words: int = 0) -> float:
        """How long a batch of sequences generating ``token_counts`` tokens takes."""
        if not token_counts:
            return 0.0
        step = (1.0 + self.batch_cost * (len(token_counts) - 1)) / self.tokens_per_s
        prefill = prompt_words / self.prefill_tokens_per_s if self.prefill_tokens_per_s > 0 else 0.0
        return prefill + max(token_counts) * step

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        counts = [r.max_new_tokens if self.output_tokens is None else min(self.output_tokens, r.max_new_tokens)
                  for r in requests]
        seconds = self.batch_seconds(counts, sum(len(r.prompt.split()) for r in requests))
        self.busy_s += seconds
        self._sleep(seconds)
        return [GenerationResult(text=_text(r, n), token_count=n, mean_logprob=-1.0)
                for r, n in zip(requests, counts, strict=True)]

    def close(self) -> None:
        pass


def _text(request: GenerationRequest, tokens: int) -> str:
    digest = hashlib.blake2b(f"{request.seed}|{request.prompt}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    words = [rng.choice(_WORDS) for _ in range(max(1, tokens))]
    # Sentences of eight words, so the text looks like prose to the guards and the clean-up.
    sentences = [" ".join(words[i:i + 8]).capitalize() + "." for i in range(0, len(words), 8)]
    return " ".join(sentences)
