"""LoRA training of an expander or a sketcher, with checkpoints, a report and a loss plot.

One run: prepare the role's examples (`pice_cloud.finetune.data`) with the base model's own chat
template and tokenizer, wrap the base model in a peft LoRA adapter, train for ``steps``
optimizer steps of ``batch_size`` examples (gradient accumulation over micro-batches), then
merge the adapter into the weights and install the result in the model store
(`pice_cloud.finetune.merge`).

- The loss is the cross-entropy of the **target tokens only** (the point's expansion, or the
  outline after the ``"1."`` pre-fill, each closed by the end-of-turn token so the model learns
  to stop); prompt tokens are context, not targets.
- **Sketcher: its own meta headings as negatives** (unlikelihood training, Welleck et al., 2019).
  A small model outlines an essay-like question by an essay's frame ("Introduction", ...,
  "Conclusion"), and cross-entropy on outlines without such headings does not move that: the
  frame is never in the data, so it is never scored. After ``negatives_after`` of the steps, the
  model being trained outlines every training instruction (greedy, the serving prompt; any
  instruction will do, it needs no answer); each heading the serving guards call meta
  (`pice_cloud.guards.is_meta_heading`) becomes a negative: its first token, in the model's own
  context. Each later step adds ``negatives_per_step`` of them, with ``negative_weight`` times the
  mean of ``-log(1 - p(token))``. The report gives the meta-heading rate of the model's outlines
  of the held-out instructions before and after training.
- Prompt and target are tokenized separately, as at serving: the runtime tokenizes the prompt
  and the model generates from there, so a token spanning the boundary never occurs.
- Fixed seed: the example order is a seeded permutation per epoch and every random state
  (Python, torch) is in the checkpoint, so ``--resume`` continues the same run.
- Checkpoints (adapter weights, optimizer, schedule, random states, loss curve) are written
  every ``checkpoint_every`` steps, atomically, keeping the last ``keep_checkpoints``; an
  interrupted run (Ctrl-C) writes one before it stops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pice_cloud import defaults, guards
from pice_cloud.errors import FinetuneError
from pice_cloud.finetune.config import FinetuneConfig
from pice_cloud.finetune.data import Example, Prepared, prepare
from pice_edge.model_store import installed_path, resolve, sha256_file
from pice_edge.runtimes.base import ChatMessage
from pice_edge.text import list_items

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of prompt and padding tokens (torch's cross-entropy ignore_index)
_CHECKPOINT = "checkpoint-{step:06d}.pt"
DATA_NOTE = ("Trained on the data named in 'data'. For ../shared/data/alpaca_eval (AlpacaEval, GPT-4-Turbo "
             "answers): CC BY-NC 4.0, train and measure only, never ship the weights.")


class Row(NamedTuple):
    """One encoded example."""

    ids: list[int]
    #: ``IGNORE_INDEX`` on the prompt, the token ids on the target.
    labels: list[int]
    #: Positions (in ``ids``) of tokens to make unlikely (a negative: its labels are all ignored).
    heads: list[int]


@dataclass
class TrainResult:
    """What a run produced."""

    report: dict[str, Any]
    report_path: Path
    model_path: Path | None


def render_prompt(tokenizer: Any, messages: Sequence[ChatMessage], prefill: str = "") -> str:
    """The prompt exactly as the runtimes build it (``TransformersRuntime.format_chat``): the
    tokenizer's chat template with the generation prompt, then the assistant pre-fill."""
    rendered = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             tokenize=False, add_generation_prompt=True)
    return str(rendered) + prefill


def _imports() -> tuple[Any, Any, Any]:
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        raise FinetuneError(f"fine-tuning needs torch, transformers and peft: pip install 'pice[finetune]' "
                            f"({exc.name} is missing)") from exc
    return torch, transformers, peft


