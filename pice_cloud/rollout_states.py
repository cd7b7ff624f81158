"""The edges' rollout states as the cloud and `pice-cloud fleet` see them: each edge's latest
`EdgeRolloutState`, retained on ``pice/v1/edge/{id}/rollout``."""

from __future__ import annotations

from pice_edge.errors import ProtocolError
from pice_edge.protocol import EdgeRolloutState, decode, topic_level
from pice_edge.rejects import Rejections
from pice_edge.transport import Message


class RolloutStates:
    """Each edge's latest `EdgeRolloutState` (retained on ``pice/v1/edge/{id}/rollout``); an
    invalid message is counted with the transport's rejections and ignored."""

    def __init__(self, rejections: Rejections | None = None) -> None:
        self.states: dict[str, EdgeRolloutState] = {}
        self._rejections = rejections if rejections is not None else Rejections()

    def handle(self, message: Message) -> None:
        device = topic_level(message.topic, -2)
        if not message.payload:
            self.states.pop(device, None)
            return
        try:
            state = decode(EdgeRolloutState, message.payload)
        except ProtocolError as exc:
            self._rejections.record("rollout_state", exc.kind, str(exc))
            return
        if state.device_id != device:
            self._rejections.record("rollout_state", "identity", f"rollout state of {state.device_id} on "
                                                                 f"{message.topic}")
            return
        self.states[device] = state
