"""The scheduler's mode router: does a question gain from a sketch, or should the cloud answer it whole?

Skeleton-of-Thought found that sketch-then-expand helps questions whose answer is a set of
independent points (advice, comparisons, explanations) and hurts code, math, step-by-step
reasoning and short answers. `EmbeddingRouter` learns that with two logistic regressions on the
all-MiniLM-L6-v2 embedding of the question: P(suits a sketch) from SoT's labels
(``tools/train_router.py``) times P(long answer) from reference answers' lengths
(``tools/train_length.py``), shipped as ``pice_cloud/data/router.json`` (weights, biases, the
calibrated threshold, how each was trained and its held-out accuracy). At run time it is one
embedding and two dot products: no scikit-learn.

When the embedding model is not available (not fetched, no torch), `EmbeddingRouter.load`
falls back to `HeuristicRouter`: regular expressions send code, math, step-by-step, role-play
and single-piece writing to the cloud, list-style questions ("how can I", "what are the ways",
"compare") to the edges, and anything else to the cloud. Its accuracy is reported next to the
learned router's by the training tool (lower, but it never needs a model).

The router only advises: ``choose_mode`` in the scheduler applies it when the request asked for
``auto`` and edges are live, and a request may always force a mode.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pice_cloud.errors import CloudError
from pice_cloud.scheduler import Mode
from pice_edge.errors import ConfigError, PiceError

if TYPE_CHECKING:
    from pice_cloud.embeddings import Embedder

log = logging.getLogger(__name__)

#: Questions are cut to this many characters before embedding; the model sees 256 tokens at most
#: anyway, and a huge request must not cost the router more than that.
MAX_QUESTION_CHARS = 4000
WEIGHTS_FORMAT = 1
#: A question whose best answer is shorter than this is served worse by an outline of points (at
#: least three points of about two sentences: some 150 words); see `RouterWeights.long_answer`.
LONG_ANSWER_WORDS = 150


class Route(NamedTuple):
    """A router's advice: the mode, and the router's score (P(suits a sketch), times P(long answer)
    with the answer-length model) that decided it."""

    mode: Mode
    probability: float


#: The advice for a question `cloud_only_reason` names: no sketch, whatever a model would score.
GATED = Route("cloud", 0.0)


class ModeRouter(Protocol):
    """Decides per question between cloud-only and progressive answering.

    ``predict`` is synchronous and may be CPU-bound (an embedding): async callers run it in a
    worker thread.
    """

    def predict(self, question: str) -> Route:
        """The advised mode for ``question`` and P(suits a sketch)."""
        ...


# --- the code/math gate ---------------------------------------------------------------------

#: Questions no sketch serves, whatever a router scores: writing, reading or fixing code, exact
#: math (an expression, an equation, a proof, coordinates), and translating a text. Narrower than the heuristic's
#: "code" and "math" rules (which also catch "the Enigma code" or "how many"), because it
#: overrides the learned router: it names programming languages with what is asked of them,
#: code-shaped text, and math notation, not topics.
_LANGUAGES = r"python|java(?:script)?|c\+\+|c\#|rust|golang|ruby|php|sql|bash|typescript|kotlin|swift|matlab|perl"
_GATES: dict[str, re.Pattern[str]] = {
    "code": re.compile(
        r"""```                                                         # a code block
        | ^\s*(def|class|import|\#include|public|select|function)\b.*[(:{;]   # a line of code
        | [{};]\s*$ | \b[a-z_]\w*\(\) | \b[a-z_]\w*\([^()\n]*\)\s*[;{]  # code-shaped text
        | \b(write|implement|debug|fix|refactor|optimi[sz]e|complete|code\ up)\b [^.?!\n]{0,60}
          \b(program|function|method|class|code|query|regex|algorithm|snippet|script\ in|unit\ tests?)\b
        | \b(in|using|with)\s+(""" + _LANGUAGES + r"""|html|css)(?![\w-])     # ... in Python
        | (\b|(?=c[+\#]))(""" + _LANGUAGES + r"""|shell|powershell)\s+
          (script|program|function|code|query|snippet|class|method|command|one-liner|statement)\b  # a bash command
        | \b(regex|regular\ expression|time\ complexity|big-o|stack\ trace|compiler?\ error|syntax\ error
             |linked\ list|binary\ search)\b""",
        re.IGNORECASE | re.MULTILINE | re.VERBOSE),
    "math": re.compile(
        r"""\d\s*[+*/^=×÷]\s*\(?-?\d | \d\s+-\s+\(?\d       # an expression (not a range: 1939-1945)
        | \$[^$\n]*[\\^_=][^$\n]*\$                       # LaTeX (not prices: $5 and $8)
        | \b[fgh]\([a-z0-9]\)
        | \b(solve|simplify|evaluate|differentiate|integrate)\b [^.?!\n]{0,40}
          (equation|expression|\bfor\ [a-z]\b|\d|\b[a-z]\s*[=^])
        | \b(equations?|integral|derivative|theorem|prove\ that|proof\ that|probability\ (of|that))\b
        | \(\s*-?\d+(\.\d+)?\s*,\s*-?\d+(\.\d+)?\s*\)     # coordinates""",
        re.IGNORECASE | re.VERBOSE),
    # A translation is one text rendered in another language: an outline of points cannot serve it.
    "translation": re.compile(
        r"""\btranslate\b [^?!\n]{0,120}? \b(into|to)\s+[a-z]+
        | \bhow\ (do|would|can)\ (you|i|we)\ say\b [^?!\n]{0,80} \bin\s+[a-z]+""",
        re.IGNORECASE | re.VERBOSE),
}


def cloud_only_reason(question: str) -> str | None:
    """``"code"``, ``"math"`` or ``"translation"`` when ``question`` asks for code, exact math or a
    translation (always answered cloud-only under ``auto``), else None."""
    text = question[:MAX_QUESTION_CHARS]
    for name, pattern in _GATES.items():
        if pattern.search(text):
            return name
    return None


# --- heuristic fallback ----------------------------------------------------------------------

_CLOUD_PATTERNS: dict[str, re.Pattern[str]] = {
    "code": re.compile(
        r"```|\b(code|coding|program(ming)?|script|function|method|class|compile[rd]?|debug|bug|regex|sql|api|"
        r"python|java(script)?|c\+\+|c#|rust|golang|bash|shell|html|css|json|git|linux|implement(ation)?|"
        r"algorithm|syntax|variable|array|string|loop|recursion|exception)\b|\w+\(\)|[{};]\s*$",
        re.IGNORECASE | re.MULTILINE,
    ),
    "math": re.compile(
        r"\b(calculate|compute|solve|equation|integral|derivative|prove|proof|theorem|probability|"
        r"how many|how much|what is the value|sum of|product of|formula|percent(age)?)\b|"
        r"\d\s*[-+*/^=×÷]\s*\d|\$[^$]+\$|\bf\(x\)|\d+ is (greater|less|bigger|smaller) than",
        re.IGNORECASE,
    ),
    "steps": re.compile(r"\bstep[- ]by[- ]step\b|\bthink (it )?through\b|\breason(ing)? (about|through)\b",
                        re.IGNORECASE),
    "role": re.compile(r"\b(pretend|imagine you are|imagine yourself|as an? [a-z]+,|role[- ]?play|you are an?)\b",
                       re.IGNORECASE),
    # One piece of writing (a story, a letter, a translation) is a whole, not a list of points.
    "writing": re.compile(
        r"\b(write|compose|draft|create|tell)\b.{0,40}\b(story|poem|song|haiku|limerick|letter|e-?mail|essay|"
        r"novel|speech|joke|dialog(ue)?|scene|tweet|paragraph|sentence|lyrics|script|rap)\b|"
        r"\btranslat(e|ion)\b|\b(rewrite|paraphrase|summari[sz]e)\b|\bin (under|less than|fewer than) \d+ words\b",
        re.IGNORECASE,
    ),
}
#: Questions whose answer is naturally a list of independent points (advice, comparisons, factors).
_LIST_PATTERN = re.compile(
    r"\b(what are (the|some)|how (can|do|should) (i|we|one|you)|tips|ways to|advice|strateg(y|ies)|benefits|"
    r"advantages|disadvantages|pros and cons|differences?|compare|comparison|factors|explain|describe|discuss|"
    r"impact|ideas|suggest)\b",
    re.IGNORECASE,
)
#: Probability reported by the heuristic: it has no calibrated score, only a side.
_HEURISTIC_P = {"cloud": 0.25, "progressive": 0.75}


