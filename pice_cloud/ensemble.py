"""Choosing one candidate per point when several edges expanded it (the ensemble).

Each candidate gets seven features; the selector picks the highest weighted sum. The weights
are fitted by ``tools/fit_ensemble.py`` on a calibration set whose target is the candidate's
similarity to a reference answer, and loaded from ``pice_cloud/data/ensemble.json``.

Features (all "higher is better" before weighting; only differences within one point matter,
because the selector takes an argmax per point):

- ``cloud_loglik``: the cloud LLM's mean token log-likelihood of the candidate given the very
  prompt the edge saw (one batched prefill for all candidates of a request, no decoding);
- ``agreement``: mean embedding cosine to the point's other candidates (minimum-Bayes-risk:
  the candidate closest to the consensus);
- ``relevance``: embedding cosine between the candidate and "question + point";
- ``edge_logprob``: the edge model's own mean token log-prob;
- ``length_fit``: closeness of the candidate's length to the expected expansion length;
- ``self_repetition``: minus how much the candidate repeats itself (its repeated-sentence rate
  plus its share of repeated 4-grams: the expansion guard's signals, graded);
- ``cross_repetition``: minus the largest share of its 4-grams found in another point's
  candidate (text one point would repeat from another, below the guard's threshold).

Without a scorer or an embedder the corresponding features are 0 for every candidate, which
leaves the argmax to the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pice_cloud.errors import CloudError
from pice_cloud.guards import repetition_signals
from pice_cloud.llm.base import ChatRequest
from pice_edge.prompts import expansion_messages
from pice_edge.protocol import Candidate

log = logging.getLogger(__name__)

FEATURES = ("cloud_loglik", "agreement", "relevance", "edge_logprob", "length_fit", "self_repetition",
            "cross_repetition")
#: Expected expansion length as a fraction of the token budget: the prompt asks for two
#: sentences, which SmolLM2 writes in roughly 60% of an 80-token budget.
LENGTH_TARGET = 0.6


@dataclass(frozen=True)
class SelectionItem:
    """The candidates of one point and what they answer."""

    question: str
    sketch: Sequence[str]
    index: int
    candidates: Sequence[Candidate]
    tokens_per_point: int = 80
    #: The usable candidates' texts of the request's other points (for ``cross_repetition``).
    other_texts: Sequence[str] = ()


class Selector(Protocol):
    """Chooses one candidate per point, for several points at once (so scoring can batch)."""

    async def choose(self, items: Sequence[SelectionItem]) -> list[int]:
        """Index into ``item.candidates`` of the chosen candidate, per item."""
        ...


class LikelihoodScorer(Protocol):
    """A cloud LLM that can score continuations (mean token log-prob) without decoding."""

    async def score(self, requests: Sequence[ChatRequest], continuations: Sequence[str]) -> list[float]: ...


class TextEmbedder(Protocol):
    """Sentence embeddings, L2-normalised (synchronous; run in a worker thread)."""

    def encode(self, texts: Sequence[str]) -> Sequence[Sequence[float]]: ...


class EnsembleWeights(BaseModel):
    """Fitted feature weights (see ``tools/fit_ensemble.py``)."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float]
    #: How they were fitted and how well they select (free-form, for people).
    fit: dict[str, Any] = Field(default_factory=dict)

    def vector(self) -> list[float]:
        return [self.weights.get(name, 0.0) for name in FEATURES]

    @classmethod
    def load(cls, path: str | Path | None = None) -> EnsembleWeights:
        """Load weights from ``path``, or the packaged ``pice_cloud/data/ensemble.json``.

        Raises:
            CloudError: the file is missing or malformed; the message names it.
        """
        try:
            if path is None:
                text = resources.files("pice_cloud").joinpath("data/ensemble.json").read_text()
                where = "pice_cloud/data/ensemble.json"
            else:
                text = Path(path).read_text()
                where = str(path)
        except OSError as exc:
            raise CloudError(f"cannot read ensemble weights {path}: {exc}; run tools/fit_ensemble.py") from exc
        try:
            weights = cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise CloudError(f"{where}: invalid ensemble weights ({exc}); run tools/fit_ensemble.py") from exc
        unknown = set(weights.weights) - set(FEATURES)
        if unknown:
            raise CloudError(f"{where}: unknown features {sorted(unknown)}; expected some of {list(FEATURES)}")
        return weights


class ConfidenceSelector:
    """The edge's own confidence only (highest mean log-prob); no cloud work at all."""

    def describe(self) -> dict[str, Any]:
        """What `/health` shows."""
        return {"kind": "confidence", "features": ["edge_logprob"], "unavailable": {}}

    async def choose(self, items: Sequence[SelectionItem]) -> list[int]:
        return [max(range(len(it.candidates)), key=lambda i: it.candidates[i].mean_logprob) for it in items]


