"""`pice-cloud finetune`: data preparation, LoRA training, merging into the model store, serving.

A tiny random model and a 20-line synthetic JSONL written here; training runs once per module
(a few seconds) and every later test uses its result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pice_cloud.errors import DataError, FinetuneError
from pice_cloud.finetune import cli
from pice_cloud.finetune.config import DataConfig, load_finetune_config
from pice_cloud.finetune.data import Point, examples_for, prepare, read_records, split_answer, split_sections
from pice_cloud.finetune.train import TrainResult, finetune, render_prompt
from pice_cloud.sketch import SKETCH_PREFILL, parse_sketch, sketch_messages
from pice_edge import model_store
from pice_edge.errors import ConfigError, ModelError
from pice_edge.prompts import expansion_messages

LIST_ANSWER = """Here are some ways to sleep better:

1. **Keep a schedule**: Go to bed at the same time every night. Your body clock adapts within a week.
2. **Limit screens** - Blue light delays melatonin. Put the phone away an hour before bed.
3. Exercise during the day, but not late. Physical activity deepens sleep.
   - Morning walks count.
4. **Watch caffeine**:
   - Avoid late coffee
   - Prefer herbal tea

Sleep well!"""

PARAGRAPH_ANSWER = """Saving money starts with a budget, written down. Track every expense for a month.

Cooking at home cuts costs. A weekly meal plan avoids impulse buys.

Automatic transfers build savings. Move a fixed sum on payday.

In summary, small habits add up."""

SENTENCE_ANSWER = ("Stretching loosens tight muscles. It also improves posture. Hydration keeps joints healthy. "
                   "Drink water through the day. Good shoes reduce strain. Replace them every year.")

# Words of the tiny model's tokenizer corpus, so that targets are cheap to learn.
_TIPS = """Here are tips:

1. **Set clear goals**: Plan your day with a calendar and set clear goals. Review it every morning.
2. **Take short breaks**: Sleep well and exercise often. Take short breaks and avoid distractions.
3. **Use a task list**: Use a task list and review it every morning. The answer explains one point.

Good luck."""
_PROSE = ("Set clear goals every week. Plan your day with a calendar and review it.\n\n"
          "Take short breaks during the day. Sleep well and exercise often.\n\n"
          "Use a task list every morning. Review it and avoid distractions.")


def write_jsonl(path: Path, n: int = 20) -> Path:
    rows = [{"instruction": f"How can I manage my time better, case {i}?", "output": _TIPS if i % 2 else _PROSE}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- data preparation: fixed inputs, exact outputs ---------------------------------------------


def test_numbered_list_items_become_points() -> None:
    split = split_answer(LIST_ANSWER)
    assert split.kind == "list"
    assert split.problem is None
    assert split.points == (
        Point("Keep a schedule", "Go to bed at the same time every night. Your body clock adapts within a week."),
        Point("Limit screens", "Blue light delays melatonin. Put the phone away an hour before bed."),
        # No bold, colon or dash: the heading is the first clause, the text the whole item.
        Point("Exercise during the day", "Exercise during the day, but not late. Physical activity deepens sleep.",
              derived=True),
        # An item that says nothing itself is its sub-items, as sentences.
        Point("Watch caffeine", "Avoid late coffee. Prefer herbal tea."),
    )


def test_paragraphs_become_points_without_the_outro() -> None:
    split = split_answer(PARAGRAPH_ANSWER)
    assert split.kind == "paragraphs"
    assert split.problem is None
    assert [p.heading for p in split.points] == [
        "Saving money starts with a budget", "Cooking at home cuts costs", "Automatic transfers build savings"]
    assert split.points[0].text == "Saving money starts with a budget, written down. Track every expense for a month."
    assert all(p.derived for p in split.points)


def test_one_paragraph_becomes_sentence_pairs() -> None:
    split = split_answer(SENTENCE_ANSWER)
    assert split.kind == "sentences"
    assert [p.text for p in split.points] == [
        "Stretching loosens tight muscles. It also improves posture.",
        "Hydration keeps joints healthy. Drink water through the day.",
        "Good shoes reduce strain. Replace them every year."]
    assert [p.heading for p in split.points] == [
        "Stretching loosens tight muscles", "Hydration keeps joints healthy", "Good shoes reduce strain"]


@pytest.mark.parametrize(("answer", "problem"), [
    ("Run this:\n```python\nprint(1)\n```\n1. a b c\n2. d e f\n3. g h i", "code"),
    ("1. **Plan** the day.\n2. **Plan** the week.\n3. **Rest**: sleep well.", "duplicate_headings"),
    ("1. **The first point**: x y z.\n2. **Sleep**: x y z.\n3. **Food**: x y z.", "meta_heading"),
    ("1. **Learn the basics of**: x.\n2. **Sleep**: x y z.\n3. **Food**: x y z.", "cut_heading"),
    # The serving guards' rules: a bare section name is meta, a dangling adjective is cut.
    ("1. **Introduction**: x y z.\n2. **Sleep**: x y z.\n3. **Food**: x y z.", "meta_heading"),
    ("1. **Python is known**: x y z.\n2. **Sleep**: x y z.\n3. **Food**: x y z.", "cut_heading"),
    ("1. **A heading far too long to fit the budget**: x.\n2. **Sleep**: x y.\n3. **Food**: x y.", "long_heading"),
    ("Buy flour and eggs today.\n\nThen mix them in a bowl.\n\nBake it for an hour.", "dependent_points"),
    ("Dear Sir,\n\nI write to ask for leave.\n\nI will be away.\n\nThanks.", "letter"),
    ("1. **Sleep**: well.\n2. **Food**: good.", "too_few_points"),
    ("## Part one\n1. **Sleep**: x y z.\n## Part two\n2. **Food**: x y z.\n3. **Rest**: x.", "sections"),
])
def test_answers_that_cannot_be_expanded_apart_are_dropped(answer: str, problem: str) -> None:
    assert split_answer(answer).problem == problem


SECTIONS_ANSWER = """# Roasting a Pig at Home

