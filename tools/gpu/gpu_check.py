"""The GPU check behind ``tools/gpu_check.sh``: one command on an air-gapped CUDA box.

It builds a SmolLM2-135M-shaped model with random weights (same shapes, same cost per token as
the real one, nothing to download), runs the ``cuda``-marked tests (the cloud's embedded backend
and the edge's transformers runtime on CUDA: batching, streaming, memory budget), measures decode
throughput at batch 1, 4 and 16 for the cloud's embedded backend (continuous batching,
`pice_cloud.llm.transformers.TransformersBackend`) and the edge's transformers runtime
(`pice_edge.runtimes.transformers.TransformersRuntime.generate`), writes one JSON
(``tools/results/gpu_check.json``) and prints a table. Without CUDA it says so and exits 0.

What it needs travels with the checkout: torch with CUDA and transformers come with the box; the
project's other dependencies (pydantic, paho-mqtt, fastapi, pytest ...) are copied from this
machine's environment by ``--prepare`` into ``build/gpu-site`` (a few tens of MB, ignored by git;
carry it along), which is put first on the module path without shadowing the box's torch stack.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "build" / "gpu-site"
OUT = ROOT / "tools" / "results" / "gpu_check.json"
BATCHES = (1, 4, 16)
#: The whole check must end within this many seconds (the issue's budget: under 8 minutes).
BUDGET_S = 480
#: The steps, each with the seconds it may take (their sum stays under BUDGET_S).
PLAN: tuple[tuple[str, int], ...] = (
    ("preflight: CUDA device, torch, transformers, the project's modules", 15),
    ("build a SmolLM2-135M-shaped model with random weights (fp32 safetensors, ~540 MB, in a temp dir)", 60),
    ("pytest -m cuda tests/contracts/test_cuda_paths.py (cloud backend, edge runtime on CUDA)", 150),
    ("decode tok/s, cloud embedded backend (continuous batching), batch 1/4/16", 100),
    ("decode tok/s, edge transformers runtime (generate), batch 1/4/16", 100),
    ("write tools/results/gpu_check.json and print the table", 5),
)
#: Distributions the GPU box brings (torch's and transformers' stacks): never copied, never shadowed.
BOX_PROVIDED = frozenset({
    "torch", "triton", "numpy", "scipy", "sympy", "mpmath", "networkx", "fsspec", "pillow", "jinja2", "markupsafe",
    "transformers", "tokenizers", "huggingface-hub", "hf-xet", "safetensors", "accelerate",
    "kernels", "regex", "filelock", "tqdm", "packaging", "pyyaml", "protobuf", "requests", "urllib3", "certifi",
    "setuptools", "pip", "wheel", "pice", "onnxruntime", "onnxruntime-gpu", "onnx", "gguf",
})
QUESTIONS = ("Why do leaves change colour in autumn?", "How do bees make honey?", "What causes the tides?",
             "Why is the sea salty?", "How does a refrigerator keep food cold?", "What is a black hole?",
             "Why do we dream?", "How do vaccines work?")


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- preparing what travels ---------------------------------------------------------------


def needed_distributions() -> list[str]:
    """The distributions the check imports (tests included), less those the box brings."""
    sys.path.insert(0, str(ROOT))
    before = set(sys.modules)
    import pytest_asyncio  # noqa: F401  # pytest plugins named by pyproject.toml
    import pytest_timeout  # noqa: F401

    import pice_cloud.llm.transformers  # noqa: F401
    import pice_edge.runtimes.transformers  # noqa: F401
    import tests.conftest  # noqa: F401  # everything the test suite's fixtures import

    top = {name.split(".")[0] for name in set(sys.modules) - before}
    owners = metadata.packages_distributions()
    dists = {d for name in top for d in owners.get(name, ())}
    dists |= {"pytest", "pluggy", "iniconfig", "pygments", "pytest-asyncio", "pytest-timeout"}
    keep: dict[str, str] = {}
    for dist in sorted(dists, key=str.lower):
        key = dist.lower().replace("_", "-")
        if key in BOX_PROVIDED or key.startswith("nvidia"):
            continue
        keep.setdefault(key, dist)
    return list(keep.values())


def prepare() -> int:
    """Copy the project's non-torch dependencies from this environment into ``build/gpu-site``."""
    if any(Path(p or ".").resolve() == SITE for p in sys.path):
        log(f"{SITE} is on the module path: run --prepare without it (tools/gpu_check.sh --prepare does)")
        return 2
    if SITE.exists():
        shutil.rmtree(SITE)
    SITE.mkdir(parents=True)
    copied = 0
    names = needed_distributions()
    for name in names:
        dist = metadata.distribution(name)
        base = Path(str(dist.locate_file("")))
        for file in dist.files or ():
            parts = Path(str(file)).parts
            if "__pycache__" in parts or parts[0] == ".." or str(file).endswith(".pyc"):
                continue
            source = base / file
            if not source.is_file():
                continue
            target = SITE / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied += source.stat().st_size
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    (SITE / "PREPARED.json").write_text(json.dumps({"python": tag, "platform": platform.machine(),
                                                    "distributions": names}, indent=1) + "\n")
    log(f"copied {len(names)} distributions ({copied / 2**20:.1f} MiB) into {SITE.relative_to(ROOT)} for {tag} "
        f"{platform.machine()}; compiled ones (pydantic_core) need the same Python on the GPU box")
    if copied > 48 * 2**20:
        log("warning: over 48 MiB; the device machine takes 64 MiB of carried files in all")
    return 0


