"""Ensemble selection: features, fitted weights, and the service choosing among replicas."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from pice_cloud import embeddings, ensemble
from pice_cloud.bootstrap import start_system
from pice_cloud.ensemble import (
    FEATURES,
    ConfidenceSelector,
    EnsembleWeights,
    LearnedSelector,
    SelectionItem,
    compute_features,
    feature_row,
    feature_vector,
    length_fit,
    similarity_features,
)
from pice_cloud.errors import CloudError
from pice_cloud.events import AnswerEvent, PointEvent
from pice_cloud.llm.base import ChatRequest
from pice_cloud.llm.transformers import TransformersBackend
from pice_edge.prompts import expansion_messages
from pice_edge.protocol import Candidate
from tests.conftest import Mosquitto, cloud_config

Q = "How can I sleep better?"
SKETCH = ["Keep a schedule", "Avoid screens at night"]


class BagOfWords:
    """A deterministic sentence embedder (hashed bag of words, L2-normalised) for logic tests."""

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            vec = [0.0] * 64
            for word in text.lower().replace(".", " ").split():
                vec[int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1.0
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            out.append([v / norm for v in vec])
        return out

    def encode_lists(self, texts: Sequence[str]) -> list[list[float]]:
        """`pice_cloud.embeddings.Embedder`'s name for the same (what tools/fit_ensemble.py calls)."""
        return self.encode(texts)


def cand(device: str, text: str, logprob: float = -1.0, tokens: int = 40, index: int = 0) -> Candidate:
    return Candidate(request_id="r1", point_index=index, device_id=device, text=text, token_count=tokens,
                     mean_logprob=logprob, latency_s=1.0)


def test_packaged_weights_load_and_bad_files_are_named(tmp_path: Path) -> None:
    weights = EnsembleWeights.load()
    assert set(weights.weights) <= set(FEATURES)
    assert any(weights.vector())
    bad = tmp_path / "w.json"
    bad.write_text("{not json")
    with pytest.raises(CloudError, match=r"w\.json: invalid ensemble weights"):
        EnsembleWeights.load(bad)
    bad.write_text('{"weights": {"vibes": 1.0}}')
    with pytest.raises(CloudError, match="unknown features"):
        EnsembleWeights.load(bad)
    with pytest.raises(CloudError, match="cannot read"):
        EnsembleWeights.load(tmp_path / "missing.json")


def test_length_fit_peaks_at_expected_length() -> None:
    assert length_fit(47, 80) > length_fit(10, 80)
    assert length_fit(47, 80) > length_fit(80, 80)
    assert length_fit(47, 80) == pytest.approx(0.0, abs=0.03)


async def test_agreement_picks_the_consensus_candidate() -> None:
    item = SelectionItem(Q, SKETCH, 0, [
        cand("a", "Go to bed at the same time every night and wake at the same time.", logprob=-0.5),
        cand("b", "Bananas are yellow fruit grown in warm countries.", logprob=-0.1),
        cand("c", "Keep the same bed time every night, and wake at the same time too.", logprob=-0.9),
    ])
    agree = LearnedSelector(EnsembleWeights(weights={"agreement": 1.0}), embedder=BagOfWords())
    assert (await agree.choose([item]))[0] in (0, 2)
    # The edges' own confidence alone would have taken the off-topic one.
    assert (await ConfidenceSelector().choose([item]))[0] == 1
    relevance = LearnedSelector(EnsembleWeights(weights={"relevance": 1.0}), embedder=BagOfWords())
    assert (await relevance.choose([item]))[0] in (0, 2)


async def test_repetition_features_pick_the_candidate_that_does_not_repeat() -> None:
    other = "Go to bed at the same time every night, even on weekends, so your body learns when to sleep."
    repeats_other = cand("a", "Go to bed at the same time every night, even on weekends, so your body rests.",
                         index=1)
    # Passes the expansion guard (no repeated sentence, few repeated 4-grams), but repeats itself.
    repeats_itself = cand("b", "Keep your room dark and cool at night, and keep your room dark and quiet in the "
                               "morning.", logprob=-0.2, index=1)
    fresh = cand("c", "Blue light from phones delays melatonin, so put them away an hour before bed.",
                 logprob=-0.9, index=1)
    item = SelectionItem(Q, SKETCH, 1, [repeats_other, repeats_itself, fresh], other_texts=[other])
    [rows] = await compute_features([item])
    cross, own = "cross_repetition", "self_repetition"
    assert rows[0][cross] < -0.5  # most of its 4-grams are in the other point's text
    assert -0.5 < rows[1][own] < 0.0
    assert rows[2][cross] == rows[2][own] == 0.0
    # Between the two that pass the guard, the edge's confidence alone takes the one that
    # repeats itself; the packaged (fitted) weights take the other.
    guarded = SelectionItem(Q, SKETCH, 1, [repeats_itself, fresh], other_texts=[other])
    assert (await ConfidenceSelector().choose([guarded]))[0] == 0
    assert (await LearnedSelector().choose([guarded]))[0] == 1
    # Fitted weights never reward repetition (tools/fit_ensemble.py constrains their sign).
    weights = EnsembleWeights.load().weights
    assert weights["self_repetition"] > 0
    assert weights.get("cross_repetition", 0.0) >= 0


