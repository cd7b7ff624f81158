"""Building the swappable parts of the request path from their configured names.

`pice-cloud serve` and `pice-cloud ask` share these so the same names mean the same thing in
the config file and on the command line.
"""

from __future__ import annotations

import logging
from typing import Literal

from pice_cloud.ensemble import ConfidenceSelector, EnsembleWeights, LearnedSelector, LikelihoodScorer, Selector
from pice_cloud.llm.base import LLMBackend
from pice_cloud.router import EmbeddingRouter, HeuristicRouter, ModeRouter
from pice_edge.errors import PiceError

log = logging.getLogger(__name__)

RouterKind = Literal["embedding", "heuristic", "off"]
SelectorKind = Literal["learned", "confidence"]


def build_router(kind: RouterKind) -> ModeRouter | None:
    """The mode router for ``auto`` requests: the learned one (MiniLM + logistic regression,
    falling back to the heuristic when MiniLM is not fetched), the keyword heuristic, or none
    (progressive whenever edges are live)."""
    if kind == "off":
        return None
    if kind == "heuristic":
        return HeuristicRouter()
    return EmbeddingRouter.load()


def build_selector(kind: SelectorKind, llm: LLMBackend, ensemble_width: int) -> Selector:
    """The ensemble selector. ``learned`` uses the fitted weights with the cloud LLM as scorer
    (when the backend can score) and MiniLM for the similarity features (when fetched); a
    feature whose part is missing contributes nothing, so selection still works.

    With ``ensemble_width`` 1 no point ever has two candidates: nothing is loaded."""
    if kind == "confidence" or ensemble_width <= 1:
        return ConfidenceSelector()
    scorer: LikelihoodScorer | None = llm if callable(getattr(llm, "score", None)) else None  # type: ignore[assignment]
    embedder = None
    try:
        from pice_cloud.embeddings import Embedder

        embedder = Embedder()
    except PiceError as exc:
        log.warning("ensemble selection without similarity features: %s", exc)
    return LearnedSelector(EnsembleWeights.load(), scorer=scorer, embedder=embedder)
