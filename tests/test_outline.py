"""Sketches decoded under their outline format: the format as a regex and a grammar, the
embedded engine's token mask (a random model still writes a well-formed outline), the HTTP
backend's structured-output fields, and the service asking for it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from pice_cloud import SKETCH_PREFILL, ServiceConfig
from pice_cloud.guards import MIN_POINTS
from pice_cloud.llm.base import ChatRequest
from pice_cloud.llm.openai_http import OpenAIHTTPBackend
from pice_edge.runtimes.base import ChatMessage, GenerationRequest
from pice_edge.runtimes.transformers import TransformersRuntime
from pice_edge.text import OutlineFormat

FORMAT = OutlineFormat(min_points=3, max_points=5, max_words=4)


@pytest.mark.parametrize(("text", "ok"), [
    (" Set goals\n2. Plan the day\n3. Take breaks", True),
    (" Set goals\n2. Plan\n3. A\n4. B\n5. C", True),
    (" Set goals\n2. Plan", False),  # too few
    (" Set goals\n3. Plan\n4. x", False),  # out of order
    (" one two three four five\n2. x\n3. y", False),  # a heading too long
    (" A\n2. B\n3. C\n4. D\n5. E\n6. F", False),  # too many
    ("\n2. B\n3. C", False),  # an empty heading
])
def test_the_format_as_a_regex(text: str, ok: bool) -> None:
    assert bool(re.fullmatch(FORMAT.regex(), text)) is ok


def test_the_format_as_a_grammar_starts_with_the_prefill_when_the_engine_writes_it() -> None:
    grammar = FORMAT.gbnf(lead="1.")
    assert grammar.splitlines()[0] == 'root ::= "1." heading item2'
    assert 'item3 ::= "\\n3." heading item4?' in grammar
    assert 'item5 ::= "\\n5." heading' in grammar.splitlines()
    assert FORMAT.gbnf().startswith("root ::= heading item2")
    with pytest.raises(ValueError, match="not an outline format"):
        OutlineFormat(min_points=4, max_points=3, max_words=4)


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_a_random_model_writes_a_well_formed_outline_under_the_mask(tiny_model: Path, seed: int | None) -> None:
    runtime = TransformersRuntime(tiny_model, threads=1)
    try:
        prompt = runtime.format_chat([ChatMessage("user", "How can I sleep better?")], SKETCH_PREFILL)
        temperature = 0.0 if seed is None else 1.0
        requests = [GenerationRequest(prompt, 60, temperature=temperature, seed=seed),
                    GenerationRequest(prompt, 60, temperature=temperature, seed=seed, outline=FORMAT)]
        free, guided = runtime.new_batch().run(requests)
        # The plain generate() (Hugging Face's, for unconstrained requests) decodes an outlined
        # request under the mask too.
        _, generated = runtime.generate(requests)
    finally:
        runtime.close()
    assert not re.fullmatch(FORMAT.regex(), free.text), "the random model alone does not write an outline"
    # The last heading's line break ends the text (so it may end with one).
    assert re.fullmatch(FORMAT.regex() + r"\n?", guided.text), guided.text
    assert re.fullmatch(FORMAT.regex() + r"\n?", generated.text), generated.text
    assert 3 <= len(guided.text.splitlines()) <= 5
    openings = [line.removeprefix(f"{i + 1}.").split()[0] for i, line in enumerate(guided.text.splitlines())]
    assert len(set(openings)) == len(openings), "no two headings open with the same word"


def _body(structured: str, *, continue_final: bool = False) -> dict[str, object]:
    backend = OpenAIHTTPBackend("http://127.0.0.1:9/v1", "m", structured_outputs=structured,
                                continue_final_message=continue_final)
    request = ChatRequest([ChatMessage("user", "q")], max_tokens=40, prefill=SKETCH_PREFILL, outline=FORMAT)
    return backend._body(request)


def test_the_http_backend_asks_the_engine_for_the_format_it_can_decode() -> None:
    assert "guided_regex" not in _body("none")
    assert "grammar" not in _body("none")
    # Without the pre-fill continued, the engine writes "1." itself: the format starts with it.
    assert _body("vllm")["guided_regex"] == r"1\." + FORMAT.regex()
    assert _body("vllm", continue_final=True)["guided_regex"] == FORMAT.regex()
    assert str(_body("llamacpp")["grammar"]).startswith('root ::= "1." heading')
    plain = OpenAIHTTPBackend("http://127.0.0.1:9/v1", "m", structured_outputs="vllm")
    assert "guided_regex" not in plain._body(ChatRequest([ChatMessage("user", "q")], max_tokens=4)), \
        "only sketches carry a format"
    with pytest.raises(Exception, match="choose none, vllm or llamacpp"):
        OpenAIHTTPBackend("http://127.0.0.1:9/v1", "m", structured_outputs="xgrammar")


async def test_the_service_asks_for_its_sketch_under_the_format_unless_told_not_to(tiny_model: Path) -> None:
    from pice_cloud.llm.transformers import TransformersBackend
    from pice_cloud.service import PiceService
    from pice_edge.transport import BrokerSettings, MqttTransport
    from tests.conftest import ScriptedSketches

    llm = ScriptedSketches(TransformersBackend(tiny_model, threads=1), [" Set goals\n2. Plan the day\n3. Rest\n"])
    try:
        for sketch_format, expected in (("constrained", True), ("free", False)):
            transport = MqttTransport(BrokerSettings(url="mqtt://127.0.0.1:9"), client_id="c")
            config = ServiceConfig(sketch_format=sketch_format, max_points=5)
            service = PiceService(llm, transport, config=config)  # type: ignore[arg-type]
            final = await service.ask("How can I sleep better?", mode="sot")
            assert final.stats.mode == "sot"
            outline = llm.sketch_requests[-1].outline
            assert (outline is not None) is expected
            if outline is not None:
                assert (outline.min_points, outline.max_points) == (MIN_POINTS, 5)
    finally:
        await llm.inner.close()


def test_the_structured_outputs_setting_is_validated() -> None:
    from pice_cloud.config import LLMConfig

    with pytest.raises(ValueError, match="structured_outputs"):
        LLMConfig(kind="openai", url="http://127.0.0.1:1/v1", structured_outputs="guess")  # type: ignore[arg-type]
    assert json.loads(LLMConfig().model_dump_json())["structured_outputs"] == "none"
    assert httpx  # the backend's client library is what sends these fields


def test_a_heading_that_may_not_end_yet_runs_on_to_finish_its_phrase(tiny_model: Path) -> None:
    import dataclasses

    def headings(form: OutlineFormat) -> list[str]:
        runtime = TransformersRuntime(tiny_model, threads=1)
        try:
            prompt = runtime.format_chat([ChatMessage("user", "How can I sleep better?")], SKETCH_PREFILL)
            results = runtime.new_batch().run([GenerationRequest(prompt, 80, temperature=1.0, seed=seed, outline=form)
                                               for seed in range(6)])
        finally:
            runtime.close()
        return [re.sub(r"^\d+\.", "", line).strip() for r in results for line in r.text.splitlines()]

    plain = dataclasses.replace(FORMAT, max_words=1, extra_words=1)
    assert {len(h.split()) for h in headings(plain)} == {1}
    # A stand-in for "not cut mid-phrase": at least two words. The heading runs one word past
    # its limit to get there (unless it used up its share of the token budget first).
    finishing = headings(dataclasses.replace(plain, can_end=lambda heading: len(heading.split()) >= 2))
    assert all(len(h.split()) <= 2 for h in finishing)
    assert sum(len(h.split()) == 2 for h in finishing) >= len(finishing) / 2, finishing


@pytest.mark.parametrize(("best", "allowed"), [
    # The model wants a third word: the heading ends (a line break), it does not glue it on.
    (" science", {"\n"}),
    # It goes on with the word it is writing: that stays allowed, a new word does not.
    ("s", {"\n", "s", "science", ",", "2."}),
])
def test_at_its_word_limit_a_heading_ends_rather_than_glue_on_a_word(best: str, allowed: set[str]) -> None:
    from pice_edge.runtimes.outline import OutlineGuide, TokenTexts

    texts = [" Quantum", " computer", " science", "science", "s", ",", "\n", "</s>", "2."]
    vocab = TokenTexts.build(lambda ids: texts[ids[0]], len(texts))
    guide = OutlineGuide(OutlineFormat(min_points=3, max_points=5, max_words=2), vocab,
                         encode=lambda text: [texts.index(text)], eos_ids=[texts.index("</s>")], budget=64)
    for token in (" Quantum", " computer"):
        guide.advance(texts.index(token))
    scores = np.zeros(len(texts))
    scores[texts.index(best)] = 5.0
    guide.mask(scores)
    assert {texts[i] for i in np.flatnonzero(np.isfinite(scores))} == allowed