async def test_cloud_loglik_feature_matches_the_backend_scores(tiny_model: Path) -> None:
    llm = TransformersBackend(tiny_model, threads=1)
    try:
        texts = ["Set clear goals and priorities.", "Sleep well and exercise often.", ": ; , ! ? 1. 2."]
        item = SelectionItem(Q, SKETCH, 1, [cand(d, t, index=1) for d, t in zip("abc", texts, strict=True)])
        feats = await compute_features([item], scorer=llm)
        direct = await llm.score([ChatRequest(expansion_messages(Q, SKETCH, 1), max_tokens=0)] * 3, texts)
        assert [row["cloud_loglik"] for row in feats[0]] == pytest.approx(direct, abs=1e-4)
        assert len(set(direct)) == 3  # the model does tell them apart
        chooser = LearnedSelector(EnsembleWeights(weights={"cloud_loglik": 1.0}), scorer=llm)
        assert (await chooser.choose([item]))[0] == max(range(3), key=lambda i: direct[i])
    finally:
        await llm.close()


class RecordingSelector(ConfidenceSelector):
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.texts: list[set[str]] = []

    async def choose(self, items: Sequence[SelectionItem]) -> list[int]:
        self.seen.extend(len(it.candidates) for it in items)
        self.texts.extend({c.text for c in it.candidates} for it in items)
        return await super().choose(items)


class BrokenSelector:
    async def choose(self, items: Sequence[SelectionItem]) -> list[int]:
        raise RuntimeError("scorer crashed")


@pytest.mark.mosquitto
@pytest.mark.parametrize("broken", [False, True])
async def test_service_replicates_points_and_chooses(mosquitto: Mosquitto, tiny_model: Path, broken: bool) -> None:
    llm = TransformersBackend(tiny_model, threads=1)
    settings = dict(max_points=2, tokens_per_point=8, sketch_tokens=30, ensemble_width=2, adaptive_budget=False)
    try:
        config = cloud_config(mosquitto.url, edges=2, edge_model=tiny_model, service=settings)
        recorder = RecordingSelector()
        async with start_system(config, llm=llm, selector=BrokenSelector() if broken else recorder) as system:
            points: list[PointEvent] = []
            final = None
            async for event in system.service.answer(Q, mode="progressive"):
                if isinstance(event, PointEvent):
                    points.append(event)
                elif isinstance(event, AnswerEvent):
                    final = event
            assert final is not None
            assert final.stats.points_edge == len(points)
            # Two idle edges with 4 free slots each: every point went to both, and each answer
            # is among the point's candidates unless the guard refused it (the sampled replica
            # of the random tiny model writes noise, which it now and then refuses).
            refused = system.service.inbox.quality.count()
            assert sum(p.point.candidates for p in points) + refused == 2 * len(points)
            assert all(p.point.candidates >= 1 for p in points)
            if not broken:
                assert sorted(recorder.seen) == sorted(p.point.candidates for p in points if p.point.candidates > 1)
                # The request is greedy, its replicas sample (ensemble_temperature): candidates differ.
                assert any(len(texts) == 2 for texts in recorder.texts)
            assert sum(n.stats.candidates_published for n in system.edges) == 2 * len(points)
    finally:
        await llm.close()


def test_replicas_sample_apart_from_the_request() -> None:
    from pice_cloud.events import REPLICA_SEED_OFFSET, derive_seed
    from pice_cloud.progressive import PointSampling
    from pice_edge.protocol import Sampling

    sampling = PointSampling(temperature=0.0, top_p=0.9, seed=7, ensemble_temperature=0.8)
    first = sampling.point(0)
    assert first == Sampling(temperature=0.0, top_p=0.9, seed=derive_seed(7, 1))
    second, third = sampling.point(0, 1), sampling.point(0, 2)
    assert (second.temperature, second.top_p, second.seed) == (0.8, 0.9, first.seed + REPLICA_SEED_OFFSET)
    assert third.seed == first.seed + 2 * REPLICA_SEED_OFFSET  # type: ignore[operator]
    hot = PointSampling(temperature=1.2, top_p=1.0, seed=None, ensemble_temperature=0.8)
    assert hot.point(0, 1).temperature == 1.2  # never cooler than asked
    assert hot.point(0, 1).seed is None