# --- the check ------------------------------------------------------------------------------


def plan_text() -> str:
    lines = [f"tools/gpu_check.sh: the plan ({sum(s for _, s in PLAN)} s of step budgets, {BUDGET_S} s at most):"]
    lines += [f"  {i}. {what} -- up to {seconds} s" for i, (what, seconds) in enumerate(PLAN, 1)]
    lines.append(f"  batches {', '.join(map(str, BATCHES))}; output {OUT.relative_to(ROOT)}")
    prepared = SITE / "PREPARED.json"
    lines.append(f"  dependencies: {SITE.relative_to(ROOT)} "
                 + (f"prepared ({json.loads(prepared.read_text())['python']})" if prepared.is_file()
                    else "not prepared (tools/gpu_check.sh --prepare on a machine with the project's venv)"))
    return "\n".join(lines)


def cuda_device() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable here ({exc})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


def build_model(where: Path) -> Path:
    """A SmolLM2-135M-shaped random model whose generation config is SmolLM2's (no repetition
    control of its own) but never ends early, so every generation decodes its full budget."""
    from pice_edge.model_store import build_random_model

    path = build_random_model(where / "smollm2-135m-random", preset="smollm2-135m")
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    for key in ("repetition_penalty", "no_repeat_ngram_size"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=1) + "\n")
    return path


def run_cuda_tests(timeout_s: int) -> dict[str, Any]:
    code = ("import sys, pytest; sys.exit(pytest.main(['-m', 'cuda', 'tests/contracts/test_cuda_paths.py', '-q', "
            "'-p', 'no:cacheprovider', '-rs']))")
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(), capture_output=True,
                              text=True, timeout=timeout_s, check=False)
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, output = 124, f"timed out after {timeout_s} s\n{exc.stdout or ''}"
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    print(output[-3000:], flush=True)
    return {"returncode": rc, "summary": tail, "seconds": round(time.perf_counter() - started, 1)}


async def cloud_throughput(model: Path, dtype: str, tokens: int) -> list[dict[str, Any]]:
    from pice_cloud.llm.base import ChatRequest
    from pice_cloud.llm.transformers import TransformersBackend
    from pice_edge.runtimes.base import ChatMessage

    llm = TransformersBackend(model, device="cuda", dtype=dtype, max_batch=max(BATCHES))
    rows = []
    try:
        await llm.complete([ChatRequest([ChatMessage("user", QUESTIONS[0])], max_tokens=8)])  # warm-up
        for batch in BATCHES:
            requests = [ChatRequest([ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])], max_tokens=tokens)
                        for i in range(batch)]
            started = time.perf_counter()
            done = await asyncio.gather(*(llm.complete([r]) for r in requests))
            seconds = time.perf_counter() - started
            made = sum(d[0].tokens for d in done)
            rows.append({"path": "cloud embedded backend (transformers, continuous batching)", "batch": batch,
                         "tokens": made, "seconds": round(seconds, 3), "tokens_per_s": round(made / seconds, 1)})
            log(f"cloud batch {batch}: {made} tokens in {seconds:.2f} s")
    finally:
        await llm.close()
    return rows