def eos_id(model: Any, tokenizer: Any) -> int:
    """The token that ends an assistant turn: the first of the generation config's EOS ids."""
    eos = model.generation_config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise FinetuneError("the base model defines no end-of-sequence token; it cannot learn where to stop")
    return int(eos)


def encode(example: Example, tokenizer: Any, eos: int) -> Row:
    """One example's input ids and labels (``IGNORE_INDEX`` on the prompt)."""
    prompt = tokenizer(render_prompt(tokenizer, example.messages, example.prefill),
                       add_special_tokens=False)["input_ids"]
    target = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    return Row([*prompt, *target, eos], [IGNORE_INDEX] * len(prompt) + [*target, eos], [])


def meta_negatives(prompt: list[int], generated: list[int], tokenizer: Any) -> tuple[list[Row], int]:
    """The negatives of one generated outline (the tokens after the ``"1."`` pre-fill): for each
    meta heading, the prompt and the outline up to the heading's first token, which is the one to
    make unlikely. Also returns how many headings the outline has."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    found = outline_headings(text)
    rows = []
    for first_char, heading in found:
        if not guards.is_meta_heading(heading):
            continue
        # The first token whose text reaches past the heading's first character holds it.
        for j in range(len(generated)):
            if len(tokenizer.decode(generated[: j + 1], skip_special_tokens=True)) > first_char:
                ids = [*prompt, *generated[: j + 1]]
                rows.append(Row(ids, [IGNORE_INDEX] * len(ids), [len(ids) - 1]))
                break
    return rows, len(found)


def outline_headings(text: str) -> list[tuple[int, str]]:
    """``(offset, heading)`` of each heading of a generated outline (the text after the ``"1."``
    pre-fill): its first line, and each later line that is a list item, numbered ("2.", "3)") or
    bulleted; empty headings left out. ``offset`` is where the heading's first character is."""
    first = text.partition("\n")[0]
    found = [(len(first) - len(first.lstrip()), first.strip())]
    found += [(item.body_start, item.body) for item in list_items(text) if item.line > 0]
    return [(offset, heading) for offset, heading in found if heading]


