"""Per-app state: what the routes and request jobs need, one instance per app on ``app.state.pice``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pice_cloud.config import CloudConfig
from pice_cloud.events import AnswerStats
from pice_cloud.llm.base import LLMBackend
from pice_cloud.metrics import Metrics
from pice_cloud.server.admission import Admission
from pice_cloud.service import PiceService


@dataclass
class ApiState:
    """What the routes need; one per app, on ``app.state.pice``."""

    service: PiceService
    llm: LLMBackend
    config: CloudConfig
    admission: Admission
    metrics: Metrics
    #: Set when the shutdown grace period is over: requests still running end with an error.
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))
    #: Clean-up tasks of cancelled requests (strong references until they finish).
    background: set[asyncio.Future[None]] = field(default_factory=set)
    #: Further sections of ``GET /health`` (the site's uplink), computed per request.
    health_sections: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def served_by(self, stats: AnswerStats) -> Literal["cloud", "site", "device"]:
        """Where an answer of this server was computed (``pice.served_by``): the cloud; or, on a
        site (``pice-cloud site``), across the site's peer edges, or by the site device alone."""
        if self.config.site is None:
            return "cloud"
        return "site" if stats.points_edge else "device"

    def answer_tokens(self, asked: int | None) -> int:
        """Most tokens a request's answer may take: what it asked for (``max_tokens``), within
        the service's ``max_answer_tokens``."""
        cap = self.service.config.max_answer_tokens
        return min(asked or cap, cap)

    @property
    def model_ids(self) -> list[str]:
        ids = [self.config.server.model_name]
        if self.llm.model_id not in ids:
            ids.append(self.llm.model_id)
        return ids
