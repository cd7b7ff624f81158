#!/usr/bin/env python3
"""Use PICE from Python: the single-host system (embedded broker + two edges + cloud LLM),
streaming the sketch and then each point as soon as it is settled.

    pice-edge models fetch smollm2-135m-instruct
    python examples/ask_local.py "What are the benefits of regular exercise?"
"""

from __future__ import annotations

import asyncio
import sys

from pice_cloud import AnswerEvent, PointEvent, SketchEvent, load_config, start_system


async def main(question: str) -> None:
    # The defaults: SmolLM2 in the cloud, an embedded broker and two local edges. The same
    # configuration file as `pice-cloud serve --config` can be passed to load_config.
    config = load_config(None, {"discovery": {"enabled": False}})
    async with start_system(config) as system:
        async for event in system.service.answer(question, mode="progressive"):
            if isinstance(event, SketchEvent):
                print("Sketch:", "; ".join(event.points), flush=True)
            elif isinstance(event, PointEvent):
                where = event.point.device_id or "cloud"
                print(f"\n{event.point.index + 1}. {event.heading} [{where}]\n{event.point.text}", flush=True)
            elif isinstance(event, AnswerEvent):
                print(f"\n({event.stats.total_s:.1f}s, {event.stats.points_edge} points from edges)")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "How can I improve my time management skills?"))
