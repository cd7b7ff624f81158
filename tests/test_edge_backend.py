"""The cloud's LLM backend on an edge runtime (kind ``edge``, the site role's LLM) with the tiny
model exported to ONNX: streamed and whole answers agree, concurrent requests share decode steps,
tokens are counted with the model's tokenizer, a device profile (and its ``site`` section) sets
it up, nothing on its path imports torch, and the profiles' ``site`` sections are validated and
turned into configuration overrides."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer

from pice_cloud.bootstrap import build_backend
from pice_cloud.config import load_config
from pice_cloud.errors import UnavailableInModeError
from pice_cloud.llm import BACKENDS, create_backend
from pice_cloud.llm.base import (
    ChatMessage,
    ChatRequest,
    Completion,
    RawCompleter,
    StreamingBackend,
    TextRequest,
    TokenCounter,
)
from pice_cloud.llm.edge_runtime import EdgeRuntimeBackend, load_edge_backend, site_llm_overrides
from pice_edge.assembly import MIN_KV_BUDGET_MB, weights_mb
from pice_edge.errors import ConfigError
from pice_edge.profiles import load_profile, parse_profile
from pice_edge.runtimes.onnx_export import export
from pice_edge.runtimes.onnxruntime import OnnxRuntime

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "How can I sleep better?",
    "What is a good breakfast?",
    "Why is the sky blue?",
    "How do I learn a language?",
]
#: The shipped profiles sized for the site role, and those too small for it.
SITE_PROFILES = ["jetson-agx-orin-64gb", "jetson-agx-thor", "jetson-orin-nx-16gb", "x86-cpu-dev"]
NO_SITE_PROFILES = ["jetson-orin-nano-8gb", "jetson-xavier-nx"]


def chat(question: str, tokens: int, **options: object) -> ChatRequest:
    return ChatRequest([ChatMessage("user", question)], max_tokens=tokens, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export(tiny_model, out)
    return out


async def _collect(llm: EdgeRuntimeBackend, request: ChatRequest) -> tuple[list[str], Completion]:
    pieces: list[str] = []
    final: Completion | None = None
    async for item in llm.stream(request):
        if isinstance(item, Completion):
            final = item
        else:
            pieces.append(item)
    assert final is not None, "a stream ends with the whole Completion"
    return pieces, final


async def test_stream_concatenates_to_what_complete_returns(tiny_onnx: Path) -> None:
    llm = load_edge_backend(tiny_onnx, threads=1, max_batch=4)
    try:
        assert isinstance(llm, StreamingBackend)
        assert isinstance(llm, RawCompleter)
        request = chat(QUESTIONS[0], 24)
        [whole] = await llm.complete([request])
        pieces, final = await _collect(llm, request)
        assert whole.tokens == 24
        assert "".join(pieces) == final.text == whole.text
        assert len(pieces) > 1, "streamed token by token, not in one piece"
        assert (final.tokens, final.mean_logprob) == (whole.tokens, pytest.approx(whole.mean_logprob))
        # A raw prompt (no chat template) continues as the same chat prompt does.
        prompt = llm.runtime.format_chat(request.messages)
        [raw] = await llm.complete_raw([TextRequest(prompt, max_tokens=24)])
        assert raw.text == whole.text
    finally:
        await llm.close()


async def test_concurrent_requests_share_decode_steps_and_answer_as_alone(tiny_onnx: Path) -> None:
    llm = load_edge_backend(tiny_onnx, threads=1, max_batch=4)
    try:
        requests = [chat(q, 10 + 4 * i) for i, q in enumerate(QUESTIONS)]
        alone = [(await llm.complete([r]))[0].text for r in requests]
        assert llm.engine.stats.peak_batch == 1
        steps_alone = llm.engine.stats.steps
        # Two whole answers, and two streams, at once.
        together = await asyncio.gather(
            llm.complete(requests[:2]), _collect(llm, requests[2]), _collect(llm, requests[3])
        )
        assert [c.text for c in together[0]] == alone[:2]
        assert ["".join(together[i][0]) for i in (1, 2)] == alone[2:]
        assert llm.engine.stats.peak_batch == 4
        # Batched: far fewer steps than the same answers one after the other.
        assert llm.engine.stats.steps - steps_alone < steps_alone
    finally:
        await llm.close()


async def test_tokens_are_counted_with_the_models_tokenizer(tiny_onnx: Path) -> None:
    llm = load_edge_backend(tiny_onnx, threads=1)
    try:
        assert isinstance(llm, TokenCounter)
        tokenizer = Tokenizer.from_file(str(tiny_onnx / "tokenizer.json"))
        text = "How can I improve my time management skills? Plan the day, then rest."
        assert llm.count_tokens(text) == len(tokenizer.encode(text, add_special_tokens=False).ids)
        assert llm.count_tokens(text) == llm.runtime.count_tokens(text)  # type: ignore[attr-defined]
        messages = [ChatMessage("system", "Be brief."), ChatMessage("user", QUESTIONS[1])]
        prompt = llm.runtime.format_chat(messages)
        assert llm.count_prompt_tokens(messages) == len(tokenizer.encode(prompt, add_special_tokens=False).ids)
        config = json.loads((tiny_onnx / "config.json").read_text())
        assert llm.context_tokens == config["max_position_embeddings"]
        assert llm.model_id == llm.runtime.model_id
        assert llm.name == "edge"
    finally:
        await llm.close()


async def test_per_token_logprobs_are_refused_clearly(tiny_onnx: Path) -> None:
    llm = load_edge_backend(tiny_onnx, threads=1)
    try:
        with pytest.raises(UnavailableInModeError, match="logprobs are not available from the edge LLM backend"):
            await llm.complete([chat(QUESTIONS[0], 4, logprobs=2)])
        with pytest.raises(UnavailableInModeError, match="logprobs"):
            await _collect(llm, chat(QUESTIONS[0], 4, logprobs=0))
        assert llm.engine.stats.steps == 0, "nothing was generated"
    finally:
        await llm.close()


async def test_create_backend_takes_the_profiles_site_settings(tiny_onnx: Path) -> None:
    assert "edge" in BACKENDS
    profile = load_profile("x86-cpu-dev")
    assert profile.site is not None
    llm = create_backend("edge", model=tiny_onnx, profile="x86-cpu-dev")
    try:
        assert isinstance(llm, EdgeRuntimeBackend)
        assert isinstance(llm.runtime, OnnxRuntime)  # the site's runtime, not the profile's (transformers)
        assert llm.settings is not None
        assert llm.settings.profile == profile
        assert (llm.settings.runtime, llm.settings.precision, llm.settings.providers) == (
            "onnxruntime",
            profile.precision,
            tuple(profile.execution_providers),
        )
        assert llm.runtime.provider == "CPUExecutionProvider"
        assert llm.engine.max_batch == profile.site.max_batch
        # The site's memory budget holds the weights and the KV cache: the engine gets the rest.
        expected = max(MIN_KV_BUDGET_MB, profile.site.memory_budget_mb - weights_mb(llm.runtime))
        assert llm.engine.memory_budget_bytes == int(expected * 2**20)
        [answer] = await llm.complete([chat(QUESTIONS[2], 6)])
        assert answer.tokens == 6
    finally:
        await llm.close()


async def test_given_options_win_over_the_profile_and_a_profile_without_site_sizes_by_its_edge_role(
    tiny_onnx: Path,
) -> None:
    llm = create_backend("edge", model=tiny_onnx, profile="x86-cpu-dev", threads=1, max_batch=2, memory_budget_mb=300)
    try:
        assert isinstance(llm, EdgeRuntimeBackend)
        assert llm.settings is not None
        assert llm.settings.threads == 1
        assert llm.runtime.session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
        assert llm.engine.max_batch == 2
        assert llm.engine.memory_budget_bytes == int(max(MIN_KV_BUDGET_MB, 300 - weights_mb(llm.runtime)) * 2**20)
    finally:
        await llm.close()
    nano = load_profile("jetson-orin-nano-8gb")
    assert nano.site is None
    llm = create_backend("edge", model=tiny_onnx, profile=nano.name)
    try:
        assert isinstance(llm, EdgeRuntimeBackend)
        # No GPU here: onnxruntime falls back to the CPU, last in every profile's list.
        assert llm.runtime.provider == "CPUExecutionProvider"
        assert llm.engine.max_batch == nano.max_batch
        assert llm.engine.memory_budget_bytes == int((nano.memory_budget_mb - weights_mb(llm.runtime)) * 2**20)
    finally:
        await llm.close()


async def test_the_configuration_builds_the_site_llm_from_a_profiles_overrides(tiny_onnx: Path) -> None:
    overrides = site_llm_overrides("x86-cpu-dev")
    overrides["llm"]["model"] = str(tiny_onnx)
    config = load_config(overrides=overrides)
    assert (config.llm.kind, config.llm.runtime, config.llm.profile) == ("edge", "onnxruntime", "x86-cpu-dev")
    llm = await asyncio.to_thread(build_backend, config.llm)
    try:
        assert isinstance(llm, EdgeRuntimeBackend)
        assert llm.settings is not None
        assert llm.settings.threads is None, "llm.threads unset: the profile's (here: the runtime's default)"
        assert llm.engine.max_batch == config.llm.max_batch == 4
    finally:
        await llm.close()


def test_site_llm_overrides_come_from_the_profiles_site_section() -> None:
    assert site_llm_overrides("jetson-orin-nx-16gb") == {
        "llm": {"kind": "edge", "profile": "jetson-orin-nx-16gb", "max_batch": 8, "memory_budget_mb": 3072},
        "server": {"max_concurrent": 8},
    }
    config = load_config(overrides=site_llm_overrides("jetson-agx-orin-64gb"))
    assert (config.llm.max_batch, config.llm.memory_budget_mb, config.server.max_concurrent) == (16, 16384, 16)


@pytest.mark.parametrize("name", NO_SITE_PROFILES)
def test_a_profile_without_site_section_is_refused_naming_those_with_one(name: str) -> None:
    with pytest.raises(ConfigError, match=f"profile '{name}' was not sized for the site role") as info:
        site_llm_overrides(name)
    message = str(info.value)
    assert "add a `site:` section" in message
    assert message.endswith("pick one of: " + ", ".join(SITE_PROFILES))


def test_shipped_site_sections_fit_their_device() -> None:
    for name in SITE_PROFILES:
        profile = load_profile(name)
        assert profile.site is not None, name
        assert profile.site.max_concurrent >= profile.site.max_batch
        text = (ROOT / "firmware_configs" / f"{name}.yaml").read_text()
        assert "# Site role" in text, f"{name}: the site section says why its numbers"
    for name in NO_SITE_PROFILES:
        assert load_profile(name).site is None


GOOD = "runtime: onnxruntime\nmemory_budget_mb: 1024\n"


@pytest.mark.parametrize(
    ("site", "expected"),
    [
        (
            "{max_batch: 4, memory_budget_mb: 512, max_concurrent: 4, max_bacth: 8}",
            r"field 'site.max_bacth': unknown field",
        ),
        (
            "{max_batch: 0, memory_budget_mb: 512, max_concurrent: 4}",
            r"field 'site.max_batch': Input should be greater than or equal to 1",
        ),
        (
            "{max_batch: 4, memory_budget_mb: 32, max_concurrent: 4}",
            r"field 'site.memory_budget_mb': Input should be greater than or equal to 64",
        ),
        (
            "{max_batch: 4, memory_budget_mb: 512, max_concurrent: 5000}",
            r"field 'site.max_concurrent': Input should be less than or equal to 4096",
        ),
        (
            "{max_batch: '4', memory_budget_mb: 512, max_concurrent: 4}",
            r"field 'site.max_batch': Input should be a valid integer",
        ),
        ("{max_batch: 4, memory_budget_mb: 512}", r"field 'site.max_concurrent': Field required"),
        ("8", r"field 'site': Input should be a valid dictionary"),
    ],
)
def test_broken_site_sections_name_the_field(tmp_path: Path, site: str, expected: str) -> None:
    path = tmp_path / "board.yaml"
    with pytest.raises(ConfigError, match=expected):
        parse_profile(yaml.safe_load(GOOD + f"site: {site}\n"), source=path)
    good = parse_profile(
        yaml.safe_load(GOOD + "site: {max_batch: 4, memory_budget_mb: 512, max_concurrent: 6}\n"), source=path
    )
    assert good.site is not None
    assert good.site.max_concurrent == 6


@pytest.mark.parametrize(
    ("llm", "expected"),
    [
        ({"profile": "x86-cpu-dev"}, r"llm\.profile is for llm\.kind 'edge'"),
        ({"runtime": "onnxruntime"}, r"llm\.runtime is for llm\.kind 'edge'"),
        ({"kind": "edge", "profile": "no-such-board"}, r"llm\.profile: unknown profile 'no-such-board'"),
        ({"kind": "edge", "runtime": "onnx"}, r"llm\.runtime: Input should be 'transformers', 'onnxruntime'"),
    ],
)
def test_edge_settings_in_the_configuration_are_validated_naming_the_field(llm: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides={"llm": llm})


TORCH_FREE = textwrap.dedent("""
    import asyncio, json, sys
    sys.modules["torch"] = None  # any import of them fails
    sys.modules["transformers"] = None
    import pice_cloud.bootstrap, pice_cloud.server, pice_cloud.service, pice_cloud.llm.edge_runtime
    import pice_cloud.cli, pice_cloud.cli_serve, pice_cloud.site
    from pice_cloud.bootstrap import start_system
    from pice_cloud.config import load_config
    from pice_cloud.llm.base import ChatMessage, ChatRequest, Completion
    from pice_cloud.llm.edge_runtime import site_llm_overrides

    async def main():
        overrides = site_llm_overrides("x86-cpu-dev")
        overrides["llm"].update(model=sys.argv[1], threads=1)
        # The site role (`pice-cloud site`), its cloud unreachable: nothing listens on port 9.
        overrides.update(discovery={"enabled": False}, site={"cloud_url": "http://127.0.0.1:9/v1"})
        config = load_config(overrides=overrides)
        # The whole system as serving builds it: backend from the configuration, broker, service.
        async with start_system(config) as system, \
                pice_cloud.site.site_role(pice_cloud.server.create_app(system.service, system.llm, config),
                                          system) as uplink:
            llm = system.llm
            request = ChatRequest([ChatMessage("user", "Why is the sky blue?")], max_tokens=12)
            [whole] = await llm.complete([request])
            items = [item async for item in llm.stream(request)]
            events = [e async for e in system.service.answer("Why is the sky blue?", mode="cloud", max_tokens=12)]
            return {"backend": type(llm).__name__, "complete": whole.text, "tokens": whole.tokens,
                    "stream": "".join(i for i in items if isinstance(i, str)), "pieces": len(items) - 1,
                    "final": items[-1].text if isinstance(items[-1], Completion) else None,
                    "counted": llm.count_prompt_tokens(request.messages), "answer": events[-1].text,
                    "route": uplink.route}

    result = asyncio.run(main())
    result["torch_loaded"] = sys.modules.get("torch") is not None or sys.modules.get("transformers") is not None
    print(json.dumps(result))
""")


def test_serving_path_needs_no_torch(tiny_onnx: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(tiny_onnx)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "EdgeRuntimeBackend"
    assert result["tokens"] == 12
    assert result["stream"] == result["final"] == result["complete"]
    assert result["pieces"] > 1
    assert result["counted"] > 0
    assert result["answer"] == result["complete"].strip()  # the service's cloud-only answer, stripped
    assert not result["torch_loaded"]
    assert result["route"] == "site"
