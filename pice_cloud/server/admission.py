"""Bounded admission: a fixed number of requests run, a bounded queue waits, the rest get 429.

Slots are handed to waiters in arrival order; a waiter gives up after ``queue_timeout_s`` (503);
`Admission.drain` (shutdown) refuses newcomers and every waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from pice_cloud.openai_schema import APIError


class Admission:
    """A bounded gate: ``max_concurrent`` holders, ``max_queue`` waiters, everyone else refused.

    Slots are handed to waiters in arrival order. `drain` (shutdown) refuses newcomers and
    wakes every waiter with a refusal.
    """

    def __init__(self, max_concurrent: int, max_queue: int, *, queue_timeout_s: float, retry_after_s: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.active = 0
        self.draining = False
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def _refuse(self, status: int, message: str, code: str) -> APIError:
        return APIError(status, message, type="server_error" if status == 503 else "rate_limit_error", code=code,
                        headers={"Retry-After": str(self.retry_after_s)})

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if needed; raise `APIError` 429/503 when refused."""
        if self.draining:
            raise self._refuse(503, "the server is shutting down; retry on another instance", "shutting_down")
        if self.active < self.max_concurrent and not self.queued:
            self.active += 1
            return
        if self.queued >= self.max_queue:
            raise self._refuse(429, f"server overloaded: {self.active} requests running and {self.queued} waiting; "
                                    f"retry after {self.retry_after_s}s", "overloaded")
        slot: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await asyncio.wait({slot}, timeout=self.queue_timeout_s)
        except asyncio.CancelledError:
            if slot.done() and slot.result():
                self.release()  # handed a slot just as we were cancelled: pass it on
            slot.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(slot)
        if not slot.done():
            slot.cancel()
            raise self._refuse(503, f"no capacity within {self.queue_timeout_s:.0f}s; retry later", "queue_timeout")
        if not slot.result():
            raise self._refuse(503, "the server is shutting down; retry on another instance", "shutting_down")

    def release(self) -> None:
        """Give a slot back (to the longest waiter, if any)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self.active = max(0, self.active - 1)

    def drain(self) -> None:
        """Refuse new requests and every waiter (shutdown)."""
        self.draining = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)
