"""Wire protocol: strict validation, size limits, and handlers that never crash on input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pice_cloud.aggregator import Aggregator
from pice_cloud.fleet import Fleet
from pice_edge.errors import PayloadTooLargeError, ProtocolError
from pice_edge.node import EdgeNode
from pice_edge.protocol import (
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
}


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
    aggregator = Aggregator(rejections=rejections)
    aggregator.handle_candidate(Message(candidate_topic("r1", "e1"), payload, retain=False))
    # No request is open, so even a valid candidate must be rejected (unknown request).
    assert rejections.count() == 1
    assert aggregator.accepted == 0


@settings(max_examples=600, deadline=None)
@given(payload=_payloads)
def test_fuzz_cloud_status_handler(payload: bytes) -> None:
    rejections = Rejections()
    fleet = Fleet(rejections=rejections)
    fleet.handle_status(Message(edge_status_topic("e1"), payload, retain=False))
    assert rejections.count() + len(fleet.live()) == 1


def test_status_for_another_device_is_rejected() -> None:
    fleet = Fleet()
    status = EdgeStatus(device_id="mallory", online=True)
    fleet.handle_status(Message(edge_status_topic("alice"), encode(status), retain=False))
    assert fleet.live() == []
    assert fleet.rejections.count("status", "identity") == 1
