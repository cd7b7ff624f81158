"""PICE cloud service: sketch with the cloud LLM, expand at the edge, assemble the answer."""

from pice_cloud.bootstrap import System, start_system
from pice_cloud.config import CloudConfig, ServiceConfig, load_config
from pice_cloud.embeddings import Embedder
from pice_cloud.ensemble import ConfidenceSelector, EnsembleWeights, LearnedSelector, Selector
from pice_cloud.errors import CloudError
from pice_cloud.events import AnswerEvent, AnswerStats, ChosenPoint, GenerationOptions, PointEvent, SketchEvent
from pice_cloud.fleet import Fleet
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend
from pice_cloud.router import EmbeddingRouter, HeuristicRouter, ModeRouter, Route
from pice_cloud.scheduler import Budget, CloudView, EdgeView, Placement, choose_mode, place
from pice_cloud.service import PiceService
from pice_cloud.sketch import parse_sketch

__all__ = [
    "AnswerEvent",
    "AnswerStats",
    "Budget",
    "ChatRequest",
    "ChosenPoint",
    "CloudConfig",
    "CloudError",
    "CloudView",
    "Completion",
    "ConfidenceSelector",
    "EdgeView",
    "Embedder",
    "EmbeddingRouter",
    "EnsembleWeights",
    "Fleet",
    "GenerationOptions",
    "HeuristicRouter",
    "LLMBackend",
    "LearnedSelector",
    "ModeRouter",
    "PiceService",
    "Placement",
    "PointEvent",
    "Route",
    "Selector",
    "ServiceConfig",
    "SketchEvent",
    "System",
    "choose_mode",
    "load_config",
    "parse_sketch",
    "place",
    "start_system",
]
