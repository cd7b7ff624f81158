"""The mode router: choose_mode's rule, the shipped weights, the keyword fallback, and the service.

- unit: choose_mode with the router's advice; the weights file's validation; the heuristic;
- integration over a real Mosquitto with the tiny LLM: the router sends a coding question
  cloud-only and a generic one progressive (heuristic router: fast; real MiniLM: slow marker);
- slow: the real all-MiniLM-L6-v2 reproduces the accuracy recorded in the weights file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pice_cloud.bootstrap import start_system
from pice_cloud.errors import CloudError
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.router import (
    CalibrationSample,
    EmbeddingRouter,
    HeuristicRouter,
    ModeRouter,
    Route,
    RouterWeights,
    RouterWeightsError,
    calibrate_threshold,
    cloud_only_reason,
    heuristic_reason,
    is_held_out,
    read_labels,
    simulate_auto,
    stratum_weights,
)
from pice_cloud.scheduler import choose_mode
from pice_edge.errors import ConfigError
from tests.conftest import Mosquitto, cloud_config

DATA = Path(os.environ.get("PICE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "sot_router"
CODING = "Write a Python function that returns the n-th Fibonacci number."
GENERIC = "How can I improve my time management skills?"


# --- choose_mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "edges", "suits", "expected"),
    [
        ("auto", 2, None, "progressive"),  # no router ran: edges are live, use them
        ("auto", 2, True, "progressive"),
        ("auto", 2, False, "cloud"),  # the router says a sketch would hurt
        ("auto", 0, True, "cloud"),  # suits, but nobody to expand
        ("auto", 0, None, "cloud"),
        ("cloud", 3, True, "cloud"),  # an explicit mode overrides the router
        ("progressive", 3, False, "progressive"),
        ("progressive", 0, None, "progressive"),  # the cloud expands its own sketch
    ],
)
def test_choose_mode_with_router_advice(requested: str, edges: int, suits: bool | None, expected: str) -> None:
    assert choose_mode(requested, edges, suits) == expected  # type: ignore[arg-type]


def test_choose_mode_keeps_its_two_argument_form() -> None:
    assert choose_mode("auto", 1) == "progressive"
    assert choose_mode("auto", 0) == "cloud"


# --- weights file --------------------------------------------------------------------------


def test_shipped_weights_load_with_their_training_record() -> None:
    weights = RouterWeights.load()
    assert len(weights.weights) == 384  # all-MiniLM-L6-v2's dimension
    assert weights.embedding_model == "all-minilm-l6-v2"
    assert 0 < weights.threshold < 1
    held = weights.meta["held_out"]
    assert set(held) == {"lima_held_out", "vicuna", "wizardlm"}
    # Better than always answering with the training majority (cloud) on LIMA's held-out part.
    assert held["lima_held_out"]["accuracy"] > 1 - held["lima_held_out"]["positives"] / held["lima_held_out"]["n"]
    assert weights.meta["C"] in [float(c) for c in weights.meta["cv_accuracy"]]


def test_the_long_answer_model_multiplies_the_score() -> None:
    suits = RouterWeights(weights=(2.0, -1.0), bias=0.5, threshold=0.3)
    both = RouterWeights(weights=(2.0, -1.0), bias=0.5, threshold=0.3, long_answer=((0.0, -3.0), 0.0))
    # A question that suits a sketch but wants a short answer (P(long) = sigmoid(-3)) goes cloud-only.
    assert suits.route([1.0, 1.0]).mode == "progressive"
    assert both.probability([1.0, 1.0]) == pytest.approx(suits.probability([1.0, 1.0]) / (1 + math.exp(3.0)))
    assert both.route([1.0, 1.0]).mode == "cloud"
    assert both.route([1.0, 0.0]).mode == "progressive"  # P(long) = 0.5, P(suits) = 0.92
    # The shipped file has one, fitted on other data than the SoT labels.
    shipped = RouterWeights.load()
    assert shipped.long_answer is not None
    assert shipped.meta["long_answer"]["held_out"]["accuracy"] > shipped.meta["long_answer"][
        "majority_class_held_out"]["accuracy"]


def test_probability_is_a_sigmoid_of_the_dot_product() -> None:
    weights = RouterWeights(weights=(2.0, -1.0), bias=0.5, threshold=0.6)
    assert weights.probability([1.0, 1.0]) == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert weights.route([1.0, 1.0]) == Route("progressive", pytest.approx(0.8176, abs=1e-4))
    assert weights.route([0.0, 1.0]).mode == "cloud"  # p = 0.38 < 0.6
    # Huge margins neither overflow nor lose the side.
    assert weights.probability([1e6, 0.0]) == 1.0
    assert weights.probability([-1e6, 0.0]) == 0.0
    with pytest.raises(CloudError, match="expect 2-d embeddings, got 3-d"):
        weights.probability([1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read router weights"),
        ("{not json", "cannot read router weights"),
        (json.dumps({"weights": [1.0], "bias": 0}), '"format": 1'),
        (json.dumps({"format": 1, "bias": 0}), "'weights'"),
        (json.dumps({"format": 1, "weights": ["a"], "bias": 0}), "not a number"),
        (json.dumps({"format": 1, "weights": [], "bias": 0}), "non-empty"),
        (json.dumps({"format": 1, "weights": [1.0], "bias": 0, "threshold": 1.5}), r"not in \(0, 1\)"),
        ('{"format": 1, "weights": [NaN], "bias": 0}', "finite"),
        (json.dumps({"format": 1, "weights": [1.0], "bias": 0, "long_answer": {"weights": [1.0]}}),
         "long_answer.'bias'"),
        (json.dumps({"format": 1, "weights": [1.0], "bias": 0, "long_answer": {"weights": [1.0, 2.0], "bias": 0}}),
         "long_answer needs 1 finite weights"),
    ],
)
def test_bad_weights_files_name_the_problem(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "router.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RouterWeightsError, match=match) as info:
        RouterWeights.load(path)
    assert str(path) in str(info.value)


# --- heuristic fallback --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "reason"),
    [
        (CODING, "code"),
        ("Implement a binary search in C++ and explain its complexity.", "code"),
        ("Why does my script print `undefined` here?\nconst x = f();", "code"),
        ("Solve for x: 3x + 10 = 5x - 2.", "math"),
        ("What is the probability of rolling two sixes?", "math"),
        ("Think step by step: which box holds the key?", "steps"),
        ("Pretend you are a pirate captain and give a speech to your crew.", "role"),
        ("Write a short story about a lighthouse keeper.", "writing"),
        ("Translate 'good morning' into French.", "writing"),
        ("Who wrote Hamlet?", "other"),
    ],
)
def test_heuristic_sends_obvious_cases_to_the_cloud(question: str, reason: str) -> None:
    assert heuristic_reason(question) == reason
    assert HeuristicRouter().predict(question).mode == "cloud"


@pytest.mark.parametrize(
    "question",
    [
        GENERIC,
        "What are the most effective ways to deal with stress?",
        "What are the differences between plant-based and animal-based protein sources?",
        "Can you give me some tips for a successful job interview?",
    ],
)
def test_heuristic_sends_list_style_questions_to_the_edges(question: str) -> None:
    route = HeuristicRouter().predict(question)
    assert route.mode == "progressive"
    assert route.probability > 0.5


@pytest.mark.parametrize(
    ("question", "reason"),
    [
        ("Write a Python function that reverses a linked list.", "code"),
        ("Develop a C++ program that counts the words of a file.", "code"),
        ("Convert the given description to a bash command: read the file and count its lines.", "code"),
        ("Write an SQL statement that lists the customers from Paris.", "code"),
        ("Why does this fail?\n```\nx = [1, 2\n```", "code"),
        ("How do I read a large file using python?", "code"),
        ("What is the time complexity of binary search?", "code"),
        ("Solve for x: 3x + 10 = 5x - 2.", "math"),
        ("Given f(x) = 5x^3 - 2x + 3, find f(2).", "math"),
        ("What is 12 * 7?", "math"),
        ("The endpoints of a segment are (2, -2) and (10, 4); how long is it?", "math"),
        ("What is the probability of rolling two sixes?", "math"),
        # Topics, not tasks: a sketch serves these.
        ("What are the main differences between Python and JavaScript?", None),
        ("What if Alan Turing had not cracked the Enigma code during World War II?", None),
        ("Write a script for a YouTube video about the history of jazz.", None),
        ("How many times does the average human blink in a lifetime? Explain your reasoning.", None),
        ("Write a haiku with 5-7-5 syllables about autumn.", None),
        ("I paid $500 for a bike and $300 for a helmet; was that a good deal?", None),
        ("What happened in Europe in 1939-1945?", None),
        # A translation is one text, not points; the topic of translation is not a task.
        ('Translate "good morning" into French.', "translation"),
        ("How do you say 'thank you' in Japanese?", "translation"),
        ("Why is machine translation of poetry so hard?", None),
        ("What should I consider when I hire someone to translate my website?", None),
    ],
)
def test_code_and_math_gate(question: str, reason: str | None) -> None:
    assert cloud_only_reason(question) == reason


def test_the_gate_overrides_the_learned_router_without_embedding() -> None:
    class Counting:
        model_id, dim, calls = "counting", 4, 0

        def encode(self, texts: list[str]) -> Any:
            import numpy as np

            Counting.calls += len(texts)
            return np.ones((len(texts), 4))

    weights = RouterWeights(weights=(1.0,) * 4, bias=0.0, threshold=0.5, embedding_model="counting")
    router = EmbeddingRouter(weights, Counting())  # type: ignore[arg-type]
    routes = router.predict_many(["Write a Python function that adds two numbers.", GENERIC, "What is 2 + 2?"])
    assert routes[0] == routes[2] == Route("cloud", 0.0)
    assert routes[1].mode == "progressive"
    assert routes[1].probability > 0.9  # sigmoid(4)
    assert Counting.calls == 1, "gated questions are not embedded"
    assert router.predict(GENERIC) == routes[1]


def test_embedding_router_without_a_model_falls_back_to_the_heuristic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PICE_MODELS_DIR", str(tmp_path / "empty"))
    router = EmbeddingRouter.load()
    assert router.embedder is None
    assert router.name == "heuristic"
    assert "pice-edge models fetch all-minilm-l6-v2" in caplog.text
    assert router.predict(CODING).mode == "cloud"
    assert [r.mode for r in router.predict_many([CODING, GENERIC])] == ["cloud", "progressive"]


def test_a_broken_weights_file_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    (tmp_path / "w.json").write_text("[]")
    with pytest.raises(RouterWeightsError):
        EmbeddingRouter.load(tmp_path / "w.json")


# --- labels ----------------------------------------------------------------------------------


def test_read_labels_parses_quoted_multiline_requests(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text('label;request\n1;How do I relax?\n0;"Fix this:\nint x = 1;\nreturn x;"\n')
    assert read_labels(path) == [("How do I relax?", 1), ("Fix this:\nint x = 1;\nreturn x;", 0)]
    path.write_text("label;request\n2;What?\n")
    with pytest.raises(ConfigError, match=r"line 2: label '2' is not 0 or 1"):
        read_labels(path)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="expected a header 'label;request'"):
        read_labels(path)


@pytest.mark.skipif(not DATA.is_dir(), reason="SoT router labels not present")
def test_sot_labels_and_the_held_out_split() -> None:
    lima = read_labels(DATA / "lima.csv")
    assert len(lima) == 1030
    held = [q for q, _ in lima if is_held_out(q)]
    assert 0.15 < len(held) / len(lima) < 0.25
    assert [is_held_out(q) for q, _ in lima] == [is_held_out(q) for q, _ in lima]  # deterministic
    recorded = RouterWeights.load().meta
    assert recorded["n_train"] == len(lima) - len(held)
    assert recorded["held_out"]["lima_held_out"]["n"] == len(held)


# --- through the service -----------------------------------------------------------------------


@pytest.fixture
async def tiny_llm(tiny_model: Path):  # type: ignore[no-untyped-def]
    llm = TransformersBackend(tiny_model, threads=1)
    yield llm
    await llm.close()


class _Recording:
    """Wraps a router and records which thread and questions it saw."""

    def __init__(self, inner: ModeRouter) -> None:
        self.inner = inner
        self.questions: list[str] = []
        self.threads: list[str] = []

    def predict(self, question: str) -> Route:
        import threading

        self.questions.append(question)
        self.threads.append(threading.current_thread().name)
        return self.inner.predict(question)


class _Broken:
    def predict(self, question: str) -> Route:
        raise RuntimeError("router exploded")


async def _route_through_service(mosquitto: Mosquitto, tiny_model: Path, llm: TransformersBackend,
                                 router: ModeRouter) -> dict[str, tuple[str, float | None]]:
    settings = dict(max_points=3, tokens_per_point=8, sketch_tokens=30, max_answer_tokens=16)
    config = cloud_config(mosquitto.url, edges=1, edge_model=tiny_model, service=settings)
    async with start_system(config, llm=llm, router=router) as system:
        out = {}
        for name, question in (("coding", CODING), ("generic", GENERIC)):
            final = await system.service.ask(question)
            assert final.text
            if final.stats.mode == "progressive":
                assert final.stats.points_edge + final.stats.points_cloud >= 1
            else:
                assert final.stats.points_edge == final.stats.points_cloud == 0
            out[name] = (final.stats.mode, final.stats.route_probability)
        # An explicit mode is not second-guessed: the router is not even asked.
        asked = len(getattr(router, "questions", []))
        forced = await system.service.ask(CODING, mode="progressive")
        assert forced.stats.mode == "progressive"
        assert forced.stats.route_probability is None
        assert len(getattr(router, "questions", [])) == asked
    return out


@pytest.mark.mosquitto
async def test_service_routes_coding_to_cloud_and_generic_to_edges(
    mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend
) -> None:
    router = _Recording(HeuristicRouter())
    modes = await _route_through_service(mosquitto, tiny_model, tiny_llm, router)
    assert modes == {"coding": ("cloud", 0.25), "generic": ("progressive", 0.75)}
    assert router.questions == [CODING, GENERIC]
    # predict ran off the event loop's thread.
    assert all(name != "MainThread" for name in router.threads)


class _FakeMiniLM:
    """A 4-d embedder that reports 7 tokens per text, as `Embedder.encode_counted` does."""

    model_id, dim = "fake-minilm", 4

    def encode_counted(self, texts: list[str]) -> tuple[Any, int]:
        import numpy as np

        return np.ones((len(texts), 4)), 7 * len(texts)

    def encode(self, texts: list[str]) -> Any:
        return self.encode_counted(texts)[0]


@pytest.mark.mosquitto
async def test_the_routers_embedding_is_on_the_requests_cloud_ledger(
    mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend
) -> None:
    router = EmbeddingRouter(RouterWeights(weights=(1.0,) * 4, bias=0.0, threshold=0.5, embedding_model="fake-minilm"),
                             _FakeMiniLM())  # type: ignore[arg-type]
    settings = dict(max_points=2, tokens_per_point=6, sketch_tokens=20)
    config = cloud_config(mosquitto.url, edges=1, edge_model=tiny_model, service=settings)
    async with start_system(config, llm=tiny_llm, router=router) as system:
        routed = await system.service.ask(GENERIC)
        gated = await system.service.ask(CODING)  # the code gate: no embedding
        process = system.service.cloud.ledger.by_purpose["route"]
    work = routed.stats.cloud_work
    assert (work.by_purpose["route"].sequences, work.by_purpose["route"].prefill_tokens) == (1, 7)
    assert work.by_purpose["route"].seconds > 0
    assert work.total.decode_tokens == routed.stats.cloud_tokens, "the embedding model decodes nothing"
    assert work.as_dict()["embeddings"]["prefill_tokens"] >= 7
    assert "route" not in gated.stats.cloud_work.by_purpose
    assert (process.calls, process.prefill_tokens) == (1, 7)


@pytest.mark.mosquitto
async def test_a_failing_router_does_not_fail_the_request(
    mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend, caplog: pytest.LogCaptureFixture
) -> None:
    settings = dict(max_points=2, tokens_per_point=6, sketch_tokens=20)
    config = cloud_config(mosquitto.url, edges=1, edge_model=tiny_model, service=settings)
    async with start_system(config, llm=tiny_llm, router=_Broken()) as system:
        final = await system.service.ask(CODING)
    assert final.stats.mode == "progressive"
    assert final.stats.route_probability is None
    assert "mode router failed" in caplog.text


async def test_no_live_edges_skips_the_router(embedded_broker: str, tiny_llm: TransformersBackend) -> None:
    router = _Recording(HeuristicRouter())
    settings = dict(max_answer_tokens=8)
    config = cloud_config(embedded_broker, edges=0, service=settings)
    async with start_system(config, llm=tiny_llm, router=router) as system:
        final = await system.service.ask(GENERIC)
    assert final.stats.mode == "cloud"
    assert router.questions == []


# --- the real MiniLM (slow) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_router(minilm: Path) -> EmbeddingRouter:
    router = EmbeddingRouter.load(model=minilm)
    assert router.embedder is not None
    return router


@pytest.mark.slow
def test_real_router_on_clear_examples(real_router: EmbeddingRouter) -> None:
    cloud = [CODING, "Implement a program in C++ that counts the words of a text file.",
             'Translate "good morning" into French.']
    progressive = [GENERIC, "What are the most effective ways to deal with stress?",
                   "What are the benefits of regular exercise?"]
    routes = real_router.predict_many(cloud + progressive)
    assert [r.mode for r in routes] == ["cloud"] * 3 + ["progressive"] * 3
    # predict (one question) and predict_many (batched, padded) agree.
    single = real_router.predict(GENERIC)
    assert single.probability == pytest.approx(routes[3].probability, abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="SoT router labels not present")
def test_real_router_reproduces_the_recorded_vicuna_accuracy(real_router: EmbeddingRouter) -> None:
    rows = read_labels(DATA / "vicuna.csv")
    # The SoT-label model alone (the answer-length model is fitted on other data), at the threshold
    # the accuracy was recorded at (train_router's 0.5, before the threshold was calibrated on
    # answers); the code/math gate's P = 0 agrees with it on these labels.
    suits_only = EmbeddingRouter(replace(real_router.weights, long_answer=None), real_router.embedder)
    routes = suits_only.predict_many([q for q, _ in rows])
    accuracy = sum((r.probability >= 0.5) == bool(y) for r, (_, y) in zip(routes, rows, strict=True)) / len(rows)
    recorded = real_router.weights.meta["held_out"]["vicuna"]["accuracy"]
    # Batching and padding shift float noise only: at most one of 80 questions may flip.
    assert abs(accuracy - recorded) <= 1 / len(rows) + 1e-9


@pytest.mark.slow
@pytest.mark.mosquitto
async def test_real_router_through_the_service(
    mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend, real_router: EmbeddingRouter
) -> None:
    modes = await _route_through_service(mosquitto, tiny_model, tiny_llm, _Recording(real_router))
    assert modes["coding"][0] == "cloud"
    assert modes["generic"][0] == "progressive"
    coding_p, generic_p = modes["coding"][1], modes["generic"][1]
    assert coding_p is not None
    assert generic_p is not None
    assert coding_p < real_router.weights.threshold <= generic_p


def _sample(p: float, cloud: float, prog: float, served: bool = True) -> CalibrationSample:
    return CalibrationSample(p, ((cloud, cloud), 300.0), ((prog, prog), 60.0 if served else 300.0), served)


def test_calibrated_threshold_keeps_auto_as_good_as_cloud_only() -> None:
    # High-probability questions gain from a sketch, low ones lose; the middle one loses a little.
    samples = [_sample(0.9, 0.70, 0.80), _sample(0.8, 0.70, 0.75), _sample(0.6, 0.70, 0.66),
               _sample(0.4, 0.70, 0.50), _sample(0.2, 0.70, 0.30)]
    best, curve = calibrate_threshold(samples)
    # At 0.6 the mean is 0.70 + (0.10 + 0.05 - 0.04) / 5 > 0.70: three of five progressive.
    assert best.threshold == pytest.approx(0.6)
    assert best.served_progressive == pytest.approx(0.6)
    assert all(q >= 0.70 for q in best.quality)
    assert best.cloud_tokens == pytest.approx((3 * 60 + 2 * 300) / 5)
    # Lower thresholds were on the curve and rejected: they make auto worse than cloud-only.
    assert any(c.threshold < best.threshold and c.quality[0] < 0.70 for c in curve)
    # The router's own weights file accepts the chosen value.
    assert 0.0 < best.threshold < 1.0


def test_a_tolerance_admits_thresholds_within_it_and_no_further() -> None:
    samples = [_sample(0.9, 0.70, 0.80), _sample(0.8, 0.70, 0.75), _sample(0.6, 0.70, 0.66),
               _sample(0.4, 0.70, 0.50), _sample(0.2, 0.70, 0.30)]
    # At 0.4 auto's mean is 0.70 + (0.10 + 0.05 - 0.04 - 0.20) / 5 = 0.682: 0.018 below cloud-only.
    assert calibrate_threshold(samples, tolerance=0.02)[0].threshold == pytest.approx(0.4)
    assert calibrate_threshold(samples, tolerance=0.01)[0].threshold == pytest.approx(0.6)


def test_calibration_counts_guard_fallbacks_as_cloud_only() -> None:
    # Routed progressive but the guards refused the sketch: the answer was cloud-only, so it
    # adds no progressive share (and the tie-break then prefers the better quality).
    samples = [_sample(0.9, 0.70, 0.70, served=False), _sample(0.5, 0.70, 0.72)]
    best, _ = calibrate_threshold(samples)
    assert best.served_progressive == pytest.approx(0.5)
    assert best.threshold == pytest.approx(0.5)


def test_calibration_routes_nothing_when_every_threshold_loses_quality() -> None:
    best, _ = calibrate_threshold([_sample(0.9, 0.80, 0.50), _sample(0.7, 0.80, 0.60)])
    assert best.routed_progressive == 0.0
    assert 0.0 < best.threshold < 1.0
    with pytest.raises(ValueError, match="no calibration samples"):
        calibrate_threshold([])


def test_stratum_weights_give_an_uneven_sample_the_population_back() -> None:
    # 12 questions: six low-probability ones all answered, six high ones of which two answered.
    population = [0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9]
    sampled = [0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.7, 0.9]
    weights = stratum_weights(sampled, population, strata=2)
    # Each low answer stands for one question, each high one for three; scaled to average 1.
    assert weights[0] == pytest.approx(weights[5])
    assert weights[6] == pytest.approx(3 * weights[0])
    assert sum(weights) == pytest.approx(len(sampled))
    # An even sample weighs every answer alike.
    assert stratum_weights(population, population, strata=4) == pytest.approx([1.0] * 12)
    # A stratum nobody answered is carried by its neighbour: here the top one by the middle one.
    carried = stratum_weights([0.05, 0.06, 0.6, 0.7], population, strata=3)
    assert carried[2] == pytest.approx(2 * carried[0])
    with pytest.raises(ValueError, match="needs a population"):
        stratum_weights([], population)


def test_weighted_samples_move_the_calibrated_threshold() -> None:
    # A low-probability question that loses quality: alone it costs auto 0.04 per question, but
    # if it stands for few of the questions (weight 0.2) the loss is within the tolerance.
    losing = _sample(0.1, 0.70, 0.50)
    others = [_sample(0.8, 0.70, 0.71), _sample(0.6, 0.70, 0.71), _sample(0.5, 0.70, 0.70),
              _sample(0.4, 0.70, 0.70)]
    assert calibrate_threshold([losing, *others], tolerance=0.01)[0].threshold == pytest.approx(0.4)
    light = replace(losing, weight=0.2)
    heavy = [replace(s, weight=1.2) for s in others]
    best, _ = calibrate_threshold([light, *heavy], tolerance=0.01)
    assert best.threshold == pytest.approx(0.1)
    assert best.routed_progressive == pytest.approx(1.0)
    point = simulate_auto([light, *heavy], 0.1)
    assert point.quality[0] == pytest.approx((0.2 * 0.50 + 1.2 * (0.71 + 0.71 + 0.70 + 0.70)) / 5.0)
