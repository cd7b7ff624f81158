"""Every default of the cloud's request path, in one place, with units.

The typed configuration (`pice_cloud.config`), the scheduler's `Budget` and the service read
these names; nothing else spells a default out. Protocol limits (id and fleet-name patterns,
payload and text sizes) live with the wire protocol in `pice_edge.protocol`.
"""

from __future__ import annotations

from typing import Final

from pice_edge.model_store import DEFAULT_MODEL
from pice_edge.protocol import MAX_QUESTION_CHARS as PROTOCOL_MAX_QUESTION_CHARS

__all__ = ["DEFAULT_MODEL"]

# --- sketch and expansion budget (an idle system's; `plan_budget` shortens it under load) ------
#: Most points in a sketch.
MAX_POINTS: Final = 6
#: Most words in one sketch heading.
MAX_WORDS: Final = 6
#: Decode budget of the sketch (tokens).
SKETCH_TOKENS: Final = 64
#: Decode budget of one point's expansion (tokens).
TOKENS_PER_POINT: Final = 80
#: A sketch with fewer than ``max_points`` points shares the answer's budget (``max_points *
#: tokens_per_point``) among them, each point up to this many times ``tokens_per_point``: the
#: answer's length should not hang on how many headings the sketch happened to have.
POINT_STRETCH: Final = 2.0
#: Longest cloud-only answer (tokens).
MAX_ANSWER_TOKENS: Final = 400

#: Longest question (chat history included) sent to the edges; the wire protocol's own cap.
MAX_QUESTION_CHARS: Final = PROTOCOL_MAX_QUESTION_CHARS

# --- the HTTP API -------------------------------------------------------------------------------
#: Largest request body (bytes): a 50,000-character question fits with room to spare; a body
#: of megabytes would only burn CPU on parsing and tokenizing before it is refused.
MAX_BODY_BYTES: Final = 256 * 1024

#: Longest prompt (tokens: the messages under the chat template, or a raw prompt) when the
#: embedded model runs on a CPU. Prefill grows faster than the prompt (attention is quadratic):
#: measured here (SmolLM2-135M, one core, one forward pass) 1,024 tokens take 3.1 s, 2,048 take
#: 6.9 s, 4,096 take 19 s, and issue 27's 7,662-token prompt held its slot for 150 s before the
#: first byte. At 2,048 the worst prompt costs about as much as a whole default answer's decode;
#: every multi-turn chat of ordinary length still fits. On a GPU or a remote engine the model's
#: context is the only limit unless ``server.max_prompt_tokens`` is set.
CPU_MAX_PROMPT_TOKENS: Final = 2048

#: Who expands a progressive answer's first point ("edge" or "cloud", which streams it).
FIRST_POINT: Final = "edge"

# --- ensemble and deadlines ---------------------------------------------------------------------
#: Most edges expanding one point; replicas only use slots that are free now, so under load the
#: width falls to 1 by itself. Measured in tools/results/ensemble.json and quality_auto.md.
ENSEMBLE_WIDTH: Final = 3
#: Sampling temperature of a point's replicas 2..width (the first keeps the request's sampling):
#: greedy replicas of the same model would write the same text and give the selector no choice.
ENSEMBLE_TEMPERATURE: Final = 0.7
#: A point's deadline is DEADLINE_FACTOR x its predicted finish, clamped to [floor, cap] seconds.
#: An edge that left is noticed by its last will or missed heartbeats, not by the deadline: the
#: deadline only decides how long a live edge that is slower than predicted (a busy host, a batch
#: larger than the one its rate was measured at) may take before the cloud writes the point
#: itself. That costs the cloud the point's prefill and decode, and the answer's first content no
#: longer waits for it (the first heading goes out at once), so the cloud waits 5x, not 3x.
DEADLINE_FLOOR_S: Final = 5.0
DEADLINE_FACTOR: Final = 5.0
DEADLINE_CAP_S: Final = 60.0

#: After the cloud reconnects to the broker, how many of its heartbeats an edge it knew gets to
#: re-announce itself before it expires, on top of the longest pause between two reconnection
#: tries (`pice_cloud.fleet.Fleet.reconnected`). While the cloud is disconnected no edge expires,
#: and the time does not count against a point's deadline (up to ``service.deadline_cap_s``):
#: the candidates the edges write meanwhile are queued (QoS 1, persistent sessions) and arrive.
RECONNECT_EDGE_GRACE_HEARTBEATS: Final = 2.0
#: Times one point may be placed on another edge after its edge stopped answering or refused
#: it. Refusals come back at once, so a few tries cost little; then the cloud expands it.
MAX_REPLACEMENTS: Final = 3

#: A sketch that fails the guards is sampled once more at this temperature (at least), with a
#: seed of its own: greedy decoding would write the same outline again.
SKETCH_RESAMPLE_TEMPERATURE: Final = 0.7
#: The cloud's own expansion of a point, refused by the guards, is sampled once more at this
#: temperature (at least), with a seed of its own.
EXPANSION_RESAMPLE_TEMPERATURE: Final = 0.7

# --- edge sampling ------------------------------------------------------------------------------
#: 0 is greedy decoding.
TEMPERATURE: Final = 0.0
TOP_P: Final = 1.0

# --- measurement smoothing (exponential moving averages: new = (1 - w) * old + w * sample) -------
#: Weight of a new sample of the cloud LLM's decode speed: responsive within a few requests.
CLOUD_RATE_SAMPLE_WEIGHT: Final = 0.3
#: Weight of a new sample of an edge's link delay: a delay sample includes queueing noise, so
#: it moves slower than the decode speed.
LINK_DELAY_SAMPLE_WEIGHT: Final = 0.2
#: Shortest generation (tokens) whose timing counts as a decode-speed sample: below it, the
#: prefill dominates and the rate would read low.
MIN_RATE_SAMPLE_TOKENS: Final = 8

# --- the cloud LLM ----------------------------------------------------------------------------
#: Sequences the cloud LLM decodes together (the embedded backend batches continuously; for a
#: remote engine, the scheduler's load estimate).
CLOUD_MAX_BATCH: Final = 8

# --- local edges (single-host setup) ----------------------------------------------------------
#: In-process edges on the embedded broker (0 with an external broker).
LOCAL_EDGES: Final = 2
EDGE_MAX_BATCH: Final = 4
#: Seconds to wait for edges to register at start.
EDGE_WAIT_S: Final = 5.0
