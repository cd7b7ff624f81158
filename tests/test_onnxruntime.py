"""The onnxruntime runtime against the transformers runtime on the tiny random model (exported
to ONNX here), provider fallback, step-level batching, and the optional runtimes' error paths."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pice_edge.errors import ModelNotFoundError, RuntimeUnavailableError
from pice_edge.prompts import expansion_messages
from pice_edge.runtimes import SteppingRuntime, create_runtime
from pice_edge.runtimes.base import GenerationRequest
from pice_edge.runtimes.onnx_export import export
from pice_edge.runtimes.onnxruntime import OnnxRuntime
from pice_edge.runtimes.transformers import TransformersRuntime

SKETCH = ["Set clear goals", "Plan the day", "Take short breaks", "Sleep well"]
QUESTIONS = ["How can I improve my time management skills?", "Why rest?", "What helps me focus at work every day?"]


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export(tiny_model, out, precisions=("fp32", "int8", "int4"))
    return out


def _requests(runtime: TransformersRuntime, budgets: list[int]) -> list[GenerationRequest]:
    # Questions of different lengths: the batch is left-padded.
    return [GenerationRequest(prompt=runtime.format_chat(expansion_messages(QUESTIONS[i % 3], SKETCH, i % 4)),
                              max_new_tokens=n) for i, n in enumerate(budgets)]


def test_greedy_output_matches_transformers(tiny_model: Path, tiny_onnx: Path) -> None:
    hf = TransformersRuntime(tiny_model, threads=1)
    ort = OnnxRuntime(tiny_onnx, threads=1)
    assert isinstance(ort, SteppingRuntime)
    requests = _requests(hf, [24, 9, 17, 1, 30, 12])
    assert [r.prompt for r in requests] == [r.prompt for r in _requests(ort, [24, 9, 17, 1, 30, 12])]  # type: ignore[arg-type]
    expected = hf.generate(requests)
    got = ort.generate(requests)
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.token_count for r in got] == [r.token_count for r in expected] == [24, 9, 17, 1, 30, 12]
    for a, b in zip(got, expected, strict=True):
        assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-3)
        assert a.mean_logprob < 0
    # One prompt alone gives the same text as inside the padded batch.
    assert ort.generate(requests[2:3])[0].text == expected[2].text


def test_sequences_joining_a_running_batch_decode_as_if_alone(tiny_model: Path, tiny_onnx: Path) -> None:
    hf = TransformersRuntime(tiny_model, threads=1)
    requests = _requests(hf, [40, 15, 20])
    alone = hf.generate(requests)
    for runtime in (OnnxRuntime(tiny_onnx, threads=1), hf):
        batch = runtime.new_batch()
        batch.add("a", requests[0])
        done = dict(batch.step())
        for _ in range(5):
            done.update(batch.step())
        batch.add("b", requests[1])  # joins after 6 steps, with a different past length
        done.update(batch.step())
        assert len(batch) == 2
        batch.add("c", requests[2])
        while len(batch):
            done.update(batch.step())
        assert [done[k].text for k in "abc"] == [r.text for r in alone], runtime.name


def _with(requests: list[GenerationRequest], **changes: object) -> list[GenerationRequest]:
    return [dataclasses.replace(r, **changes) for r in requests]  # type: ignore[arg-type]


def test_repetition_control_matches_transformers_and_changes_the_output(tiny_model: Path, tiny_onnx: Path) -> None:
    hf = TransformersRuntime(tiny_model, threads=1)
    ort = OnnxRuntime(tiny_onnx, threads=1)
    plain = _requests(hf, [30, 24, 30])
    # The tiny model's generation_config.json asks for penalty 1.3 and no repeated 2-grams
    # (random weights loop on one token without them): a request's settings override those.
    settings = {"folder": {}, "same as folder": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
                "off": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
                "strong": {"repetition_penalty": 2.0, "no_repeat_ngram_size": 3},
                "penalty only": {"repetition_penalty": 3.0, "no_repeat_ngram_size": 0},
                "n-grams only": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 2}}
    texts = {}
    for name, changes in settings.items():
        requests = _with(plain, **changes)
        texts[name] = [r.text for r in ort.generate(requests)]
        assert texts[name] == [r.text for r in hf.generate(requests)], name
    assert texts["same as folder"] == texts["folder"]
    distinct = ["folder", "off", "strong", "penalty only", "n-grams only"]
    for i, a in enumerate(distinct):
        for b in distinct[:i]:
            assert all(x != y for x, y in zip(texts[a], texts[b], strict=True)), (a, b)
    # Without control the random model loops on one token; with it, it writes varied text.
    assert all(len(set(t)) < 3 for t in texts["off"])
    assert all(len(set(t)) > 5 for t in texts["strong"])


def test_penalty_off_leaves_a_model_without_one_unchanged(tiny_onnx: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-penalty"
    shutil.copytree(tiny_onnx, folder)
    config_file = folder / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.pop("repetition_penalty")
    config.pop("no_repeat_ngram_size")
    config_file.write_text(json.dumps(config))
    ort = OnnxRuntime(folder, threads=1)
    requests = [GenerationRequest(prompt=ort.format_chat(expansion_messages(q, SKETCH, i)), max_new_tokens=20)
                for i, q in enumerate(QUESTIONS)]
    default = [r.text for r in ort.generate(requests)]
    assert [r.text for r in ort.generate(_with(requests, repetition_penalty=1.0, no_repeat_ngram_size=0))] == default
    assert [r.text for r in ort.generate(_with(requests, repetition_penalty=3.0))] != default


def test_rows_with_and_without_repetition_control_share_a_batch(tiny_model: Path, tiny_onnx: Path) -> None:
    hf = TransformersRuntime(tiny_model, threads=1)
    plain = _requests(hf, [25, 25, 25, 25])
    mixed = [plain[0], dataclasses.replace(plain[1], repetition_penalty=1.5),
             dataclasses.replace(plain[2], no_repeat_ngram_size=2), plain[3]]
    alone = [hf.generate([r])[0].text for r in mixed]
    for runtime in (OnnxRuntime(tiny_onnx, threads=1), hf):
        batch = runtime.new_batch()
        batch.add(0, mixed[0])
        batch.add(1, mixed[1])
        done = dict(batch.step())
        for _ in range(4):
            done.update(batch.step())
        batch.add(2, mixed[2])  # joins a running batch, with other settings than its rows
        batch.add(3, mixed[3])
        while len(batch):
            done.update(batch.step())
        assert [done[i].text for i in range(4)] == alone, runtime.name
    # transformers' own generate() groups a mixed batch by setting and gives the same texts.
    assert [r.text for r in hf.generate(mixed)] == alone


def test_sampling_is_seeded_and_within_top_p(tiny_onnx: Path) -> None:
    ort = OnnxRuntime(tiny_onnx, threads=1)
    prompt = ort.format_chat(expansion_messages(QUESTIONS[0], SKETCH, 0))
    req = GenerationRequest(prompt=prompt, max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    first, second = ort.generate([req]), ort.generate([req])
    assert first == second
    greedy = ort.generate([GenerationRequest(prompt=prompt, max_new_tokens=20)])
    other_seed = ort.generate([GenerationRequest(prompt=prompt, max_new_tokens=20, temperature=0.9, top_p=0.9,
                                                 seed=8)])
    assert {first[0].text, other_seed[0].text, greedy[0].text} != {first[0].text}


def test_quantized_exports_load_and_generate(tiny_onnx: Path) -> None:
    for precision in ("int8", "int4"):
        rt = OnnxRuntime(tiny_onnx, precision=precision, threads=1)
        assert rt.model_id.endswith(precision)
        out = rt.generate([GenerationRequest(prompt=rt.format_chat(expansion_messages(QUESTIONS[1], SKETCH, 1)),
                                             max_new_tokens=8)])
        assert out[0].token_count == 8
        assert out[0].text


def test_unavailable_provider_falls_back_and_reports_the_actual_one(
        tiny_onnx: Path, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime

    with caplog.at_level(logging.WARNING, logger="pice_edge.runtimes.onnxruntime"):
        rt = create_runtime("onnxruntime", model=str(tiny_onnx), providers=["no-such-provider", "tensorrt", "cpu"],
                            threads=1)
    assert isinstance(rt, OnnxRuntime)
    assert "'no-such-provider' is not available" in caplog.text
    assert "falling back" in caplog.text
    available = onnxruntime.get_available_providers()
    if "TensorrtExecutionProvider" not in available:
        assert "'tensorrt' is not available" in caplog.text
        assert rt.provider == "CPUExecutionProvider"
    assert rt.provider in available
    assert rt.provider == rt.session.get_providers()[0]


def test_missing_export_names_the_tool(tiny_model: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"export_onnx\.py"):
        OnnxRuntime(tiny_model, precision="int4")


def test_missing_onnxruntime_names_the_extra(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An edge without the library: importing it fails (None in sys.modules makes `import` raise).
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeUnavailableError, match=r"pice\[edge\]"):
        create_runtime("onnxruntime", model=str(tiny_onnx))


def test_missing_tensorrt_llm_names_the_extra_and_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(RuntimeUnavailableError, match=r"pice\[tensorrt-llm\]") as info:
        create_runtime("tensorrt_llm", model="smollm2-135m-instruct")
    assert "NVIDIA GPU" in str(info.value)
