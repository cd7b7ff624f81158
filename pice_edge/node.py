"""EdgeNode: MQTT tasks -> queue -> batching engine -> runtime (worker thread) -> candidates.

Tasks that arrive together are generated together in one batch (the edge's parallelism); a
short gathering window lets points of one request that arrive a few milliseconds apart share
a prefill. The batching itself is the project's one engine (`pice_edge._engine.BatchEngine`,
the cloud's embedded model runs on it too): with a runtime that decodes step by step
(`SteppingRuntime`), tasks that arrive while others are being generated join the running batch
at the next decode step (continuous batching) and finished sequences leave it at once; with a
plain `Runtime`, they form the next batch as soon as the runtime is free. Either way the batch is
bounded by ``max_batch`` and by the estimated KV-cache bytes of its sequences
(``memory_budget_mb``). The node keeps the queue policy on top: a bounded queue, refusals,
deadlines checked when a task would start, model switches between batches, and publishing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, cast

from pice_edge._engine import BatchEngine, EngineStats, Job
from pice_edge._memory import free_memory
from pice_edge.errors import ConfigError, ProtocolError, TransportError
from pice_edge.model_transfer import SourceUnreachableError
from pice_edge.prompts import (
    EXPANSION_NO_REPEAT_NGRAM_SIZE,
    EXPANSION_REPETITION_PENALTY,
    clean_expansion,
    expansion_messages,
)
from pice_edge.protocol import (
    FLEET_ROLLOUT_TOPIC,
    Candidate,
    EdgeRolloutState,
    EdgeStatus,
    ExpandTask,
    FleetRollout,
    RefusalReason,
    RolloutPhase,
    TaskRefusal,
    candidate_topic,
    decode,
    edge_rollout_topic,
    edge_status_topic,
    edge_tasks_topic,
    encode,
    is_valid_id,
    refusal_topic,
)
from pice_edge.rejects import Rejections
from pice_edge.rollout import RolloutPolicy, local_build, remember
from pice_edge.runtimes.base import GenerationRequest, GenerationResult, Runtime
from pice_edge.timing import finish_s
from pice_edge.transport import BrokerSettings, Message, MqttTransport

log = logging.getLogger(__name__)

#: How often an idle engine looks up from the task queue (for a due model switch).
_IDLE_POLL_S = 0.25

#: How long a starting edge waits to see its own status come back from the broker (seconds).
STATUS_ECHO_TIMEOUT_S = 5.0
_SEEN_TASKS = 4096  # remembered (request, point) pairs, to drop QoS 1 re-deliveries

T = TypeVar("T")
M = TypeVar("M", ExpandTask, FleetRollout)


class _Engines(Generic[T]):
    """An attribute that is the batching engine's (the object's ``via`` attribute), read and
    written under the node's name."""

    def __init__(self, via: str, name: str) -> None:
        self.via, self.name = via, name

    def __get__(self, obj: object, owner: type | None = None) -> T:
        return cast(T, getattr(getattr(obj, self.via), self.name))

    def __set__(self, obj: object, value: T) -> None:
        setattr(getattr(obj, self.via), self.name, value)


@dataclass
class NodeStats:
    """Counters an operator (or a test) can read from a running node; those of the batching
    itself are the engine's (``engine``), also readable under their node names below."""

    tasks_received: int = 0
    tasks_expired: int = 0
    tasks_duplicate: int = 0
    tasks_refused: int = 0
    #: Most tasks held at once (running + waiting): never above ``max_batch + max_queue``.
    peak_outstanding: int = 0
    #: Model builds switched to, and rollouts that failed (the node stayed on its build).
    rollouts: int = 0
    rollouts_failed: int = 0
    candidates_published: int = 0
    engine: EngineStats = field(default_factory=EngineStats)

    #: Generations that ran to the end.
    batches = _Engines[int]("engine", "finished")
    #: Sequences generated together at each of the last steps (batches, for a plain runtime).
    batch_sizes = _Engines[list[int]]("engine", "batch_sizes")
    tokens_generated = _Engines[int]("engine", "tokens_generated")
    #: Measured decode rate per sequence at batch 1 (`pice_edge.timing`; what status reports and
    #: refusals use).
    tokens_per_s = _Engines[float]("engine", "tokens_per_s")
    #: Steps run: decode steps, or batches for a plain runtime.
    steps = _Engines[int]("engine", "steps")
    #: Tasks that started while other sequences were being generated (continuous batching).
    tasks_joined_running = _Engines[int]("engine", "joined_running")
    #: Largest number of sequences generated together so far.
    peak_batch = _Engines[int]("engine", "peak_batch")


