"""The guards inside the request path: a refused sketch is sampled again, then the request goes
cloud-only; a refused candidate is never used (the next candidate, or the cloud, expands the
point). Real broker and real edges; the sketches are scripted by a test backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from pice_cloud.bootstrap import start_system
from pice_cloud.cloud_meter import CloudMeter
from pice_cloud.ensemble import ConfidenceSelector
from pice_cloud.llm.base import ChatRequest, Completion
from pice_cloud.llm.transformers import TransformersBackend
from pice_cloud.metrics import Metrics
from pice_cloud.progressive import (
    CloudExpander,
    ExpandInCloud,
    Inbox,
    RejectionCounters,
    RequestDriver,
    expansion_check,
)
from pice_cloud.sketch import SKETCH_PREFILL
from pice_edge.protocol import Candidate, Sampling, candidate_topic, encode
from pice_edge.rejects import Rejections
from pice_edge.transport import Message
from tests.conftest import Mosquitto, ScriptedSketches, cloud_config
from tests.progressive_support import FakeClock, candidate, live_fleet, make_request, open_request

QUESTION = "How can I improve my time management skills?"
BAD = [" The first point\n2. The second point\n", " Set clear goals\n2. Point two\n3. In conclusion\n"]
GOOD = " Set clear daily goals\n2. Plan each morning\n3. Take short breaks\n"


@pytest.fixture
async def tiny_llm(tiny_model: Path) -> AsyncIterator[TransformersBackend]:
    llm = TransformersBackend(tiny_model, threads=1)
    yield llm
    await llm.close()


def _config(url: str, tiny_model: Path) -> object:
    return cloud_config(url, edges=2, edge_model=tiny_model,
                        service={"sketch_guard": True, "tokens_per_point": 8, "max_answer_tokens": 12})


@pytest.mark.mosquitto
async def test_a_refused_sketch_is_sampled_again_and_the_answer_is_complete(
        mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend) -> None:
    llm = ScriptedSketches(tiny_llm, [BAD[0], GOOD])
    async with start_system(_config(mosquitto.url, tiny_model), llm=llm) as system:  # type: ignore[arg-type]
        final = await system.service.ask(QUESTION, mode="progressive")
        rejections = system.service.sketch_rejections.snapshot()
    assert final.stats.mode == "progressive"
    assert final.stats.sketch_rejected == ["too_few_points"]
    assert rejections == {("sketch", "too_few_points"): 1}
    # The second sketch was sampled, not decoded greedily again.
    first, second = llm.sketch_requests
    assert first.temperature == 0.0
    assert second.temperature >= 0.7
    assert second.seed is not None
    assert [line.split("**")[1] for line in final.text.split("\n\n")] == \
        ["Set clear daily goals", "Plan each morning", "Take short breaks"]
    assert final.stats.points_edge + final.stats.points_cloud == 3


@pytest.mark.mosquitto
async def test_two_refused_sketches_send_the_request_cloud_only(
        mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend) -> None:
    llm = ScriptedSketches(tiny_llm, BAD)
    async with start_system(_config(mosquitto.url, tiny_model), llm=llm) as system:  # type: ignore[arg-type]
        final = await system.service.ask(QUESTION, mode="progressive")
        metrics = Metrics(system.service.transport.rejections, live_edges=lambda: 0, queued=lambda: 0,
                          in_flight=lambda: 0, sketch_rejections=system.service.sketch_rejections)
        assert system.service.inbox.accepted == 0, "no task went to an edge"
    assert final.stats.mode == "cloud"
    assert final.stats.sketch_rejected == ["too_few_points", "meta_heading"]
    assert final.text  # the cloud's own answer
    assert "**" not in final.text
    value = metrics.registry.get_sample_value("pice_sketch_rejected_total", {"reason": "meta_heading"})
    assert value == 1


def _candidate(point: int, device: str, text: str) -> Message:
    cand = Candidate(request_id="r1", point_index=point, device_id=device, text=text, token_count=20,
                     mean_logprob=-0.5, latency_s=0.1)
    return Message(candidate_topic("r1", device), encode(cand), retain=False)


async def test_a_candidate_that_repeats_another_point_is_refused() -> None:
    points = ["Set clear goals", "Plan the day"]
    clock = FakeClock()
    inbox = Inbox(clock=clock)
    pending, _ = open_request(inbox, [("a",), ("a", "b")], live_fleet(clock, "a", "b"),
                              check=expansion_check(QUESTION, points))
    first = "Write down three goals for the week and check them every evening before you sleep."
    inbox.handle_candidate(_candidate(0, "a", first))
    # Point 2, from two edges: one repeats point 1's sentence, one is its own.
    inbox.handle_candidate(_candidate(1, "a", first))
    own = "Block the morning for deep work and leave meetings and e-mail for the afternoon hours."
    inbox.handle_candidate(_candidate(1, "b", own))
    assert pending.chosen(0).text == first  # type: ignore[union-attr]
    state = pending.points[1]
    assert state.rejected == {"a": "repeats_other_point"}
    assert [c.text for c in state.usable()] == [own]
    assert inbox.quality.snapshot() == {("candidate", "repeats_other_point"): 1}


@pytest.mark.parametrize(("text", "reason"), [
    ("Dear [Supervisor's Name], I am writing to tell you about my time.", "other_document"),
    ("", None),  # empty candidates were never usable; the guard is not asked
    ("Plan the day", "echoes_prompt"),
])
async def test_refused_candidates_leave_the_point_to_the_cloud(text: str, reason: str | None) -> None:
    clock = FakeClock()
    inbox = Inbox(clock=clock)
    pending, recorder = open_request(inbox, [("a",), ("a",)], live_fleet(clock, "a"),
                                     check=expansion_check(QUESTION, ["Set clear goals", "Plan the day"]))
    inbox.handle_candidate(_candidate(1, "a", text))
    state = pending.points[1]
    assert not state.settled, "no usable candidate: the cloud expands the point"
    assert state.usable() == []
    assert state.rejected == ({"a": reason} if reason else {})
    assert [a.points for a in recorder.of(ExpandInCloud)] == [(1,)], "at once, not at the deadline"  # type: ignore[attr-defined]


class ScriptedStream:
    """A streaming backend that writes a fixed text in fixed pieces (for `_stream_point`)."""

    name = "scripted"
    model_id = "scripted"

    def __init__(self, pieces: Sequence[str], tokens: int) -> None:
        self.pieces, self.tokens = pieces, tokens

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        return [Completion("".join(self.pieces), self.tokens) for _ in requests]

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | Completion]:
        for piece in self.pieces:
            yield piece
        yield Completion("".join(self.pieces), self.tokens)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(("pieces", "tokens", "text", "sent"), [
    # Finished by itself: streamed sentence by sentence, the last one when the text ends.
    (["Keep the", " same bed", " time. Wake up", " at seven. Avoid naps"], 20,
     "Keep the same bed time. Wake up at seven. Avoid naps", 3),
    # Cut by the token budget: the unfinished sentence never goes out.
    (["Keep the same bed time.", " Wake up at seven", " and"], 80, "Keep the same bed time.", 1),
])
async def test_the_cloud_streams_a_point_sentence_by_sentence(pieces: list[str], tokens: int, text: str,
                                                              sent: int) -> None:
    from pice_cloud.cloud_meter import CloudMeter
    from pice_cloud.events import render_point

    expander = CloudExpander(CloudMeter(ScriptedStream(pieces, tokens)))  # type: ignore[arg-type]
    out = [item async for item in expander.stream("How can I sleep better?", ["Keep a schedule", "Dark room"],
                                                  0, 80, Sampling())]
    streamed = [piece for piece, _, _ in out if piece]
    finals = [(final, n) for _, final, n in out if final is not None]
    assert finals == [(text, tokens)]
    assert streamed[0].startswith("1. **Keep a schedule** Keep the same bed time.")
    assert len(streamed) == sent  # a piece per settled sentence, not one at the end
    assert "".join(streamed) == render_point(0, "Keep a schedule", text)


@pytest.mark.mosquitto
async def test_a_sketch_with_a_duplicate_heading_is_repaired_without_a_second_sketch(
        mosquitto: Mosquitto, tiny_model: Path, tiny_llm: TransformersBackend) -> None:
    llm = ScriptedSketches(tiny_llm, [" Set clear daily goals\n2. Plan each morning\n3. Set daily goals\n"
                                      "4. Take short breaks\n"])
    async with start_system(_config(mosquitto.url, tiny_model), llm=llm) as system:  # type: ignore[arg-type]
        final = await system.service.ask(QUESTION, mode="progressive")
        metrics = Metrics(system.service.transport.rejections, live_edges=lambda: 0, queued=lambda: 0,
                          in_flight=lambda: 0, sketch_repairs=system.service.sketch_repairs)
    assert len(llm.sketch_requests) == 1
    assert final.stats.mode == "progressive"
    assert final.stats.sketch_rejected == []
    assert final.stats.sketch_repaired == ["duplicate_points"]
    assert [line.split("**")[1] for line in final.text.split("\n\n")] == \
        ["Set clear daily goals", "Plan each morning", "Take short breaks"]
    assert metrics.registry.get_sample_value("pice_sketch_repaired_total", {"reason": "duplicate_points"}) == 1


class ScriptedExpansions:
    """A cloud whose point expansions come from a script, one text per call."""

    name = model_id = "scripted"
    streams = False

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.requests: list[ChatRequest] = []

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        self.requests += requests
        return [Completion(text=self.texts.pop(0), tokens=10) for _ in requests]

    async def close(self) -> None:
        pass


FIRST = "Write down three goals for the week and check them every evening before you sleep."


async def _cloud_expands_point_two(texts: Sequence[str]) -> tuple[str, ScriptedExpansions, Rejections]:
    """Point 1 comes from an edge; point 2 has no edge, so the cloud expands it from ``texts``."""
    points = ["Set clear goals", "Plan the day"]
    fleet = live_fleet(FakeClock(), "a")
    request = make_request([("a",), ()], fleet, points=points, check=expansion_check(QUESTION, points), seed=6)
    llm = ScriptedExpansions(texts)
    rejections = Rejections()
    driver = RequestDriver(request, publish=lambda task: None, expander=CloudExpander(CloudMeter(llm)),  # type: ignore[arg-type]
                           selector=ConfidenceSelector(), clock=fleet.now,
                           counters=RejectionCounters(Rejections(), Rejections(), rejections))
    driver.feed(request.start(fleet.now()))  # point 2 has no edge: it waits for the cloud
    driver.feed(request.on_candidate(candidate(0, "a", FIRST), fleet.now()))
    await asyncio.wait_for(driver.run(), 10)
    return (await driver.point(1)).text, llm, rejections


async def test_a_cloud_expansion_that_repeats_another_point_is_sampled_again() -> None:
    own = "Block the morning for deep work and leave meetings and e-mail for the afternoon."
    text, llm, rejections = await _cloud_expands_point_two([FIRST, own])
    assert text == own
    first, second = llm.requests
    assert (first.temperature, first.seed) == (0.0, 8)
    assert second.temperature >= 0.7
    assert second.seed not in (None, 8)
    assert rejections.snapshot() == {("cloud", "repeats_other_point"): 1}


async def test_when_both_cloud_tries_repeat_the_repeated_sentences_are_left_out() -> None:
    own = "Block the morning for deep work."
    text, _, _ = await _cloud_expands_point_two([f"{own} {FIRST}", f"{FIRST} {FIRST}"])
    assert text == own


@pytest.mark.mosquitto
async def test_a_sketch_model_writes_the_sketches_and_nothing_else(
        mosquitto: Mosquitto, tiny_model: Path, smollm2: Path) -> None:
    # llm.sketch_model: SmolLM2 writes the sketch (real headings), the tiny random model everything else.
    config = cloud_config(mosquitto.url, edges=2, edge_model=tiny_model,
                          llm={"model": str(tiny_model), "sketch_model": str(smollm2), "threads": 1},
                          service={"tokens_per_point": 8, "max_answer_tokens": 12, "max_points": 4})
    async with start_system(config) as system:  # type: ignore[arg-type]
        service = system.service
        assert service.sketch_cloud is not service.cloud
        assert service.sketch_cloud.llm.model_id == smollm2.name
        assert service.cloud.llm.model_id == tiny_model.name
        final = await service.ask(QUESTION, mode="progressive")
    assert final.stats.mode == "progressive", final.stats.sketch_rejected
    headings = [line.split("**")[1] for line in final.text.split("\n\n")]
    # The tiny random model cannot write these; SmolLM2 does, greedily.
    assert headings[0] == "Set clear goals and prioritize tasks", headings
    assert len(headings) >= 3


class FramedExpansions:
    """A cloud whose sketch is scripted and whose expansions all open with the same frame, as
    small models often write them (each point written alone)."""

    name = model_id = "framed"
    streams = False

    async def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        out = []
        for request in requests:
            if request.prefill == SKETCH_PREFILL:
                out.append(Completion(text=GOOD, tokens=12))
                continue
            heading = request.messages[-1].content.split('"')[1]
            out.append(Completion(text=f"{FRAME}it's also important to {heading.lower()} every single day.",
                                  tokens=20))
        return out

    async def close(self) -> None:
        pass


FRAME = "In addition to setting clear daily goals for yourself, "


async def test_an_opening_frame_repeated_across_points_is_said_once(embedded_broker: str, tiny_model: Path) -> None:
    config = cloud_config(embedded_broker, service={"tokens_per_point": 24})
    async with start_system(config, llm=FramedExpansions()) as system:  # type: ignore[arg-type]
        final = await system.service.ask(QUESTION, mode="progressive")
    assert final.stats.mode == "progressive"
    texts = [line.split("** ", 1)[1] for line in final.text.split("\n\n")]
    assert texts == [f"{FRAME}it's also important to set clear daily goals every single day.",
                     "It's also important to plan each morning every single day.",
                     "It's also important to take short breaks every single day."]
