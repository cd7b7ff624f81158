"""Export a Hugging Face causal LM folder to ONNX for `OnnxRuntime` (needs ``pice[export]``).

Why our own exporter (``torch.onnx.export`` of a thin wrapper) rather than the two off-the-shelf
ones, measured on SmolLM2-135M here (one CPU thread, 150-token prompt; see ``tools/export_onnx.py``):

* optimum's exporter (``optimum-onnx`` 0.1.0) pins ``transformers<4.58`` and so cannot be installed
  next to the transformers 5 that the rest of PICE uses; in a separate virtualenv its graph computed
  logits for every prompt position (prefill 0.69 s at batch 1, decode step 114 ms at batch 4).
* onnxruntime-genai's model builder (0.18) installs and is fast (decode 64 ms at batch 1, 86 ms at
  batch 4), but its GroupQueryAttention graph takes no position ids and derives each row's positions
  from the attention mask's row sum, which assumes right-aligned, contiguous rows: left-padded
  batches and sequences that join a running batch (continuous batching) are not expressible.
* This wrapper keeps standard attention with an explicit attention mask and position ids (so any
  row may carry left padding), and returns only the last position's logits (prefill 0.54 s at batch
  1, decode 65 ms at batch 1 and 78 ms at batch 4): as fast as the builder's, and it batches freely.

Graph inputs: ``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq], ``position_ids``
[batch, seq], ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim]; outputs
``logits`` [batch, vocab] (last position only) and ``present.{i}.key|value``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pice_edge.errors import ModelError, RuntimeUnavailableError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "int4")
#: Files copied next to the ONNX graph so the runtime needs no Hugging Face library.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")


def onnx_file(folder: Path, precision: str) -> Path:
    """Where the export of ``precision`` lives inside an ONNX model folder."""
    return folder / f"model-{precision}.onnx"


def default_output(hf_folder: Path) -> Path:
    """The default ONNX folder for a Hugging Face folder: ``<folder>/onnx``."""
    return hf_folder / "onnx"


def export(hf_folder: Path, out_dir: Path | None = None, *, precisions: tuple[str, ...] = ("fp32",),
           opset: int = 17) -> dict[str, Path]:
    """Export ``hf_folder`` to ONNX (fp32), then quantize to the other ``precisions``.

    int8 is onnxruntime's dynamic quantization of the MatMul weights (per tensor); int4 packs the
    MatMul weights into ``MatMulNBits`` blocks of 32 (weight-only, symmetric).

    Returns:
        precision -> path of its ``.onnx`` file.
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ModelError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    out = out_dir or default_output(hf_folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in _SIDE_FILES:
        if (hf_folder / name).is_file():
            shutil.copy2(hf_folder / name, out / name)
    fp32 = onnx_file(out, "fp32")
    _export_fp32(hf_folder, fp32, opset=opset)
    paths = {"fp32": fp32}
    if "int8" in precisions:
        paths["int8"] = quantize_int8(fp32, onnx_file(out, "int8"))
    if "int4" in precisions:
        paths["int4"] = quantize_int4(fp32, onnx_file(out, "int4"))
    (out / "pice-onnx.json").write_text(json.dumps(
        {"source": str(hf_folder), "opset": opset, "files": {k: v.name for k, v in paths.items()}}, indent=2))
    return paths


def _export_fp32(hf_folder: Path, target: Path, *, opset: int) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache
    except ImportError as exc:
        raise RuntimeUnavailableError(f"exporting to ONNX needs torch and transformers: pip install 'pice[export]' "
                                      f"({exc})") from exc
    started = time.perf_counter()
    # Eager attention traces to plain MatMul/Softmax with the explicit mask: portable to every EP.
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager").eval()
    config = model.config
    layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", config.num_attention_heads))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    class _Wrapper(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            cache = DynamicCache(config=config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=True, logits_to_keep=1)
            present: list[Any] = []
            for layer in _cache_of(out).layers:
                present += [layer.keys, layer.values]
            # Only the last position's logits: prefill skips (prompt length x vocab) of lm_head work.
            return (out.logits[:, -1, :], *present)

    batch, seq, past_len = 2, 3, 4
    args = (
        torch.randint(0, int(config.vocab_size), (batch, seq)),
        torch.ones(batch, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(),
        *[torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers)],
    )
    kv_in = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    kv_out = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    dynamic.update({name: {0: "batch", 2: "past_sequence"} for name in kv_in})
    dynamic.update({name: {0: "batch", 2: "total_sequence"} for name in kv_out})
    target.parent.mkdir(parents=True, exist_ok=True)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(_Wrapper(), args, str(target), input_names=["input_ids", "attention_mask", "position_ids",
                                                                        *kv_in],
                          output_names=["logits", *kv_out], dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False)
    log.info("exported %s to %s in %.1fs", hf_folder, target, time.perf_counter() - started)


def _quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise RuntimeUnavailableError(f"quantizing needs onnxruntime: pip install 'pice[edge]' ({exc})") from exc
    return quantization


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantization of the weight MatMuls, per tensor (activations quantized at run time)."""
    q = _quantization()
    import onnx

    started = time.perf_counter()
    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    # Only weight MatMuls (attention's activation x activation MatMuls stay fp32), and per tensor:
    # per_channel=True produced garbage text on SmolLM2 (MiniLM similarity 0.01 vs fp32's 0.60).
    attention = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    q.quantize_dynamic(str(source), str(target), weight_type=q.QuantType.QInt8, per_channel=False,
                       op_types_to_quantize=["MatMul"], nodes_to_exclude=attention)
    log.info("int8 model %s in %.1fs", target, time.perf_counter() - started)
    return target


def quantize_int4(source: Path, target: Path, *, block_size: int = 32) -> Path:
    """Weight-only 4-bit quantization of the MatMul weights into ``MatMulNBits`` nodes."""
    q = _quantization()
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    started = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=block_size, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    del q
    log.info("int4 model %s in %.1fs", target, time.perf_counter() - started)
    return target


def _cache_of(output: Any) -> Any:
    # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated).
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
