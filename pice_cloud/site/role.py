"""The site role installed on a served system: `Uplink` + `SiteForwarder` + their metrics."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
from prometheus_client import Counter, Gauge

from pice_cloud.site.forward import SiteForwarder
from pice_cloud.site.uplink import Switch, Uplink

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pice_cloud.bootstrap import System
    from pice_edge.discovery import Peer


@contextlib.asynccontextmanager
async def site_role(app: FastAPI, system: System) -> AsyncIterator[Uplink]:
    """Make ``app`` (the site's own app, `create_app` on ``system``) a site's front door until the
    block ends: completions are forwarded while the cloud answers (`SiteForwarder`), the uplink
    is probed (`Uplink`), and ``/health`` and ``/metrics`` say where requests go.

    Call before the server starts (the middleware joins the app's stack at its first request)."""
    config = system.config
    assert config.site is not None, "site_role needs the configuration's site section"
    state = app.state.pice
    registry = state.metrics.registry
    route = Gauge("pice_site_route", "Where new requests go: 1 for the current route (cloud or site)", ["route"],
                  registry=registry)
    switches = Counter("pice_site_switches", "Changes of route, by the route taken", ["to"], registry=registry)
    requests = Counter("pice_site_requests", "Completions by where they were sent: cloud, site, or cloud+site "
                       "(a stream the cloud dropped, finished on the site)", ["route"], registry=registry)

    def on_switch(switch: Switch) -> None:
        switches.labels(switch.to).inc()
        for name in ("cloud", "site"):
            route.labels(name).set(1 if name == switch.to else 0)

    # Forwarded requests are not admitted here (the cloud admits them): the pool must not be
    # what limits them, and a full pool must not look like a cloud that is gone.
    client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
    own_url = system.claim.api_url if system.claim is not None else None
    uplink = Uplink(config.site, own_id=system.service.cloud_id, own_url=own_url, client=client,
                    transport=system.service.transport, on_switch=on_switch)
    route.labels("site").set(1)
    route.labels("cloud").set(0)
    if system.discovery is not None:
        fleet = config.discovery.fleet

        def on_peer(name: str, peer: Peer | None) -> None:
            if (peer is not None and peer.kind == "cloud" and peer.fleet == fleet and peer.compatible
                    and peer.properties.get("role") != "site"):
                uplink.learn(peer.id, peer.properties.get("api", ""))

        system.discovery.watch(on_peer, edges=False, clouds=True)

    def describe() -> dict[str, object]:
        return {**uplink.describe(), "peers": len(system.service.fleet.live())}

    state.health_sections["site"] = describe
    app.add_middleware(SiteForwarder, uplink=uplink, llm=system.llm, config=config,  # type: ignore[arg-type]
                       count=lambda where: requests.labels(where).inc(),
                       draining=lambda: state.admission.draining, admission=state.admission,
                       meter=system.service.cloud)
    await uplink.start()
    try:
        yield uplink
    finally:
        await uplink.close()
        await client.aclose()