## Introduction
Roasting a whole pig takes a day.

## Step 1: Equipment Needed
- A spit or a large grill
- Charcoal

## 2. Preparing the Pig
Clean and season it the night before.

### Brine
Salt water overnight.

## Cooking Techniques:
Cook it low and slow, about an hour per 10 pounds.

## Conclusion
Enjoy the feast.
"""


def test_sections_outline_the_sketcher_by_their_content() -> None:
    # An essay-like answer is dropped for the expander (a section is more than one point's text) ...
    assert split_answer(SECTIONS_ANSWER).problem == "sections"
    # ... but its content sections outline it for the sketcher: the title, the frame
    # ("Introduction", "Conclusion"), numbering, colons and sub-sections left out.
    split = split_sections(SECTIONS_ANSWER)
    assert split.problem is None
    assert split.kind == "sections"
    assert [p.heading for p in split.points] == ["Equipment Needed", "Preparing the Pig", "Cooking Techniques"]
    assert split.points[1].text == "Clean and season it the night before. Salt water overnight."
    # Fewer than three content sections: not an outline.
    two = SECTIONS_ANSWER.replace("## Cooking Techniques:", "Cooking Techniques:")
    assert split_sections(two).problem == "too_few_points"
    assert split_sections("## Intro\nx\n\n```\ncode\n```\n## A\n## B\n## C").problem == "code"


def test_prepare_uses_sections_for_the_sketcher_only(tmp_path: Path) -> None:
    data = tmp_path / "s.jsonl"
    lines = [{"instruction": f"How do I roast a pig, take {i}?", "output": SECTIONS_ANSWER} for i in range(3)]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = DataConfig(holdout_fraction=0.0)
    sketcher = prepare(data, "sketcher", cfg)
    assert sketcher.counts["answers_outlined_by_sections"] == 3
    assert [e.sketch for e in sketcher.train] == [("Equipment Needed", "Preparing the Pig", "Cooking Techniques")] * 3
    with pytest.raises(DataError, match="sections"):
        prepare(data, "expander", cfg)


def test_examples_are_the_serving_prompts() -> None:
    from pice_cloud.finetune.data import Record

    record = Record(7, "How do I sleep better?", LIST_ANSWER)
    split = split_answer(LIST_ANSWER)
    cfg = DataConfig()
    [sketcher] = examples_for(record, split, "sketcher", cfg)
    headings = ["Keep a schedule", "Limit screens", "Exercise during the day", "Watch caffeine"]
    assert list(sketcher.messages) == sketch_messages(record.instruction, max_points=6, max_words=6)
    assert sketcher.prefill == SKETCH_PREFILL
    assert sketcher.target == " Keep a schedule\n2. Limit screens\n3. Exercise during the day\n4. Watch caffeine"
    # What the model learns to write parses back, through the serving parser, to the outline.
    assert parse_sketch(sketcher.target) == headings

    drops: Counter[str] = Counter()
    expanders = examples_for(record, split, "expander", cfg, drops=drops)
    assert [e.point_index for e in expanders] == [0, 1, 2]
    assert list(expanders[1].messages) == expansion_messages(record.instruction, headings, 1)
    assert expanders[1].target == "Blue light delays melatonin. Put the phone away an hour before bed."
    assert expanders[0].prefill == ""
    assert drops == {"short_point": 1}  # "Avoid late coffee. Prefer herbal tea.": 6 words


def test_prepare_counts_and_holds_out_instructions(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl")
    cfg = DataConfig(holdout_fraction=0.25)
    prepared = prepare(data, "expander", cfg, seed=3)
    counts = prepared.counts
    assert counts["records"] == 20
    assert counts["answers_by_kind"] == {"list": 10, "paragraphs": 10}
    assert counts["answers_usable"] == 20
    assert counts["train_examples_used"] == len(prepared.train) == 3 * (20 - counts["heldout_instructions"])
    assert 0 < counts["heldout_instructions"] < 20
    train_q = {e.question for e in prepared.train}
    assert not train_q & {e.question for e in prepared.heldout}, "a held-out instruction leaked into training"
    # Same seed, same split, whatever the role.
    sketcher = prepare(data, "sketcher", cfg, seed=3)
    assert {e.question for e in sketcher.heldout} == {e.question for e in prepared.heldout}


# --- bad data -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "message"), [
    (b'{"instruction": "q"}', "missing field 'output'"),
    (b'{"output": "a"}', "missing field 'instruction'"),
    (b'{"instruction": "q", "output": "   "}', "field 'output' is empty"),
    (b'{"instruction": "q", "output": 3}', "field 'output' must be a string"),
    (b'{"instruction": "q", "output": "caf\xe9"}', "not valid UTF-8"),
    (b'{"instruction": "q", "output": ', "not valid JSON"),
    (b'["q", "a"]', "expected a JSON object"),
    (b'{"instruction": "q", "output": "' + b"x" * (10 << 20) + b'"}', "longer than 1048576 bytes"),
], ids=["no-output", "no-instruction", "empty-output", "not-a-string", "not-utf8", "not-json", "not-an-object",
        "10MB-line"])
def test_bad_lines_are_named(tmp_path: Path, line: bytes, message: str) -> None:
    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + b"\n\n" + good + b"\n" + line + b"\n" + good + b"\n")
    with pytest.raises(DataError) as info:
        read_records(path)
    assert f"{path}, line 4: " in str(info.value)
    assert message in str(info.value)
    assert info.value.line == 4
    # With skip_bad_lines the other records survive and the bad one is reported.
    bad: list[str] = []
    records = read_records(path, skip_bad_lines=True, bad=bad)
    assert [r.line for r in records] == [1, 3, 5]
    assert len(bad) == 1
    assert "line 4" in bad[0]


def test_missing_data_file_and_no_usable_example(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read training data"):
        read_records(tmp_path / "absent.jsonl")
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"instruction": "Capital of France?", "output": "Paris."}) + "\n")
    with pytest.raises(DataError, match=r"no usable expander example in 1 records .*too_few_points"):
        prepare(path, "expander", DataConfig())


# --- configuration ----------------------------------------------------------------------------------


def test_config_errors_name_the_field_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ft.yaml"
    path.write_text("role: expander\ndata: d.jsonl\noptim: {lr: -1}\nlora: {rank: 8}\n")
    with pytest.raises(ConfigError) as info:
        load_finetune_config(path)
    text = str(info.value)
    assert f"config file {path}: optim.lr: Input should be greater than 0" in text
    assert f"config file {path}: lora.rank: unknown field" in text
    with pytest.raises(ConfigError, match=r"command line: steps: .*greater than or equal to 1"):
        load_finetune_config(None, {"role": "sketcher", "data": "x", "steps": 0})
    with pytest.raises(ConfigError, match=r"role: required \(give --role"):
        load_finetune_config(None, {"data": "x"})
    path.write_text("role: sketcher\ndata: d.jsonl\nsteps: 7\n")
    cfg = load_finetune_config(path, {"steps": 9})
    assert cfg.steps == 9, "flags override the file"
    assert cfg.data == tmp_path / "d.jsonl", "paths in a file are relative to the file"
    assert cfg.model_name == "smollm2-135m-pice-sketcher"


def test_cli_flags_map_onto_the_config() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub, [])
    args = parser.parse_args(["finetune", "--role", "expander", "--data", "d.jsonl", "--steps", "5", "--lora-r", "4",
                              "--lr", "0.01", "--max-examples", "50", "--no-store", "--resume"])
    cfg = cli.config_from_args(args)
    assert (cfg.role, cfg.steps, cfg.lora.r, cfg.optim.lr, cfg.data_prep.max_examples, cfg.store) == \
        ("expander", 5, 4, 0.01, 50, False)
    assert args.resume is True
    assert cfg.lora.alpha == 32, "flags not given keep the defaults"


# --- training, merging, storing, serving -----------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PICE_MODELS_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def trained(store: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    tmp = tmp_path_factory.mktemp("finetune")
    data = write_jsonl(tmp / "data.jsonl")
    cfg = load_finetune_config(None, {
        "role": "expander", "data": str(data), "base": str(tiny_model), "name": "tiny-pice-expander",
        "steps": 16, "seed": 1, "threads": 1, "checkpoint_every": 8, "work_dir": str(tmp / "work"),
        "report_dir": str(tmp / "report"), "eval_examples": 8,
        "data_prep": {"holdout_fraction": 0.2},
        "optim": {"lr": 5e-2, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    })
    return finetune(cfg, progress=False)


def test_training_lowers_the_loss(trained: TrainResult) -> None:
    r = trained.report
    losses = r["loss_curve"]
    assert len(losses) == r["steps"] == 16
    # The tiny random model starts near uniform (ln 400 = 6.0) and LoRA cannot rescale its tied,
    # tiny-norm output embeddings, so the loss cannot fall far: a steady 0.15 is a real decrease.
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.15, losses
    assert r["heldout_loss_after"] < r["heldout_loss_before"] - 0.15
    assert r["data_counts"]["records"] == 20
    assert r["peak_rss_mb"] > 0
    assert r["train_s"] > 0
    assert r["device"] == "cpu"
    assert 0 < r["trainable_parameters"] < r["total_parameters"]
    assert json.loads(trained.report_path.read_text())["loss_curve"] == losses
    assert trained.report_path.with_suffix(".png").stat().st_size > 1000


def test_interrupted_run_resumes_where_it_stopped(trained: TrainResult, tmp_path: Path) -> None:
    """Ctrl-C after step 5 writes a checkpoint; --resume then gives the uninterrupted run's curve."""
    cfg = load_finetune_config(None, {**trained.report["config"], "store": False,
                                      "work_dir": str(tmp_path / "work"), "report_dir": str(tmp_path)})

    def interrupt(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, progress=False, on_step=interrupt)
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["checkpoint-000005.pt"]
    resumed = finetune(cfg, resume=True, progress=False)
    assert resumed.report["resumed_from_step"] == 5
    assert resumed.report["loss_curve"] == pytest.approx(trained.report["loss_curve"], abs=1e-3)
    assert resumed.report["heldout_loss_before"] == trained.report["heldout_loss_before"]
    changed = cfg.model_copy(update={"seed": 99})
    with pytest.raises(FinetuneError, match="different seed"):
        finetune(changed, resume=True, progress=False)
    # Starting afresh in the same folder discards the earlier run's checkpoints.
    finetune(cfg.model_copy(update={"steps": 2, "checkpoint_every": 1}), progress=False)
    assert [p.name for p in sorted((tmp_path / "work").iterdir())] == ["checkpoint-000001.pt", "checkpoint-000002.pt"]


