"""Building and starting a complete, configured PICE system from one `CloudConfig`.

This is the one way the parts are assembled; `pice-cloud ask`, `pice-cloud serve`, the examples
and the tests all go through `start_system`:

    config -> LLM backend (`build_backend`)        -> mode router (`build_router`)
           -> broker: external, or embedded        -> ensemble selector (`build_selector`)
           -> local edge nodes (single host)       -> `PiceService` (connected, subscribed)
           -> zeroconf advertisement (`discovery`) -> `System` handles, torn down in reverse

The HTTP API is built on top of a `System` by `pice_cloud.server.create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pice_cloud.broker import EmbeddedBroker
from pice_cloud.config import CloudConfig, LLMConfig, RouterKind, SelectorKind
from pice_cloud.ensemble import ConfidenceSelector, EnsembleWeights, LearnedSelector, LikelihoodScorer, Selector
from pice_cloud.guards import Embed
from pice_cloud.llm import create_backend
from pice_cloud.llm.base import LLMBackend
from pice_cloud.replica import ReplicaClaim
from pice_cloud.router import EmbeddingRouter, HeuristicRouter, ModeRouter, RouterWeights
from pice_cloud.service import PiceService
from pice_edge.errors import PiceError
from pice_edge.protocol import CLOUD_STATUS_FILTER, encode
from pice_edge.transport import BrokerSettings, MqttTransport

if TYPE_CHECKING:
    from pice_cloud.embeddings import Embedder
    from pice_edge.discovery import Discovery
    from pice_edge.node import EdgeNode

log = logging.getLogger(__name__)

#: How long the cloud's offline status may take to reach the broker at shutdown (seconds).
OFFLINE_STATUS_TIMEOUT_S: Final = 2.0


class _FromConfig:
    """Marker: build this part from the configuration."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG: Final = _FromConfig()


@dataclass
class System:
    """Handles to the running parts of one cloud process."""

    config: CloudConfig
    llm: LLMBackend
    service: PiceService
    #: The broker everything talks through (the embedded one's loopback URL, or the configured one).
    broker_url: str
    edges: list[EdgeNode] = field(default_factory=list)
    discovery: Discovery | None = None
    #: This process's claim on its cloud_id; ``claim.lost_event`` is set when another process
    #: holds the id and this one must stop (`pice_cloud.replica`).
    claim: ReplicaClaim | None = None


def default_cloud_id(api_url: str = "") -> str:
    """A replica id unique among the replicas sharing a broker, stable for the process:
    ``cloud-HOST-PORT`` when it serves HTTP (the same id again after a restart, so the broker's
    persistent session is reused, not orphaned), else ``cloud-HOST-PID``."""
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-.")[:40] or "host"
    port = urllib.parse.urlsplit(api_url).port if api_url else None
    return f"cloud-{host}-{port if port is not None else os.getpid()}"


def build_backend(config: LLMConfig, *, model: str | None = None) -> LLMBackend:
    """The cloud LLM backend ``config`` describes (loads the model for local backends); ``model``
    runs another model the same way (``llm.sketch_model``).

    Raises:
        PiceError: the backend's library or the model is missing (the message says what to do).
    """
    if config.kind == "transformers":
        options: dict[str, Any] = {"device": config.device, "dtype": config.dtype, "threads": config.threads,
                                   "max_batch": config.max_batch, "memory_budget_mb": config.memory_budget_mb}
    elif config.kind == "openai":
        options = {"url": config.url, "api_key": config.api_key.get_secret_value() if config.api_key else None,
                   "timeout_s": config.timeout_s, "max_parallel": config.max_parallel,
                   "continue_final_message": config.continue_final_message, "context_tokens": config.context_tokens,
                   "structured_outputs": config.structured_outputs}
    elif config.kind == "tensorrt_llm":
        options = {"structured_outputs": config.structured_outputs, "context_tokens": config.context_tokens}
    elif config.kind == "edge":
        # Threads and the batch the configuration leaves unset come from the device profile.
        given = config.model_fields_set
        options = {"runtime": config.runtime, "profile": config.profile,
                   "threads": config.threads if "threads" in given else None,
                   "max_batch": config.max_batch if "max_batch" in given else None,
                   "memory_budget_mb": config.memory_budget_mb}
    else:
        options = {}
    backend = create_backend(config.kind, model=model or config.model, **options)
    if config.context_tokens is not None:
        backend.context_tokens = config.context_tokens  # type: ignore[attr-defined]  # operator's override
    return backend


def _cloud_max_batch(config: LLMConfig, backend: LLMBackend) -> int:
    """Sequences the cloud LLM decodes together, for the scheduler: ``llm.max_batch``, or with
    kind edge its engine's bound (taken from the device profile when the configuration leaves it unset)."""
    engine_batch = getattr(getattr(backend, "engine", None), "max_batch", None)
    return engine_batch if config.kind == "edge" and isinstance(engine_batch, int) else config.max_batch


