"""Step-level decoding shared by runtimes whose model is a function
``(input_ids, attention_mask, position_ids, past) -> (last logits, present)`` on numpy arrays.

Rows of the running batch carry their own left padding and position ids, so a sequence can be
prefilled and join the batch between any two decode steps (continuous batching), and finished
rows leave it at once. The logits processing reproduces the Hugging Face ``generate`` defaults a
model folder's ``generation_config.json`` asks for (repetition penalty, no-repeat n-grams,
suppressed tokens), so greedy outputs agree with the transformers runtime; a request's own
repetition settings override the folder's for its row only, so rows with different settings
share one batch.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pice_edge.runtimes.base import GenerationRequest, GenerationResult
from pice_edge.runtimes.outline import OutlineGuide, TokenTexts

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
#: (input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], past [2L x (B,H,P,D)]) -> (logits [B,V], present)
ForwardFn = Callable[[IntArray, IntArray, IntArray, list[FloatArray]], tuple[FloatArray, list[FloatArray]]]


@dataclass(frozen=True)
class ModelShape:
    """What the decoder needs to know of a model, read from its ``config.json``."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = int(config["num_attention_heads"])
        return cls(layers=int(config["num_hidden_layers"]), kv_heads=int(config.get("num_key_value_heads", heads)),
                   head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
                   vocab_size=int(config["vocab_size"]))

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class LogitsPolicy:
    """Token-selection rules from ``generation_config.json`` (as transformers applies them)."""

    eos_ids: frozenset[int]
    pad_id: int
    suppress: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def from_folder(cls, folder: Path, config: dict[str, Any]) -> LogitsPolicy:
        gen: dict[str, Any] = {}
        if (folder / "generation_config.json").is_file():
            gen = json.loads((folder / "generation_config.json").read_text())
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        eos_list = eos if isinstance(eos, list) else [eos]
        eos_ids = frozenset(int(e) for e in eos_list if e is not None)
        pad = gen.get("pad_token_id", config.get("pad_token_id"))
        if pad is None:
            pad = min(eos_ids) if eos_ids else 0
        return cls(eos_ids=eos_ids, pad_id=int(pad), suppress=tuple(int(t) for t in gen.get("suppress_tokens") or ()),
                   repetition_penalty=float(gen.get("repetition_penalty") or 1.0),
                   no_repeat_ngram_size=int(gen.get("no_repeat_ngram_size") or 0))

    def for_request(self, request: GenerationRequest) -> LogitsPolicy:
        """This policy with the request's repetition settings where it sets them."""
        penalty = self.repetition_penalty if request.repetition_penalty is None else request.repetition_penalty
        ngram = self.no_repeat_ngram_size if request.no_repeat_ngram_size is None else request.no_repeat_ngram_size
        if (penalty, ngram) == (self.repetition_penalty, self.no_repeat_ngram_size):
            return self
        return replace(self, repetition_penalty=penalty, no_repeat_ngram_size=ngram)

    def process(self, logits: FloatArray, history: Sequence[int]) -> FloatArray:
        """Scores of one row after the processors (a copy; ``logits`` is left untouched)."""
        scores = logits.astype(np.float32, copy=True)
        if self.repetition_penalty != 1.0 and history:
            seen = np.fromiter(set(history), dtype=np.int64)
            picked = scores[seen]
            scores[seen] = np.where(picked < 0, picked * self.repetition_penalty, picked / self.repetition_penalty)
        n = self.no_repeat_ngram_size
        if n > 0 and len(history) + 1 >= n:
            prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
            banned = [history[i + n - 1] for i in range(len(history) - n + 1)
                      if tuple(history[i:i + n - 1]) == prefix]
            if banned:
                scores[banned] = -np.inf
        if self.suppress:
            scores[list(self.suppress)] = -np.inf
        return scores


def _log_softmax_at(logits: FloatArray, token: int) -> float:
    top = float(np.max(logits))
    return float(logits[token]) - top - math.log(float(np.sum(np.exp(logits - top))))


def choose(scores: FloatArray, raw: FloatArray, request: GenerationRequest,
           rng: np.random.Generator) -> tuple[int, float]:
    """Pick the next token (greedy, or temperature + top-p sampling); return it with its log-prob
    under the raw logits (the model's own confidence, independent of the sampling settings)."""
    if request.temperature <= 0:
        token = int(np.argmax(scores))
    else:
        scaled = scores.astype(np.float64) / request.temperature
        scaled -= np.max(scaled)
        probs = np.exp(scaled)
        probs /= probs.sum()
        if request.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = order[: int(np.searchsorted(cumulative, request.top_p)) + 1]
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        token = int(rng.choice(probs.shape[0], p=probs))
    return token, _log_softmax_at(raw, token)


@dataclass
class _Row:
    key: object
    request: GenerationRequest
    history: list[int]  # prompt + generated ids (what the processors look at)
    rng: np.random.Generator
    policy: LogitsPolicy  # the batch's policy with this request's repetition settings
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    position: int = 0  # position id of the next token fed to the model
    done: bool = False
    guide: OutlineGuide | None = None  # the request's outline format, when it has one


