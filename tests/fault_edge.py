"""The real ``pice-edge`` command with an injected fault, for tests/test_faults.py.

    python -m tests.fault_edge [--delay S] [--duplicate] run --broker ... (the pice-edge run flags)

``--delay S``: the runtime sleeps S seconds before each batch (a slow or overloaded device).
``--duplicate``: every candidate is published twice (what a QoS 1 re-delivery looks like).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import pice_edge.runtimes
from pice_edge import cli
from pice_edge.runtimes.base import ChatMessage, GenerationRequest, GenerationResult, Runtime
from pice_edge.transport import MqttTransport


class SlowRuntime:
    """Wraps a runtime; every batch first waits ``delay`` seconds."""

    def __init__(self, inner: Runtime, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.name = inner.name
        self.model_id = inner.model_id

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        return self.inner.format_chat(messages, prefill)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        time.sleep(self.delay)
        return self.inner.generate(requests)

    def close(self) -> None:
        self.inner.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fault_edge")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--duplicate", action="store_true")
    faults, rest = parser.parse_known_args(argv)

    if faults.delay > 0:
        real_create = pice_edge.runtimes.create_runtime

        def slow_create(name: str, **kwargs: Any) -> Runtime:
            return SlowRuntime(real_create(name, **kwargs), faults.delay)

        pice_edge.runtimes.create_runtime = slow_create  # the CLI imports it when it runs
    if faults.duplicate:
        real_publish = MqttTransport.publish

        def publish_twice(self: MqttTransport, topic: str, payload: bytes, *, retain: bool = False) -> None:
            real_publish(self, topic, payload, retain=retain)
            if "/candidates/" in topic:
                real_publish(self, topic, payload, retain=retain)

        MqttTransport.publish = publish_twice  # type: ignore[method-assign]
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