@dataclass
class _Queued:
    task: ExpandTask
    received: float


class _TaskQueue:
    """The node's waiting tasks, as the engine's `pice_edge._engine.JobSource`: a bounded queue
    (a full one refuses, in `EdgeNode._on_task`), the task first in line held out of it while it
    does not fit the batch, a task whose deadline passed while it waited dropped (``expired``),
    and nothing started while a model switch is due (``switch_due``; the switch itself,
    ``on_idle``, happens when nothing runs)."""

    def __init__(self, maxsize: int, *, prepare: Callable[[_Queued], Job[_Queued]],
                 expired: Callable[[_Queued], bool], switch_due: Callable[[], bool],
                 on_idle: Callable[[], None]) -> None:
        self.queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=maxsize)
        self._prepare = prepare
        self._expired = expired
        self._switch_due = switch_due
        self._on_idle = on_idle
        #: Taken from the queue, first in line (no memory for it yet), and its prepared job.
        self._held: _Queued | None = None
        self._job: Job[_Queued] | None = None

    def __len__(self) -> int:
        return self.queue.qsize() + (self._held is not None)

    def drain(self) -> list[_Queued]:
        """Take every waiting task out, first in line first."""
        waiting = [self._held] if self._held is not None else []
        self._held = self._job = None
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        return waiting

    def reformat(self) -> None:
        """Prepare the held task again (a new runtime formats its prompt)."""
        self._job = None

    def peek(self) -> Job[_Queued] | None:
        if self._switch_due():
            return None  # let the running batch drain: what waits runs on the new model
        while True:
            if self._held is None:
                try:
                    self._held = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    return None
            # Checked every time: a held task's deadline may pass while it waits for memory.
            if self._expired(self._held):
                self._held = self._job = None
                continue
            if self._job is None:
                self._job = self._prepare(self._held)
            return self._job

    def pop(self) -> Job[_Queued]:
        job = self._job
        assert job is not None, "pop without a peeked job"
        self._held = self._job = None
        return job

    async def wait(self, timeout: float | None) -> bool:
        if self._held is None:
            try:
                # An idle engine looks up now and then, so a due model switch is not held up.
                self._held = await asyncio.wait_for(self.queue.get(), _IDLE_POLL_S if timeout is None else timeout)
            except asyncio.TimeoutError:
                return False
        return not self._switch_due()

    def idle(self) -> None:
        self._on_idle()


