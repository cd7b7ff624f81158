"""The models this cloud offers to its edges, over HTTP (``/v1/pice/models``).

Edges fetch them with ``pice-edge models fetch NAME --from URL`` (`pice_edge.model_transfer`):
the manifest first (each file's size and SHA-256, the model store's own ``pice-model.json``),
then each file, with HTTP ``Range`` so that an interrupted transfer resumes. Only files that the
manifest lists are served, and only from inside the model's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.responses import FileResponse, JSONResponse

from pice_cloud.openai_schema import APIError
from pice_edge.errors import ModelError
from pice_edge.model_store import MANIFEST, check_manifest
from pice_edge.model_transfer import NAME, safe_relative_path


class ModelCatalog:
    """Models in a model store folder, offered to edges.

    Args:
        root: the model store (``pice-edge models`` / ``pice-cloud finetune`` write there).
        names: the models to offer; ``None``: every model in ``root`` whose files match its manifest.
    """

    def __init__(self, root: Path, names: list[str] | None = None) -> None:
        self.root = root
        self.names = names

    def _folder(self, name: str) -> Path:
        if not NAME.match(name) or (self.names is not None and name not in self.names):
            raise APIError(404, f"this cloud does not offer model {name!r}", code="model_not_found")
        folder = self.root / name
        if not (folder / MANIFEST).is_file():
            raise APIError(404, f"model {name!r} is not in this cloud's model store", code="model_not_found")
        return folder

    def listing(self) -> dict[str, Any]:
        models: list[dict[str, Any]] = []
        candidates = self.names if self.names is not None else sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if self.root.is_dir() else []
        for name in candidates:
            try:
                manifest = check_manifest(self._folder(name))
            except (APIError, ModelError):
                continue  # absent or damaged: not offered
            files = manifest["files"]
            entry: dict[str, Any] = {"name": name, "files": len(files),
                                     "bytes": sum(f["size"] for f in files.values())}
            entry.update({k: manifest[k] for k in ("source", "role", "base_model") if k in manifest})
            models.append(entry)
        return {"object": "list", "models": models}

    def manifest(self, name: str) -> JSONResponse:
        folder = self._folder(name)
        try:
            manifest = check_manifest(folder)
        except ModelError as exc:
            raise APIError(503, f"model {name!r} is damaged on the cloud ({exc})", code="model_damaged") from exc
        return JSONResponse(manifest)

    def file(self, name: str, rel: str) -> FileResponse:
        folder = self._folder(name)
        try:
            safe_relative_path(rel)
        except ModelError as exc:
            raise APIError(404, str(exc), code="file_not_found") from exc
        listed = json.loads((folder / MANIFEST).read_text()).get("files", {})
        path = (folder / rel).resolve()
        if rel not in listed or not path.is_relative_to(folder.resolve()) or not path.is_file():
            raise APIError(404, f"model {name!r} has no file {rel!r}", code="file_not_found")
        # FileResponse answers Range requests (206), which is what makes downloads resumable.
        return FileResponse(path, media_type="application/octet-stream")
