"""A progressive answer's points, from placement until each is settled.

- `planner`: pure placement (which edges expand which points, deadlines, sampling, the points
  the cloud serves itself); `tools/simulate.py` replays it.
- `request`: `ProgressiveRequest`, the sans-I/O state machine that alone settles points and
  alone writes its tasks' fleet accounting; its inputs return actions.
- `inbox`: decodes candidates and refusals, checks identity, routes them by request id.
- `driver`: `RequestDriver` carries a request's actions out on asyncio.
- `cloud_text`: the cloud's own expansions (whole, or streamed as the answer's opening).

`pice_cloud.service.PiceService` chooses the mode, writes the sketch, and wires these together.
"""

from pice_cloud.progressive.cloud_text import CloudExpander
from pice_cloud.progressive.driver import RejectionCounters, RequestDriver
from pice_cloud.progressive.inbox import Inbox
from pice_cloud.progressive.planner import (
    Plan,
    PlannedTask,
    PointSampling,
    eligible,
    first_point_in_cloud,
    plan_replacement,
    plan_request,
)
from pice_cloud.progressive.request import (
    Action,
    CandidateCheck,
    Choose,
    ExpandInCloud,
    FleetLedger,
    ProgressiveRequest,
    Reject,
    SendTask,
    Settle,
    expansion_check,
)

__all__ = [
    "Action",
    "CandidateCheck",
    "Choose",
    "CloudExpander",
    "ExpandInCloud",
    "FleetLedger",
    "Inbox",
    "Plan",
    "PlannedTask",
    "PointSampling",
    "ProgressiveRequest",
    "Reject",
    "RejectionCounters",
    "RequestDriver",
    "SendTask",
    "Settle",
    "eligible",
    "expansion_check",
    "first_point_in_cloud",
    "plan_replacement",
    "plan_request",
]
