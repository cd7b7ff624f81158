"""Sentence embeddings: the cosine helper (fast) and the real all-MiniLM-L6-v2 (slow marker)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pice_cloud.embeddings import Embedder, cosine
from pice_edge.errors import ModelNotFoundError


def test_cosine_of_rows() -> None:
    sims = cosine([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], [[3.0, 0.0]])
    assert sims.shape == (3, 1)
    assert sims[:, 0].tolist() == pytest.approx([1.0, 0.0, 2**-0.5])
    assert cosine([1.0, 0.0], [-1.0, 0.0]).item() == pytest.approx(-1.0)


def test_missing_model_names_the_fetch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PICE_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="pice-edge models fetch all-minilm-l6-v2"):
        Embedder()


@pytest.fixture(scope="module")
def embedder(minilm: Path) -> Embedder:
    return Embedder(minilm, batch_size=2)


@pytest.mark.slow
def test_paraphrases_are_closer_than_unrelated_sentences(embedder: Embedder) -> None:
    texts = [
        "How can I improve my time management skills?",
        "What are good ways to manage my time better?",
        "Write a Python function that reverses a linked list.",
        "The weather in Lisbon is sunny today.",
    ]
    vectors = embedder.encode(texts)
    assert vectors.shape == (4, 384)
    assert vectors.dtype == torch.float32
    assert torch.linalg.vector_norm(vectors, dim=1).tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    sims = cosine(vectors, vectors)
    assert sims[0, 1] > 0.6
    assert sims[0, 1] > sims[0, 2] + 0.3
    assert sims[0, 1] > sims[0, 3] + 0.3
    assert embedder.similarity(texts[:1], texts[1:2]).item() == pytest.approx(sims[0, 1].item(), abs=1e-5)


@pytest.mark.slow
def test_batching_and_order_do_not_change_vectors(embedder: Embedder) -> None:
    texts = ["short", "a somewhat longer sentence that needs padding in a batch", "mid length text"]
    together = embedder.encode(texts)  # batches of 2, sorted by length: padding in play
    alone = torch.cat([embedder.encode([t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)
    lists = embedder.encode_lists(texts[:1])
    assert len(lists) == 1
    assert len(lists[0]) == 384
    assert isinstance(lists[0][0], float)
    # Longer than the model's 256-token window: truncated, not an error.
    assert embedder.encode(["word " * 2000]).shape == (1, 384)
    with pytest.raises(TypeError, match="sequence of texts"):
        embedder.encode("one string")  # type: ignore[arg-type]
