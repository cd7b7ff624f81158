"""Smoke runs of the tools in tools/ that no other test runs, so that none of them rots.

Each tool runs as users run it (a subprocess of this interpreter, from the checkout) on a tiny
random model, a few questions and tiny budgets, and writes its JSON into the test's folder; the
test then checks what came out (counts equal to what was asked, values in range), not only the
exit status. Tiny stand-ins make the runs fast and independent of the machine:

- the data: a small folder in the shared data's formats (``vicuna_bench``, ``alpaca_eval``,
  ``sot_router``), given to the tools with ``PICE_DATA_DIR``;
- the sentence embedder: a random one-layer BERT with all-MiniLM-L6-v2's width (384, so the
  shipped router weights apply to it) stored as ``all-minilm-l6-v2`` in a model store of its
  own (``PICE_MODELS_DIR``); no real model is read, nothing is downloaded;
- servers, brokers and edges: real, on loopback ports.

Tools tested elsewhere: ``load_test.py`` (tests/test_load.py), ``simulate.py``'s model
(tests/test_simulate.py; its command line here), ``fit_ensemble.py fit``'s feature layout
(tests/test_ensemble.py; both commands here), ``bench.py --quick`` (.ci/run, after the suite).
``vicuna.py`` is the data helper every tool here reads through.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pice_cloud.broker import mosquitto_executable
from pice_cloud.router import cloud_only_reason, is_held_out
from pice_edge.model_store import EMBEDDING_MODEL, MANIFEST, build_random_model

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"

#: The small configuration of every `pice-cloud serve` a tool starts (the environment reaches it):
#: the tiny model writes gibberish the guards would refuse every time, so they are off here.
SERVE_ENV = {
    "PICE_DISCOVERY__ENABLED": "false", "PICE_LLM__THREADS": "1", "PICE_EDGES__THREADS": "1",
    "PICE_SERVICE__SKETCH_GUARD": "false", "PICE_SERVICE__EXPANSION_GUARD": "false",
    "PICE_SERVICE__MAX_POINTS": "3", "PICE_SERVICE__TOKENS_PER_POINT": "8", "PICE_SERVICE__SKETCH_TOKENS": "30",
    "PICE_SERVICE__MAX_ANSWER_TOKENS": "24",
}


# --- a small data folder in the shared data's formats -------------------------------------------

#: (id, category, question, headings of its reference answer)
VICUNA = [
    (1, "generic", "How can I improve my time management skills?",
     ["Set clear goals", "Prioritize your tasks", "Use a calendar"]),
    (2, "generic", "What are the most effective ways to deal with stress?",
     ["Exercise regularly", "Sleep enough", "Talk to friends", "Practice slow breathing"]),
    (3, "coding", "Write a Python function that reverses a string.", []),
    (4, "knowledge", "What are the main benefits of regular exercise?",
     ["A stronger heart", "Better mood", "Deeper sleep"]),
    (5, "math", "What is 17 times 23?", []),
    (6, "writing", "Write a short note inviting a friend to a picnic.",
     ["Say hello warmly", "Give the time and place", "Ask them to bring a dish"]),
    (7, "common-sense", "How can you tell if a restaurant is popular with locals?",
     ["Look at the crowd", "Check the menu language", "Ask people nearby"]),
    (8, "fermi", "How many times does the average human blink in a lifetime?",
     ["Blinks per minute", "Waking hours per day", "Years in a lifetime"]),
]

#: alpaca_eval instructions: (instruction, headings); no headings = a prose answer.
ALPACA = [
    ("How do I keep houseplants alive?", ["Water on a schedule", "Give them light", "Repot in spring"]),
    ("What should I pack for a weekend hike?", ["Enough water", "A warm layer", "A simple map", "Snacks"]),
    ("Give me tips for learning a new language.", ["Practice every day", "Speak with natives", "Read simple books"]),
    ("How can I save money on groceries?", ["Plan weekly meals", "Buy in bulk", "Compare unit prices"]),
    ("What is the capital of France?", []),
    ("How do I prepare for a job interview?", ["Research the company", "Practice common questions",
                                               "Prepare your own questions"]),
    ("How can I sleep better at night?", ["Keep a fixed bedtime", "Avoid late screens", "Keep the room cool"]),
    ("Explain how to start running as a beginner.", ["Buy good shoes", "Start with short runs", "Rest between runs"]),
    ("Who wrote Pride and Prejudice?", []),
    ("How do I make my home office more comfortable?", ["Choose a good chair", "Add a desk lamp",
                                                         "Keep cables tidy"]),
    ("What are good habits for healthy teeth?", ["Brush twice daily", "Floss every evening", "See a dentist"]),
    ("How can I be more productive in the morning?", ["Wake up early", "Eat a real breakfast", "Start with one task",
                                                      "Skip the news"]),
    ("Translate 'good morning' into Spanish.", []),
    ("How do I organise a small birthday party?", ["Set a budget", "Invite close friends", "Plan simple games"]),
]


def _item_text(heading: str, question: str) -> str:
    topic = question.rstrip("?.").split()[-1].lower()
    return (f"{heading} keeps your {topic} routine steady and easy to follow over many weeks. "
            f"Start with one small change, note how it works, and adjust it before adding another.")


def _list_answer(question: str, headings: list[str]) -> str:
    if not headings:
        return f"The short answer to '{question}' fits in one plain sentence without any list."
    items = [f"{n}. **{h}:** {_item_text(h, question)}" for n, h in enumerate(headings, 1)]
    return "Here are a few ideas that help.\n\n" + "\n\n".join(items) + "\n\nPick the ones that suit you."


def write_data(root: Path) -> Path:
    """The data folder the tools read through ``PICE_DATA_DIR`` (tools/vicuna.py)."""
    vicuna = root / "vicuna_bench"
    vicuna.mkdir(parents=True)
    (vicuna / "question.jsonl").write_text("".join(
        json.dumps({"question_id": i, "category": c, "turns": [q]}) + "\n" for i, c, q, _ in VICUNA))
    (vicuna / "model_answer_gpt-4o.jsonl").write_text("".join(
        json.dumps({"question_id": i, "model_id": "gpt-4o", "choices": [{"index": 0, "turns": [_list_answer(q, h)]}]})
        + "\n" for i, _, q, h in VICUNA))
    alpaca = root / "alpaca_eval"
    alpaca.mkdir()
    (alpaca / "gpt-4-turbo.jsonl").write_text("".join(
        json.dumps({"id": n, "dataset": "helpful_base" if n % 2 else "koala", "instruction": q,
                    "output": _list_answer(q, h)}) + "\n" for n, (q, h) in enumerate(ALPACA)))
    sot = root / "sot_router"
    sot.mkdir()
    suits = [f"{q} Please give {n} ideas." for n in range(1, 4) for q, h in ALPACA if h]
    not_suits = [f"What is {a} plus {b}?" for a in range(3, 9) for b in (4, 7, 11, 20)]
    for name, rows in (("lima", [(1, q) for q in suits] + [(0, q) for q in not_suits]),
                       ("vicuna", [(1 if h else 0, q) for _, _, q, h in VICUNA]),
                       ("wizardlm", [(1, "How should I train a puppy?"), (0, "What is 2 to the power of 10?"),
                                     (1, "How can I write better emails?"), (0, "Sort the list 3, 1, 2.")])):
        with (sot / f"{name}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh, delimiter=";")
            writer.writerow(["label", "request"])
            writer.writerows(rows)
    return root


def list_outlines() -> list[tuple[str, list[str]]]:
    """The alpaca_eval answers that are lists of 3+ bold headings (guard_calibration's outlines)."""
    return [(q, h) for q, h in ALPACA if len(h) >= 3]


# --- a tiny stand-in for all-MiniLM-L6-v2 -------------------------------------------------------

def build_tiny_embedder(folder: Path) -> Path:
    """A random one-layer BERT, 384 wide like all-MiniLM-L6-v2, with a character-level WordPiece
    vocabulary, and the manifest of a fetched model (`pice_edge.model_store.resolve` checks it)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
             *string.punctuation, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=512))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size,
                                          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"files": files, "source": "tests: random stand-in"}))
    return folder


# --- running a tool -----------------------------------------------------------------------------

@dataclass
class World:
    data: Path
    models: Path
    embedder: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("tools-world")
    data = write_data(root / "data")
    models = root / "models"
    embedder = build_tiny_embedder(models / EMBEDDING_MODEL)
    env = {**os.environ, "PICE_DATA_DIR": str(data), "PICE_MODELS_DIR": str(models), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    return World(data, models, embedder, env)


def run_tool(world: World, tool: str, *args: object, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python tools/TOOL ARGS`` from the checkout; fails the test unless it exits 0."""
    cmd = [sys.executable, str(TOOLS / tool), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT,
                          env={**world.env, **(env or {})})
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def cosine_like(value: Any) -> bool:
    return finite(value) and -1.0001 <= value <= 1.0001


# --- the shared data, as the tools' helper reads it ----------------------------------------------

#: Where the tools look for the data by default (tools/vicuna.py): the tests here use their own.
SHARED_DATA = Path(os.environ.get("PICE_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.mark.skipif(not (SHARED_DATA / "vicuna_bench").is_dir(), reason=f"no shared data in {SHARED_DATA}")
def test_vicuna_helper_reads_the_shared_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/vicuna.py on the real files: the formats the small folder above imitates."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import vicuna

    questions = vicuna.read_vicuna(SHARED_DATA / "vicuna_bench")
    assert len(questions) == 80
    assert len({q["id"] for q in questions}) == 80
    assert sum(bool(q["reference"]) for q in questions) == 80
    assert {"generic", "coding", "math"} <= {q["category"] for q in questions}
    alpaca = SHARED_DATA / "alpaca_eval" / "gpt-4-turbo.jsonl"
    fit, calibration = vicuna.read_alpaca("fit", alpaca), vicuna.read_alpaca("calibration", alpaca)
    assert len(fit) + len(calibration) == len(alpaca.read_text().splitlines())
    assert not {q["id"] for q in fit} & {q["id"] for q in calibration}
    assert 0.1 < len(calibration) / (len(fit) + len(calibration)) < 0.3  # the held-out fifth


# --- models built for one test -------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, world: World) -> tuple[Path, str]:
    """A copy of the tiny model exported to ONNX by tools/export_onnx.py (fp32 and int8), with its
    greedy agreement check on two prompts; (the model folder, the tool's stdout)."""
    pytest.importorskip("onnx", reason="the ONNX export needs the 'export' extra")
    pytest.importorskip("onnxruntime", reason="the ONNX runtime needs the 'edge' extra")
    model = tmp_path_factory.mktemp("onnx") / "tiny"
    shutil.copytree(tiny_model, model)
    proc = run_tool(world, "export_onnx.py", "--model", model, "--precision", "fp32", "int8", "--check", 2,
                    "--check-tokens", 4)
    return model, proc.stdout


# --- the tools -----------------------------------------------------------------------------------

def test_export_onnx_exports_and_agrees_with_transformers(exported: tuple[Path, str]) -> None:
    model, stdout = exported
    onnx = model / "onnx"
    for precision in ("fp32", "int8"):
        assert (onnx / f"model-{precision}.onnx").stat().st_size > 0
        assert f"{precision}: {onnx / f'model-{precision}.onnx'}" in stdout
    assert (onnx / "tokenizer.json").is_file()
    check = json.loads(stdout[stdout.index("{"):])
    assert check["prompts"] == 2
    assert 0 <= check["identical_outputs"] <= 2
    # Same weights, same greedy decoding: a broken export diverges from the first tokens.
    assert 0.5 <= check["token_agreement"] <= 1.0
    assert finite(check["max_logprob_diff"])


def test_bench_edge_measures_each_runtime_and_its_quality(exported: tuple[Path, str], world: World,
                                                          tmp_path: Path) -> None:
    model, _ = exported
    out = tmp_path / "bench_edge.json"
    run_tool(world, "bench_edge.py", "--model", model, "--runtimes", "transformers", "onnxruntime:fp32",
             "--batch-sizes", 2, "--tasks", 2, "--tokens", 4, "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["runtime"], r["max_batch"]) for r in rows] == [("transformers", 2), ("onnxruntime:fp32", 2)]
    for r in rows:
        assert r["tasks"] == 2
        assert r["max_new_tokens"] == 4
        assert 2 <= r["tokens"] <= 2 * 4  # every task answered, none past its budget
        assert finite(r["tokens_per_s"])
        assert r["tokens_per_s"] > 0
        assert 1 <= r["peak_batch"] <= 2
        assert r["vs_first_batch"] == 1.0
        assert r["peak_rss_mb"] > 0
    assert rows[0]["vs_transformers"] == 1.0

    quality = tmp_path / "quality.json"
    run_tool(world, "bench_edge.py", "--model", model, "--runtimes", "onnxruntime:fp32", "transformers",
             "--quality", 2, "--tokens", 4, "--out", quality)
    report = json.loads(quality.read_text())
    assert report["reference"] == "onnxruntime:fp32"
    by = {r["runtime"]: r for r in report["quality"]}
    assert set(by) == {"onnxruntime:fp32", "transformers"}
    assert all(r["points"] == 2 and cosine_like(r["similarity_to_gpt4o"]) for r in by.values())
    assert by["onnxruntime:fp32"]["delta_vs_fp32"] == 0
    assert by["onnxruntime:fp32"]["identical_to_fp32"] == 2
    assert by["onnxruntime:fp32"]["similarity_to_fp32"] == pytest.approx(1.0, abs=1e-3)


def test_train_router_fits_and_writes_loadable_weights(world: World, tmp_path: Path) -> None:
    from pice_cloud import RouterWeights

    weights, report_path = tmp_path / "router.json", tmp_path / "report.json"
    run_tool(world, "train_router.py", "--data", world.data / "sot_router", "--model", world.embedder,
             "--weights-out", weights, "--json", report_path, "--tune-threshold", "--cache", tmp_path / "emb.pt")
    report = json.loads(report_path.read_text())
    lima = list(csv.reader((world.data / "sot_router" / "lima.csv").read_text().splitlines(), delimiter=";"))[1:]
    results = report["results"]
    assert report["meta"]["n_train"] + results["lima_held_out"]["router"]["n"] == len(lima)
    assert results["vicuna"]["router"]["n"] == len(VICUNA)
    for name in ("lima_held_out", "vicuna", "wizardlm"):
        for method in ("router", "majority", "heuristic"):
            assert 0.0 <= results[name][method]["accuracy"] <= 1.0
    loaded = RouterWeights.load(weights)
    assert len(loaded.weights) == 384  # the embedder's width
    assert 0.0 < loaded.threshold < 1.0
    assert loaded.meta["C"] in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    assert (tmp_path / "emb.pt").is_file()


def test_train_length_adds_a_loadable_long_answer_model(world: World, tmp_path: Path) -> None:
    from pice_cloud import RouterWeights

    weights, report = tmp_path / "router.json", tmp_path / "length.json"
    shutil.copy(ROOT / "pice_cloud" / "data" / "router.json", weights)
    shipped = (ROOT / "pice_cloud" / "data" / "router.json").read_bytes()
    # The stand-in answers: lists of headings run to ~40 words and more, the others to ~15.
    run_tool(world, "train_length.py", "--model", world.embedder, "--weights", weights, "--json", report,
             "--words", 30)
    section = json.loads(weights.read_text())["long_answer"]
    fit = [q for q, _ in ALPACA if not is_held_out(q)]
    assert section["n_train"] == len(fit)
    assert section["positives_train"] == sum(1 for q, h in ALPACA if h and not is_held_out(q))
    assert 0.0 <= section["held_out"]["accuracy"] <= 1.0
    loaded = RouterWeights.load(weights)
    assert loaded.long_answer is not None
    assert len(loaded.long_answer[0]) == len(loaded.weights)
    # The router's score is now P(suits a sketch) x P(long answer).
    vector = [0.01 * (i % 7 - 3) for i in range(len(loaded.weights))]
    long_w, long_b = loaded.long_answer
    p_long = 1.0 / (1.0 + math.exp(-(long_b + sum(w * x for w, x in zip(long_w, vector, strict=True)))))
    suits_only = dataclasses.replace(loaded, long_answer=None)
    assert loaded.probability(vector) == pytest.approx(suits_only.probability(vector) * p_long)
    assert 0.0 < p_long < 1.0
    assert json.loads(report.read_text())["words"] == 30
    assert (ROOT / "pice_cloud" / "data" / "router.json").read_bytes() == shipped


def test_calibrate_router_routes_what_the_gate_passes_progressive_when_it_never_loses(
        world: World, tmp_path: Path) -> None:
    rng = random.Random(0)
    rows_path = tmp_path / "rows.jsonl"
    questions = [q for q, _ in ALPACA]
    refused = {qid for qid in range(len(questions)) if qid % 4 == 0}  # sketches the guards sent cloud-only
    with rows_path.open("w") as out:
        for qid, question in enumerate(questions):
            cosine, rouge = rng.uniform(0.4, 0.8), rng.uniform(0.1, 0.4)
            for mode, gain in (("cloud", 0.0), ("progressive", 0.05)):
                served = "cloud" if mode == "cloud" or qid in refused else "progressive"
                out.write(json.dumps({"question_id": qid, "question": question, "mode": mode, "mode_served": served,
                                      "cosine": round(cosine + gain, 4), "rouge_l": round(rouge + gain, 4),
                                      "cloud_tokens": rng.randint(20, 200)}) + "\n")
    weights = tmp_path / "router.json"
    shutil.copy(ROOT / "pice_cloud" / "data" / "router.json", weights)
    shipped = (ROOT / "pice_cloud" / "data" / "router.json").read_bytes()
    out_json = tmp_path / "calibration.json"
    # These questions are not alpaca_eval's: every answer weighs alike (no strata).
    run_tool(world, "calibrate_router.py", "--rows", rows_path, "--weights", weights, "--write", "--out", out_json,
             "--strata", 1)
    result = json.loads(out_json.read_text())
    assert result["questions"] == len(questions)
    assert out_json.with_suffix(".png").stat().st_size > 0
    chosen, cloud = result["chosen"], result["cloud_only"]
    assert result["curve"]
    assert all(0.0 <= c["served_progressive"] <= 1.0 for c in result["curve"])
    assert cloud["served_progressive"] == 0.0
    # Progressive is better on every question: every one the gate lets through (a translation is
    # answered cloud-only whatever the router scores) is routed to it, and the guards' refusals are
    # the only others served cloud-only.
    gated = {qid for qid, question in enumerate(questions) if cloud_only_reason(question)}
    assert len(gated) == 1
    assert chosen["routed_progressive"] == pytest.approx(1 - len(gated) / len(questions), abs=1e-4)
    assert chosen["served_progressive"] == pytest.approx(1 - len(refused | gated) / len(questions), abs=1e-4)
    assert chosen["cosine"] > cloud["cosine"]
    assert chosen["rouge_l"] > cloud["rouge_l"]
    written = json.loads(weights.read_text())
    assert written["threshold_calibration"]["questions"] == len(questions)
    assert written["threshold"] == pytest.approx(chosen["threshold"], abs=1e-4)
    assert (ROOT / "pice_cloud" / "data" / "router.json").read_bytes() == shipped


def test_guard_calibration_counts_the_outlines_it_read(world: World, tmp_path: Path) -> None:
    out = tmp_path / "guards.json"
    run_tool(world, "guard_calibration.py", "--limit", 100, "--out", out)
    report = json.loads(out.read_text())
    outlines = list_outlines()
    assert report["outlines"] == len(outlines)
    assert report["headings"] == sum(len(h) for _, h in outlines)
    assert report["paragraphs"] == report["headings"]  # every item has its text
    assert 0.0 <= report["headings_over_max_words"] <= 1.0
    assert 0 <= report["outlines_rejected"] <= len(outlines)
    for key in ("heading_question_cosine", "max_pairwise_heading_cosine_per_outline"):
        assert set(report[key]) == {"p50", "p90", "p95", "p99", "max"}
        assert all(cosine_like(v) for v in report[key].values())
    assert report["heading_words"]["max"] <= 5

    lexical = tmp_path / "lexical.json"
    run_tool(world, "guard_calibration.py", "--limit", 4, "--no-embed", "--out", lexical)
    first = json.loads(lexical.read_text())
    assert first["outlines"] == len([h for _, h in ALPACA[:4] if len(h) >= 3])
    assert first["heading_question_cosine"] == {}


def test_repetition_eval_reports_each_setting(tiny_model: Path, world: World, tmp_path: Path) -> None:
    out = tmp_path / "repetition.jsonl"
    run_tool(world, "repetition_eval.py", "--model", tiny_model, "--outlines", 2, "--offset", 0, "--tokens", 6,
             "--settings", "1.0:0,1.3:3", "--threads", 1, "--examples", 2, "--out", out)
    reports = jsonl(out)
    chosen = list_outlines()[0::9][:2]
    expansions = sum(min(5, len(h)) for _, h in chosen)
    assert [(r["repetition_penalty"], r["no_repeat_ngram_size"]) for r in reports] == [(1.0, 0), (1.3, 3)]
    for r in reports:
        assert r["outlines"] == len(chosen)
        assert r["expansions"] == expansions
        assert sum(r["guard"].values()) == expansions
        assert cosine_like(r["cosine_to_reference"])
        assert 0.0 <= r["own_repeated_4grams"] <= 1.0
        assert 0.0 <= r["answer_repeated_sentences"] <= 1.0
        assert len(r["examples"]) == 2


def test_sketch_guard_eval_judges_each_sketch(tiny_model: Path, world: World, tmp_path: Path) -> None:
    out = tmp_path / "sketches.jsonl"
    run_tool(world, "sketch_guard_eval.py", "--model", tiny_model, "--limit", 3, "--outline", "--threads", 1,
             "--out", out)
    run_tool(world, "sketch_guard_eval.py", "--model", tiny_model, "--limit", 2, "--source", "alpaca",
             "--prompt", "legacy", "--no-embed", "--threads", 1, "--out", out)
    outlined, legacy = jsonl(out)
    assert (outlined["questions"], outlined["outline"], outlined["embed"]) == (3, True, True)
    assert (legacy["questions"], legacy["prompt"], legacy["embed"]) == (2, "legacy", False)
    for r in (outlined, legacy):
        n = r["questions"]
        assert len(r["examples"]) == n
        assert 0 <= r["greedy_pass"] <= r["greedy_or_resample_pass"] <= n
        assert r["sampled_pass"] <= r["greedy_or_resample_pass"]
        assert r["greedy_served_with_repair"] <= r["served_with_repair_and_resample"] <= n
    # Under the outline format every greedy sketch parses into numbered headings.
    assert all(e["greedy"] for e in outlined["examples"])


def test_fit_ensemble_generates_then_fits(tiny_model: Path, world: World, tmp_path: Path) -> None:
    from pice_cloud.ensemble import FEATURES, EnsembleWeights

    generated = tmp_path / "generated"
    proc = run_tool(world, "fit_ensemble.py", "--results", generated, "generate", "--model", tiny_model,
                    "--source", "vicuna", "--questions", 2, "--k", 2, "--tokens", 6, "--threads", 1, "--fresh")
    # The random model's sketches are gibberish: the sketch guard refuses every one.
    assert not jsonl(generated / "ensemble_calibration.jsonl")
    assert "2 sketches refused by the guard" in proc.stderr
    # Without the guard, its candidates: K per point, each with its log-probs and guard verdict.
    run_tool(world, "fit_ensemble.py", "--results", generated, "generate", "--model", tiny_model, "--source", "vicuna",
             "--questions", 2, "--k", 2, "--tokens", 6, "--threads", 1, "--fresh", "--no-sketch-guard")
    rows = jsonl(generated / "ensemble_calibration.jsonl")
    # One question per category (round-robin, coding and math left out): common-sense, fermi.
    assert [r["id"] for r in rows] == [7, 8]
    for row in rows:
        assert row["sketch"]
        assert row["reference"]
        assert row["tokens_per_point"] == 6
        assert sorted((c["point"], c["temperature"]) for c in row["candidates"]) == sorted(
            (p, t) for p in range(len(row["sketch"])) for t in (0.0, 0.7))
        for c in row["candidates"]:
            assert finite(c["edge_logprob"], c["cloud_loglik"])
            assert 0 < c["tokens"] <= 6
            assert c["guard"] is None or isinstance(c["guard"], str)

    # Fitting needs candidates that pass the guards, which the tiny model's rarely do: a
    # calibration file in generate's format.
    fitting = tmp_path / "fitting"
    fitting.mkdir()
    rng = random.Random(5)
    words = ["sleep", "bed", "night", "time", "keep", "dark", "room", "cool", "light", "phone", "screen", "wake",
             "early", "coffee", "quiet", "routine"]

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(5, 16))) + "."

    with (fitting / "ensemble_calibration.jsonl").open("w") as out:
        for qid in range(8):
            cands = [{"point": p, "temperature": 0.0 if k == 0 else 0.7, "text": text(), "tokens": rng.randint(5, 80),
                      "edge_logprob": -3 * rng.random(), "cloud_loglik": -3 * rng.random(), "guard": None}
                     for p in range(2) for k in range(3)]
            out.write(json.dumps({"id": qid, "category": "generic", "question": "How can I sleep better?",
                                  "sketch": ["Keep a routine", "Dark quiet room"], "reference": f"{text()}\n\n{text()}",
                                  "tokens_per_point": 80, "candidates": cands}) + "\n")
    weights = tmp_path / "ensemble.json"
    run_tool(world, "fit_ensemble.py", "--results", fitting, "fit", "--out", weights, "--keep-costly")
    fitted = json.loads(weights.read_text())
    assert list(fitted["weights"]) == list(FEATURES)
    assert all(finite(w) for w in fitted["weights"].values())
    meta = fitted["fit"]
    assert meta["questions"] == 8
    assert 1 <= meta["test_questions"] < 8
    assert meta["train_points"] + meta["test_points"] == 8 * 2
    assert meta["candidates_per_point"] == 3
    for row in meta["report"]:
        assert 0.0 <= row["oracle_hit"] <= 1.0
        assert cosine_like(row["mean_similarity"])
    assert json.loads((fitting / "ensemble.json").read_text()) == fitted
    EnsembleWeights.load(weights)


def test_rollout_bench_switches_every_edge_and_loses_nothing(tiny_model: Path, world: World, tmp_path: Path) -> None:
    other = build_random_model(tmp_path / "tiny-b", seed=1)
    out = tmp_path / "rollout.json"
    run_tool(world, "rollout_bench.py", "--from-model", tiny_model, "--to-model", other, "--tokens", 4,
             "--warmup", 0.5, "--timeout", 120, "--json", out)
    result = json.loads(out.read_text())
    assert result["build_from"] != result["build_to"]
    assert result["all_switched"]
    assert sorted(result["switched_after_s"]) == ["edge-0", "edge-1", "edge-2"]
    assert result["requests_lost"] == 0
    assert result["failed_rollouts"] == 0
    assert result["requests_total"] >= result["requests_during_rollout"] >= 0
    assert result["requests_total"] > 0
    assert result["bytes"] > 0


def test_simulate_projects_a_small_fleet(world: World, tmp_path: Path) -> None:
    out, plot = tmp_path / "simulate.json", tmp_path / "simulate.png"
    run_tool(world, "simulate.py", "--edges", "2,4", "--rates", "0.5", "--duration", 20, "--points", 3,
             "--tokens", 16, "--json", out, "--plot", plot)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["edges"], r["offered_per_s"]) for r in rows] == [(2, 0.5), (4, 0.5)]
    for r in rows:
        for mode in ("pice", "cloud_only"):
            assert r[mode]["completed"] > 0
            assert finite(r[mode]["latency_p50_s"], r[mode]["gpu_s_per_request"])
            assert r[mode]["latency_p50_s"] <= r[mode]["latency_p95_s"]
        assert 0.0 <= r["pice"]["cloud_point_share"] <= 1.0
    assert plot.stat().st_size > 0


