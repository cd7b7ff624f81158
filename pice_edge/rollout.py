"""Following the fleet's model rollout on an edge: the policy, the build the edge adopted, where a
build is found on the edge's own disk, and how often a failed rollout is tried again.

The fleet's rollout (`FleetRollout`, retained on ``pice/v1/fleet/rollout``) is its desired
state. An edge that follows it (`pice-edge run` without ``--no-rollout``):

- **converges on it whenever it runs**: the retained message reaches it on every connect, at start
  too, whatever ``--model`` says;
- **remembers the build it adopted** (`AdoptedBuild`, a small file in its model store): a restart
  loads that build directly, also after the rollout message was withdrawn
  (``pice-cloud fleet --clear-rollout``), so a restart never changes what an edge runs. Clearing
  a rollout stops it where it is (edges not yet switched stay on their build); to take the fleet
  back, roll the old build out again (a rollback);
- **looks on its own disk first** (`local_build`): the folder it started from, the store, and the
  previous builds a fetch keeps (`pice_edge.model_transfer.KEEP_PREVIOUS_BUILDS`), each verified
  against its manifest, so a rollback works with the cloud unreachable or no longer offering it;
- **tries again** when the source could not be reached (`SourceUnreachableError`: refused, reset,
  5xx), with exponential back-off and jitter (`RolloutPolicy.retry_delay_s`) so a fleet does not
  hit a cloud that just came back all at once; a build that arrives damaged or different is not
  tried again (the edge stays on its build; a new rollout starts over).

Its progress is published, retained, as `EdgeRolloutState` on ``pice/v1/edge/{device}/rollout``
(``pice-cloud fleet`` shows it), and logged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pice_edge.errors import ModelError

if TYPE_CHECKING:
    from pice_edge.runtimes.base import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutPolicy:
    """How a node follows the fleet's model rollout (`FleetRollout`): ``loader`` builds a runtime
    on a model folder (the same runtime and settings the node started with), ``models_root`` is
    the model store to fetch into (default: the usual one), ``api_key`` the cloud's.

    A rollout whose source cannot be reached is tried again after ``retry_min_s``, doubling up to
    ``retry_max_s``, at most ``max_attempts`` times in all."""

    loader: Callable[[Path], Runtime]
    models_root: Path | None = None
    api_key: str | None = None
    retry_min_s: float = 2.0
    retry_max_s: float = 120.0
    max_attempts: int = 12

    @property
    def root(self) -> Path:
        """The model store rollouts fetch into."""
        from pice_edge.model_store import models_dir

        return self.models_root if self.models_root is not None else models_dir()

    def retry_delay_s(self, attempt: int) -> float:
        """Seconds before try ``attempt + 1`` after ``attempt`` failed: doubling from
        ``retry_min_s`` to ``retry_max_s``, each between half and all of that (jitter)."""
        ceiling = min(self.retry_max_s, self.retry_min_s * float(2 ** (attempt - 1)))
        return ceiling * random.uniform(0.5, 1.0)


class AdoptedBuild(BaseModel):
    """The build an edge switched to on the fleet's word, remembered across restarts."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    build: str = Field(pattern=r"^[0-9a-f]{12}$")
    #: The folder it was loaded from (a start looks there first).
    path: str = Field(max_length=4096)
    adopted_at: float


def adopted_path(root: Path, device_id: str) -> Path:
    """Where the edge ``device_id`` remembers its adopted build (one file per device: several
    edges may share a host's model store)."""
    return root / f".pice-rollout-{device_id}.json"


def remember(root: Path, device_id: str, model: str, build: str, path: Path) -> None:
    """Record that ``device_id`` runs ``model@build`` from ``path`` (atomically: a crash mid-write
    leaves the previous record)."""
    record = AdoptedBuild(model=model, build=build, path=str(path), adopted_at=time.time())
    target = adopted_path(root, device_id)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = target.with_suffix(".tmp")
        staging.write_text(record.model_dump_json(indent=2))
        os.replace(staging, target)
    except OSError as exc:
        log.warning("edge %s: cannot record its build in %s (%s); after a restart it starts on its --model and "
                    "follows the rollout again", device_id, target, exc)


def adopted(root: Path, device_id: str) -> AdoptedBuild | None:
    """The build ``device_id`` adopted last, or None (none, or an unreadable record: logged)."""
    target = adopted_path(root, device_id)
    try:
        text = target.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s (%s); starting on --model", target, exc)
        return None
    try:
        return AdoptedBuild.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        log.warning("ignoring %s: not a valid record (%s); starting on --model", target, exc)
        return None


def local_build(root: Path, model: str, build: str, also: Iterable[Path] = ()) -> Path | None:
    """A folder on this disk holding ``model@build`` intact (every file against its manifest's
    SHA-256), or None: ``also`` first (folders the edge ran from), then the store's current
    folder of ``model``, then the previous builds a fetch kept. Slow on big models (hashes every
    file): call it off the event loop."""
    from pice_edge.model_store import build_id, check_manifest
    from pice_edge.model_transfer import previous_build_path

    seen: set[Path] = set()
    for folder in (*also, root / model, previous_build_path(root, model, build)):
        if folder in seen or build_id(folder) != build:
            continue
        seen.add(folder)
        try:
            check_manifest(folder, full=True)
        except ModelError as exc:
            log.warning("%s holds %s@%s but fails verification (%s); not using it", folder, model, build, exc)
            continue
        return folder
    return None


__all__ = ["AdoptedBuild", "RolloutPolicy", "adopted", "adopted_path", "local_build", "remember"]