class SharedEmbedder:
    """One all-MiniLM-L6-v2 for the mode router, the sketch guard and the ensemble selector of a
    system: loaded on first need, at most once (a copy each cost the cloud ~180 MB and two loads
    more). Its ``encode`` is serialised by the embedder's own lock. When the model cannot
    load, every part runs without it and one warning says what each loses."""

    def __init__(self) -> None:
        self._tried = False
        self._embedder: Embedder | None = None

    def get(self) -> Embedder | None:
        """The embedder, or None when it is not available (not fetched, no torch)."""
        if not self._tried:
            self._tried = True
            try:
                from pice_cloud.embeddings import Embedder

                self._embedder = Embedder()
            except PiceError as exc:
                log.warning("no sentence embeddings (%s): the mode router falls back to keyword rules, the sketch "
                            "guard compares shared words only, the ensemble selector has no similarity features",
                            exc)
        return self._embedder


def build_router(kind: RouterKind, shared: SharedEmbedder | None = None) -> ModeRouter | None:
    """The mode router for ``auto`` requests: the learned one (MiniLM + logistic regressions,
    falling back to the heuristic when MiniLM is not fetched), the keyword heuristic, or none
    (progressive whenever edges are live)."""
    if kind == "off":
        return None
    if kind == "heuristic":
        return HeuristicRouter()
    return EmbeddingRouter(RouterWeights.load(), (shared or SharedEmbedder()).get())


def build_selector(kind: SelectorKind, llm: LLMBackend, ensemble_width: int,
                   shared: SharedEmbedder | None = None) -> Selector:
    """The ensemble selector. ``learned`` uses the fitted weights with the cloud LLM as scorer
    (when the backend can score) and MiniLM for the similarity features (when fetched); a
    feature whose part is missing contributes nothing, so selection still works.

    With ``ensemble_width`` 1 no point ever has two candidates: nothing is loaded."""
    if kind == "confidence" or ensemble_width <= 1:
        return ConfidenceSelector()
    scorer: LikelihoodScorer | None = llm if callable(getattr(llm, "score", None)) else None  # type: ignore[assignment]
    return LearnedSelector(EnsembleWeights.load(), scorer=scorer, embedder=(shared or SharedEmbedder()).get())


def build_sketch_embed(shared: SharedEmbedder | None = None) -> Embed | None:
    """MiniLM sentence embeddings for the sketch guard's near-duplicate check, or None when the
    model is not fetched (the guard then compares shared words only)."""
    embedder = (shared or SharedEmbedder()).get()
    return embedder.encode if embedder is not None else None


@contextlib.asynccontextmanager
async def start_system(
    config: CloudConfig,
    *,
    llm: LLMBackend | None = None,
    router: ModeRouter | _FromConfig | None = FROM_CONFIG,
    selector: Selector | _FromConfig = FROM_CONFIG,
    api_url: str = "",
) -> AsyncIterator[System]:
    """Start everything ``config`` describes; stop it all when the block ends.

    Args:
        config: the validated configuration (`pice_cloud.config.load_config`).
        llm: an already built cloud LLM to use instead of ``config.llm`` (the caller closes it);
            by default the backend is built here and closed at the end.
        router, selector: parts to use instead of the configured ones (tests, embedding).
        api_url: the HTTP API's URL, published in the cloud's status and zeroconf record.

    Raises:
        CloudIdClashError: another live replica holds this replica's ``cloud_id`` (checked on an
            external broker before anything is loaded).
        PiceError: a part could not be built or started (model, broker, edges); the message
            says which and what to do.
    """
    cloud_id = config.cloud_id or (f"site-{config.site.name}" if config.site else default_cloud_id(api_url))
    claim = ReplicaClaim(cloud_id, api_url=api_url)
    if config.broker is not None:
        # Before the model loads (seconds to minutes) and before we connect under the id, which
        # would take the holder's broker session: a clash is refused at once, the holder untouched.
        await claim.probe(config.broker)
    own_llm = llm is None
    backend = await asyncio.to_thread(build_backend, config.llm) if llm is None else llm
    sketcher: LLMBackend | None = None
    broker: EmbeddedBroker | None = None
    nodes: list[EdgeNode] = []
    transport: MqttTransport | None = None
    discovery: Discovery | None = None
    give_way: asyncio.Task[None] | None = None
    try:
        if config.llm.sketch_model:
            sketcher = await asyncio.to_thread(build_backend, config.llm, model=config.llm.sketch_model)
        shared = SharedEmbedder()
        if isinstance(router, _FromConfig):
            router = await asyncio.to_thread(build_router, config.service.router, shared)
        if isinstance(selector, _FromConfig):
            selector = await asyncio.to_thread(build_selector, config.service.selector, backend,
                                               config.service.ensemble_width, shared)
        if config.broker is None:
            broker = EmbeddedBroker()
            broker_settings = BrokerSettings(url=await broker.start())
        else:
            broker_settings = config.broker
        nodes = await _start_local_edges(config, broker_settings)
        # A persistent session under a stable client id: candidates that edges publish while we
        # reconnect (a broker restart) are queued for us instead of dropped.
        transport = MqttTransport(
            broker_settings, client_id=cloud_id, clean_session=False, will=(claim.topic, encode(claim.status(False))),
        )
        # Every (re)connect re-subscribes, and the broker sends the retained status: another
        # process's claim when it took our session in between (`ReplicaClaim.watch`). One
        # subscription to every replica's status serves the claim and the service's count of
        # live replicas (`LiveReplicas`): overlapping subscriptions would deliver ours twice.
        transport.add_subscription(CLOUD_STATUS_FILTER, claim.watch)
        embed = await asyncio.to_thread(build_sketch_embed, shared) if config.service.sketch_guard else None
        service = PiceService(backend, transport, config=config.service, router=router, selector=selector,
                              cloud_max_batch=_cloud_max_batch(config.llm, backend), embed=embed, cloud_id=cloud_id,
                              sketcher=sketcher)
        def announce() -> None:
            # On every (re)connect: a restarted broker without persistence has lost our retained
            # status. A process that gave the id up announces nothing over the holder's claim.
            if claim.lost is None:
                transport.publish(claim.topic, encode(claim.status(True)), retain=True)

        transport.on_connect(announce)
        await transport.connect()
        claim.start_heartbeat(transport)
        give_way = asyncio.create_task(_give_way(claim, transport))
        if nodes and not await service.fleet.wait_for(len(nodes), config.edges.wait_s):
            log.warning("only %d of %d local edges registered within %.0fs", len(service.fleet.live()), len(nodes),
                        config.edges.wait_s)
        discovery = await _advertise(config, service, broker_settings.url, api_url)
        yield System(config=config, llm=backend, service=service, broker_url=broker_settings.url, edges=nodes,
                     discovery=discovery, claim=claim)
    finally:
        if give_way is not None:
            give_way.cancel()
        await claim.stop_heartbeat()
        if discovery is not None:
            await discovery.close()
        if transport is not None:
            if transport.connected and claim.lost is None:
                await transport.publish_and_wait(claim.topic, encode(claim.status(False)), retain=True,
                                                 timeout=OFFLINE_STATUS_TIMEOUT_S)
            await transport.close()
        for node in nodes:
            await node.stop()
        if broker is not None:
            await broker.stop()
        if sketcher is not None:
            await sketcher.close()
        if own_llm:
            await backend.close()