@pytest.mark.mosquitto
def test_load_fleet_then_simulate_validates_its_run(world: World, tmp_path: Path) -> None:
    if mosquitto_executable() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
    out = tmp_path / "load_fleet.json"
    run_tool(world, "load_fleet.py", "--edges", 4, "--light", 2, "--concurrency", 3, "--duration", 1.5, "--points", 2,
             "--tokens", 4, "--edge-rate", 200, "--cloud-rate", 400, "--heartbeat", 0.5, "--json", out)
    [row] = json.loads(out.read_text())["rows"]
    assert row["edges"] == 4
    assert row["replicas"] == 1
    assert row["light"]["requests"] == 2
    assert row["light"]["points_cloud"] <= 2 * 2
    throughput = row["throughput"]
    assert throughput["errors"] == 0
    assert throughput["completed"] > 0
    assert finite(throughput["requests_per_s"], throughput["latency_p50_s"])
    assert throughput["requests_per_s"] > 0
    assert 0.0 <= throughput["cloud_point_share"] <= 1.0
    assert throughput["messages_per_request"]["tasks"] > 0
    # Both sides did work the OS saw: the cloud's process and the edges' host process.
    busy = throughput["cores_busy"]
    assert busy["cloud"] > 0
    assert busy["edge_hosts"] > 0
    assert row["edge_host"] == {**row["edge_host"], "hosts": 1, "reported": 1}
    assert row["registry_bytes_per_edge"] > 0

    # The simulator re-runs the measured configuration from load_fleet's JSON.
    validated = tmp_path / "validate.json"
    run_tool(world, "simulate.py", "--validate", out, "--json", validated)
    [check] = json.loads(validated.read_text())["rows"]
    assert check["edges"] == 4
    assert check["concurrency"] == 3
    assert check["measured"]["requests_per_s"] == throughput["requests_per_s"]
    assert finite(check["throughput_error"], check["p50_error"])


