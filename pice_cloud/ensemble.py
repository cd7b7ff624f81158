"""Choosing one candidate per point when several edges expanded it (the ensemble).

Each candidate gets seven features; the selector picks the highest weighted sum. The weights
are fitted by ``tools/fit_ensemble.py`` on a calibration set whose target is the candidate's
similarity to a reference answer, and loaded from ``pice_cloud/data/ensemble.json``, keyed by
feature name. A candidate's features are built in one place, `feature_row`, as a mapping from
name to value, for both the selector and the fitter; `feature_vector` lays a row out in a list
of names' order, so fitted weights and features always line up by name, never by position.

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
from collections.abc import Mapping, Sequence
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

#: Every feature's name, in the order they are documented above (and summed in a score).
FEATURES = ("cloud_loglik", "agreement", "relevance", "edge_logprob", "length_fit", "self_repetition",
            "cross_repetition")
#: The features computed from sentence embeddings (costly: skipped when none is weighted).
EMBEDDING_FEATURES = ("agreement", "relevance")
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

    def weight(self, name: str) -> float:
        """The weight of feature ``name`` (0 when the file does not name it)."""
        return self.weights.get(name, 0.0)

    def vector(self, names: Sequence[str] = FEATURES) -> list[float]:
        """The weights laid out in ``names``' order (to pair with `feature_vector` of the same names)."""
        return [self.weight(name) for name in names]

    def score(self, row: Mapping[str, float]) -> float:
        """The weighted sum of a candidate's features (`feature_row`), matched by name."""
        # Summed in FEATURES order whatever order the file lists them in: one score per row.
        return sum(self.weight(name) * row[name] for name in FEATURES)

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


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine of two L2-normalised embeddings (their dot product)."""
    return float(sum(float(x) * float(y) for x, y in zip(a, b, strict=True)))


def similarity_features(vectors: Sequence[Sequence[float]], context: Sequence[float]) -> list[tuple[float, float]]:
    """``(agreement, relevance)`` of each of one point's candidates, from their embeddings and
    the embedding of "question + point": mean cosine to the other candidates (0 alone), and
    cosine to the context."""
    out = []
    for j, mine in enumerate(vectors):
        others = [v for m, v in enumerate(vectors) if m != j]
        agreement = sum(cosine(mine, o) for o in others) / len(others) if others else 0.0
        out.append((agreement, cosine(mine, context)))
    return out


def feature_row(text: str, *, tokens: int, tokens_per_point: int, edge_logprob: float, cloud_loglik: float = 0.0,
                agreement: float = 0.0, relevance: float = 0.0, other_texts: Sequence[str] = ()) -> dict[str, float]:
    """One candidate's features by name (every name in `FEATURES`): the one definition of what
    each feature is, used by the selector (`compute_features`) and the fitter
    (``tools/fit_ensemble.py``).

    Args:
        text: the candidate's text; ``tokens``: its length in tokens, of a budget of
            ``tokens_per_point``.
        edge_logprob: the edge model's mean token log-prob of it.
        cloud_loglik: the cloud LLM's mean token log-likelihood of it (0: no scorer).
        agreement, relevance: from `similarity_features` (0: no embedder).
        other_texts: the usable candidates' texts of the request's other points.
    """
    rep = repetition_signals(text, other_texts)
    return {
        "cloud_loglik": cloud_loglik,
        "agreement": agreement,
        "relevance": relevance,
        "edge_logprob": edge_logprob,
        "length_fit": length_fit(tokens, tokens_per_point),
        "self_repetition": -(rep.own_sentences + rep.own_4grams),
        "cross_repetition": -rep.other_points,
    }


def feature_vector(row: Mapping[str, float], names: Sequence[str] = FEATURES) -> list[float]:
    """A feature row laid out in ``names``' order (a fitter's design-matrix row).

    Raises:
        KeyError: a name that is not a feature.
    """
    return [row[name] for name in names]


async def compute_features(
    items: Sequence[SelectionItem],
    *,
    scorer: LikelihoodScorer | None = None,
    embedder: TextEmbedder | None = None,
) -> list[list[dict[str, float]]]:
    """Feature rows (`feature_row`: name -> value) per item, per candidate. The cloud's scores
    come in one batched call for all items, the embeddings in one encode."""
    flat = [(it, c) for it in items for c in it.candidates]
    loglik = [0.0] * len(flat)
    if scorer is not None and flat:
        requests = [ChatRequest(expansion_messages(it.question, it.sketch, it.index), max_tokens=0) for it, _ in flat]
        loglik = await scorer.score(requests, [c.text for _, c in flat])
    vectors: list[Sequence[float]] | None = None
    contexts: list[Sequence[float]] | None = None
    if embedder is not None and flat:
        texts = [c.text for _, c in flat] + [f"{it.question} {it.sketch[it.index]}" for it in items]
        # to_thread: the worker sees the request's context (its `current_ledger`).
        encoded: Any = await asyncio.to_thread(embedder.encode, texts)
        if hasattr(encoded, "tolist"):  # a tensor or array (pice_cloud.embeddings.Embedder)
            encoded = encoded.tolist()
        vectors, contexts = list(encoded[: len(flat)]), list(encoded[len(flat):])
    out: list[list[dict[str, float]]] = []
    pos = 0
    for n, it in enumerate(items):
        k = len(it.candidates)
        if vectors is not None and contexts is not None:
            similar = similarity_features(vectors[pos:pos + k], contexts[n])
        else:
            similar = [(0.0, 0.0)] * k
        out.append([feature_row(cand.text, tokens=cand.token_count, tokens_per_point=it.tokens_per_point,
                                edge_logprob=cand.mean_logprob, cloud_loglik=loglik[pos + j],
                                agreement=similar[j][0], relevance=similar[j][1], other_texts=it.other_texts)
                    for j, cand in enumerate(it.candidates)])
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
        w = self.weights
        # Skip a feature's (costly) computation when its weight is zero.
        self.scorer = scorer if w.weight("cloud_loglik") else None
        self.embedder = embedder if any(w.weight(name) for name in EMBEDDING_FEATURES) else None
        if w.weight("cloud_loglik") and scorer is None:
            log.warning("ensemble selection without the cloud's log-likelihood: the LLM backend cannot score")

    def describe(self) -> dict[str, Any]:
        """What `/health` shows: the features in use, and the fitted ones this deployment cannot
        compute (their part is missing), with why."""
        w = {name: self.weights.weight(name) for name in FEATURES}
        missing: dict[str, str] = {}
        if w["cloud_loglik"] and self.scorer is None:
            missing["cloud_loglik"] = "the cloud LLM backend cannot score continuations (an HTTP engine)"
        if self.embedder is None:
            for name in EMBEDDING_FEATURES:
                if w[name]:
                    missing[name] = "the embedding model is not fetched (pice-edge models fetch all-minilm-l6-v2)"
        return {"kind": "learned", "features": [f for f in FEATURES if w[f] and f not in missing],
                "unavailable": missing}

    async def choose(self, items: Sequence[SelectionItem]) -> list[int]:
        if not items:
            return []
        feats = await compute_features(items, scorer=self.scorer, embedder=self.embedder)
        picks = []
        for rows in feats:
            scores = [self.weights.score(row) for row in rows]
            picks.append(max(range(len(rows)), key=lambda i: scores[i]))
        return picks