async def _give_way(claim: ReplicaClaim, transport: MqttTransport) -> None:
    """Once this process gives its cloud_id up, leave the broker at once: every reconnect would
    take the holder's session again. Whoever runs the system stops it (`pice_cloud.server.serve`)."""
    await claim.lost_event.wait()
    await transport.close()


async def _start_local_edges(config: CloudConfig, broker: BrokerSettings) -> list[EdgeNode]:
    """The in-process edge nodes of the single-host setup, assembled as ``pice-edge run``
    assembles a device (`pice_edge.assembly`: runtime, KV-cache budget, model build) from the
    ``edges`` section; they share one copy of the weights with each other, and with the cloud
    when they name the same model."""
    count = config.local_edges
    if not count:
        return []
    from pice_edge.assembly import assemble_edge, resolve_settings
    from pice_edge.profiles import load_profile

    # The `edges` section says what runs (runtime, batch, threads); a device profile, when named,
    # adds what a device would (its KV-cache budget, precision, repetition control).
    profile = await asyncio.to_thread(load_profile, config.edges.profile) if config.edges.profile else None
    settings = resolve_settings(profile, model=config.edge_model, runtime=config.edges.runtime,
                                max_batch=config.edges.max_batch, threads=config.edges.threads)
    nodes: list[EdgeNode] = []
    try:
        for i in range(count):
            node = await assemble_edge(settings, device_id=f"local-edge-{i + 1}", broker=broker,
                                       profile_name=config.edges.profile or "local")
            await node.start()
            nodes.append(node)
    except BaseException:
        for node in nodes:
            await node.stop()
        raise
    return nodes


async def _advertise(config: CloudConfig, service: PiceService, broker_url: str, api_url: str) -> Discovery | None:
    """Advertise the cloud and its broker on zeroconf and watch for edges (``discovery``)."""
    disc = config.discovery
    if not disc.enabled:
        return None
    from pice_edge.discovery import CloudAdvert, Discovery, parse_interfaces

    interfaces = disc.interfaces
    if interfaces == "auto":
        # Advertise where we serve: a loopback-only service stays off the LAN.
        host = config.server.host
        interfaces = "127.0.0.1" if host.startswith("127.") or host == "localhost" else "all"
    discovery = Discovery(parse_interfaces(interfaces))
    try:
        await discovery.start()
        await discovery.advertise_cloud(CloudAdvert(cloud_id=service.cloud_id, broker_url=broker_url,
                                                    fleet=disc.fleet, api_url=api_url,
                                                    role="site" if config.site is not None else ""))
        service.fleet.watch_zeroconf(discovery, disc.fleet)
    except Exception as exc:
        # Discovery is a convenience: edges can always be given --broker.
        log.warning("zeroconf advertisement failed (%s); edges need --broker %s", exc, broker_url)
        await discovery.close()
        return None
    log.info("advertised cloud %s (broker %s) on zeroconf, fleet %s", service.cloud_id, broker_url, disc.fleet)
    return discovery
