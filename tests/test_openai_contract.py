"""The OpenAI contract, row by row of the README's compatibility table: every request parameter
is applied or refused with a 400 that names it. The official ``openai`` client against the real
server, a real Mosquitto and a real edge (tiny random model)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import QUESTION, Api, Mosquitto, serving

pytestmark = pytest.mark.mosquitto

PROGRESSIVE = {"pice": {"mode": "progressive"}}
CLOUD = {"pice": {"mode": "cloud"}}


@pytest.fixture
async def api(mosquitto: Mosquitto, tiny_model: Path) -> AsyncIterator[Api]:
    async with serving(tiny_model, mosquitto.url, edges=1,
                       # Long point deadlines: on a busy machine a point must not fall back to the cloud,
                       # whose sampling path differs from the edge's (the seed tests compare texts).
                       overrides={"service": {"max_answer_tokens": 24, "tokens_per_point": 12,
                                              "deadline_floor_s": 60, "deadline_cap_s": 60}}) as served:
        assert await served.system.service.fleet.wait_for(1, 10)
        yield served


async def _text(client: openai.AsyncOpenAI, extra: dict[str, Any], **params: Any) -> tuple[str, str]:
    reply = await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": QUESTION}],
                                                 extra_body=extra, **params)
    choice = reply.choices[0]
    return choice.message.content or "", choice.finish_reason


@pytest.mark.parametrize(("param", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}),
    ("logit_bias", {"50": 10}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", 0.5),
    ("n", 2),
])
async def test_unsupported_parameters_are_refused_by_name(api: Api, param: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await _text(api.client(), CLOUD, **{param: value})
    assert info.value.param == param
    assert param in info.value.message


async def test_unknown_parameter_is_refused_and_harmless_ones_accepted(api: Api) -> None:
    client = api.client()
    with pytest.raises(openai.BadRequestError) as info:
        await _text(client, {**CLOUD, "top_k": 5})
    assert info.value.param == "top_k"
    assert info.value.code == "unknown_parameter"
    # The "not used" values of unsupported parameters, and parameters that change no answer.
    text, _ = await _text(client, CLOUD, response_format={"type": "text"}, tool_choice="none", user="u-1",
                          presence_penalty=0, logprobs=False, max_tokens=4)
    assert text


@pytest.mark.parametrize("extra", [CLOUD, PROGRESSIVE], ids=["cloud", "progressive"])
async def test_seed_repeats_and_different_seeds_differ(api: Api, extra: dict[str, Any]) -> None:
    client = api.client()
    first, _ = await _text(client, extra, temperature=1.2, seed=1)
    again, _ = await _text(client, extra, temperature=1.2, seed=1)
    other, _ = await _text(client, extra, temperature=1.2, seed=2)
    assert first == again
    assert first != other
    if extra is PROGRESSIVE:
        stats = api.state.metrics.registry.get_sample_value("pice_points_total", {"source": "edge"})
        assert stats, "the edge expanded points (sampling reached it)"


async def test_stop_ends_the_text_before_it(api: Api) -> None:
    client = api.client()
    full, finish = await _text(client, CLOUD, max_tokens=24)
    assert finish == "length"
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut, finish = await _text(client, CLOUD, max_tokens=24, stop=[stop, "never-in-the-text"])
    assert cut == full[: full.index(stop)].strip()
    assert finish == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        await _text(client, CLOUD, stop=["a", "b", "c", "d", "e"])
    assert info.value.param == "stop"


async def test_max_tokens_caps_a_progressive_answers_expansions(api: Api) -> None:
    client = api.client()
    finishes: list[str] = []

    async def expansion_tokens(**params: Any) -> tuple[int, int]:
        reply = await client.chat.completions.create(model="pice", messages=[{"role": "user", "content": QUESTION}],
                                                     extra_body=PROGRESSIVE, **params)
        finishes.append(reply.choices[0].finish_reason)
        assert reply.usage is not None
        assert reply.usage.model_extra is not None
        assert reply.model_extra is not None
        info = reply.model_extra["pice"]
        assert info["mode"] == "progressive"
        fallback = info["cloud_work"].get("fallback_expansion", {}).get("decode_tokens", 0)
        return reply.usage.model_extra["edge_tokens"] + fallback, info["points_edge"] + info["points_cloud"]

    # The random tiny model writes each point's whole budget (12 tokens, more for a short sketch).
    free, points = await expansion_tokens()
    assert free >= 12 * points
    capped, points = await expansion_tokens(max_tokens=6)
    assert 0 < capped <= 6
    assert points >= 1
    # Cut by the limit, as a cloud-only answer would say; the free one ended by itself.
    assert finishes == ["stop", "length"]


async def test_stop_applies_to_each_point_in_progressive_mode(api: Api) -> None:
    client = api.client()
    full, _ = await _text(client, PROGRESSIVE)
    # The first point's expansion, after its bold heading.
    body = full.split("**", 2)[2].split("\n\n")[0].strip()
    stop = body[len(body) // 2: len(body) // 2 + 2]
    if not stop.strip() or "**" in stop:
        pytest.skip("the tiny model's first point is too short to cut")
    cut, finish = await _text(client, PROGRESSIVE, stop=stop)
    assert stop not in cut
    assert finish == "stop"
    assert cut.count("**") == full.count("**"), "every point is still there, each cut at the stop string"


async def test_stream_equals_non_stream_for_the_same_seed(api: Api) -> None:
    client = api.client()
    for extra in (CLOUD, PROGRESSIVE):
        whole, _ = await _text(client, extra, temperature=0.9, seed=7)
        stream = await client.chat.completions.create(
            model="pice", messages=[{"role": "user", "content": QUESTION}], extra_body=extra, temperature=0.9,
            seed=7, stream=True)
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(parts) == whole


# --- the legacy endpoint ---------------------------------------------------------------------------

async def test_legacy_completions_stream_and_not(api: Api) -> None:
    client = api.client()
    prompt = "Once upon a time"
    whole = await client.completions.create(model="pice", prompt=prompt, max_tokens=8, seed=3, temperature=0.8)
    choice = whole.choices[0]
    assert choice.text
    assert choice.finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 8
    assert whole.usage.prompt_tokens > 0
    again = await client.completions.create(model="pice", prompt=prompt, max_tokens=8, seed=3, temperature=0.8)
    assert again.choices[0].text == choice.text
    stream = await client.completions.create(model="pice", prompt=prompt, max_tokens=8, seed=3, temperature=0.8,
                                             stream=True)
    pieces = [c async for c in stream]
    assert "".join(c.choices[0].text for c in pieces if c.choices) == choice.text
    assert pieces[-1].choices[0].finish_reason == "length"
    # Greedy by default: the default max_tokens of this endpoint is OpenAI's 16.
    default = await client.completions.create(model="pice", prompt=prompt)
    assert default.usage is not None
    assert default.usage.completion_tokens == 16


async def test_legacy_completions_apply_stop_and_refuse_by_name(api: Api) -> None:
    client = api.client()
    full = (await client.completions.create(model="pice", prompt="Hello", max_tokens=12)).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("the tiny model wrote whitespace where the stop string would go")
    cut = (await client.completions.create(model="pice", prompt="Hello", max_tokens=12, stop=stop)).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    for param, value in (("echo", True), ("best_of", 3), ("logprobs", 2), ("suffix", "end")):
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="pice", prompt="Hello", max_tokens=2, **{param: value})
        assert info.value.param == param
    requests = api.state.metrics.registry.get_sample_value("pice_requests_total", {"mode": "cloud", "outcome": "ok"})
    assert requests is not None
    assert requests >= 2, "the legacy endpoint is counted like chat"


# --- token streaming ---------------------------------------------------------------------------------

async def test_cloud_answer_streams_token_by_token(api: Api) -> None:
    client = api.client()
    whole, _ = await _text(client, CLOUD, max_tokens=24, temperature=0.8, seed=11)
    stream = await client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": QUESTION}], extra_body=CLOUD, max_tokens=24,
        temperature=0.8, seed=11, stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in [c async for c in stream] if chunk.choices
              and chunk.choices[0].delta.content]
    assert "".join(pieces) == whole
    assert len(pieces) > 5, "the answer came in many pieces, not one"
    # A stop string mid-answer: the streamed text ends before it, like the whole one.
    stop = whole[len(whole) // 2: len(whole) // 2 + 2]
    if stop.strip():
        cut, _ = await _text(client, CLOUD, max_tokens=24, temperature=0.8, seed=11, stop=stop)
        stream = await client.chat.completions.create(
            model="pice", messages=[{"role": "user", "content": QUESTION}], extra_body=CLOUD, max_tokens=24,
            temperature=0.8, seed=11, stream=True, stop=stop)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert streamed == cut
        assert stop not in streamed


# --- logprobs (cloud-only answers) ------------------------------------------------------------------

async def test_logprobs_have_one_entry_per_token(api: Api) -> None:
    client = api.client()
    reply = await client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, logprobs=True,
        top_logprobs=2)  # mode auto: asking for logprobs answers cloud-only
    choice = reply.choices[0]
    assert reply.model_extra is not None
    assert reply.model_extra["pice"]["mode"] == "cloud"
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert reply.usage is not None
    assert len(entries) == reply.usage.completion_tokens == 10
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4  # greedy: the chosen one is the best
    assert "".join(e.token for e in entries).strip() == choice.message.content
    # Streamed: the same tokens, with the text.
    stream = await client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, logprobs=True, stream=True)
    chunks = [c async for c in stream if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content]
    streamed = [e.token for c in chunks for e in c.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert streamed == [e.token for e in entries]


async def test_logprobs_are_refused_in_progressive_mode(api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await _text(api.client(), PROGRESSIVE, logprobs=True)
    assert info.value.param == "logprobs"
    assert "cloud-only" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await _text(api.client(), CLOUD, top_logprobs=2)
    assert info.value.param == "top_logprobs"