def heuristic_reason(question: str) -> str | None:
    """Why the heuristic sends ``question`` to the cloud (code, math, steps, role, writing, other), or None."""
    text = question[:MAX_QUESTION_CHARS]
    for name, pattern in _CLOUD_PATTERNS.items():
        if pattern.search(text):
            return name
    return None if _LIST_PATTERN.search(text) else "other"


class HeuristicRouter:
    """Keyword rules, no model: used when the embedding model is unavailable, and as a baseline.

    Cloud-only for code, math, step-by-step, role-play and single-piece writing (a story, a
    letter, a translation); progressive for questions phrased as asking for a list of points
    ("what are the ways", "how can I", "compare", "tips"); cloud-only for anything else, because
    most of SoT's training questions that match neither are unsuited (the rules were chosen on
    LIMA's training part only) and a cloud answer is never worse in quality.
    """

    name = "heuristic"

    def predict(self, question: str) -> Route:
        mode: Mode = "cloud" if heuristic_reason(question) else "progressive"
        return Route(mode, _HEURISTIC_P[mode])


# --- learned router ---------------------------------------------------------------------------


class RouterWeightsError(ConfigError):
    """The router's weights file is missing, malformed or made for another embedding."""


def _sigmoid(z: float) -> float:
    if z >= 0:  # numerically safe both ways
        return 1.0 / (1.0 + math.exp(-z))
    ez = math.exp(z)
    return ez / (1.0 + ez)


