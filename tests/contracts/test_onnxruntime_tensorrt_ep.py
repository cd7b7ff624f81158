"""The onnxruntime runtime's TensorRT execution provider against a fake of onnxruntime's option
parsing and explicit-profile checks (``fake_onnxruntime`` names the files and commit): the options
it is given exist, parse, and cover every dynamic input of the decoder export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pice_edge.runtimes.onnx_export import onnx_file
from pice_edge.runtimes.onnxruntime import OnnxRuntime
from tests.contracts import fake_onnxruntime
from tests.contracts.fake_onnxruntime import TRT, FakeSession, parse_shapes


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> object:
    yield from fake_onnxruntime.install(monkeypatch)


@pytest.fixture
def onnx_folder(tiny_model: Path, tmp_path: Path) -> Path:
    """An ONNX model folder of the tiny model (two layers); the fake session never reads the graph."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "chat_template.jinja"):
        if (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, folder / name)
    onnx_file(folder, "fp32").write_bytes(b"")
    return folder


def trt_options(session: dict[str, object]) -> dict[str, str]:
    providers = session["providers"]
    assert isinstance(providers, list)
    assert providers[0] == TRT
    options = session["options"]
    assert isinstance(options, list)
    return dict(options[0])


def test_tensorrt_engine_covers_every_batch_and_length_it_is_given(fake_ort: object, onnx_folder: Path,
                                                                   tmp_path: Path) -> None:
    runtime = OnnxRuntime(onnx_folder, providers=("tensorrt", "cuda", "cpu"), engine_cache=tmp_path / "engines",
                          fp16=True, max_batch=8, max_tokens=512)
    assert runtime.provider == TRT
    (session,) = FakeSession.created
    options = trt_options(session)
    assert options["trt_fp16_enable"] == "True"
    assert options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(tmp_path / "engines")
    low, high, opt = (parse_shapes(options[k]) for k in fake_onnxruntime.PROFILES)
    assert low["input_ids"] == (1, 1)
    assert high["input_ids"] == (8, 512)
    assert low["past_key_values.0.key"][2] == 0  # the prefill's empty cache
    assert high["past_key_values.1.value"] == (8, runtime.shape.kv_heads, 511, runtime.shape.head_dim)
    assert opt["input_ids"] == (8, 1)  # tuned for decoding
    assert high["attention_mask"] == (8, 512)


def test_without_ranges_tensorrt_is_still_configured_and_warns(fake_ort: object, onnx_folder: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    OnnxRuntime(onnx_folder, providers=("tensorrt", "cpu"))
    options = trt_options(FakeSession.created[0])
    assert not any(k.startswith("trt_profile") for k in options)
    assert "rebuilds its engine" in caplog.text


def test_ranges_refused_for_a_split_graph_fall_back(fake_ort: object, onnx_folder: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    FakeSession.extra_dynamic_inputs = ("/model/layers.0/Cast_output_0",)  # an inner input of a split graph
    runtime = OnnxRuntime(onnx_folder, providers=("tensorrt", "cpu"), max_batch=4, max_tokens=256)
    assert runtime.provider == TRT
    assert len(FakeSession.created) == 1  # the refused session is never made; the second one is
    assert not any(k.startswith("trt_profile") for k in trt_options(FakeSession.created[0]))
    assert "refused the explicit shape ranges" in caplog.text


def test_max_tokens_is_capped_by_the_model_context(fake_ort: object, onnx_folder: Path) -> None:
    runtime = OnnxRuntime(onnx_folder, providers=("tensorrt",), max_batch=2, max_tokens=1_000_000)
    high = parse_shapes(trt_options(FakeSession.created[0])["trt_profile_max_shapes"])
    assert high["input_ids"][1] == 2048  # the tiny model's max_position_embeddings
    assert runtime.provider == TRT
