"""The cloud's own expansions of sketch points: one point at a time (a point no edge answered in
time, stopped if an edge's candidate settles it first) or streamed to the client (the answer's
opening point), with the same prompt and clean-up as an edge's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence

from pice_cloud.cloud_ledger import CloudLedger, Purpose
from pice_cloud.cloud_meter import CloudMeter
from pice_cloud.events import render_point
from pice_cloud.llm.base import ChatRequest, Completion
from pice_edge.prompts import clean_expansion, expansion_messages, settled_sentences
from pice_edge.protocol import Sampling


class CloudExpander:
    """Expands points with the cloud LLM (through ``cloud``, which batches and meters it)."""

    def __init__(self, cloud: CloudMeter) -> None:
        self.cloud = cloud

    @staticmethod
    def _request(question: str, points: Sequence[str], index: int, tokens_per_point: int,
                 sampling: Sampling) -> ChatRequest:
        return ChatRequest(expansion_messages(question, list(points), index), max_tokens=tokens_per_point,
                           temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)

    async def expand_one(self, question: str, points: Sequence[str], index: int, tokens_per_point: int,
                         sampling: Sampling, *, purpose: Purpose = "fallback_expansion",
                         ledger: CloudLedger | None = None) -> tuple[str, int]:
        """One point's (cleaned text, tokens decoded), as `expand` gives it. Streamed when the
        backend can: cancelled midway (an edge's candidate settled the point first), the
        generation stops at the next decode step and the ledger still gets what was decoded."""
        request = self._request(question, points, index, tokens_per_point, sampling)
        if not self.cloud.streams:
            [res] = await self.cloud.complete([request], purpose=purpose, ledger=ledger)
        else:
            res = Completion("", 0)
            async with contextlib.aclosing(self.cloud.stream(request, purpose=purpose, ledger=ledger)) as stream:
                async for piece in stream:
                    if isinstance(piece, Completion):
                        res = piece
        text = clean_expansion(res.text, truncated=res.tokens >= tokens_per_point, point=points[index],
                               question=question)
        return text or points[index], res.tokens

    async def stream(self, question: str, points: Sequence[str], index: int, tokens_per_point: int,
                     sampling: Sampling, *, ledger: CloudLedger | None = None,
                     ) -> AsyncGenerator[tuple[str, str | None, int], None]:
        """Expand point ``index`` and stream it: yields ``(piece, None, 0)`` as whole sentences
        settle (`pice_edge.prompts.clean_expansion`, then `settled_sentences`, on the text so
        far), the first piece opening with the point's rendered heading; then ``(rest, text,
        tokens)``: ``text`` is the point's final text, and the pieces add up to
        ``render_point(index, heading, text)`` exactly, so a streamed answer and a whole one match."""
        request = self._request(question, points, index, tokens_per_point, sampling)
        heading = points[index]
        opening = render_point(index, heading, "") + " "
        raw, sent, tokens = "", "", 0
        async with contextlib.aclosing(self.cloud.stream(request, purpose="first_point", ledger=ledger)) as stream:
            async for piece in stream:
                if isinstance(piece, Completion):
                    tokens = piece.tokens
                    continue
                raw += piece
                cleaned = settled_sentences(clean_expansion(raw, truncated=False, point=heading, question=question))
                if len(cleaned) > len(sent) and cleaned.startswith(sent):
                    yield (opening if not sent else "") + cleaned[len(sent):], None, 0
                    sent = cleaned
        final = clean_expansion(raw, truncated=tokens >= tokens_per_point, point=heading, question=question) or heading
        if not sent:
            yield opening + final, final, tokens
        elif final.startswith(sent):
            yield final[len(sent):], final, tokens
        else:  # the clean-up of the whole text changed what went out: keep what went out
            yield "", sent, tokens