@dataclass(frozen=True)
class RouterWeights:
    """Logistic regressions over sentence embeddings: P(suits a sketch) = sigmoid(w . x + b),
    fitted on Skeleton-of-Thought's labels, times P(long answer) = sigmoid(w' . x + b') where
    ``long_answer`` = (w', b') is given, fitted on reference-answer lengths (`LONG_ANSWER_WORDS`;
    ``tools/train_length.py``). The product is the router's score, compared with ``threshold``."""

    weights: tuple[float, ...]
    bias: float
    threshold: float = 0.5
    embedding_model: str = "all-minilm-l6-v2"
    meta: dict[str, Any] = field(default_factory=dict)
    long_answer: tuple[tuple[float, ...], float] | None = None

    @classmethod
    def load(cls, path: str | Path | None = None) -> RouterWeights:
        """Read a weights file; the default is the one shipped in ``pice_cloud/data/router.json``.

        Raises:
            RouterWeightsError: unreadable, wrong format, or fields of the wrong type.
        """
        where = str(path) if path else "pice_cloud/data/router.json"
        try:
            if path is None:
                text = resources.files("pice_cloud").joinpath("data/router.json").read_text(encoding="utf-8")
            else:
                text = Path(path).read_text(encoding="utf-8")
            data = json.loads(text)
        except (OSError, ValueError) as exc:
            raise RouterWeightsError(f"cannot read router weights {where} ({exc}); "
                                     "re-create them with `python tools/train_router.py`") from exc
        if not isinstance(data, dict) or data.get("format") != WEIGHTS_FORMAT:
            raise RouterWeightsError(f"{where}: expected an object with \"format\": {WEIGHTS_FORMAT}")
        try:
            weights = tuple(float(x) for x in data["weights"])
            bias = float(data["bias"])
            threshold = float(data.get("threshold", 0.5))
            model = str(data.get("embedding_model", "all-minilm-l6-v2"))
        except (KeyError, TypeError, ValueError) as exc:
            raise RouterWeightsError(f"{where}: field {exc} is missing or not a number") from exc
        if not weights or not all(math.isfinite(w) for w in (*weights, bias, threshold)):
            raise RouterWeightsError(f"{where}: weights must be a non-empty list of finite numbers")
        if not 0.0 < threshold < 1.0:
            raise RouterWeightsError(f"{where}: threshold {threshold} is not in (0, 1)")
        long_answer = None
        if data.get("long_answer") is not None:
            section = data["long_answer"]
            try:
                long_answer = (tuple(float(x) for x in section["weights"]), float(section["bias"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise RouterWeightsError(f"{where}: long_answer.{exc} is missing or not a number; re-create it "
                                         "with `python tools/train_length.py`") from exc
            if len(long_answer[0]) != len(weights) or not all(map(math.isfinite, (*long_answer[0], long_answer[1]))):
                raise RouterWeightsError(f"{where}: long_answer needs {len(weights)} finite weights and a bias")
        meta = {k: v for k, v in data.items()
                if k not in {"weights", "bias", "threshold", "embedding_model", "long_answer"}}
        if long_answer is not None:  # how it was fitted, without its weights
            meta["long_answer"] = {k: v for k, v in data["long_answer"].items() if k not in {"weights", "bias"}}
        return cls(weights=weights, bias=bias, threshold=threshold, embedding_model=model, meta=meta,
                   long_answer=long_answer)

    def probability(self, vector: Sequence[float]) -> float:
        """The router's score for one embedding: P(suits a sketch), times P(long answer) when
        the weights have a ``long_answer`` model."""
        if len(vector) != len(self.weights):
            raise CloudError(f"router weights expect {len(self.weights)}-d embeddings, got {len(vector)}-d; "
                             f"they were trained on {self.embedding_model}")
        xs = [float(x) for x in vector]
        p = _sigmoid(self.bias + math.fsum(w * x for w, x in zip(self.weights, xs, strict=True)))
        if self.long_answer is not None:
            weights, bias = self.long_answer
            p *= _sigmoid(bias + math.fsum(w * x for w, x in zip(weights, xs, strict=True)))
        return p

    def route(self, vector: Sequence[float]) -> Route:
        p = self.probability(vector)
        return Route("progressive" if p >= self.threshold else "cloud", p)


class EmbeddingRouter:
    """Logistic regression on the question's MiniLM embedding (see the module docstring).

    Args:
        weights: the fitted weights (default: the shipped file).
        embedder: the sentence embedder; ``None`` routes with `HeuristicRouter` instead.
    """

    def __init__(self, weights: RouterWeights | None = None, embedder: Embedder | None = None) -> None:
        self.weights = weights or RouterWeights.load()
        self.embedder = embedder
        self._fallback = HeuristicRouter()
        if embedder is not None and embedder.dim != len(self.weights.weights):
            raise RouterWeightsError(f"router weights are {len(self.weights.weights)}-d but the embedder "
                                     f"{embedder.model_id} gives {embedder.dim}-d vectors")

    @property
    def name(self) -> str:
        return "embedding" if self.embedder is not None else "heuristic"

    @classmethod
    def load(cls, weights_path: str | Path | None = None, *, model: str | Path | None = None,
             device: str = "cpu") -> EmbeddingRouter:
        """Load the weights and the embedding model; without the model, route by the heuristic.

        Raises:
            RouterWeightsError: the weights file is unusable (that is a deployment error, not a fallback).
        """
        weights = RouterWeights.load(weights_path)
        try:
            from pice_cloud.embeddings import Embedder

            embedder: Embedder | None = Embedder(model or weights.embedding_model, device=device)
        except PiceError as exc:
            log.warning("mode router falls back to the keyword heuristic: %s", exc)
            embedder = None
        return cls(weights, embedder)

    def predict(self, question: str) -> Route:
        [route] = self.predict_many([question])
        return route

    def predict_many(self, questions: Sequence[str]) -> list[Route]:
        """`predict` for many questions with batched embedding. Code and math questions
        (`cloud_only_reason`) go cloud-only with P = 0 and are not embedded."""
        if self.embedder is None:
            return [self._fallback.predict(q) for q in questions]
        routes: list[Route | None] = [GATED if cloud_only_reason(q) else None for q in questions]
        todo = [i for i, r in enumerate(routes) if r is None]
        if todo:
            vectors = self.embedder.encode([questions[i][:MAX_QUESTION_CHARS] for i in todo]).tolist()
            for i, vector in zip(todo, vectors, strict=True):
                routes[i] = self.weights.route(vector)
        return [r for r in routes if r is not None]


# --- SoT's labels (training and evaluation) ----------------------------------------------------


def read_labels(path: str | Path) -> list[tuple[str, int]]:
    """Read a Skeleton-of-Thought router file: ``label;request`` rows, requests may be quoted and span lines.

    Label 1 means the question suits sketch-then-expand.

    Raises:
        ConfigError: unreadable file, missing columns, or a label other than 0/1 (the row is named).
    """
    try:
        with Path(path).open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter=";")
            if reader.fieldnames is None or not {"label", "request"} <= set(reader.fieldnames):
                raise ConfigError(f"{path}: expected a header 'label;request', got {reader.fieldnames}")
            rows = []
            for line, row in enumerate(reader, start=2):
                label = (row.get("label") or "").strip()
                if label not in {"0", "1"}:
                    raise ConfigError(f"{path}: row near line {line}: label {label!r} is not 0 or 1")
                rows.append(((row.get("request") or "").strip(), int(label)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read router labels {path} ({exc})") from exc
    return rows


def is_held_out(text: str, fraction: float = 0.2) -> bool:
    """Deterministic split by a hash of the text: the same questions are held out on every machine."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < fraction


# --- threshold calibration ---------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSample:
    """One held-back question answered both ways, for `calibrate_threshold`.

    Attributes:
        probability: the router's P(suits a sketch) for the question.
        cloud: (quality metrics, cloud tokens) of its cloud-only answer; metrics are higher-better
            (e.g. MiniLM cosine and ROUGE-L to a reference answer).
        progressive: the same for its progressive answer.
        served_progressive: whether that answer was really progressive (the sketch guards may
            have sent it cloud-only, as they would under ``auto``).
        weight: how many questions of the traffic it stands for, relative to the others (see
            `stratum_weights`: questions near the threshold are sampled more densely than the rest).
    """

    probability: float
    cloud: tuple[tuple[float, ...], float]
    progressive: tuple[tuple[float, ...], float]
    served_progressive: bool
    weight: float = 1.0


@dataclass(frozen=True)
class ThresholdPoint:
    """What ``auto`` gives at one threshold: shares of questions and mean metrics."""

    threshold: float
    routed_progressive: float
    served_progressive: float
    quality: tuple[float, ...]
    cloud_tokens: float


def simulate_auto(samples: Sequence[CalibrationSample], threshold: float) -> ThresholdPoint:
    """``auto`` at ``threshold``: a question with P >= threshold takes its progressive answer.
    Shares and means are weighted by each sample's ``weight``."""
    routed = [s.probability >= threshold for s in samples]
    picks = [s.progressive if r else s.cloud for s, r in zip(samples, routed, strict=True)]
    weights = [s.weight for s in samples]
    total = math.fsum(weights)

    def mean(values: Sequence[float]) -> float:
        return math.fsum(w * v for w, v in zip(weights, values, strict=True)) / total

    width = len(samples[0].cloud[0])
    return ThresholdPoint(
        threshold=threshold,
        routed_progressive=mean([float(r) for r in routed]),
        served_progressive=mean([float(r and s.served_progressive) for s, r in zip(samples, routed, strict=True)]),
        quality=tuple(mean([p[0][i] for p in picks]) for i in range(width)),
        cloud_tokens=mean([p[1] for p in picks]),
    )


def stratum_weights(sampled: Sequence[float], population: Sequence[float], strata: int = 6) -> list[float]:
    """Post-stratification weights for answered questions drawn unevenly from a population.

    The population's router probabilities are cut into ``strata`` groups of equal size (by
    rank); each answered question (``sampled``: its probability) stands for its group's members
    divided by the answered ones in the group. A group nobody answered joins its neighbour
    above (the top group, its neighbour below). Weights are scaled to average 1, so an even
    sample gets 1 each and an uneven one (e.g. every question near the threshold plus a random
    sample of the rest) gets the population's mean back.

    Raises:
        ValueError: an empty population or sample, or ``strata`` < 1.
    """
    if not population or not sampled or strata < 1:
        raise ValueError("stratum_weights needs a population, a sample and at least one stratum")
    ranked = sorted(population)
    size = len(ranked)
    # Upper edges of the groups by rank; a probability belongs to the first group whose edge is >= it.
    edges = [ranked[min(size - 1, (k + 1) * size // strata - 1)] for k in range(strata)]
    edges[-1] = math.inf
    members = [0] * strata
    for p in ranked:
        members[bisect.bisect_left(edges, p)] += 1
    group = [bisect.bisect_left(edges, p) for p in sampled]
    answered = [group.count(k) for k in range(strata)]
    # Merge unanswered groups into a neighbour: each group maps to the one that carries it.
    carrier = list(range(strata))
    for k in range(strata):
        if answered[k] == 0:
            above = next((j for j in range(k + 1, strata) if answered[j]), None)
            carrier[k] = above if above is not None else next(j for j in range(k - 1, -1, -1) if answered[j])
    carried = [0] * strata
    for k in range(strata):
        carried[carrier[k]] += members[k]
    raw = [carried[g] / answered[g] for g in group]
    scale = len(raw) / math.fsum(raw)
    return [w * scale for w in raw]


def calibrate_threshold(samples: Sequence[CalibrationSample], tolerance: float = 0.0,
                        ) -> tuple[ThresholdPoint, list[ThresholdPoint]]:
    """The threshold that serves the most questions progressively while every mean quality
    metric of ``auto`` stays >= cloud-only's less ``tolerance`` (ties: the better first metric,
    then the higher threshold), and the whole curve. With no such threshold the answer routes
    nothing progressive (the highest threshold the weights file accepts).

    Raises:
        ValueError: no samples, or samples with different numbers of metrics.
    """
    if not samples:
        raise ValueError("no calibration samples")
    if len({len(s.cloud[0]) for s in samples} | {len(s.progressive[0]) for s in samples}) != 1:
        raise ValueError("every sample needs the same quality metrics for both modes")
    cloud = simulate_auto(samples, math.inf)
    # The routing only changes at the samples' own probabilities.
    thresholds = sorted({min(max(s.probability, 1e-4), 1 - 1e-4) for s in samples} | {1 - 1e-4})
    curve = [simulate_auto(samples, t) for t in thresholds]
    feasible = [c for c in curve if all(a >= b - tolerance for a, b in zip(c.quality, cloud.quality, strict=True))]
    if not feasible:
        return curve[-1], curve
    return max(feasible, key=lambda c: (c.served_progressive, c.quality[0], c.threshold)), curve