def length_fit(tokens: int, budget: int) -> float:
    """0 at the expected length, more negative the further (in log ratio) from it."""
    return -abs(math.log((tokens + 1) / (LENGTH_TARGET * max(1, budget) + 1)))


def _cos(a: Sequence[float], b: Sequence[float]) -> float:
    return float(sum(x * y for x, y in zip(a, b, strict=True)))


async def compute_features(
    items: Sequence[SelectionItem],
    *,
    scorer: LikelihoodScorer | None = None,
    embedder: TextEmbedder | None = None,
) -> list[list[list[float]]]:
    """Feature vectors (in `FEATURES` order) per item, per candidate."""
    flat = [(it, c) for it in items for c in it.candidates]
    loglik = [0.0] * len(flat)
    if scorer is not None and flat:
        requests = [ChatRequest(expansion_messages(it.question, it.sketch, it.index), max_tokens=0) for it, _ in flat]
        loglik = await scorer.score(requests, [c.text for _, c in flat])
    vectors: list[Sequence[float]] | None = None
    contexts: list[Sequence[float]] | None = None
    if embedder is not None and flat:
        texts = [c.text for _, c in flat] + [f"{it.question} {it.sketch[it.index]}" for it in items]
        encoded: Any = await asyncio.get_running_loop().run_in_executor(None, embedder.encode, texts)
        if hasattr(encoded, "tolist"):  # a tensor or array (pice_cloud.embeddings.Embedder)
            encoded = encoded.tolist()
        vectors, contexts = list(encoded[: len(flat)]), list(encoded[len(flat):])
    out: list[list[list[float]]] = []
    pos = 0
    for n, it in enumerate(items):
        rows = []
        k = len(it.candidates)
        for j, cand in enumerate(it.candidates):
            agreement = relevance = 0.0
            if vectors is not None and contexts is not None:
                mine = vectors[pos + j]
                others = [vectors[pos + m] for m in range(k) if m != j]
                agreement = sum(_cos(mine, o) for o in others) / len(others) if others else 0.0
                relevance = _cos(mine, contexts[n])
            rep = repetition_signals(cand.text, it.other_texts)
            rows.append([loglik[pos + j], agreement, relevance, cand.mean_logprob,
                         length_fit(cand.token_count, it.tokens_per_point),
                         -(rep.own_sentences + rep.own_4grams), -rep.other_points])
        out.append(rows)
        pos += k
    return out


class LearnedSelector:
    """Weighted sum of the features, weights fitted offline (`EnsembleWeights`).

    The cloud scoring pass runs only for points that have two or more candidates, all of a
    request's such points in one batched prefill.
    """

    def __init__(self, weights: EnsembleWeights | None = None, *, scorer: LikelihoodScorer | None = None,
                 embedder: TextEmbedder | None = None) -> None:
        self.weights = weights or EnsembleWeights.load()
        w = self.weights.vector()
        # Skip a feature's (costly) computation when its weight is zero.
        self.scorer = scorer if w[0] else None
        self.embedder = embedder if (w[1] or w[2]) else None
        if w[0] and scorer is None:
            log.warning("ensemble selection without the cloud's log-likelihood: the LLM backend cannot score")

    def describe(self) -> dict[str, Any]:
        """What `/health` shows: the features in use, and the fitted ones this deployment cannot
        compute (their part is missing), with why."""
        w = dict(zip(FEATURES, self.weights.vector(), strict=True))
        missing: dict[str, str] = {}
        if w["cloud_loglik"] and self.scorer is None:
            missing["cloud_loglik"] = "the cloud LLM backend cannot score continuations (an HTTP engine)"
        if self.embedder is None:
            for name in ("agreement", "relevance"):
                if w[name]:
                    missing[name] = "the embedding model is not fetched (pice-edge models fetch all-minilm-l6-v2)"
        return {"kind": "learned", "features": [f for f in FEATURES if w[f] and f not in missing],
                "unavailable": missing}

    async def choose(self, items: Sequence[SelectionItem]) -> list[int]:
        if not items:
            return []
        feats = await compute_features(items, scorer=self.scorer, embedder=self.embedder)
        w = self.weights.vector()
        picks = []
        for rows in feats:
            scores = [sum(wi * xi for wi, xi in zip(w, row, strict=True)) for row in rows]
            picks.append(max(range(len(rows)), key=lambda i: scores[i]))
        return picks
