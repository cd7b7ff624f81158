#!/usr/bin/env python3
"""Stream an answer from `pice-cloud serve` with the official `openai` package.

    pice-cloud serve &                       # embedded broker, 2 local edges, SmolLM2
    python examples/openai_client.py "What are the benefits of regular exercise?"
    python examples/openai_client.py --mode cloud "What is the capital of France?"

The answer arrives point by point (progressive mode); the ``pice`` extension field picks the mode
per request and the last chunk tells where the points were expanded.
"""

from __future__ import annotations

import argparse
import sys
import time

from openai import OpenAI


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="How can I improve my time management skills?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--mode", choices=("auto", "progressive", "cloud"), default="auto")
    args = parser.parse_args()

    # The server needs no key unless server.api_key is set; the client insists on one.
    client = OpenAI(base_url=args.base_url, api_key="pice")
    started = time.perf_counter()
    first: float | None = None
    stream = client.chat.completions.create(
        model="pice",
        messages=[{"role": "user", "content": args.question}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"pice": {"mode": args.mode}},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - started
            print(chunk.choices[0].delta.content, end="", flush=True)
        info = (chunk.model_extra or {}).get("pice")
        if info:
            where = f"{info['points_edge']} points from edges, {info['points_cloud']} from the cloud"
            print(f"\n\n[mode {info['mode']}; {where}]", file=sys.stderr)
        if chunk.usage is not None:
            extra = chunk.usage.model_extra or {}
            print(f"[tokens: prompt {chunk.usage.prompt_tokens}, completion {chunk.usage.completion_tokens}; "
                  f"generated in the cloud {extra.get('cloud_tokens')}, at the edge {extra.get('edge_tokens')}]",
                  file=sys.stderr)
    total = time.perf_counter() - started
    print(f"[first text after {first or total:.2f}s, done after {total:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