def edge_throughput(model: Path, dtype: str, tokens: int) -> list[dict[str, Any]]:
    from pice_edge.prompts import EXPANSION_REPETITION_PENALTY
    from pice_edge.runtimes.base import ChatMessage, GenerationRequest
    from pice_edge.runtimes.transformers import TransformersRuntime

    runtime = TransformersRuntime(model, device="cuda", dtype=dtype)
    rows = []
    try:
        prompts = [runtime.format_chat([ChatMessage("user", q)]) for q in QUESTIONS]
        runtime.generate([GenerationRequest(prompts[0], max_new_tokens=8)])  # warm-up
        for batch in BATCHES:
            # What an edge sends: greedy, the profiles' repetition penalty, no n-gram blocking.
            requests = [GenerationRequest(prompts[i % len(prompts)], max_new_tokens=tokens,
                                          repetition_penalty=EXPANSION_REPETITION_PENALTY, no_repeat_ngram_size=0)
                        for i in range(batch)]
            started = time.perf_counter()
            results = runtime.generate(requests)
            seconds = time.perf_counter() - started
            made = sum(r.token_count for r in results)
            rows.append({"path": "edge transformers runtime (generate)", "batch": batch, "tokens": made,
                         "seconds": round(seconds, 3), "tokens_per_s": round(made / seconds, 1)})
            log(f"edge batch {batch}: {made} tokens in {seconds:.2f} s")
    finally:
        runtime.close()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'path':<60} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8}"]
    lines += [f"{r['path']:<60} {r['batch']:>5} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.1f}"
              for r in rows]
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ok, device = cuda_device()
    if not ok:
        print(f"tools/gpu_check.sh: {device}.\n"
              "This check measures the CUDA paths (cloud embedded backend, edge transformers runtime) and runs the "
              "cuda-marked tests; it needs an NVIDIA GPU with CUDA-enabled torch. Nothing was measured and "
              f"{OUT.relative_to(ROOT)} was left as it is. On a GPU box: tools/gpu_check.sh "
              "(tools/gpu_check.sh --dry-run prints the plan).", flush=True)
        return 0
    import torch
    import transformers

    log(f"device {device}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers "
        f"{transformers.__version__}; python {platform.python_version()}")
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "device": device, "gpus": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "model": "random weights, SmolLM2-135M shapes (preset smollm2-135m)",
        "dtype": args.dtype, "new_tokens": args.tokens, "prompt": "one short question, chat template applied",
    }
    with tempfile.TemporaryDirectory(prefix="pice-gpu-check-") as tmp:
        t0 = time.perf_counter()
        model = build_model(Path(tmp))
        report["model_build_s"] = round(time.perf_counter() - t0, 1)
        log(f"model built in {report['model_build_s']} s")
        report["cuda_tests"] = run_cuda_tests(timeout_s=PLAN[2][1])
        rows = asyncio.run(cloud_throughput(model, args.dtype, args.tokens))
        rows += edge_throughput(model, args.dtype, args.tokens)
    report["decode"] = rows
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows), flush=True)
    log(f"tests: {report['cuda_tests']['summary']} (rc {report['cuda_tests']['returncode']}); wrote {args.out} "
        f"in {report['total_s']} s")
    return 0 if report["cuda_tests"]["returncode"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its time budget, run nothing")
    parser.add_argument("--prepare", action="store_true",
                        help="copy the project's non-torch dependencies into build/gpu-site (on this machine)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per sequence (default 128)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare()
    if args.dry_run:
        print(plan_text())
        ok, device = cuda_device()
        print(f"  device here: {device}" + ("" if ok else " -- the check would explain itself and exit 0"))
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
