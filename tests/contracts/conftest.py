"""Contract tests of the NVIDIA paths: fakes of the libraries' APIs injected through
``sys.modules`` (each fake names the file and commit it mirrors), and the ``cuda`` marker of the
tests that need a GPU (skipped where torch sees none; ``tools/gpu_check.sh`` runs them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.contracts import fake_edgellm, fake_tensorrt_llm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU with CUDA (skipped without one)")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False); tools/gpu_check.sh runs these")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[fake_tensorrt_llm.FakeLLM]]:
    """``tensorrt_llm`` replaced by the fake for this test."""
    yield from fake_tensorrt_llm.install(monkeypatch)


@pytest.fixture
def fake_edge_llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[fake_edgellm.FakeEdgeLLM]]:
    """``experimental.server`` (TensorRT Edge-LLM) replaced by the fake for this test."""
    yield from fake_edgellm.install(monkeypatch)
