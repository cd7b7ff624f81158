"""Everything on one host: embedded broker, N edge nodes in this process, the cloud service.

Used by `pice-cloud ask` (and by tests and examples). Edge nodes here share one copy of the
model weights with each other and with the cloud when they name the same model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from pice_cloud.broker import EmbeddedBroker
from pice_cloud.llm.base import LLMBackend
from pice_cloud.router import ModeRouter
from pice_cloud.service import PiceService, ServiceSettings
from pice_edge.node import EdgeNode
from pice_edge.protocol import CLOUD_STATUS_TOPIC, CloudStatus, encode
from pice_edge.runtimes import create_runtime
from pice_edge.transport import BrokerSettings, MqttTransport

log = logging.getLogger(__name__)


@dataclass
class LocalSystem:
    """Handles to the running parts."""

    service: PiceService
    broker_url: str
    edges: list[EdgeNode] = field(default_factory=list)


@contextlib.asynccontextmanager
async def local_system(
    llm: LLMBackend,
    *,
    broker_url: str | None = None,
    edges: int = 2,
    edge_model: str | Path = "smollm2-135m-instruct",
    edge_runtime: str = "transformers",
    edge_threads: int | None = None,
    max_batch: int = 4,
    settings: ServiceSettings | None = None,
    wait_edges_s: float = 5.0,
    cloud_id: str = "cloud",
    router: ModeRouter | None = None,
    broker_settings: BrokerSettings | None = None,
    api_url: str = "",
) -> AsyncIterator[LocalSystem]:
    """Start a broker (unless ``broker_url`` or ``broker_settings`` is given), ``edges`` local
    nodes and the service.

    With an external broker, edges already registered there are used as well.
    ``broker_settings`` carries credentials and TLS files; ``api_url`` is advertised in the
    cloud's status.
    """
    broker = None
    if broker_settings is not None:
        broker_url = broker_settings.url
    elif broker_url is None:
        broker = EmbeddedBroker()
        broker_url = await broker.start()
    settings_b = broker_settings or BrokerSettings(url=broker_url)
    nodes: list[EdgeNode] = []
    transport = MqttTransport(
        settings_b,
        client_id=cloud_id,
        will=(CLOUD_STATUS_TOPIC, encode(CloudStatus(cloud_id=cloud_id, online=False))),
    )
    try:
        for i in range(edges):
            runtime = create_runtime(edge_runtime, model=edge_model, threads=edge_threads)
            node = EdgeNode(runtime, device_id=f"local-edge-{i + 1}", broker=settings_b, profile="local",
                            max_batch=max_batch)
            await node.start()
            nodes.append(node)
        service = PiceService(llm, transport, settings=settings, router=router)
        await transport.connect()
        transport.publish(CLOUD_STATUS_TOPIC, encode(CloudStatus(cloud_id=cloud_id, online=True, api_url=api_url)),
                          retain=True)
        if edges and not await service.fleet.wait_for(edges, wait_edges_s):
            log.warning("only %d of %d local edges registered within %.0fs", len(service.fleet.live()), edges,
                        wait_edges_s)
        yield LocalSystem(service=service, broker_url=broker_url, edges=nodes)
    finally:
        if transport.connected:
            await transport.publish_and_wait(
                CLOUD_STATUS_TOPIC, encode(CloudStatus(cloud_id=cloud_id, online=False, api_url=api_url)), retain=True,
                timeout=2.0,
            )
        await transport.close()
        for node in nodes:
            await node.stop()
        if broker is not None:
            await broker.stop()
