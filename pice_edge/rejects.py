"""Counting and logging of rejected inbound messages.

A fleet can be noisy: a misconfigured device may publish the same bad payload every second.
Each kind of rejection is counted every time and logged once per (source, kind) so the log
stays readable and the counters (exported by the cloud's /metrics) tell the volume.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger(__name__)


class Rejections:
    """Thread-safe counter of rejected messages, keyed by (source, kind)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def record(self, source: str, kind: str, detail: str) -> None:
        """Count one rejected message; log the first of each (source, kind)."""
        with self._lock:
            first = (source, kind) not in self._counts
            self._counts[(source, kind)] += 1
        if first:
            log.warning("rejected %s message (%s): %s — further ones are only counted", source, kind, detail)

    def count(self, source: str | None = None, kind: str | None = None) -> int:
        """How many messages were rejected, optionally for one source and/or kind."""
        with self._lock:
            return sum(
                n
                for (s, k), n in self._counts.items()
                if (source is None or s == source) and (kind is None or k == kind)
            )

    def snapshot(self) -> dict[tuple[str, str], int]:
        """A copy of all counts."""
        with self._lock:
            return dict(self._counts)
