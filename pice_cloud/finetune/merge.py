"""Merging a trained LoRA adapter into its base model and installing the result in the model store.

The merged model is an ordinary Hugging Face folder (fp32 safetensors, the base's tokenizer,
chat template and generation settings), so every runtime and the ONNX export take it as they
take the base model; no peft is needed to serve it. It is written to a scratch folder in the
work directory first and handed to `pice_edge.model_store.install`, which copies it into the
store with a manifest of SHA-256 sums and renames it into place: a failure leaves no model
half-written in the store.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pice_cloud.errors import FinetuneError
from pice_cloud.finetune.config import FinetuneConfig
from pice_edge import model_store

log = logging.getLogger(__name__)


def merge_and_install(model: Any, tokenizer: Any, cfg: FinetuneConfig, work: Path, *,
                      meta: dict[str, Any]) -> Path:
    """Merge ``model``'s adapter into its weights, save it with ``tokenizer``, install it as
    ``cfg.model_name``; return its folder in the store.

    Raises:
        FinetuneError: the merged model cannot be saved.
        ModelError: it cannot be installed (name taken without ``replace``, copy failure).
    """
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged = merged.to("cpu").eval()
    merged.config.use_cache = True  # training switched it off; serving wants the KV cache
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="merged-", dir=work) as tmp:
        folder = Path(tmp) / cfg.model_name
        try:
            merged.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        except (OSError, ValueError, RuntimeError) as exc:
            raise FinetuneError(f"cannot save the merged model to {folder}: {exc}") from exc
        # The base's license and chat template travel with the model.
        base = model_store.resolve(cfg.base)
        for extra in ("chat_template.jinja", "LICENSE", "README.md"):
            if (base / extra).is_file() and not (folder / extra).exists():
                shutil.copy2(base / extra, folder / extra)
        path = model_store.install(folder, cfg.model_name, meta=meta, replace=cfg.replace)
    log.info("merged model installed as %s in %s", cfg.model_name, path)
    return path