def test_learned_selector_says_which_fitted_features_it_cannot_compute() -> None:
    weights = EnsembleWeights(weights={"cloud_loglik": 0.5, "relevance": 1.0, "self_repetition": 1.0})
    described = LearnedSelector(weights).describe()  # no scorer (an HTTP engine), no embedder
    assert described["kind"] == "learned"
    assert described["features"] == ["self_repetition"]
    assert set(described["unavailable"]) == {"cloud_loglik", "relevance"}
    assert "cannot score" in described["unavailable"]["cloud_loglik"]
    full = LearnedSelector(weights, embedder=BagOfWords()).describe()
    assert full["features"] == ["relevance", "self_repetition"]


# --- one feature row, keyed by name, for the selector and the fitter ---------------------------

TOOLS = Path(__file__).resolve().parents[1] / "tools"
WORDS = ("sleep", "bed", "night", "time", "keep", "dark", "room", "cool", "light", "phone", "screen", "wake", "early",
         "coffee", "avoid", "the", "a", "and", "same", "every", "quiet", "routine", "body")


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) + "."


def _items(count: int = 12, seed: int = 3) -> list[SelectionItem]:
    rng = random.Random(seed)
    return [SelectionItem(Q, SKETCH, rng.randint(0, 1),
                          [cand(f"d{j}", _text(rng), logprob=-3 * rng.random(), tokens=rng.randint(1, 80))
                           for j in range(rng.randint(2, 4))],
                          other_texts=[_text(rng) for _ in range(rng.randint(0, 2))]) for _ in range(count)]


async def test_the_selector_builds_its_rows_with_feature_row() -> None:
    items = _items()
    embedder = BagOfWords()
    for item, rows in zip(items, await compute_features(items, embedder=embedder), strict=True):
        vectors = embedder.encode([c.text for c in item.candidates])
        context = embedder.encode([f"{item.question} {item.sketch[item.index]}"])[0]
        expected = [feature_row(c.text, tokens=c.token_count, tokens_per_point=item.tokens_per_point,
                                edge_logprob=c.mean_logprob, agreement=agreement, relevance=relevance,
                                other_texts=item.other_texts)
                    for c, (agreement, relevance) in zip(item.candidates, similarity_features(vectors, context),
                                                         strict=True)]
        assert rows == expected
        assert all(list(row) == list(FEATURES) for row in rows)  # every feature, by name
        assert any(row["agreement"] and row["relevance"] for row in rows)


async def test_a_reordered_names_list_gives_the_same_scores_and_picks(tmp_path: Path) -> None:
    weights = EnsembleWeights.load()
    items = _items()
    rows = [row for per_item in await compute_features(items, embedder=BagOfWords()) for row in per_item]
    reordered = list(reversed(FEATURES))
    for row in rows:
        by_position = sum(w * x for w, x in zip(weights.vector(reordered), feature_vector(row, reordered),
                                                 strict=True))
        assert by_position == pytest.approx(weights.score(row), abs=1e-12)
        assert feature_vector(row, reordered) == list(reversed(feature_vector(row)))
    # A weights file that lists the features in another order selects the same candidates.
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps({"weights": dict(reversed(list(weights.weights.items())))}))
    picks = await LearnedSelector(weights, embedder=BagOfWords()).choose(items)
    assert await LearnedSelector(EnsembleWeights.load(shuffled), embedder=BagOfWords()).choose(items) == picks
    assert len(set(picks)) > 1, "the items do not tell the features apart"
    with pytest.raises(KeyError):
        feature_vector(rows[0], ["vibes"])


