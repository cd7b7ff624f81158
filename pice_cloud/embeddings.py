"""Sentence embeddings with all-MiniLM-L6-v2, without sentence-transformers.

Used by the scheduler's mode router, the ensemble's agreement feature and the benchmark's
quality metric. all-MiniLM-L6-v2's sentence-transformers pipeline is: BERT encoder (inputs cut
at 256 tokens) -> mean of the token embeddings over the attention mask -> L2 normalisation
(its ``modules.json`` and ``1_Pooling/config.json``); `Embedder` does exactly that with plain
transformers, so vectors match sentence-transformers' to float precision.

The model comes from `pice_edge.model_store` (``pice-edge models fetch all-minilm-l6-v2``).
`Embedder.encode` is synchronous and CPU-bound: async callers run it in a worker thread.
torch and transformers are imported lazily, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pice_edge.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: The model's sentence-transformers ``max_seq_length``: longer inputs are truncated.
MAX_TOKENS = 256
DEFAULT_BATCH = 32


class Embedder:
    """all-MiniLM-L6-v2 (or any BERT-style sentence model with mean pooling) as unit vectors.

    Args:
        model: a known model name (default ``all-minilm-l6-v2``) or a Hugging Face folder.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        batch_size: texts per forward pass; texts are sorted by length first so a batch pads little.
        max_tokens: truncation length in tokens.

    Raises:
        ModelNotFoundError: the model is not fetched (the message names the command).
        ModelError: torch/transformers are missing or the folder does not load.
    """

    def __init__(self, model: str | Path = "all-minilm-l6-v2", *, device: str = "cpu",
                 batch_size: int = DEFAULT_BATCH, max_tokens: int = MAX_TOKENS) -> None:
        from pice_edge import model_store

        self.path = model_store.resolve(model)
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ModelError(f"sentence embeddings need torch and transformers: pip install "
                             f"'pice[cloud-torch]' ({exc})") from exc
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            self._model = AutoModel.from_pretrained(str(self.path), dtype=torch.float32).to(device).eval()
        except Exception as exc:
            raise ModelError(f"cannot load the embedding model from {self.path} ({exc}); "
                             "run `pice-edge models fetch all-minilm-l6-v2 --force`") from exc
        self.device = device
        self.batch_size = max(1, batch_size)
        self.max_tokens = max_tokens
        self.dim = int(self._model.config.hidden_size)
        self.model_id = self.path.name
        # A fast tokenizer is not safe to call from two threads at once ("Already borrowed").
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings of ``texts``: a float32 tensor of shape (len(texts), dim) on CPU."""
        return self.encode_counted(texts)[0]

    def encode_counted(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """`encode`, and the number of tokens the model ran over (padding included: it was computed)."""
        import torch

        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not one string")
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        tokens = 0
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                out[idx], computed = self._encode_batch([texts[i] for i in idx])
                tokens += computed
        return out, tokens

    def encode_lists(self, texts: Sequence[str]) -> list[list[float]]:
        """`encode` as plain Python lists (JSON-friendly)."""
        return [[float(x) for x in row] for row in self.encode(texts).tolist()]

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of every text of ``a`` with every text of ``b``: shape (len(a), len(b))."""
        return cosine(self.encode(a), self.encode(b))

    def _encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        import torch

        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self._model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        # Mean over real tokens only (padding excluded), as sentence-transformers' Pooling does.
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu(), int(enc["input_ids"].numel())


def cosine(a: Any, b: Any) -> torch.Tensor:
    """Cosine similarity between rows of ``a`` (n, d) and rows of ``b`` (m, d): shape (n, m).

    Accepts tensors or nested lists; 1-D inputs are treated as one row. Rows need not be unit length.
    """
    import torch

    ta = torch.as_tensor(a, dtype=torch.float32)
    tb = torch.as_tensor(b, dtype=torch.float32)
    ta = ta.unsqueeze(0) if ta.dim() == 1 else ta
    tb = tb.unsqueeze(0) if tb.dim() == 1 else tb
    ta = torch.nn.functional.normalize(ta, p=2, dim=1)
    tb = torch.nn.functional.normalize(tb, p=2, dim=1)
    return ta @ tb.T
