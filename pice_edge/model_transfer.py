"""Models from the cloud: download a model the cloud offers (``pice-cloud serve`` publishes its
model store under ``/v1/pice/models``), resumably, verify every file, install atomically.

An operator with fifty Jetsons fetches and exports once, on the cloud; every edge then runs

    pice-edge models fetch smollm2-135m-pice-expander --from http://cloud:8000

The manifest is the model store's own (``pice-model.json``: each file's size and SHA-256). A
download goes to a staging folder beside the store (``.pice-fetch-NAME``): ``.part`` files grow
with HTTP ``Range`` requests, so an interrupted transfer resumes where it stopped, and a file
joins the staging folder only once its SHA-256 matches. The finished folder replaces the
installed one with renames, so a broken or partial download never touches the model in use.
Concurrent fetches of one model take turns (a lock file); the second finds it installed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from pice_edge.errors import ModelError
from pice_edge.model_store import MANIFEST, build_id, build_of, check_manifest, models_dir, sha256_file

log = logging.getLogger(__name__)

#: Model names that travel in URLs and become folder names.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
#: Where models are offered on a cloud's HTTP API.
API_PATH = "/v1/pice/models"
#: Builds a fetch replaces are kept beside the store (``.builds/NAME@BUILD``), this many per
#: model, newest first: a rollback to the build an edge ran before needs no download, and works
#: when the cloud no longer offers it (or is unreachable). One build of SmolLM2 is 517 MB (fp32).
KEEP_PREVIOUS_BUILDS = 1
#: HTTP answers that say "not now" rather than "no": worth another try later.
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class SourceUnreachableError(ModelError):
    """The cloud that offers a model could not be reached, or answered "not now" (5xx, 429) or
    broke off a transfer: the same fetch may succeed later (a rollout retries it with back-off)."""


def safe_relative_path(rel: str) -> PurePosixPath:
    """``rel`` as a path inside a model folder, or `ModelError` for one that would leave it
    (absolute, ``..``, a backslash, an empty part) or overwrite the manifest."""
    path = PurePosixPath(rel)
    bad_part = any(p in ("", ".", "..") for p in rel.split("/"))
    if not rel or "\\" in rel or "\x00" in rel or path.is_absolute() or bad_part or rel == MANIFEST:
        raise ModelError(f"the manifest names {rel!r}, a path outside the model folder; refusing it")
    return path


def validate_manifest(name: str, manifest: Any) -> dict[str, dict[str, Any]]:
    """The manifest's files, checked: safe paths, sizes, SHA-256 digests."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise ModelError(f"the cloud's manifest of {name!r} lists no files")
    files: dict[str, dict[str, Any]] = manifest["files"]
    for rel, info in files.items():
        safe_relative_path(rel)
        size, digest = (info or {}).get("size"), (info or {}).get("sha256")
        if not isinstance(size, int) or size < 0 or not isinstance(digest, str) or not _SHA256.match(digest):
            raise ModelError(f"the cloud's manifest of {name!r} has no valid size and SHA-256 for {rel!r}")
    return files


class _Client:
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ModelError(f"--from must be the cloud's http(s):// URL, not {base_url!r}")
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout_s = api_key, timeout_s

    def open(self, path: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(self.base + path, headers=dict(headers or {}))
        if self.api_key:
            # Not passed on to where a redirect points: the key is for this cloud only.
            request.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)  # http(s) only: checked above
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise ModelError(f"{self.base} wants an API key: pass --api-key (or PICE_API_KEY)") from exc
            kind = SourceUnreachableError if exc.code in _TRANSIENT_HTTP else ModelError
            raise kind(f"{self.base}{path}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SourceUnreachableError(f"cannot reach the cloud at {self.base} ({exc}); is `pice-cloud serve` "
                                         "running?") from exc

    def json(self, path: str) -> Any:
        with self.open(path) as response:
            try:
                return json.loads(response.read(16 << 20))
            except ValueError as exc:
                raise ModelError(f"{self.base}{path} did not answer JSON") from exc