def test_merged_model_is_in_the_store_with_checksums(trained: TrainResult, store: Path) -> None:
    path = trained.model_path
    assert path == store / "tiny-pice-expander"
    manifest = model_store.check_manifest(path, full=True)
    assert manifest["origin"] == "installed"
    assert manifest["base"].endswith("tiny")
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert manifest["files"]["model.safetensors"]["sha256"] == model_store.sha256_file(path / "model.safetensors")
    assert model_store.resolve("tiny-pice-expander") == path
    listed = {m["name"]: m for m in model_store.list_models()}
    assert listed["tiny-pice-expander"]["state"] == "ready"
    assert not [p for p in store.iterdir() if p.name.startswith(".")], "staging folders left behind"
    # Installing again under the same name needs replace.
    with pytest.raises(FinetuneError, match="already installed"):
        finetune(load_finetune_config(None, trained.report["config"]), progress=False)


def test_merged_model_runs_in_transformers_and_onnxruntime(trained: TrainResult) -> None:
    from pice_edge.runtimes.base import GenerationRequest
    from pice_edge.runtimes.onnx_export import export
    from pice_edge.runtimes.onnxruntime import OnnxRuntime
    from pice_edge.runtimes.transformers import TransformersRuntime

    name = "tiny-pice-expander"
    hf = TransformersRuntime(name, threads=1)
    export(model_store.resolve(name))
    ort = OnnxRuntime(name, threads=1)
    messages = expansion_messages("How can I manage my time?", ["Set clear goals", "Take short breaks"], 0)
    # Training rendered its prompts exactly as both runtimes do.
    assert render_prompt(hf.tokenizer, messages) == hf.format_chat(messages) == ort.format_chat(messages)
    sketch = sketch_messages("How can I manage my time?", max_points=6, max_words=6)
    assert render_prompt(hf.tokenizer, sketch, SKETCH_PREFILL) == ort.format_chat(sketch, SKETCH_PREFILL)
    request = GenerationRequest(prompt=hf.format_chat(messages), max_new_tokens=12)
    [a] = hf.generate([request])
    [b] = ort.generate([request])
    assert a.token_count > 0
    assert a.text.strip()
    assert b.text == a.text, "onnxruntime and transformers disagree on the merged model (greedy)"
    ort.close()
    hf.close()