def _calibration(path: Path, questions: int = 8, seed: int = 5) -> None:
    """A small calibration file in `tools/fit_ensemble.py generate`'s format."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for qid in range(questions):
            cands = [{"point": point, "temperature": 0.0 if k == 0 else 0.7, "text": _text(rng),
                      "tokens": rng.randint(5, 80), "edge_logprob": -3 * rng.random(),
                      "cloud_loglik": -3 * rng.random(), "guard": None}
                     for point in range(2) for k in range(3)]
            out.write(json.dumps({"id": qid, "category": "generic", "question": Q, "sketch": SKETCH,
                                  "reference": f"{_text(rng)}\n\n{_text(rng)}", "tokens_per_point": 80,
                                  "candidates": cands}) + "\n")


def test_the_fitter_keys_its_columns_and_weights_by_feature_name(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The fitter lays out its design matrix from the selector's feature names: fitted with the
    names in another order, every feature gets the same weight."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import fit_ensemble

    monkeypatch.setattr(embeddings, "Embedder", BagOfWords)
    monkeypatch.setattr(fit_ensemble, "RESULTS", tmp_path)
    monkeypatch.setattr(fit_ensemble, "CALIBRATION", tmp_path / "calibration.jsonl")
    _calibration(tmp_path / "calibration.jsonl")

    def fitted(name: str) -> EnsembleWeights:
        out = tmp_path / name
        fit_ensemble.fit(argparse.Namespace(out=str(out), test_fraction=0.3, seed=0, keep_costly=True))
        return EnsembleWeights.load(out)

    usual = fitted("usual.json")
    monkeypatch.setattr(ensemble, "FEATURES", tuple(reversed(FEATURES)))
    backwards = fitted("backwards.json")
    assert list(backwards.weights) == list(reversed(FEATURES))  # written in the order fitted, keyed by name
    assert any(usual.weights.values())
    for name in FEATURES:
        assert backwards.weights[name] == pytest.approx(usual.weights[name], rel=1e-6, abs=1e-12), name


def test_a_feature_the_cloud_computes_is_left_out_where_it_does_not_pay(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """cloud_loglik costs the cloud a prefill of every candidate: noise (as here) is not kept,
    and the report says why, with the held-out picks with and without it."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import fit_ensemble

    monkeypatch.setattr(embeddings, "Embedder", BagOfWords)
    monkeypatch.setattr(fit_ensemble, "RESULTS", tmp_path)
    monkeypatch.setattr(fit_ensemble, "CALIBRATION", tmp_path / "calibration.jsonl")
    _calibration(tmp_path / "calibration.jsonl")
    out = tmp_path / "weights.json"
    fit_ensemble.fit(argparse.Namespace(out=str(out), test_fraction=0.3, seed=0, keep_costly=False))
    written = json.loads(out.read_text())
    verdict = written["fit"]["costly_features"]
    assert verdict["features"] == ["cloud_loglik"]
    assert verdict["kept"] is verdict["pays"] is False
    assert written["weights"]["cloud_loglik"] == 0.0
    assert any(written["weights"].values()), "the cheap features still choose"
    assert "fitted without cloud_loglik" in {row["selector"] for row in written["fit"]["report"]}
    # With zero weight the selector runs no scoring pass on the cloud.
    assert LearnedSelector(EnsembleWeights.load(out), scorer=object()).scorer is None  # type: ignore[arg-type]


def test_one_embedding_model_serves_the_router_the_guard_and_the_selector(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from pice_cloud import bootstrap
    from pice_edge.errors import ModelNotFoundError

    loads: list[BagOfWords] = []

    class Counted(BagOfWords):
        dim = 384  # the shipped router weights' width
        model_id = "stand-in"

        def __init__(self) -> None:
            loads.append(self)

    monkeypatch.setattr(embeddings, "Embedder", Counted)
    shared = bootstrap.SharedEmbedder()
    router = bootstrap.build_router("embedding", shared)
    selector = bootstrap.build_selector("learned", object(), 3, shared)  # type: ignore[arg-type]
    embed = bootstrap.build_sketch_embed(shared)
    assert len(loads) == 1
    [only] = loads
    assert router is not None
    assert router.embedder is only  # type: ignore[attr-defined]
    assert isinstance(selector, LearnedSelector)
    assert selector.embedder is only
    assert embed is not None
    assert embed.__self__ is only  # type: ignore[attr-defined]

    # Not fetched: each part runs without it, one warning names what each loses, one load tried.
    def missing() -> None:
        loads.append(BagOfWords())
        raise ModelNotFoundError("all-minilm-l6-v2 is not fetched: run `pice-edge models fetch all-minilm-l6-v2`")

    monkeypatch.setattr(embeddings, "Embedder", missing)
    loads.clear()
    shared = bootstrap.SharedEmbedder()
    with caplog.at_level("WARNING", logger="pice_cloud.bootstrap"):
        assert bootstrap.build_router("embedding", shared).name == "heuristic"  # type: ignore[union-attr]
        assert bootstrap.build_sketch_embed(shared) is None
        assert bootstrap.build_selector("learned", object(), 3, shared).embedder is None  # type: ignore[arg-type,attr-defined]
    assert len(loads) == 1
    [warning] = [r for r in caplog.records if r.name == "pice_cloud.bootstrap"]
    assert "keyword rules" in warning.getMessage()
    assert "similarity features" in warning.getMessage()
