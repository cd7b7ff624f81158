"""How long an edge takes to expand a point: the one model both sides of the wire use.

The cloud places a point on the edge predicted to finish it soonest and gives it a deadline of a
few times that prediction; the edge refuses a task it predicts it would finish after its deadline.
Both predictions come from `finish_s`, fed with the rate the edge reports (`per_sequence_rate`),
so a refusal means the edge's queue or speed is worse than the cloud knew (another replica's
tasks, a stale heartbeat), never that the two sides model the edge differently: with two models
the edges refused ~1 task per request that the cloud had placed under load.

Batch cost: a decode step of a batch of ``b`` sequences costs ``b ** BATCH_EXPONENT`` times a step
at batch 1 (measured for SmolLM2-135M on one CPU thread: 21 tok/s at batch 1, 51 at 4 and 93 at 8,
i.e. exponents 0.35 and 0.28), so piling points onto one edge is cheaper per token but slower per
point than spreading them.
"""

from __future__ import annotations

from typing import Final

BATCH_EXPONENT: Final = 0.35


def per_sequence_rate(rows: int, produced: int, elapsed_s: float) -> float:
    """An edge's decode rate as a lone sequence would see it (tokens/s at batch 1), from a step
    that advanced ``rows`` sequences by ``produced`` tokens in all in ``elapsed_s`` seconds.

    The edge reports this normalised rate rather than the batch's throughput, so a rate measured
    at batch 1 and one measured at a full batch mean the same thing to `finish_s`.
    """
    if rows <= 0 or produced <= 0 or elapsed_s <= 0:
        return 0.0
    return float(produced * rows ** (BATCH_EXPONENT - 1.0) / elapsed_s)


def finish_s(ahead: int, max_batch: int, tokens: int, tokens_per_s: float) -> float:
    """Seconds until a task of ``tokens`` tokens that arrives behind ``ahead`` others (running or
    waiting) finishes on an edge that runs ``max_batch`` at a time at ``tokens_per_s`` per
    sequence (`per_sequence_rate`): the full batches before it, then its own batch."""
    size = max(1, max_batch)
    full_batches, in_last = divmod(max(0, ahead), size)
    step = tokens / tokens_per_s  # seconds for one sequence decoded alone
    return float(full_batches * step * size**BATCH_EXPONENT + step * (in_last + 1) ** BATCH_EXPONENT)