@pytest.mark.mosquitto
async def test_merged_model_served_by_an_edge_over_mosquitto(trained: TrainResult, mosquitto: Any) -> None:
    from pice_edge.node import EdgeNode
    from pice_edge.protocol import Candidate, ExpandTask, candidate_topic, decode, edge_tasks_topic, encode
    from pice_edge.runtimes.transformers import TransformersRuntime
    from pice_edge.transport import BrokerSettings, MqttTransport

    settings = BrokerSettings(url=mosquitto.url)
    runtime = TransformersRuntime("tiny-pice-expander", threads=1)
    got: asyncio.Queue[Candidate] = asyncio.Queue()
    cloud = MqttTransport(settings, client_id="ft-cloud")
    cloud.add_subscription(candidate_topic("ftreq", "+"), lambda m: got.put_nowait(decode(Candidate, m.payload)))
    node = EdgeNode(runtime, device_id="ft-edge", broker=settings, heartbeat_s=0.5)
    await cloud.connect()
    await node.start()
    try:
        task = ExpandTask(request_id="ftreq", point_index=1, question="How can I manage my time?",
                          sketch=["Set clear goals", "Take short breaks"], max_new_tokens=10,
                          deadline=time.time() + 60)
        await cloud.publish_and_wait(edge_tasks_topic("ft-edge"), encode(task))
        candidate = await asyncio.wait_for(got.get(), 30)
    finally:
        await node.stop()
        await cloud.close()
    assert candidate.device_id == "ft-edge"
    assert candidate.point_index == 1
    assert candidate.model_id == "tiny-pice-expander"
    assert candidate.text.strip()