# --- tools that start `pice-cloud serve` themselves ------------------------------------------------

@pytest.fixture
def serve_env(tiny_model: Path) -> dict[str, str]:
    """The environment of a tool whose `pice-cloud serve` runs the tiny model (its default model
    is SmolLM2; the variables set what the tools' flags do not)."""
    return {**SERVE_ENV, "PICE_LLM__MODEL": str(tiny_model), "PICE_EDGES__MODEL": str(tiny_model)}


def test_latency_api_streams_both_modes(world: World, serve_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    run_tool(world, "latency_api.py", "--questions", world.data / "vicuna_bench" / "question.jsonl", "--ids", "1,2",
             "--out", out, env=serve_env)
    report = json.loads(out.read_text())
    results = report["results"]
    assert sorted((r["question_id"], r["mode"]) for r in results) == [
        (1, "cloud"), (1, "progressive"), (2, "cloud"), (2, "progressive")]
    for r in results:
        assert 0 < r["ttft_s"] <= r["total_s"]
        assert r["chars"] > 0
        assert r["completion_tokens"] > 0
    for r in results:
        if r["mode"] == "progressive":
            assert r["points_edge"] + r["points_cloud"] >= 1
    assert set(report["summary"]) == {"progressive", "cloud"}
    assert all(finite(v) for v in report["ratio_cloud_over_progressive"].values())


def test_eval_modes_answers_every_question_in_every_mode(world: World, serve_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    rows_path, summary_path, md = tmp_path / "rows.jsonl", tmp_path / "summary.json", tmp_path / "examples.md"
    args = ("--source", "vicuna", "--questions", 2, "--rows", rows_path, "--json", summary_path, "--md", md)
    run_tool(world, "eval_modes.py", *args, env=serve_env)
    rows = jsonl(rows_path)
    assert sorted((r["question_id"], r["mode"]) for r in rows) == sorted(
        (q, m) for q in (1, 2) for m in ("cloud", "progressive", "auto"))
    for r in rows:
        assert cosine_like(r["cosine"])
        assert 0.0 <= r["rouge_l"] <= 1.0
        assert r["words"] > 0
        assert r["cloud_tokens"] > 0
    assert {r["mode_served"] for r in rows if r["mode"] == "cloud"} == {"cloud"}
    for r in rows:
        if r["mode"] == "progressive":
            assert r["mode_served"] == "progressive"
            assert r["points_edge"] + r["points_cloud"] >= 1
        if r["mode"] == "auto":  # the embedding router (the stand-in embedder) decided
            assert 0.0 <= r["route_probability"] <= 1.0
    summary = json.loads(summary_path.read_text())
    assert summary["questions"] == 2
    assert {m: s["answers"] for m, s in summary["summary"].items()} == {"cloud": 2, "progressive": 2, "auto": 2}
    assert summary["summary"]["progressive"]["progressive_share"] == 1.0
    assert md.read_text().startswith("# Answer quality per mode (vicuna)")

    # A rerun resumes: every answer is there, so no server starts and nothing is added.
    run_tool(world, "eval_modes.py", *args, env={**serve_env, "PICE_LLM__MODEL": "/nonexistent"})
    assert len(jsonl(rows_path)) == len(rows)


def test_eval_modes_below_picks_the_router_s_low_end(world: World, tmp_path: Path) -> None:
    rows_path, summary_path = tmp_path / "rows.jsonl", tmp_path / "summary.json"
    rows_path.write_text("")
    held = [q for q, _ in ALPACA if is_held_out(q)]
    # Every question scores below 1: the held-out ones the gate passes, and nothing is answered.
    run_tool(world, "eval_modes.py", "--source", "alpaca", "--below", 1.0, "--modes", "cloud", "--summarise-only",
             "--rows", rows_path, "--json", summary_path)
    assert json.loads(summary_path.read_text())["questions"] == len([q for q in held if not cloud_only_reason(q)])
    # Nothing scores below 0.
    run_tool(world, "eval_modes.py", "--source", "alpaca", "--below", 0.0, "--modes", "cloud", "--summarise-only",
             "--rows", rows_path, "--json", summary_path)
    assert json.loads(summary_path.read_text())["questions"] == 0


def test_eval_quality_measures_answers_sketches_and_points(tiny_model: Path, world: World,
                                                           serve_env: dict[str, str], tmp_path: Path) -> None:
    # The expander's training report names its data and held-out split (pice-cloud finetune writes it).
    report = tmp_path / "finetune_expander.json"
    report.write_text(json.dumps({"config": {
        "role": "expander", "base": str(tiny_model), "data": str(world.data / "alpaca_eval" / "gpt-4-turbo.jsonl"),
        "data_prep": {"holdout_fraction": 0.5, "max_seq_len": 4096}}}))
    out, md = tmp_path / "quality.json", tmp_path / "quality.md"
    run_tool(world, "eval_quality.py", "--questions", 1, "--modes", "base", "--base", tiny_model, "--expander",
             tiny_model, "--sketcher", tiny_model, "--sketches", 2, "--points", 2, "--expander-report", report,
             "--tokens-per-point", 8, "--sketch-tokens", 30, "--threads", 1, "--max-tokens", 24, "--json", out,
             "--md", md, env=serve_env)
    result = json.loads(out.read_text())
    assert result["questions"] == 1
    assert list(result["modes"]) == ["base"]
    [row] = result["rows"]
    assert row["mode"] == "base"
    assert row["question_id"] == 1
    assert row["answer"]
    assert cosine_like(row["cosine"])
    assert all(cosine_like(c) for c in row["point_cosines"])
    assert result["summary"]["base"]["answers"] == 1
    sketches = result["sketch_level"]
    assert sketches["questions"] == 2
    assert set(sketches["models"]) == {"base", "sketcher"}
    for m in sketches["models"].values():
        assert len(m["sketches"]) == 2
        assert 0 <= m["guard_accepted"] <= 2
        assert 0 <= m["well_formed"] <= 2
    points = result["point_level"]
    assert 1 <= points["points"] <= 2
    assert set(points["models"]) == {"base", "expander"}
    for m in points["models"].values():
        assert cosine_like(m["cosine"])
        assert 0.0 <= m["rouge_l"] <= 1.0
    assert points["cosine_gain"] == 0.0  # the same model on both sides
    assert md.read_text().startswith("# Answer quality")


def test_site_drill_cuts_the_uplink_twice_and_loses_nothing(exported: tuple[Path, str], world: World,
                                                           tmp_path: Path) -> None:
    """The site on onnxruntime (the tiny model's export), the cloud and three edges on the tiny model."""
    model, _ = exported
    out = tmp_path / "site_drill.json"
    run_tool(world, "site_drill.py", "--model", model, "--requests", 6, "--concurrency", 2, "--outage", 3,
             "--alone", 2, "--questions", 2, "--no-guards", "--probe-interval", 0.3, "--max-tokens", 24,
             "--json", out, env=SERVE_ENV, timeout=600)
    result = json.loads(out.read_text())
    assert result["requests"] == 6
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert [c["kind"] for c in result["cuts"]] == ["link", "cloud-process"]
    assert all(c["detect_s"] is not None and c["return_s"] is not None for c in result["cuts"])
    assert sum(result["site_counts"].values()) == 7  # the warm-up and the six, each routed once
    assert set(result["alone"]["served_by"]["alone"]) == {"device"}
    assert result["alone"]["latency_ratio_alone_over_peers"] > 0
    assert all(cosine_like(r["cosine"]) for r in result["rows"] if "cosine" in r)


def test_prompt_eval_compares_the_layouts(tiny_model: Path, world: World, tmp_path: Path) -> None:
    out = tmp_path / "layouts.json"
    run_tool(world, "prompt_eval.py", "--model", tiny_model, "--questions", 6, "--tokens", 6, "--threads", 1,
             "--unguarded", "--examples", 1, "--out", out)
    reports = json.loads(out.read_text())["layouts"]
    assert [r["layout"] for r in reports] == ["point", "outline"]
    for r in reports:
        # Both layouts expand the same sketches' points.
        assert (r["answers"], r["points"]) == (reports[0]["answers"], reports[0]["points"])
        assert r["answers"] > 0
        assert sum(r["guard"].values()) == r["points"]
        assert cosine_like(r["cosine"])
        assert cosine_like(r["relevance"])
        assert 0.0 <= r["rouge_l"] <= 1.0
        assert 0.0 <= r["opening_repeat"] <= 1.0
        assert len(r["examples"]) == 1
