"""Wire protocol: strict validation, size limits, and handlers that never crash on input."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pice_cloud.fleet import Fleet
from pice_cloud.progressive import Inbox
from pice_edge.errors import PayloadTooLargeError, ProtocolError
from pice_edge.node import EdgeNode
from pice_edge.protocol import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Candidate,
    CloudStatus,
    EdgeStatus,
    ExpandTask,
    candidate_topic,
    decode,
    edge_status_topic,
    edge_tasks_topic,
    encode,
)
from pice_edge.rejects import Rejections
from pice_edge.runtimes.transformers import TransformersRuntime
from pice_edge.transport import BrokerSettings, Message
from tests.progressive_support import live_fleet, open_request


def _task(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"v": 1, "request_id": "r1", "point_index": 1, "question": "Why?",
                               "sketch": ["a", "b"], "max_new_tokens": 32, "deadline": time.time() + 30}
    base.update(over)
    return base


def _candidate(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"v": 1, "request_id": "r1", "point_index": 0, "device_id": "e1", "text": "t",
                               "token_count": 3, "mean_logprob": -0.5, "latency_s": 0.1}
    base.update(over)
    return base


def test_round_trip_every_message() -> None:
    messages = [
        ExpandTask.model_validate(_task()),
        Candidate.model_validate(_candidate()),
        EdgeStatus(device_id="e1", online=True, tokens_per_s=12.5),
        CloudStatus(cloud_id="c", online=True, api_url="http://127.0.0.1:8000"),
    ]
    for msg in messages:
        assert decode(type(msg), encode(msg)) == msg


BAD_TASKS = {
    "not json": b"{nope",
    "not utf8": b"\xff\xfe{}",
    "array": b"[1, 2]",
    "missing field": json.dumps({k: v for k, v in _task().items() if k != "question"}).encode(),
    "unknown field": json.dumps(_task(extra=1)).encode(),
    "string for int": json.dumps(_task(point_index="1")).encode(),
    "negative index": json.dumps(_task(point_index=-1)).encode(),
    "index outside sketch": json.dumps(_task(point_index=5)).encode(),
    "empty sketch": json.dumps(_task(sketch=[], point_index=0)).encode(),
    "blank point": json.dumps(_task(sketch=["a", ""])).encode(),
    "huge question": json.dumps(_task(question="x" * 20_000)).encode(),
    "zero budget": json.dumps(_task(max_new_tokens=0)).encode(),
    "wildcard in id": json.dumps(_task(request_id="a/#")).encode(),
    "future version": json.dumps(_task(v=2)).encode(),
    "bool for float": json.dumps(_task(deadline=True)).encode(),
    "bad sampling": json.dumps(_task(sampling={"temperature": 9})).encode(),
    "penalty below 1": json.dumps(_task(sampling={"repetition_penalty": 0.5})).encode(),
    "penalty above 2": json.dumps(_task(sampling={"repetition_penalty": 3.0})).encode(),
    "string penalty": json.dumps(_task(sampling={"repetition_penalty": "1.2"})).encode(),
}


def test_repetition_penalty_is_optional_and_absent_from_the_wire_when_unset() -> None:
    # A v1 sender older than the field: the edge uses its own profile's penalty.
    old = decode(ExpandTask, json.dumps(_task(sampling={"temperature": 0.7, "top_p": 0.9, "seed": 3})).encode())
    assert old.sampling.repetition_penalty is None
    # An edge older than the field forbids unknown keys: unset, it is not sent at all.
    assert "repetition_penalty" not in json.loads(encode(old))["sampling"]
    asked = decode(ExpandTask, json.dumps(_task(sampling={"repetition_penalty": 1.2})).encode())
    assert asked.sampling.repetition_penalty == 1.2
    assert json.loads(encode(asked))["sampling"]["repetition_penalty"] == 1.2
    assert decode(ExpandTask, encode(asked)) == asked
    assert decode(ExpandTask, json.dumps(_task(sampling={"repetition_penalty": 1})).encode()).sampling \
        .repetition_penalty == 1.0


@pytest.mark.parametrize("payload", BAD_TASKS.values(), ids=BAD_TASKS.keys())
def test_expand_task_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(ExpandTask, payload)


BAD_CANDIDATES = {
    "positive logprob": _candidate(mean_logprob=0.5),
    "negative tokens": _candidate(token_count=-1),
    "float tokens": _candidate(token_count=1.5),
    "device with slash": _candidate(device_id="e/1"),
    "null text": _candidate(text=None),
    "huge text": _candidate(text="y" * 20_000),
}


@pytest.mark.parametrize("data", BAD_CANDIDATES.values(), ids=BAD_CANDIDATES.keys())
def test_candidate_rejects(data: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(Candidate, json.dumps(data).encode())
    assert info.value.kind == "schema"
    assert "Candidate: field" in str(info.value)


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (EdgeStatus, {"device_id": "e1"}),
        (EdgeStatus, {"device_id": "e1", "online": "yes"}),
        (EdgeStatus, {"device_id": "e1", "online": True, "queue_depth": -3}),
        (CloudStatus, {"cloud_id": "c", "online": True, "load": "high"}),
        (CloudStatus, {"cloud_id": "", "online": True}),
    ],
)
def test_status_rejects(model: type[EdgeStatus] | type[CloudStatus], data: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        decode(model, json.dumps(data).encode())


def test_oversized_payload_refused_before_parsing() -> None:
    payload = b"{" + b" " * 2000 + b"}"
    with pytest.raises(PayloadTooLargeError) as info:
        decode(EdgeStatus, payload, max_bytes=1024)
    assert info.value.kind == "too_large"
    assert "1024" in str(info.value)


# --- fuzzing the handlers that face the network ----------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
# Valid messages with one field replaced by an arbitrary JSON value: reaches deep validation.
_mutated_task = st.builds(lambda k, v: json.dumps({**_task(), k: v}).encode(),
                          st.sampled_from(sorted(_task())), _json_values)
_mutated_candidate = st.builds(lambda k, v: json.dumps({**_candidate(), k: v}, default=str).encode(),
                               st.sampled_from(sorted(_candidate())), _json_values)
_payloads = st.one_of(st.binary(max_size=300), _json_values.map(lambda v: json.dumps(v).encode()))


@pytest.fixture(scope="module")
def fuzz_node(tiny_model: Path) -> EdgeNode:
    return EdgeNode(TransformersRuntime(tiny_model), device_id="fuzz-edge", broker=BrokerSettings(), max_queue=100_000)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(_payloads, _mutated_task))
def test_fuzz_edge_task_handler(fuzz_node: EdgeNode, payload: bytes) -> None:
    rejected = fuzz_node.rejections.count()
    received = fuzz_node.stats.tasks_received + fuzz_node.stats.tasks_duplicate
    fuzz_node._on_task(Message(edge_tasks_topic("fuzz-edge"), payload, retain=False))
    accepted = fuzz_node.stats.tasks_received + fuzz_node.stats.tasks_duplicate - received
    try:
        decode(ExpandTask, payload)
        valid = True
    except ProtocolError:
        valid = False
    # Every input is either accepted (valid) or counted as rejected (invalid): none vanish.
    assert (accepted, fuzz_node.rejections.count() - rejected) == ((1, 0) if valid else (0, 1))


@settings(max_examples=600, deadline=None)
@given(payload=st.one_of(_payloads, _mutated_candidate))
def test_fuzz_cloud_candidate_handler(payload: bytes) -> None:
    rejections = Rejections()
    inbox = Inbox(rejections=rejections)
    inbox.handle_candidate(Message(candidate_topic("r1", "e1"), payload, retain=False))
    # No request is open, so even a valid candidate must be rejected (unknown request).
    assert rejections.count() == 1
    assert inbox.accepted == 0


@settings(max_examples=600, deadline=None)
@given(payload=_payloads)
def test_fuzz_cloud_status_handler(payload: bytes) -> None:
    rejections = Rejections()
    fleet = Fleet(rejections=rejections)
    fleet.handle_status(Message(edge_status_topic("e1"), payload, retain=False))
    # An empty payload is neither: a cleared retained status, or `pice-edge doctor`'s ACL probe.
    assert rejections.count() + len(fleet.live()) == (0 if payload == b"" else 1)


def test_status_for_another_device_is_rejected() -> None:
    fleet = Fleet()
    status = EdgeStatus(device_id="mallory", online=True)
    fleet.handle_status(Message(edge_status_topic("alice"), encode(status), retain=False))
    assert fleet.live() == []
    assert fleet.rejections.count("status", "identity") == 1


# --- bulk fuzzing: 10,000 inputs per handler -------------------------------------------------
# Hypothesis above explores cleverly but costs ~ms per example; here a seeded generator feeds
# 10,000 inputs per handler in well under a second each: random bytes, random JSON, and many
# near-valid messages (one field mutated, dropped or added, truncated, a byte flipped, oversized),
# plus valid ones. Every input must be either accepted or counted as rejected, exactly once,
# no exception may escape, and the handler must still serve a valid message afterwards.

FUZZ_INPUTS = 10_000
_WEIRD_VALUES: list[object] = [
    None, True, False, 0, -1, 1, 31, 32, 4096, 4097, 2**31, 2**63, -(2**63), 1e308, -1e308, 0.5, -0.0,
    float("nan"), float("inf"), "", " ", "x" * 70, "a/b", "+", "#", "é\u202e", "\x00", "1", [], {}, [1], {"v": 1},
]


def _random_json(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth > 2 or roll < 0.5:
        return rng.choice([*_WEIRD_VALUES, rng.randint(-(10**6), 10**6), rng.random() * 1e4,
                           "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 12)))])
    if roll < 0.75:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["v", "text", "request_id", "x", ""]): _random_json(rng, depth + 1) for _ in range(3)}


def _fuzz_inputs(valid: Callable[[random.Random], dict[str, object]], seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(FUZZ_INPUTS):
        base = valid(rng)
        roll = rng.random()
        if roll < 0.1:
            yield rng.randbytes(rng.randint(0, 300))
        elif roll < 0.2:
            yield json.dumps(_random_json(rng)).encode()
        elif roll < 0.5:  # one field replaced by something odd
            key = rng.choice(sorted(base))
            yield json.dumps({**base, key: _random_json(rng)}).encode()
        elif roll < 0.6:  # one field missing, or one too many
            data = dict(base)
            if rng.random() < 0.5:
                data.pop(rng.choice(sorted(data)))
            else:
                data[rng.choice(["extra", "V", "device", "__proto__"])] = 1
            yield json.dumps(data).encode()
        elif roll < 0.7:  # cut short
            raw = json.dumps(base).encode()
            yield raw[: rng.randint(0, len(raw) - 1)]
        elif roll < 0.8:  # one byte flipped
            raw = bytearray(json.dumps(base).encode())
            raw[rng.randrange(len(raw))] = rng.randrange(256)
            yield bytes(raw)
        elif roll < 0.82:  # over the size limit
            yield json.dumps({**base, "text": "z" * DEFAULT_MAX_PAYLOAD_BYTES}).encode()
        else:
            yield json.dumps(base).encode()


def _valid_task(rng: random.Random) -> dict[str, object]:
    sketch = [f"point {i}" for i in range(rng.randint(1, 5))]
    return _task(request_id=f"r{rng.randint(0, 50)}", sketch=sketch, point_index=rng.randrange(len(sketch)),
                 max_new_tokens=rng.randint(1, 64), sampling={"temperature": rng.choice([0.0, 0.7])})


def _valid_candidate(rng: random.Random) -> dict[str, object]:
    return _candidate(point_index=rng.randint(0, 5), device_id=rng.choice(["e1", "e1", "e2"]),
                      text=rng.choice(["", "some text"]), mean_logprob=-rng.random())


def _valid_status(rng: random.Random) -> dict[str, object]:
    return {"v": 1, "device_id": rng.choice(["e1", "e1", "e2"]), "online": rng.random() < 0.8,
            "max_batch": rng.randint(1, 8), "tokens_per_s": rng.random() * 100, "sent_at": time.time()}


def _is_valid(model: type[ExpandTask] | type[Candidate] | type[EdgeStatus], payload: bytes) -> bool:
    try:
        decode(model, payload)
    except ProtocolError:
        return False
    return True


def test_bulk_fuzz_edge_task_handler(fuzz_node: EdgeNode) -> None:
    stats, rejections = fuzz_node.stats, fuzz_node.rejections
    topic = edge_tasks_topic("fuzz-edge")
    valid_seen = 0
    for payload in _fuzz_inputs(_valid_task, seed=1):
        before = (stats.tasks_received + stats.tasks_duplicate, rejections.count())
        fuzz_node._on_task(Message(topic, payload, retain=False))
        after = (stats.tasks_received + stats.tasks_duplicate, rejections.count())
        valid = _is_valid(ExpandTask, payload)
        valid_seen += valid
        assert (after[0] - before[0], after[1] - before[1]) == ((1, 0) if valid else (0, 1)), payload[:200]
    assert valid_seen > FUZZ_INPUTS // 10, "the generator must also produce valid messages"
    # Still serving: a fresh valid task is queued.
    received = stats.tasks_received
    fuzz_node._on_task(Message(topic, json.dumps(_task(request_id="after-fuzz")).encode(), retain=False))
    assert stats.tasks_received == received + 1


async def test_bulk_fuzz_cloud_candidate_handler() -> None:
    rejections = Rejections()
    inbox = Inbox(rejections=rejections)
    fleet = live_fleet(time.monotonic, "e1", "e2")
    pending, _ = open_request(inbox, [("e1",)] * 4, fleet)  # points 0-3 for e1; e2 and points 4-5 are strangers
    rng = random.Random(3)
    valid_seen = 0
    for payload in _fuzz_inputs(_valid_candidate, seed=2):
        topic = candidate_topic(rng.choice(["r1", "r1", "r2"]), rng.choice(["e1", "e1", "e2"]))
        before = inbox.accepted + rejections.count()
        inbox.handle_candidate(Message(topic, payload, retain=False))
        valid_seen += _is_valid(Candidate, payload)
        assert inbox.accepted + rejections.count() - before == 1, payload[:200]
    assert valid_seen > FUZZ_INPUTS // 10
    kinds = {kind for (_, kind) in rejections.snapshot()}
    assert {"json", "schema", "too_large", "identity", "unknown_point", "unassigned", "duplicate"} <= kinds
    assert sum(state.settled for state in pending.points) >= 1
    # Still serving: a new request accepts and settles a valid candidate.
    fresh, _ = open_request(inbox, [("e1",)], fleet, request_id="after-fuzz")
    inbox.handle_candidate(Message(candidate_topic("after-fuzz", "e1"),
                                   json.dumps(_candidate(request_id="after-fuzz")).encode(), retain=False))
    chosen = fresh.chosen(0)
    assert chosen is not None
    assert chosen.text == "t"


def test_bulk_fuzz_cloud_status_handler() -> None:
    rejections = Rejections()
    fleet = Fleet(rejections=rejections)
    rng = random.Random(5)
    for payload in _fuzz_inputs(_valid_status, seed=4):
        topic_device = rng.choice(["e1", "e1", "e2"])
        before = rejections.count()
        fleet.handle_status(Message(edge_status_topic(topic_device), payload, retain=False))
        matches = _is_valid(EdgeStatus, payload) and decode(EdgeStatus, payload).device_id == topic_device
        assert rejections.count() - before == (0 if matches or payload == b"" else 1), payload[:200]
    # Still serving: a valid status registers its edge.
    fleet.handle_status(Message(edge_status_topic("after-fuzz"), encode(EdgeStatus(device_id="after-fuzz",
                                                                                   online=True)), retain=False))
    assert fleet.get("after-fuzz") is not None