def outline_negatives(model: Any, tokenizer: Any, questions: Sequence[str], cfg: FinetuneConfig, device: str,
                      torch: Any, *, batch_size: int = 16) -> tuple[list[Row], dict[str, Any]]:
    """The model outlines ``questions`` greedily with the serving prompt; (the negatives of its
    meta headings, counts: outlines, headings, meta headings and their rate, examples)."""
    from pice_cloud.sketch import SKETCH_PREFILL, sketch_messages

    budget = cfg.data_prep
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[Row] = []
    headings = 0
    examples: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            prompts = [tokenizer(render_prompt(tokenizer, sketch_messages(q, max_points=budget.max_points,
                                                                           max_words=budget.max_words),
                                               SKETCH_PREFILL), add_special_tokens=False)["input_ids"]
                       for q in questions[start:start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=defaults.SKETCH_TOKENS,
                                     do_sample=False, use_cache=True, pad_token_id=pad)
            for prompt, row in zip(prompts, out[:, width:].tolist(), strict=True):
                generated = [t for t in row if t != pad]
                found, n = meta_negatives(prompt, generated, tokenizer)
                rows += found
                headings += n
                if found and len(examples) < 8:
                    examples.append(tokenizer.decode(generated, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return rows, {"outlines": len(questions), "headings": headings, "meta_headings": len(rows),
                  "meta_heading_rate": round(len(rows) / headings, 4) if headings else None,
                  "seconds": round(time.perf_counter() - started, 1), "examples": examples}


def _pad(rows: Sequence[Row], pad_id: int, torch: Any) -> dict[str, Any]:
    """Left-padded batch tensors, with the position ids counted from each row's first real token.

    Left padding (as the runtimes batch at serving) puts every row's target at the end, so the
    forward pass computes logits for the last ``keep`` positions only (`logits_to_keep`): the
    vocabulary projection of every prompt position (49k-wide on SmolLM2) is skipped.
    """
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    heads = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        offset = width - len(row.ids)
        ids[i, offset:] = torch.tensor(row.ids)
        labels[i, offset:] = torch.tensor(row.labels)
        mask[i, offset:] = 1
        heads[i, [offset + h for h in row.heads]] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # The first position scored, a target token or a negative, in any row.
    first_target = min(min([j for j, x in enumerate(row.labels) if x != IGNORE_INDEX][:1] + row.heads)
                       + width - len(row.ids) for row in rows)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels,
            "heads": heads, "keep": width - first_target + 1}


class Losses(NamedTuple):
    """Sums over one padded batch."""

    #: Cross-entropy of the target tokens.
    cross_entropy: Any
    #: Target tokens.
    tokens: int
    #: Sum of -log(1 - p) over the negatives' tokens (0 without negatives).
    unlikelihood: Any
    #: Sum of the negatives' probabilities (a float), and how many negatives.
    negative_probability: float
    negatives: int


def _token_loss_sum(model: Any, batch: dict[str, Any], torch: Any) -> Losses:
    """The batch's target-token cross-entropy and its negatives' unlikelihood."""
    keep = int(batch["keep"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep).logits
    # Logits at position p predict the token at p + 1: the last `keep` positions, less the final
    # one, predict the last `keep - 1` tokens, which hold every row's target.
    shifted = logits[:, :-1].float()
    targets = batch["labels"][:, -(keep - 1):]
    loss = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    heads = batch["heads"][:, -(keep - 1):]
    n_heads = int(heads.sum())
    if n_heads == 0:
        return Losses(loss, int((targets != IGNORE_INDEX).sum()), loss.new_zeros(()), 0.0, 0)
    tokens = batch["input_ids"][:, -(keep - 1):][heads]
    probs = torch.softmax(shifted[heads], dim=-1).gather(1, tokens[:, None]).squeeze(1)
    unlikely = -torch.log((1.0 - probs).clamp(min=1e-6)).sum()
    return Losses(loss, int((targets != IGNORE_INDEX).sum()), unlikely, float(probs.sum().detach()), n_heads)


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


class _Order:
    """Which examples make up each step: a seeded permutation per epoch (stable across resumes)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def batch(self, step: int, size: int) -> list[int]:
        out = []
        for pos in range(step * size, (step + 1) * size):
            epoch, offset = divmod(pos, self.n)
            if epoch not in self._perms:
                self._perms = {epoch: random.Random(self.seed * 1_000_003 + epoch).sample(range(self.n), self.n)}
            out.append(self._perms[epoch][offset])
        return out


def _fingerprint(cfg: FinetuneConfig, data_sha256: str) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (``steps`` may grow; output paths may move)."""
    return {"role": cfg.role, "base": cfg.base, "data_sha256": data_sha256, "seed": cfg.seed,
            "data_prep": cfg.data_prep.model_dump(mode="json"), "lora": cfg.lora.model_dump(mode="json"),
            "optim": cfg.optim.model_dump(mode="json")}


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*.pt"))


def _save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int, torch: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _CHECKPOINT.format(step=step)
    partial = path.with_suffix(".pt.partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write leaves a .partial, never a truncated checkpoint
    for old in _checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _resume_state(folder: Path, fingerprint: dict[str, Any], torch: Any) -> dict[str, Any] | None:
    found = _checkpoints(folder)
    if not found:
        log.warning("--resume: no checkpoint in %s; starting from step 0", folder)
        return None
    path = found[-1]
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FinetuneError(f"cannot read checkpoint {path} ({exc}); delete it to resume from the one before") \
            from exc
    saved = state.get("fingerprint", {})
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        raise FinetuneError(f"checkpoint {path} was made with a different {', '.join(differ)}; resume with the same "
                            f"settings, or start afresh without --resume (or with another --work-dir)")
    log.info("resuming from %s (step %d)", path, state["step"])
    return state


def _select_device(cfg: FinetuneConfig, torch: Any) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device 'cuda' was asked for but torch sees no CUDA device")
    return "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def _eval_loss(model: Any, rows: list[Row], micro: int, pad_id: int, device: str, torch: Any) -> float | None:
    if not rows:
        return None
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), micro):
            batch = _to(_pad(rows[start:start + micro], pad_id, torch), device)
            losses = _token_loss_sum(model, batch, torch)
            total += float(losses.cross_entropy)
            tokens += losses.tokens
    model.train(was_training)
    return round(total / max(tokens, 1), 4)


def prepare_for(cfg: FinetuneConfig) -> tuple[Prepared, Any]:
    """The role's examples measured with the base model's tokenizer (and the tokenizer)."""
    _torch, transformers, _peft = _imports()
    base_path = resolve(cfg.base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_path))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(messages: Sequence[ChatMessage], prefill: str) -> str:
        return render_prompt(tokenizer, messages, prefill)

    return prepare(cfg.data, cfg.role, cfg.data_prep, seed=cfg.seed, render=render, count=count), tokenizer


def finetune(cfg: FinetuneConfig, *, resume: bool = False, progress: bool = True,
             on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the LoRA adapter of ``cfg.role``, then (``cfg.store``) merge and install it.

    Args:
        cfg: the run's configuration.
        resume: continue from the newest checkpoint in the work folder.
        progress: show a progress bar (tqdm) with the loss on stderr.
        on_step: called with (step, loss) after every optimizer step.

    Raises:
        DataError: malformed training data (the message names the line), or no usable example.
        FinetuneError: missing libraries, an incompatible checkpoint, no LoRA target in the model.
        ModelError: the base model is missing, or the result cannot be installed.
    """
    torch, transformers, peft = _imports()
    started = time.perf_counter()
    name = cfg.model_name
    if cfg.store and installed_path(name) is not None and not cfg.replace:
        # Fail before an hour of training, not after.
        raise FinetuneError(f"model {name!r} is already installed; pass --replace to overwrite it or --name")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = _select_device(cfg, torch)
    base_path = resolve(cfg.base)

    prepared, tokenizer = prepare_for(cfg)
    log.info("data: %s", json.dumps(prepared.counts))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    eos = eos_id(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    train_rows = [encode(ex, tokenizer, eos) for ex in prepared.train]
    eval_pool = list(prepared.heldout)
    random.Random(cfg.seed).shuffle(eval_pool)
    eval_rows = [encode(ex, tokenizer, eos) for ex in eval_pool[: cfg.eval_examples]]

    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.lora.target_modules if t in present]
    if not targets:
        raise FinetuneError(f"none of lora.target_modules {cfg.lora.target_modules} is a module of {cfg.base}")
    model.config.use_cache = False  # no KV cache while training (it only costs memory)
    lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=targets, task_type="CAUSAL_LM", bias="none")
    with warnings.catch_warnings():
        # peft calls transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = peft.get_peft_model(model, lora).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    opt = cfg.optim
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opt.lr,
                                  weight_decay=opt.weight_decay)

    def schedule(step: int) -> float:
        # Linear warm-up, then linear decay to 10% of the peak rate at the last step.
        if step < opt.warmup_steps:
            return (step + 1) / (opt.warmup_steps + 1)
        span = max(1, cfg.steps - opt.warmup_steps)
        return max(0.1, 1.0 - 0.9 * (step - opt.warmup_steps) / span)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    fingerprint = _fingerprint(cfg, sha256_file(cfg.data))
    work = cfg.work_path
    losses: list[float] = []
    start_step = 0
    elapsed_before = 0.0
    eval_before = None
    negatives: list[Row] = []
    negatives_report: dict[str, Any] | None = None
    negatives_step = (int(cfg.steps * cfg.negatives_after)
                      if cfg.role == "sketcher" and cfg.negatives_after is not None else None)
    state = _resume_state(work, fingerprint, torch) if resume else None
    if not resume and _checkpoints(work):
        # A fresh run must not leave an earlier run's checkpoints for a later --resume to pick up.
        log.warning("starting afresh: removing %d checkpoint(s) of an earlier run in %s", len(_checkpoints(work)), work)
        for old in _checkpoints(work):
            old.unlink()
    if state is not None:
        peft.set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        losses = list(state["losses"])
        start_step = int(state["step"])
        elapsed_before = float(state.get("train_s", 0.0))
        eval_before = state.get("eval_loss_before")
        negatives = [Row(*row) for row in state.get("negatives", [])]
        negatives_report = state.get("negatives_report")
        meta_before = state.get("meta_before")
    else:
        eval_before = _eval_loss(model, eval_rows, opt.micro_batch_size, pad_id, device, torch)
        meta_before = (outline_negatives(model, tokenizer, prepared.heldout_questions, cfg, device, torch)[1]
                       if negatives_step is not None and prepared.heldout_questions else None)

    order = _Order(len(train_rows), cfg.seed)
    train_started = time.perf_counter()

    def checkpoint(step: int) -> Path:
        return _save_checkpoint(work, step, {
            "step": step, "fingerprint": fingerprint, "adapter": peft.get_peft_model_state_dict(model),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(), "losses": losses,
            "train_s": elapsed_before + time.perf_counter() - train_started, "eval_loss_before": eval_before,
            "negatives": [list(row) for row in negatives], "negatives_report": negatives_report,
            "meta_before": meta_before,
        }, cfg.keep_checkpoints, torch)

    bar = None
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"finetune {cfg.role}", unit="step", dynamic_ncols=True)
    model.train()
    step = start_step
    try:
        while step < cfg.steps:
            indices = order.batch(step, opt.batch_size)
            rows = [train_rows[i] for i in indices]
            if step == negatives_step and negatives_report is None:
                questions = list(prepared.questions)
                if cfg.negatives_outlines is not None and len(questions) > cfg.negatives_outlines:
                    questions = random.Random(cfg.seed).sample(questions, cfg.negatives_outlines)
                negatives, negatives_report = outline_negatives(model, tokenizer, questions, cfg, device, torch)
                negatives_report["at_step"] = step
                log.info("negatives at step %d: %d meta headings in %d outlines", step, len(negatives),
                         len(questions))
            if negatives:
                # A seeded, step-determined choice: a resumed run adds the same ones.
                pick = random.Random(cfg.seed * 1_000_003 + step).sample(
                    range(len(negatives)), min(cfg.negatives_per_step, len(negatives)))
                rows += [negatives[i] for i in pick]
            tokens = sum(sum(1 for x in row.labels[1:] if x != IGNORE_INDEX) for row in rows)
            heads = sum(len(row.heads) for row in rows)
            step_loss = 0.0
            for start in range(0, len(rows), opt.micro_batch_size):
                batch = _to(_pad(rows[start:start + opt.micro_batch_size], pad_id, torch), device)
                part = _token_loss_sum(model, batch, torch)
                # Means over the whole step, whatever the micro-batching: cross-entropy per target
                # token, unlikelihood per negative. The loss curve is the cross-entropy alone.
                loss = part.cross_entropy / max(tokens, 1)
                if part.negatives:
                    loss = loss + cfg.negative_weight * part.unlikelihood / heads
                loss.backward()
                step_loss += part.cross_entropy.item() / max(tokens, 1)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], opt.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(step_loss, 4))
            if not math.isfinite(step_loss):
                raise FinetuneError(f"the loss became {step_loss} at step {step}; lower optim.lr")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if on_step is not None:
                on_step(step, step_loss)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step)
    except KeyboardInterrupt:
        if step > start_step:
            path = checkpoint(step)
            print(f"\ninterrupted at step {step}; checkpoint {path}; continue with --resume", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    train_s = elapsed_before + time.perf_counter() - train_started
    eval_after = _eval_loss(model, eval_rows, opt.micro_batch_size, pad_id, device, torch)
    meta_after = (outline_negatives(model, tokenizer, prepared.heldout_questions, cfg, device, torch)[1]
                  if meta_before is not None else None)

    model_path = None
    merge_s = 0.0
    if cfg.store:
        from pice_cloud.finetune.merge import merge_and_install

        merge_started = time.perf_counter()
        model_path = merge_and_install(model, tokenizer, cfg, work, meta={
            "source": f"pice-cloud finetune --role {cfg.role} (base {cfg.base})", "base": cfg.base,
            "role": cfg.role, "training_data": str(cfg.data), "training_data_sha256": fingerprint["data_sha256"],
            "steps": cfg.steps, "lora": cfg.lora.model_dump(mode="json"), "data_note": DATA_NOTE,
        })
        merge_s = time.perf_counter() - merge_started

    report: dict[str, Any] = {
        "role": cfg.role, "base": cfg.base, "model": name if cfg.store else None,
        "model_path": str(model_path) if model_path else None, "data": str(cfg.data), "data_note": DATA_NOTE,
        "data_counts": prepared.counts,
        "samples": [ex.as_json() for ex in prepared.train[:2]],
        "steps": cfg.steps, "batch_size": opt.batch_size, "examples_seen": cfg.steps * opt.batch_size,
        "epochs": round(cfg.steps * opt.batch_size / len(train_rows), 2),
        "loss_curve": losses, "loss_first10_mean": _mean(losses[:10]), "loss_last10_mean": _mean(losses[-10:]),
        "heldout_loss_before": eval_before, "heldout_loss_after": eval_after, "heldout_examples": len(eval_rows),
        # The model's own outlines: its meta headings that became negatives, and the meta-heading
        # rate of its outlines of the held-out instructions before and after training.
        "negatives": negatives_report,
        "heldout_outlines_before": _counts_only(meta_before), "heldout_outlines_after": _counts_only(meta_after),
        "trainable_parameters": trainable, "total_parameters": total_params,
        "train_s": round(train_s, 1), "merge_install_s": round(merge_s, 1),
        "wall_s": round(time.perf_counter() - started + elapsed_before, 1),
        "resumed_from_step": start_step if resume else None,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
        "device": device, "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "config": cfg.model_dump(mode="json"),
    }
    report_path = cfg.report_path
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    plot_loss(report, report_path.with_suffix(".png"))
    return TrainResult(report, report_path, model_path)


def _counts_only(report: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if report is None else {k: v for k, v in report.items() if k != "examples"}


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def plot_loss(report: dict[str, Any], path: Path) -> Path | None:
    """The loss curve (per step and a moving average) with the held-out loss before and after."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss plot (pip install matplotlib)")
        return None
    losses = report["loss_curve"]
    steps = list(range(1, len(losses) + 1))
    window = max(1, len(losses) // 8)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="#9bb7d4", linewidth=1, label="training loss (step)")
    ax.plot(steps, smooth, color="#1f4e79", linewidth=2, label=f"moving average ({window} steps)")
    for key, style, label in (("heldout_loss_before", ":", "held-out, before"),
                              ("heldout_loss_after", "--", "held-out, after")):
        if report.get(key) is not None:
            ax.axhline(report[key], color="#c0504d", linestyle=style, label=f"{label}: {report[key]:.3f}")
    negatives = report.get("negatives") or {}
    if negatives.get("at_step") is not None:
        ax.axvline(negatives["at_step"] + 0.5, color="#7f7f7f", linestyle="-.",
                   label=f"{negatives['meta_headings']} own meta headings as negatives from here")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("target-token cross-entropy")
    ax.set_title(f"LoRA {report['role']} on {report['base']} ({report['train_s']:.0f} s, {report['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
