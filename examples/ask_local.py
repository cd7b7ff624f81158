#!/usr/bin/env python3
"""Use PICE from Python: the single-host system (embedded broker + two edges + cloud LLM),
streaming the sketch and then each point as soon as it is settled.

    pice-edge models fetch smollm2-135m-instruct
    python examples/ask_local.py "What are the benefits of regular exercise?"
"""

from __future__ import annotations

import asyncio
import sys

from pice_cloud import AnswerEvent, PointEvent, SketchEvent, local_system
from pice_cloud.llm.transformers import TransformersBackend


async def main(question: str) -> None:
    llm = TransformersBackend("smollm2-135m-instruct", threads=1)
    try:
        async with local_system(llm, edges=2, edge_threads=1) as system:
            async for event in system.service.answer(question):
                if isinstance(event, SketchEvent):
                    print("Sketch:", "; ".join(event.points), flush=True)
                elif isinstance(event, PointEvent):
                    where = event.point.device_id or "cloud"
                    print(f"\n{event.point.index + 1}. {event.heading} [{where}]\n{event.point.text}", flush=True)
                elif isinstance(event, AnswerEvent):
                    print(f"\n({event.stats.total_s:.1f}s, {event.stats.points_edge} points from edges)")
    finally:
        await llm.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "How can I improve my time management skills?"))