def test_a_failed_install_leaves_nothing_half_written(trained: TrainResult, store: Path,
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert trained.model_path is not None
    source = tmp_path / "merged"
    shutil.copytree(trained.model_path, source, ignore=shutil.ignore_patterns("onnx", model_store.MANIFEST))
    before = sorted(p.name for p in store.iterdir())
    calls = {"n": 0}
    real_copy = shutil.copy2

    def failing_copy(src: Any, dst: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, **kwargs)

    real_copytree = shutil.copytree

    def copytree_that_fails(src: Any, dst: Any, **kwargs: Any) -> Any:
        return real_copytree(src, dst, **{**kwargs, "copy_function": failing_copy})

    monkeypatch.setattr(shutil, "copytree", copytree_that_fails)
    with pytest.raises(ModelError, match="No space left on device"):
        model_store.install(source, "tiny-broken")
    assert sorted(p.name for p in store.iterdir()) == before, "a half-written model or staging folder is left"
    # Replacing an installed model that fails half-way keeps the old one whole.
    calls["n"] = 0
    with pytest.raises(ModelError):
        model_store.install(source, "tiny-pice-expander", replace=True)
    monkeypatch.undo()
    model_store.check_manifest(store / "tiny-pice-expander", full=True)
    assert sorted(p.name for p in store.iterdir()) == before
    # Names that would clash or escape are refused before anything is written.
    for bad_name in ("smollm2-135m-instruct", "../evil", "Upper"):
        with pytest.raises(ModelError):
            model_store.install(source, bad_name)
    assert sorted(p.name for p in store.iterdir()) == before


def test_left_padded_batches_score_like_single_rows(tiny_model: Path) -> None:
    """Batching pads on the left and scores only the target positions: the same loss, finite gradients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pice_cloud.finetune.data import Example
    from pice_cloud.finetune.train import _pad, _token_loss_sum, encode, eos_id

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    sketch = ("Set clear goals", "Take short breaks")
    rows = [encode(Example("expander", 1, q, sketch, 0, tuple(expansion_messages(q, list(sketch), 0)), "", t),
                   tokenizer, eos_id(model, tokenizer))
            for q, t in (("How can I plan?", "Plan your day with a calendar."),
                         ("How can I plan my whole week well?", "Review it every morning and avoid distractions."))]
    assert len(rows[0].ids) != len(rows[1].ids)
    assert rows[0].heads == [], "heading starts are marked in sketcher targets only"
    pad = int(tokenizer.pad_token_id)
    together = _token_loss_sum(model, _pad(rows, pad, torch), torch)
    apart = [_token_loss_sum(model, _pad([row], pad, torch), torch) for row in rows]
    assert together.tokens == sum(a.tokens for a in apart) == sum(sum(1 for x in r.labels if x != -100) for r in rows)
    assert together.cross_entropy.item() == pytest.approx(sum(a.cross_entropy.item() for a in apart), rel=1e-4)
    together.cross_entropy.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_meta_headings_of_an_outline_become_negatives(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from pice_cloud.finetune.train import IGNORE_INDEX, meta_negatives

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    outline = " Introduction\n2. Set clear goals\n3. The first step\n4. Conclusion"
    generated = tokenizer(outline, add_special_tokens=False)["input_ids"]
    rows, headings = meta_negatives([5, 6, 7], generated, tokenizer)
    assert headings == 4
    assert len(rows) == 3, "Introduction, The first step, Conclusion"
    for row, heading in zip(rows, ("Introduction", "The first step", "Conclusion"), strict=True):
        assert row.ids[:3] == [5, 6, 7]
        assert row.ids[3:] == generated[: len(row.ids) - 3]
        assert row.labels == [IGNORE_INDEX] * len(row.ids), "a negative has no target to learn"
        assert row.heads == [len(row.ids) - 1]
        # The negative is the heading's first token, in the outline's own context.
        assert heading.startswith(tokenizer.decode([row.ids[-1]]).strip())


def test_unlikelihood_is_minus_log_one_minus_p_of_each_negative(tiny_model: Path) -> None:
    """A batch of a target row and a negative: the cross-entropy is the target's alone, the
    unlikelihood -log(1 - p) of the negative's token, and a step on it lowers that probability."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pice_cloud.finetune.data import Example
    from pice_cloud.finetune.train import IGNORE_INDEX, Row, _pad, _token_loss_sum, encode

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    sketch = ("Set clear goals", "Take short breaks", "Use a task list")
    target = encode(Example("sketcher", 1, "q", sketch, None, tuple(sketch_messages("q", max_points=6, max_words=6)),
                            SKETCH_PREFILL, " Set clear goals\n2. Take short breaks\n3. Use a task list"), tokenizer, 0)
    ids = tokenizer("How do I plan? 1. Plan", add_special_tokens=False)["input_ids"]
    negative = Row(ids, [IGNORE_INDEX] * len(ids), [len(ids) - 1])
    pad = int(tokenizer.pad_token_id)
    both = _token_loss_sum(model, _pad([target, negative], pad, torch), torch)
    alone = _token_loss_sum(model, _pad([target], pad, torch), torch)
    assert both.tokens == alone.tokens
    assert both.cross_entropy.item() == pytest.approx(alone.cross_entropy.item(), rel=1e-4)
    assert alone.negatives == 0
    assert alone.unlikelihood.item() == 0.0
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -2], -1)[ids[-1]]
    assert both.negatives == 1
    assert both.negative_probability == pytest.approx(float(p), rel=1e-4)
    assert both.unlikelihood.item() == pytest.approx(float(-torch.log(1 - p)), rel=1e-4)
    only = _token_loss_sum(model, _pad([negative], pad, torch), torch)
    only.unlikelihood.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 1e4 * param.grad
    after = _token_loss_sum(model, _pad([negative], pad, torch), torch)
    assert after.negative_probability < 0.5 * only.negative_probability


