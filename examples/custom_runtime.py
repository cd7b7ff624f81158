#!/usr/bin/env python3
"""Plug your own inference runtime into a PICE edge node, in one file.

A runtime is any object with ``name``, ``model_id``, ``format_chat(messages, prefill)``,
``generate(requests) -> results`` and ``close()`` (the `pice_edge.Runtime` protocol): wrap
llama.cpp, a vendor SDK, an HTTP model server, or — as here — any Python callable that maps a
prompt to text. `EdgeNode` takes it as is; it batches tasks for you and calls ``generate`` on a
worker thread. (For continuous batching, also implement `pice_edge.runtimes.SteppingRuntime`.)

This example runs without any model library: its "model" is a tiny extractive summariser. It
starts the embedded MQTT broker, an edge node with the custom runtime, and plays the cloud:
sends one expansion task per point of a sketch and prints the candidates.

    python examples/custom_runtime.py
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

from pice_cloud import EmbeddedBroker
from pice_edge import (
    CANDIDATES_FILTER,
    BrokerSettings,
    Candidate,
    ChatMessage,
    EdgeNode,
    ExpandTask,
    GenerationRequest,
    GenerationResult,
    MqttTransport,
    decode,
    edge_tasks_topic,
    encode,
)


class CallableRuntime:
    """A `Runtime` around ``complete(prompt, max_words) -> text``.

    Real integrations replace ``complete`` with their engine (for llama-cpp-python:
    ``lambda p, n: llm(p, max_tokens=n)["choices"][0]["text"]``) and, if the engine can, run a
    whole batch at once in ``generate``.
    """

    name = "callable"

    def __init__(self, complete: Callable[[str, int], str], model_id: str = "custom") -> None:
        self.complete = complete
        self.model_id = model_id

    def format_chat(self, messages: Sequence[ChatMessage], prefill: str = "") -> str:
        # Use your model's own chat template here; this one is ChatML.
        turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
        return f"{turns}<|im_start|>assistant\n{prefill}"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = []
        for request in requests:
            text = self.complete(request.prompt, request.max_new_tokens)
            words = len(text.split())
            # No per-token probabilities from this engine: report a neutral confidence that
            # decreases with length (the cloud's ensemble weighs it against other signals).
            results.append(GenerationResult(text=text, token_count=words, mean_logprob=-math.log1p(words) / 10))
        return results

    def close(self) -> None:
        pass


def keyword_expander(prompt: str, max_words: int) -> str:
    """The stand-in model: expands the requested point from its own words."""
    point = prompt.split('Expand point', 1)[-1].split('"')[1] if '"' in prompt else "this point"
    text = (f"{point} matters because it turns intentions into daily habits. "
            f"Start small with {point.lower()} and review what worked at the end of each week.")
    return " ".join(text.split()[:max_words])


async def main() -> None:
    broker = EmbeddedBroker()
    url = await broker.start()
    settings = BrokerSettings(url=url)
    node = EdgeNode(CallableRuntime(keyword_expander, model_id="keyword-expander"), device_id="custom-edge",
                    broker=settings, max_batch=4)
    cloud = MqttTransport(settings, client_id="example-cloud")
    sketch = ["Set clear goals", "Prioritize tasks", "Limit distractions"]
    got: asyncio.Queue[Candidate] = asyncio.Queue()
    cloud.add_subscription(CANDIDATES_FILTER, lambda m: got.put_nowait(decode(Candidate, m.payload)))
    await node.start()
    await cloud.connect()
    try:
        for i in range(len(sketch)):
            task = ExpandTask(request_id="example", point_index=i, question="How can I manage my time better?",
                              sketch=sketch, max_new_tokens=40, deadline=time.time() + 30)
            cloud.publish(edge_tasks_topic("custom-edge"), encode(task))
        for _ in sketch:
            candidate = await asyncio.wait_for(got.get(), timeout=30)
            print(f"{candidate.point_index + 1}. [{candidate.device_id}/{candidate.model_id}] {candidate.text}")
        print(f"batches: {node.stats.batch_sizes}")
    finally:
        await cloud.close()
        await node.stop()
        await broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
