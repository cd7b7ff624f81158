#!/usr/bin/env python3
"""Export a Hugging Face model folder to ONNX for the onnxruntime edge runtime, optionally
quantized (int8 dynamic, int4 MatMulNBits), and check the export against transformers.

    python tools/export_onnx.py --model smollm2-135m-instruct --precision fp32 int8 int4 --check 20

The files land in ``<model folder>/onnx/`` (``model-fp32.onnx``, ``model-int8.onnx``,
``model-int4.onnx`` plus the tokenizer and configs), where ``OnnxRuntime`` looks for them.
``--check N`` generates greedily for N expansion prompts (Vicuna-bench questions) with both the
transformers and the onnxruntime fp32 runtimes and reports token agreement. Why this exporter and
not optimum's or onnxruntime-genai's: see ``pice_edge/runtimes/onnx_export.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FALLBACK_QUESTIONS = [
    "How can I improve my time management skills?", "What are the benefits of regular exercise?",
    "How do vaccines work?", "What makes a good leader?", "How can cities reduce traffic congestion?",
]


def expansion_prompts(runtime: object, count: int) -> list[str]:
    """``count`` expansion prompts: Vicuna-bench questions with a generic three-point outline."""
    from vicuna import VICUNA, read_vicuna

    from pice_edge import expansion_messages

    questions = [q["question"] for q in read_vicuna()] if (VICUNA / "question.jsonl").is_file() \
        else FALLBACK_QUESTIONS
    sketch = ["Main idea", "Practical steps", "Common pitfalls"]
    prompts = []
    for i in range(count):
        question = questions[i % len(questions)]
        prompts.append(runtime.format_chat(expansion_messages(question, sketch, i % 3)))  # type: ignore[attr-defined]
    return prompts


def check_agreement(model: str, count: int, tokens: int) -> dict[str, float]:
    """Greedy token agreement between the transformers and onnxruntime (fp32) runtimes."""
    from pice_edge import GenerationRequest, create_runtime

    hf = create_runtime("transformers", model=model)
    ort = create_runtime("onnxruntime", model=model)
    prompts = expansion_prompts(hf, count)
    assert prompts == expansion_prompts(ort, count), "chat templates render differently"
    requests = [GenerationRequest(prompt=p, max_new_tokens=tokens) for p in prompts]
    a, b = [], []
    for start in range(0, len(requests), 4):
        a += hf.generate(requests[start:start + 4])
        b += ort.generate(requests[start:start + 4])
    hf_tok = hf.tokenizer  # type: ignore[attr-defined]
    same_tokens = total = identical = 0
    for x, y in zip(a, b, strict=True):
        ids_x = hf_tok(x.text, add_special_tokens=False)["input_ids"]
        ids_y = hf_tok(y.text, add_special_tokens=False)["input_ids"]
        # Agreement = shared prefix; one flipped near-tie changes every token after it.
        prefix = 0
        for tx, ty in zip(ids_x, ids_y, strict=False):
            if tx != ty:
                break
            prefix += 1
        same_tokens += prefix
        total += max(len(ids_x), len(ids_y), 1)
        identical += x.text == y.text
    return {"prompts": count, "identical_outputs": identical, "token_agreement": round(same_tokens / total, 4),
            "max_logprob_diff": round(max(abs(x.mean_logprob - y.mean_logprob) for x, y in zip(a, b, strict=True)), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or Hugging Face folder")
    parser.add_argument("--out", type=Path, help="output folder (default: <model folder>/onnx)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "int8", "int4"])
    parser.add_argument("--check", type=int, default=0, metavar="N", help="greedy agreement check on N prompts")
    parser.add_argument("--check-tokens", type=int, default=48)
    parser.add_argument("--skip-export", action="store_true", help="only run --check on an existing export")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The quantizers log every node they visit.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)

    from pice_edge import resolve_model
    from pice_edge.runtimes import export_onnx

    if not args.skip_export:
        started = time.perf_counter()
        paths = export_onnx(resolve_model(args.model), args.out, precisions=tuple(args.precision))
        for precision, path in paths.items():
            print(f"{precision}: {path} ({path.stat().st_size / 1e6:.0f} MB)")
        print(f"export took {time.perf_counter() - started:.1f}s")
    if args.check:
        print(json.dumps(check_agreement(args.model, args.check, args.check_tokens), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