def offered(base_url: str, *, api_key: str | None = None, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The models a cloud offers (name, files, bytes)."""
    listing = _Client(base_url, api_key, timeout_s).json(API_PATH)
    models: list[dict[str, Any]] = listing.get("models", []) if isinstance(listing, dict) else []
    return models


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _installed_matches(target: Path, files: dict[str, dict[str, Any]]) -> bool:
    try:
        local = check_manifest(target, full=True)
    except ModelError:
        return False
    return build_of(local["files"]) == build_of(files)


def fetch_from(base_url: str, name: str, *, api_key: str | None = None, root: Path | None = None,
               progress: bool = True, timeout_s: float = 60.0, expected_build: str | None = None) -> Path:
    """Download model ``name`` from the cloud at ``base_url`` into the model store; its folder.

    Idempotent: a model already installed with the same files is left as it is. With
    ``expected_build``, a manifest of another build is refused before anything is downloaded.

    Raises:
        ModelError: the cloud is unreachable or does not offer the model, the manifest names a
            path outside the model folder, a file's SHA-256 does not match (that file is
            discarded; run again to resume the others), or the disk is full. The installed
            model, if any, is untouched in every case.
    """
    if not NAME.match(name):
        raise ModelError(f"invalid model name {name!r}")
    root = root or models_dir()
    client = _Client(base_url, api_key, timeout_s)
    quoted = urllib.parse.quote(name)
    manifest = client.json(f"{API_PATH}/{quoted}/manifest")
    files = validate_manifest(name, manifest)
    if expected_build is not None and build_of(files) != expected_build:
        raise ModelError(f"the cloud offers {name} build {build_of(files)}, not the announced {expected_build}")
    target = root / name
    with _locked(root, name):
        if _installed_matches(target, files):
            log.info("%s is installed and matches the cloud's manifest", name)
            return target
        staging = root / f".pice-fetch-{name}"
        staging.mkdir(parents=True, exist_ok=True)
        total = sum(int(info["size"]) for info in files.values())
        bar = _progress(total, name) if progress else None
        try:
            for rel, info in sorted(files.items()):
                _fetch_file(client, f"{API_PATH}/{quoted}/files/{urllib.parse.quote(rel)}", staging / rel,
                            int(info["size"]), str(info["sha256"]), bar)
        except http.client.HTTPException as exc:  # the cloud broke off mid-file (not an OSError)
            raise SourceUnreachableError(f"the transfer of {name} from {client.base} broke off ({exc!r}); run "
                                         "again to resume") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise ModelError(f"no room for {name} in {root} ({exc.strerror}): it needs {total / 2**20:.0f} MiB; "
                                 f"free some space and run the same command again (it resumes)") from exc
            if isinstance(exc, (ConnectionError, TimeoutError)):
                raise SourceUnreachableError(f"the transfer of {name} from {client.base} broke off ({exc}); run "
                                             "again to resume") from exc
            raise ModelError(f"cannot write {name} into {root}: {exc}") from exc
        finally:
            if bar is not None:
                bar.close()
        # Files an earlier download of another build left in staging are not part of this one.
        for leftover in sorted(staging.rglob("*"), reverse=True):
            rel = leftover.relative_to(staging).as_posix()
            if leftover.is_file() and rel not in files:
                leftover.unlink()
            elif leftover.is_dir() and not any(leftover.iterdir()):
                leftover.rmdir()
        meta = {k: v for k, v in manifest.items() if k != "files"}
        (staging / MANIFEST).write_text(json.dumps({"files": files, **meta, "fetched_from": client.base,
                                                    "fetched_at": round(time.time(), 3)}, indent=2))
        _swap_into_place(staging, target)
    log.info("fetched %s from %s into %s", name, client.base, target)
    return target


def _progress(total: int, name: str) -> Any:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)


def _fetch_file(client: _Client, url_path: str, dest: Path, size: int, digest: str, bar: Any) -> None:
    if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == digest:
        if bar is not None:
            bar.update(size)
        return  # finished in an earlier run
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    if offset > size:
        part.unlink()
        offset = 0
    hasher = hashlib.sha256()
    if offset:
        with part.open("rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                hasher.update(block)
    if offset < size:
        with client.open(url_path, {"Range": f"bytes={offset}-"} if offset else None) as response:
            if offset and response.status != 206:
                # The server ignored the range: start the file over.
                offset, hasher = 0, hashlib.sha256()
                part.unlink(missing_ok=True)
            if bar is not None:
                bar.update(offset)
            try:
                with part.open("ab") as out:
                    remaining = size - offset
                    # Never more than the manifest says: a server cannot fill the disk.
                    while remaining > 0 and (block := response.read(min(_CHUNK, remaining))):
                        out.write(block)
                        hasher.update(block)
                        remaining -= len(block)
                        if bar is not None:
                            bar.update(len(block))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    part.unlink(missing_ok=True)  # give the space back
                raise
    elif bar is not None:
        bar.update(size)
    got = part.stat().st_size
    if got != size or hasher.hexdigest() != digest:
        part.unlink(missing_ok=True)
        raise ModelError(f"{dest.name}: {'SHA-256 does not match' if got == size else f'{got} of {size} bytes'} "
                         "the cloud's manifest; the file was discarded (run again; if it persists, run "
                         "`pice-edge models verify` on the cloud's copy)")
    part.rename(dest)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Two renames on one file system: readers see the old model or the new one, never a mix.
    The build replaced is kept as a previous build (`previous_build_path`), up to
    `KEEP_PREVIOUS_BUILDS` per model."""
    old = target.with_name(f".{target.name}.previous")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)
        raise
    _keep_previous(old, target.parent, target.name)


def previous_build_path(root: Path, name: str, build: str) -> Path:
    """Where a replaced build of model ``name`` is kept in the store ``root``."""
    return root / ".builds" / f"{name}@{build}"


def _keep_previous(old: Path, root: Path, name: str) -> None:
    """Keep the replaced folder ``old`` as a previous build of ``name``; drop the oldest beyond
    `KEEP_PREVIOUS_BUILDS` (a folder without a manifest is no build: dropped)."""
    build = build_id(old) if old.exists() else None
    if build is None or KEEP_PREVIOUS_BUILDS <= 0:
        shutil.rmtree(old, ignore_errors=True)
        return
    kept = previous_build_path(root, name, build)
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        if kept.exists():
            shutil.rmtree(kept)
        old.rename(kept)
        os.utime(kept)  # the newest previous build: the last one pruned
    except OSError as exc:
        log.warning("could not keep the previous build of %s (%s); it is removed", name, exc)
        shutil.rmtree(old, ignore_errors=True)
        return
    builds = sorted(kept.parent.glob(f"{name}@*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in builds[KEEP_PREVIOUS_BUILDS:]:
        shutil.rmtree(stale, ignore_errors=True)


__all__ = ["API_PATH", "KEEP_PREVIOUS_BUILDS", "SourceUnreachableError", "fetch_from", "offered",
           "previous_build_path", "safe_relative_path", "validate_manifest"]