def test_sketcher_run_outlines_its_instructions_for_negatives(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl")
    cfg = load_finetune_config(None, {
        "role": "sketcher", "data": str(data), "base": str(tiny_model), "store": False, "steps": 4, "seed": 1,
        "threads": 1, "work_dir": str(tmp_path / "work"), "report_dir": str(tmp_path),
        # The tiny tokenizer's pieces are short: the sketch prompt takes ~1,000 of them.
        "eval_examples": 4, "data_prep": {"holdout_fraction": 0.2, "max_seq_len": 2048}, "negatives_after": 0.5,
        "negatives_outlines": 5, "optim": {"batch_size": 2, "micro_batch_size": 2, "warmup_steps": 0},
    })
    report = finetune(cfg, progress=False).report
    prepared = prepare(data, "sketcher", cfg.data_prep, seed=1)
    assert report["negatives"]["at_step"] == 2
    assert len(prepared.questions) == 20 - len(prepared.heldout_questions)
    assert report["negatives"]["outlines"] == 5, "a seeded sample of the training instructions"
    assert report["negatives"]["seconds"] > 0
    assert report["heldout_outlines_before"]["outlines"] == report["heldout_outlines_after"]["outlines"] \
        == len(prepared.heldout_questions) > 0
    # The random model's outlines are words, not headings the guards know: few or no negatives.
    assert report["negatives"]["meta_headings"] <= report["negatives"]["headings"]


def test_outline_headings_count_every_list_item_as_a_heading() -> None:
    """Regression: "3)" and bulleted lines are headings of a generated outline, not text of the one
    before (the old regex knew "N." only)."""
    from pice_cloud.finetune.train import outline_headings

    text = " Introduction\n2) Set clear goals\nwhy it matters\n3. The first step\n- Conclusion\n4."
    found = outline_headings(text)
    assert [h for _, h in found] == ["Introduction", "Set clear goals", "The first step", "Conclusion"]
    for offset, heading in found:
        assert text[offset:].startswith(heading), "the offset is the heading's first character"