class EdgeNode:
    """An edge device's serving loop.

    Args:
        runtime: the local model (any `Runtime`).
        device_id: this device's id; also its MQTT client id and the last level of the topics
            it publishes on.
        broker: how to reach the MQTT broker.
        profile: device profile name, reported in status.
        max_batch: most tasks generated together.
        batch_window_s: how long to wait for more tasks after the first one of a batch.
        heartbeat_s: interval of status messages; the cloud expires the node after a few
            missed ones.
        max_queue: tasks beyond this many waiting are refused; with ``max_batch`` running, the
            most this node ever holds. A task that would have to wait and would not finish before
            its deadline at the measured decode rate is refused too. A refusal goes back to the
            replica that sent the task (`TaskRefusal`), which places the point elsewhere at once.
        memory_budget_mb: most KV-cache memory (MiB) the sequences of a batch may take, estimated
            by the runtime's ``kv_cache_bytes`` where it has one; ``None`` bounds by ``max_batch``
            only. A single task larger than the budget still runs, alone.
        repetition_penalty: repetition penalty of expansions (1.0 = off; ``None``: the model
            folder's ``generation_config.json`` decides); a task whose sampling sets one uses its
            own. ``pice-edge run`` passes its device profile's.
        no_repeat_ngram_size: never repeat a token n-gram of this size in an expansion (0 = off;
            ``None``: the model folder's ``generation_config.json`` decides).
        model_build: the build of the model the runtime loaded (`pice_edge.model_store.build_id`),
            reported as ``model_id`` ``NAME@BUILD`` so the cloud can schedule by build.
        model_name: that model's name in the model store (default: the runtime's model id; an
            ONNX runtime's id carries its precision, the store's name does not).
        rollout: follow the fleet's model rollout (a build on this disk, else fetched; verified;
            switched to between batches; see `pice_edge.rollout`); ``None``: ignore it.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        device_id: str,
        broker: BrokerSettings,
        profile: str = "",
        max_batch: int = 4,
        batch_window_s: float = 0.02,
        heartbeat_s: float = 2.0,
        max_queue: int = 256,
        rejections: Rejections | None = None,
        memory_budget_mb: float | None = None,
        repetition_penalty: float | None = EXPANSION_REPETITION_PENALTY,
        no_repeat_ngram_size: int | None = EXPANSION_NO_REPEAT_NGRAM_SIZE,
        model_build: str | None = None,
        model_name: str | None = None,
        rollout: RolloutPolicy | None = None,
    ) -> None:
        if not is_valid_id(device_id):
            raise ValueError(f"device id {device_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ : -")
        self.runtime = runtime
        self.device_id = device_id
        self.profile = profile
        self.heartbeat_s = heartbeat_s
        self.repetition_penalty = repetition_penalty
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.model_build = model_build
        self.rollout = rollout
        #: The last rollout's outcome, for logs and tests: "", "fetching", "retrying in 4s (attempt
        #: 1): ...", "switched", "failed: ...", "withdrawn".
        self.rollout_state = ""
        #: The model store's name of the loaded model (what rollouts name), and its build.
        self.model_name = model_name or runtime.model_id
        # Folders this node ran each build from: a rollback looks there first (see `local_build`).
        self._ran_from: dict[tuple[str, str], Path] = {}
        self._note_folder(runtime)
        self._next_runtime: tuple[Runtime, str, str | None, Path] | None = None
        self._rollout_target: tuple[str, str] | None = None
        self._rollout_task: asyncio.Task[None] | None = None
        self._swapped = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pice-edge-{device_id}")
        self._waiting = _TaskQueue(max_queue, prepare=self._as_job, expired=self._expired,
                                   switch_due=lambda: self._next_runtime is not None, on_idle=self._swap)
        self._engine: BatchEngine[_Queued] = BatchEngine(
            runtime, self._waiting, self._executor, max_batch=max_batch, batch_window_s=batch_window_s,
            memory_budget_bytes=int(memory_budget_mb * 2**20) if memory_budget_mb else None,
            after_step=self._ended, name=f"edge {device_id} runtime")
        self.stats = NodeStats(engine=self._engine.stats)
        #: Set once our own status came back from the broker (the cloud can see us).
        self.status_visible = asyncio.Event()
        self._started_at = time.time()
        self.rejections = rejections or Rejections()
        self._max_payload = broker.max_payload_bytes
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        #: Called with every status this node publishes (discovery uses it to keep its TXT
        #: record's free slots current); listeners must not block.
        self.status_listeners: list[Callable[[EdgeStatus], None]] = []
        offline = EdgeStatus(device_id=device_id, online=False, profile=profile, runtime=runtime.name,
                             model_id=self.model_id, max_batch=max_batch, heartbeat_s=heartbeat_s)
        self.transport = MqttTransport(
            broker,
            client_id=device_id,
            will=(edge_status_topic(device_id), encode(offline)),
            rejections=self.rejections,
        )
        self.transport.add_subscription(edge_tasks_topic(device_id), self._on_task)
        if rollout is not None:
            self.transport.add_subscription(FLEET_ROLLOUT_TOPIC, self._on_rollout)
        self.transport.on_connect(self.publish_status)

    # --- batching limits (the engine's) ---------------------------------------------------

    #: Most tasks generated together.
    max_batch = _Engines[int]("_engine", "max_batch")
    #: How long an idle node waits for more tasks after the first one of a batch.
    batch_window_s = _Engines[float]("_engine", "batch_window_s")
    #: Most estimated KV-cache bytes of the sequences of a batch (``None``: no limit).
    memory_budget_bytes = _Engines["int | None"]("_engine", "memory_budget_bytes")

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, connect_timeout: float = 10.0) -> None:
        """Connect to the broker and start serving.

        Raises:
            BrokerUnreachableError: the broker did not answer.
            ConfigError: the broker refuses this device its own status topic (with the fleet's
                ACL: the device id differs from the broker username).
        """
        self._started_at = time.time()
        await self.transport.connect(connect_timeout)
        topic = edge_status_topic(self.device_id)
        try:
            # Our own status must come back to us: proof that the broker lets us publish it.
            await self.transport.subscribe(topic, self._on_own_status)
        except TransportError as exc:
            await self.transport.close()
            username = self.transport.settings.username
            raise ConfigError(
                f"the broker refuses device {self.device_id!r} its status topic {topic} ({exc}); with the fleet's "
                f"ACL the device id must equal the broker username ({username or 'none given'}): use "
                "--device-id USERNAME or --username DEVICE_ID"
            ) from exc
        self._engine.start()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"{self.device_id}-heartbeat"),
            asyncio.create_task(self._check_status_visible(), name=f"{self.device_id}-status-check"),
        ]

    async def stop(self) -> None:
        """Hand back the tasks not started (refusals), publish an offline status, disconnect and
        stop the worker."""
        task = self._rollout_task
        self._abandon_rollout()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._engine.close()
        if self.transport.connected:
            for queued in self._waiting.drain():
                self._refuse(queued.task, "stopping", "the node is stopping")
        if self.transport.connected:
            await self.transport.publish_and_wait(
                edge_status_topic(self.device_id), encode(self._status(online=False)), retain=True, timeout=2.0
            )
        await self.transport.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> EdgeNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- model and rollout -----------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """What this node runs: ``NAME@BUILD`` (the model store's name) when the build is known,
        else the runtime's id."""
        return f"{self.model_name}@{self.model_build}" if self.model_build else self.runtime.model_id

    def _note_folder(self, runtime: Runtime) -> None:
        """Remember where the running build was loaded from (when the runtime says, and the
        build is known)."""
        where = getattr(runtime, "path", None)
        if self.model_build and isinstance(where, Path):
            self._ran_from[(self.model_name, self.model_build)] = where if where.is_dir() else where.parent

    def _on_rollout(self, message: Message) -> None:
        if not message.payload:
            # Withdrawn: stay on what runs now (and on the build adopted, after a restart too).
            target = self._rollout_target
            self._abandon_rollout()
            if target is not None:
                self.rollout_state = "withdrawn"
                self._rollout_report(target, "withdrawn", "the rollout was cleared before this edge switched")
            return
        rollout = self._decode("rollout", FleetRollout, message)
        if rollout is None:
            return
        target = (rollout.model, rollout.build)
        if target == self._rollout_target:
            return  # the same rollout again (a reconnect re-delivers the retained message)
        self._abandon_rollout()  # a newer rollout, or a rollback, supersedes the one in progress
        if target == (self.model_name, self.model_build):
            self._adopt(self._ran_from.get(target))  # already there: a restart must keep it too
            return
        self._rollout_target = target
        self._rollout_task = asyncio.get_running_loop().create_task(self._roll_out(rollout),
                                                                    name=f"{self.device_id}-rollout")

    def _adopt(self, folder: Path | None) -> None:
        """Record the build this node runs on the fleet's word, so a restart starts on it."""
        if self.rollout is None or not self.model_build or folder is None:
            return
        remember(self.rollout.root, self.device_id, self.model_name, self.model_build, folder)

    def _rollout_report(self, target: tuple[str, str], phase: RolloutPhase, detail: str = "", *,
                        attempt: int = 0, retry_at: float | None = None) -> None:
        """Publish (retained) how this node's part of the rollout of ``target`` (model, build)
        stands; never raises."""
        state = EdgeRolloutState(device_id=self.device_id, model=target[0], build=target[1], phase=phase,
                                 running=self.model_id, detail=detail[:1000], attempt=attempt, retry_at=retry_at)
        try:
            self.transport.publish(edge_rollout_topic(self.device_id), encode(state), retain=True)
        except Exception:
            log.exception("could not publish the rollout state")

    def _abandon_rollout(self) -> None:
        """Stop the rollout in progress; a runtime it loaded but did not switch to is closed."""
        if self._rollout_task is not None and not self._rollout_task.done():
            self._rollout_task.cancel()
        self._rollout_target = None
        if self._next_runtime is not None:
            pending = self._next_runtime[0]
            self._next_runtime = None
            self._executor.submit(_close_runtime, pending, _on_cuda(pending))

    async def _roll_out(self, rollout: FleetRollout) -> None:
        """Find (on this disk) or fetch, verify and load the rollout's build, then switch between
        batches. A source that cannot be reached is tried again with back-off; any other failure,
        or the last try, leaves the node on the build it runs (the rollback), and says why in the
        log and in its rollout state."""
        assert self.rollout is not None
        policy = self.rollout
        target = f"{rollout.model}@{rollout.build}"
        goal = (rollout.model, rollout.build)
        attempt = 0
        while True:
            attempt += 1
            if attempt == 1:  # later tries keep saying "retrying" (with the last error) until they end
                self.rollout_state = "fetching"
                self._rollout_report(goal, "fetching", f"from {rollout.source}", attempt=attempt)
            try:
                runtime, path = await self._obtain(rollout, policy)
                break
            except asyncio.CancelledError:
                raise
            except SourceUnreachableError as exc:
                if attempt >= policy.max_attempts:
                    self._rollout_failed(rollout, f"{exc} (gave up after {attempt} tries)", attempt)
                    return
                delay = policy.retry_delay_s(attempt)
                self.rollout_state = f"retrying in {delay:.0f}s (attempt {attempt}): {exc}"
                self._rollout_report(goal, "retrying", str(exc), attempt=attempt, retry_at=time.time() + delay)
                log.warning("%s: rollout of %s: %s; trying again in %.1fs (attempt %d of %d)", self.device_id, target,
                            exc, delay, attempt, policy.max_attempts)
                await asyncio.sleep(delay)
            except Exception as exc:
                self._rollout_failed(rollout, str(exc), attempt)
                return
        self._swapped.clear()
        self._next_runtime = (runtime, rollout.model, rollout.build, path)
        await self._swapped.wait()
        self.rollout_state = "switched"
        self._rollout_report(goal, "switched", attempt=attempt)

    async def _obtain(self, rollout: FleetRollout, policy: RolloutPolicy) -> tuple[Runtime, Path]:
        """The rollout's build loaded, and the folder it came from: a copy on this disk when
        there is one (no network: a rollback works offline), else fetched from the source.

        Raises:
            SourceUnreachableError: the source could not be reached (worth another try).
            ModelError, ConfigError: the build arrived damaged or different, or does not load.
        """
        from pice_edge.model_store import build_id
        from pice_edge.model_transfer import fetch_from

        target = f"{rollout.model}@{rollout.build}"
        ran_from = self._ran_from.get((rollout.model, rollout.build))
        known = [ran_from] if ran_from is not None else []
        path = await asyncio.to_thread(local_build, policy.root, rollout.model, rollout.build, known)
        if path is not None:
            log.info("%s: rolling out %s from this disk (%s)", self.device_id, target, path)
        else:
            log.info("%s: rolling out %s from %s", self.device_id, target, rollout.source)
            path = await asyncio.to_thread(fetch_from, rollout.source, rollout.model, api_key=policy.api_key,
                                           root=policy.models_root, progress=False, expected_build=rollout.build)
            got = build_id(path)
            if got != rollout.build:
                raise ConfigError(f"the fetched {rollout.model} is build {got}, not {rollout.build}")
        loading = asyncio.get_running_loop().run_in_executor(None, policy.loader, path)
        try:
            runtime = await asyncio.shield(loading)
        except asyncio.CancelledError:
            # Superseded while loading: close what the loader returns when it does.
            loading.add_done_callback(lambda f: f.result().close() if not f.cancelled() and f.exception() is None
                                      else None)
            raise
        return runtime, path

    def _rollout_failed(self, rollout: FleetRollout, why: str, attempt: int) -> None:
        self.rollout_state = f"failed: {why}"
        self.stats.rollouts_failed += 1
        self._rollout_target = None
        self._rollout_report((rollout.model, rollout.build), "failed", why, attempt=attempt)
        log.error("%s: rollout of %s@%s failed (%s); staying on %s", self.device_id, rollout.model, rollout.build,
                  why, self.model_id)

    def _swap(self) -> None:
        """Switch to the pending runtime, if one is due; called by the engine when nothing runs."""
        if self._next_runtime is None:
            return  # nothing due, or the rollout was abandoned meanwhile
        old = self.runtime
        self.runtime, self.model_name, self.model_build, path = self._next_runtime
        self._next_runtime = None
        self._engine.use(self.runtime)
        self._waiting.reformat()
        self._rollout_target = None
        self.stats.rollouts += 1
        self._ran_from[(self.model_name, self.model_build or "")] = path
        self._adopt(path)
        log.info("%s: now running %s", self.device_id, self.model_id)
        self._executor.submit(_close_runtime, old, _on_cuda(old))
        del old  # the runtime's close frees the weights only once nothing here refers to them
        self._swapped.set()
        self.publish_status()

    # --- status ----------------------------------------------------------------------------

    def _status(self, *, online: bool = True) -> EdgeStatus:
        depth = self._waiting.queue.qsize()
        running = self._engine.running
        return EdgeStatus(
            device_id=self.device_id,
            online=online,
            profile=self.profile,
            runtime=self.runtime.name,
            model_id=self.model_id,
            max_batch=self.max_batch,
            free_slots=max(0, self.max_batch - depth - running),
            queue_depth=depth + running,
            tokens_per_s=round(self.stats.tokens_per_s, 2),
            heartbeat_s=self.heartbeat_s,
        )

    def publish_status(self) -> None:
        """Publish this node's retained status now."""
        status = self._status()
        for listener in self.status_listeners:
            try:
                listener(status)
            except Exception:
                log.exception("status listener failed")
        try:
            self.transport.publish(edge_status_topic(self.device_id), encode(status), retain=True)
        except Exception:
            log.exception("could not publish status")

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.transport.connected:
                self.publish_status()

    # --- inbound ---------------------------------------------------------------------------

    def _decode(self, topic: str, model: type[M], message: Message) -> M | None:
        """The message, or None when it is invalid (counted under ``topic``, never raised)."""
        try:
            return decode(model, message.payload, max_bytes=self._max_payload)
        except ProtocolError as exc:
            self.rejections.record(topic, exc.kind, str(exc))
            return None

    def _on_own_status(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained status, or doctor's probe
        try:
            status = decode(EdgeStatus, message.payload, max_bytes=self._max_payload)
        except ProtocolError:
            return
        if status.device_id == self.device_id and status.online and status.sent_at >= self._started_at - 1.0:
            self.status_visible.set()

    async def _check_status_visible(self) -> None:
        """Say so when our status does not come back: the cloud cannot see us either (a broker
        ACL that silently drops our publishes), however healthy we look from here."""
        try:
            await asyncio.wait_for(self.status_visible.wait(), STATUS_ECHO_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.error("edge %s: our status did not come back from the broker within %.0fs: the broker drops our "
                      "publishes, so the cloud cannot schedule us. Likely its ACL: the device id must equal the broker "
                      "username (%s); `pice-edge doctor` checks it", self.device_id, STATUS_ECHO_TIMEOUT_S,
                      self.transport.settings.username or "none given")
            # Keep running: once the broker's ACL is fixed (and reloaded) the next heartbeat gets through.
            await self.status_visible.wait()
            log.warning("edge %s: our status reaches the broker now", self.device_id)
        # Seen once is proof enough: stop receiving our own heartbeats.
        self.transport.unsubscribe(edge_status_topic(self.device_id))

    def _on_task(self, message: Message) -> None:
        task = self._decode("task", ExpandTask, message)
        if task is None:
            return
        key = (task.request_id, task.point_index)
        if key in self._seen:
            self.stats.tasks_duplicate += 1
            return
        self._seen[key] = None
        if len(self._seen) > _SEEN_TASKS:
            self._seen.popitem(last=False)
        self.stats.tasks_received += 1
        if self._waiting.queue.full():
            self._refuse(task, "queue_full", f"queue of {self._waiting.queue.maxsize} is full")
            return
        if self._would_miss_deadline(task):
            self._refuse(task, "would_miss_deadline", f"{self._outstanding()} tasks ahead")
            return
        self._waiting.queue.put_nowait(_Queued(task, time.monotonic()))
        outstanding = self._outstanding()
        self.stats.peak_outstanding = max(self.stats.peak_outstanding, outstanding)
        if outstanding == self.max_batch:
            # Just became full: say so now, not at the next heartbeat, so that other cloud
            # replicas stop sending tasks this node would have to refuse.
            self.publish_status()

    def _outstanding(self) -> int:
        return len(self._waiting) + self._engine.running

    def _would_miss_deadline(self, task: ExpandTask) -> bool:
        """A task that must wait for a slot, and by the measured decode rate would not finish
        before its deadline even so (a task that can start at once is always taken)."""
        ahead = self._outstanding()
        if ahead < self.max_batch or self.stats.tokens_per_s <= 0:
            return False
        return time.time() + finish_s(ahead, self.max_batch, task.max_new_tokens,
                                      self.stats.tokens_per_s) > task.deadline

    def _refuse(self, task: ExpandTask, reason: RefusalReason, detail: str) -> None:
        self.stats.tasks_refused += 1
        self.rejections.record("task", reason, detail)
        if task.reply_to is None:
            return  # a sender without reply_to has no refusal topic: its deadline covers the point
        refusal = TaskRefusal(request_id=task.request_id, point_index=task.point_index, device_id=self.device_id,
                              reason=reason)
        try:
            self.transport.publish(refusal_topic(task.reply_to, task.request_id, self.device_id), encode(refusal))
        except Exception:
            log.exception("could not refuse task %s/%d", task.request_id, task.point_index)

    # --- batching (the engine's hooks) ------------------------------------------------------

    def _expired(self, queued: _Queued) -> bool:
        """The task's deadline passed while it waited: nobody reads a late candidate (counted)."""
        if queued.task.deadline > time.time():
            return False
        self.stats.tasks_expired += 1
        return True

    def _as_job(self, queued: _Queued) -> Job[_Queued]:
        """The task as the engine's job, its prompt formatted by the runtime that will run it."""
        return Job(self._request(queued.task), queued)

    def _ended(self, jobs: list[Job[_Queued]]) -> None:
        """Publish what the step finished, then the slots it freed."""
        for job in jobs:
            if job.future.cancelled() or job.future.exception() is not None:
                continue  # a failed step (the engine logged it): the cloud expands these points
            self._publish(job.context, job.request, job.future.result())
        self.publish_status()

    def _publish(self, queued: _Queued, req: GenerationRequest, result: GenerationResult) -> None:
        task = queued.task
        text = clean_expansion(result.text, truncated=result.token_count >= req.max_new_tokens,
                               point=task.sketch[task.point_index], question=task.question)
        candidate = Candidate(
            request_id=queued.task.request_id,
            point_index=queued.task.point_index,
            device_id=self.device_id,
            text=text,
            token_count=result.token_count,
            mean_logprob=max(-1e4, min(0.0, result.mean_logprob)),
            latency_s=time.monotonic() - queued.received,
            model_id=self.model_id,
        )
        try:
            self.transport.publish(candidate_topic(candidate.request_id, self.device_id, task.reply_to),
                                   encode(candidate))
            self.stats.candidates_published += 1
        except Exception:
            log.exception("could not publish candidate for %s/%d", candidate.request_id, candidate.point_index)

    def _request(self, task: ExpandTask) -> GenerationRequest:
        prompt = self.runtime.format_chat(expansion_messages(task.question, task.sketch, task.point_index))
        return GenerationRequest(
            prompt=prompt,
            max_new_tokens=task.max_new_tokens,
            temperature=task.sampling.temperature,
            top_p=task.sampling.top_p,
            seed=task.sampling.seed,
            repetition_penalty=self.repetition_penalty if task.sampling.repetition_penalty is None
            else task.sampling.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )


def _on_cuda(runtime: Runtime) -> bool:
    """Whether ``runtime`` holds CUDA memory (a torch runtime on a CUDA device)."""
    return str(getattr(runtime, "device", "")).startswith("cuda")


def _close_runtime(runtime: Runtime, cuda: bool) -> None:
    """Close a runtime switched away from and give its memory back (`pice_edge._memory`); on the
    node's worker thread, after the last step that used it."""
    runtime.close()
    del runtime
    free_memory(cuda=cuda)