class StepBatch:
    """A `StreamingDecodeBatch` over a `ForwardFn` (see the module docstring)."""

    def __init__(self, forward: ForwardFn, shape: ModelShape, policy: LogitsPolicy,
                 encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 vocab: Callable[[int], TokenTexts] | None = None) -> None:
        self._forward = forward
        self._shape = shape
        self._policy = policy
        self._encode = encode
        self._decode = decode
        #: Vocabulary size -> the tokens' texts, for outline-constrained requests (built on
        #: first use; pass the runtime's cached one so that each batch does not rebuild it).
        self._vocab = vocab or functools.cache(lambda size: TokenTexts.build(decode, size))
        self._rows: list[_Row] = []
        self._past: list[FloatArray] = []
        self._mask: IntArray = np.zeros((0, 0), dtype=np.int64)
        self._pending: list[tuple[object, GenerationRequest]] = []
        self._finished: list[tuple[object, GenerationResult]] = []

    def __len__(self) -> int:
        return len(self._rows) + len(self._pending)

    def add(self, key: object, request: GenerationRequest) -> None:
        # Prefilled together at the next step: one batched prefill beats several single ones.
        self._pending.append((key, request))

    def step(self) -> list[tuple[object, GenerationResult]]:
        if self._pending:
            self._prefill(self._pending)
            self._pending = []
        if self._rows:
            self._decode_step()
        finished, self._finished = self._finished, []
        return finished

    def progress(self) -> list[tuple[object, list[int]]]:
        """The tokens generated so far by every live sequence (copies: for streaming)."""
        return [(row.key, list(row.generated)) for row in self._rows if not row.done]

    def discard(self, key: object) -> None:
        """Drop a sequence that nobody waits for any more (its slot is free at once)."""
        self._pending = [(k, r) for k, r in self._pending if k != key]
        for row in self._rows:
            if row.key == key:
                row.done = True
        self._finished = [(k, r) for k, r in self._finished if k != key]
        self._drop_finished()

    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate a whole batch (the plain `Runtime.generate` path)."""
        for i, request in enumerate(requests):
            self.add(i, request)
        results: dict[object, GenerationResult] = {}
        while len(self):
            results.update(self.step())
        return [results[i] for i in range(len(requests))]

    # --- internals -------------------------------------------------------------------------

    def _empty_past(self, batch: int) -> list[FloatArray]:
        s = self._shape
        return [np.zeros((batch, s.kv_heads, 0, s.head_dim), dtype=np.float32) for _ in range(2 * s.layers)]

    def _prefill(self, items: list[tuple[object, GenerationRequest]]) -> None:
        prompts = [self._encode(req.prompt) or [self._policy.pad_id] for _, req in items]
        width = max(len(p) for p in prompts)
        ids = np.full((len(items), width), self._policy.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, present = self._forward(ids, mask, positions, self._empty_past(len(items)))
        rows = []
        for i, ((key, req), prompt) in enumerate(zip(items, prompts, strict=True)):
            rng = np.random.default_rng(req.seed)
            row = _Row(key=key, request=req, history=list(prompt), rng=rng, policy=self._policy.for_request(req),
                       position=len(prompt))
            if req.outline is not None:
                row.guide = OutlineGuide(req.outline, self._vocab(int(logits.shape[-1])), self._encode,
                                         self._policy.eos_ids, budget=req.max_new_tokens)
            rows.append(row)
            self._accept(row, logits[i])
        self._merge(rows, present, mask)
        self._drop_finished()

    def _merge(self, rows: list[_Row], present: list[FloatArray], mask: IntArray) -> None:
        if not self._rows:
            self._rows, self._past, self._mask = rows, present, mask
            return
        old_t, new_t = self._mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)

        def pad(a: Any, t: int) -> Any:
            if t == width:
                return a
            spec = [(0, 0)] * a.ndim
            spec[2 if a.ndim == 4 else 1] = (width - t, 0)  # left padding on the time axis
            return np.pad(a, spec)

        self._past = [np.concatenate([pad(a, old_t), pad(b, new_t)]) for a, b in zip(self._past, present, strict=True)]
        self._mask = np.concatenate([pad(self._mask, old_t), pad(mask, new_t)])
        self._rows += rows

    def _decode_step(self) -> None:
        batch = len(self._rows)
        ids = np.array([[row.generated[-1]] for row in self._rows], dtype=np.int64)
        positions = np.array([[row.position] for row in self._rows], dtype=np.int64)
        mask = np.concatenate([self._mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        logits, self._past = self._forward(ids, mask, positions, self._past)
        self._mask = mask
        for i, row in enumerate(self._rows):
            row.position += 1
            self._accept(row, logits[i])
        self._drop_finished()

    def _accept(self, row: _Row, logits: FloatArray) -> None:
        scores = row.policy.process(logits, row.history)
        if row.guide is not None:
            row.guide.mask(scores)
        token, logprob = choose(scores, logits, row.request, row.rng)
        if row.guide is not None:
            row.guide.advance(token)
        row.generated.append(token)
        row.history.append(token)
        row.logprobs.append(logprob)
        if token in self._policy.eos_ids or len(row.generated) >= row.request.max_new_tokens:
            row.done = True
            self._finished.append((row.key, self._result(row)))

    def _result(self, row: _Row) -> GenerationResult:
        ids = row.generated
        stopped = bool(ids) and ids[-1] in self._policy.eos_ids
        text_ids = ids[:-1] if stopped else ids
        # The EOS token itself counts toward confidence when the model chose to stop.
        mean = sum(row.logprobs) / len(row.logprobs) if row.logprobs else 0.0
        return GenerationResult(text=self._decode(text_ids), token_count=len(text_ids), mean_logprob=min(0.0, mean))

    def _drop_finished(self) -> None:
        if not any(row.done for row in self._rows):
            return
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._past, self._mask = [], np.zeros((0, 0), dtype=np.int64)
            return
        self._past = [a[keep] for a in self._past]
        self._mask = self._mask[keep]
        # Columns that are padding in every remaining row cost attention work for nothing.
        first = int(np.argmax(self._mask.any(axis=0)))
        if first:
            self._past = [np.ascontiguousarray(a[:, :, first:]) for a in self._past]
            self._mask = self._mask[:, first:]
