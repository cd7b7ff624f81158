"""PICE cloud service: sketch with the cloud LLM, expand at the edge, assemble the answer.

What ``__all__`` lists (with the sub-packages `pice_cloud.llm`, `pice_cloud.progressive`,
`pice_cloud.finetune` and `pice_cloud.server`) is the public API; the other modules are
implementation and may change. Nothing here imports torch or transformers.
"""

from pice_cloud.bootstrap import System, start_system
from pice_cloud.broker import EmbeddedBroker, MosquittoProcess, free_port, wait_port
from pice_cloud.config import CloudConfig, EdgesConfig, ServiceConfig, load_config
from pice_cloud.embeddings import Embedder
from pice_cloud.ensemble import ConfidenceSelector, EnsembleWeights, LearnedSelector, Selector
from pice_cloud.errors import CloudError, SketchError
from pice_cloud.events import AnswerEvent, AnswerStats, ChosenPoint, GenerationOptions, PointEvent, SketchEvent
from pice_cloud.fleet import Fleet
from pice_cloud.fleet_cli import publish_rollout, rollout_message
from pice_cloud.guards import (
    MAX_HEADING_WORDS,
    Embed,
    check_expansion,
    check_sketch,
    is_cut_heading,
    is_meta_heading,
    repair_sketch,
    repeated_ngram_share,
    repeated_sentence_rate,
    sketch_rejection_reason,
)
from pice_cloud.llm.base import ChatRequest, Completion, LLMBackend
from pice_cloud.router import (
    LONG_ANSWER_WORDS,
    MAX_QUESTION_CHARS,
    WEIGHTS_FORMAT,
    CalibrationSample,
    EmbeddingRouter,
    HeuristicRouter,
    ModeRouter,
    Route,
    RouterWeights,
    ThresholdPoint,
    calibrate_threshold,
    cloud_only_reason,
    is_held_out,
    read_labels,
    simulate_auto,
    stratum_weights,
)
from pice_cloud.scheduler import Budget, CloudView, EdgeView, Placement, choose_mode, place
from pice_cloud.service import PiceService
from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages

__all__ = [
    "LONG_ANSWER_WORDS",
    "MAX_HEADING_WORDS",
    "MAX_QUESTION_CHARS",
    "SKETCH_PREFILL",
    "WEIGHTS_FORMAT",
    "AnswerEvent",
    "AnswerStats",
    "Budget",
    "CalibrationSample",
    "ChatRequest",
    "ChosenPoint",
    "CloudConfig",
    "CloudError",
    "CloudView",
    "Completion",
    "ConfidenceSelector",
    "EdgeView",
    "EdgesConfig",
    "Embed",
    "EmbeddedBroker",
    "Embedder",
    "EmbeddingRouter",
    "EnsembleWeights",
    "Fleet",
    "GenerationOptions",
    "HeuristicRouter",
    "LLMBackend",
    "LearnedSelector",
    "ModeRouter",
    "MosquittoProcess",
    "PiceService",
    "Placement",
    "PointEvent",
    "Route",
    "RouterWeights",
    "Selector",
    "ServiceConfig",
    "SketchError",
    "SketchEvent",
    "System",
    "ThresholdPoint",
    "calibrate_threshold",
    "check_expansion",
    "check_sketch",
    "choose_mode",
    "cloud_only_reason",
    "free_port",
    "is_cut_heading",
    "is_held_out",
    "is_meta_heading",
    "load_config",
    "parse_sketch",
    "place",
    "publish_rollout",
    "read_labels",
    "repair_sketch",
    "repeated_ngram_share",
    "repeated_sentence_rate",
    "rollout_message",
    "simulate_auto",
    "sketch_messages",
    "sketch_rejection_reason",
    "start_system",
    "stratum_weights",
    "wait_port",
]
