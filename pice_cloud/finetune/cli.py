"""``pice-cloud finetune``: train a LoRA expander (edge) or sketcher (cloud) and install it as a model.

    pice-cloud finetune --role expander --data answers.jsonl [--config finetune.yaml] [--base NAME|DIR]
                        [--name NAME] [--steps N] [--resume] [--prepare-only] ...

Flags override the ``--config`` file; see `pice_cloud.finetune.config` for every field.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pice_cloud.finetune.config import FinetuneConfig, load_finetune_config

# flag dest -> path of the config field it sets
_FIELDS: dict[str, tuple[str, ...]] = {
    "role": ("role",), "data": ("data",), "base": ("base",), "name": ("name",), "steps": ("steps",),
    "seed": ("seed",), "device": ("device",), "threads": ("threads",), "work_dir": ("work_dir",),
    "report_dir": ("report_dir",), "checkpoint_every": ("checkpoint_every",), "replace": ("replace",),
    "store": ("store",), "max_examples": ("data_prep", "max_examples"), "max_seq_len": ("data_prep", "max_seq_len"),
    "holdout_fraction": ("data_prep", "holdout_fraction"), "skip_bad_lines": ("data_prep", "skip_bad_lines"),
    "lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"), "lr": ("optim", "lr"),
    "batch_size": ("optim", "batch_size"), "micro_batch_size": ("optim", "micro_batch_size"),
}


def add_parser(subparsers: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Register ``finetune`` on the ``pice-cloud`` sub-command parser."""
    p = subparsers.add_parser(
        "finetune", parents=common_parents,
        help="train a LoRA expander (edge SLM) or sketcher (cloud LLM) and install it in the model store",
        description="Train a LoRA adapter on {\"instruction\", \"output\"} JSONL with the serving prompts, "
                    "merge it and install the result in the model store as a new model. Flags override --config.")
    p.add_argument("--role", choices=("expander", "sketcher"), default=None,
                   help="expander: question + outline + point -> expansion (edges); "
                        "sketcher: question -> outline (a small or self-hosted cloud model)")
    p.add_argument("--data", default=None, help="JSONL with one {\"instruction\", \"output\"} object per line")
    p.add_argument("--config", default=None, help="YAML file with the run's settings (flags override it)")
    p.add_argument("--base", default=None, help="base model: a store name or a Hugging Face folder "
                                                "(default smollm2-135m-instruct)")
    p.add_argument("--name", default=None, help="the new model's store name (default <base>-pice-<role>)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the work folder")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step (default 8)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="examples per forward pass; gradients accumulate up to --batch-size (default 4)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 32)")
    p.add_argument("--max-examples", type=int, default=None, help="subsample the training examples")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + target in tokens (default 320)")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="share of instructions kept out of training for evaluation (default 0.1)")
    p.add_argument("--skip-bad-lines", action="store_true", default=None,
                   help="count malformed data lines and go on instead of stopping at the first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default auto (CUDA when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--work-dir", default=None, help="checkpoints (default ~/.cache/pice/finetune/<name>)")
    p.add_argument("--report-dir", default=None,
                   help="where finetune_<role>.json and .png are written (default: the work folder)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 10)")
    p.add_argument("--replace", action="store_true", default=None, help="overwrite an installed model of that name")
    p.add_argument("--no-store", dest="store", action="store_false", default=None,
                   help="train and report only; do not merge and install the model")
    p.add_argument("--prepare-only", action="store_true",
                   help="prepare the data and print its counts (and two examples); train nothing")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, nested like the config file."""
    out: dict[str, Any] = {}
    for dest, path in _FIELDS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The effective configuration of ``args`` (config file + flags)."""
    return load_finetune_config(args.config, overrides(args))


def run(args: argparse.Namespace) -> int:
    """Run ``pice-cloud finetune``; errors are `PiceError` subclasses for the caller to report."""
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.prepare_only:
        from pice_cloud.finetune.train import prepare_for, render_prompt

        prepared, tokenizer = prepare_for(cfg)
        print(json.dumps(prepared.counts, indent=2))
        for example in prepared.train[:2]:
            print(f"\n--- line {example.line} ---\n{render_prompt(tokenizer, example.messages, example.prefill)}"
                  f"{example.target}")
        return 0
    from pice_cloud.finetune.train import finetune

    result = finetune(cfg, resume=args.resume, progress=not args.no_progress)
    r = result.report
    print(f"{cfg.role}: {r['data_counts']['train_examples_used']} training examples, {r['steps']} steps in "
          f"{r['train_s']:.0f} s; loss {r['loss_first10_mean']} -> {r['loss_last10_mean']}, held-out "
          f"{r['heldout_loss_before']} -> {r['heldout_loss_after']}; peak memory {r['peak_rss_mb']:.0f} MB",
          file=sys.stderr)
    negatives, before, after = r.get("negatives"), r.get("heldout_outlines_before"), r.get("heldout_outlines_after")
    if negatives:
        print(f"negatives: {negatives['meta_headings']} meta headings in {negatives['outlines']} outlines of its own "
              f"(from step {negatives['at_step']}, {negatives['seconds']:.0f} s)", file=sys.stderr)
    if before and after:
        print(f"meta headings in its outlines of the {before['outlines']} held-out instructions: "
              f"{before['meta_heading_rate']} -> {after['meta_heading_rate']}", file=sys.stderr)
    print(f"report: {result.report_path}", file=sys.stderr)
    if result.model_path is not None:
        print(f"model {cfg.model_name} installed in {result.model_path}")
    return 0
