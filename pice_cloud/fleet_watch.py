"""``pice-cloud fleet --watch``: the fleet page's view in a terminal, redrawn every ``--interval``.

Two sources, one drawing (`render`):

* ``--cloud URL`` (a running ``pice-cloud serve``): its ``/fleet/state``, the JSON the fleet page
  draws (`pice_cloud.server.fleet_page`): edges with the tasks that cloud sent them, requests by
  mode, points by where they were written, the cloud work ledger, refusals by reason, the
  rollout. The API key comes from ``--api-key`` or ``PICE_API_KEY``.
* otherwise the broker (``--broker``, or the fleet's cloud found on zeroconf): a connection kept
  open that collects the edges' statuses, the rollout and the edges' rollout states, as
  ``pice-cloud fleet`` does once; the cloud's own figures are not on the broker and are left out.

Drawn with ``rich`` (installed with the cloud's dependencies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pice_edge.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

StateSource = Callable[[], Awaitable[dict[str, Any]]]


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _secs(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


def render(state: dict[str, Any], *, error: str | None = None) -> RenderableType:
    """The view of one `pice_cloud.server.fleet_page.FleetPage.snapshot` (or the broker-only part
    of it) as rich renderables; ``error`` says why it is not fresh."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[RenderableType] = []
    cloud = state.get("cloud")
    head = Text("PICE fleet", style="bold")
    if cloud:
        style = {"ok": "bold green", "degraded": "bold yellow"}.get(cloud["status"], "bold red")
        head.append(f"  {cloud['status']}", style=style)
        head.append(f"  cloud {cloud['id']} · {cloud['llm']['backend']} {cloud['llm']['model']} · "
                    f"up {_secs(cloud['uptime_s'])}")
    broker = state.get("broker", {})
    if broker:
        head.append(f"  broker {broker.get('url', '?')}", style="dim")
    head.append(f"  updated {time.strftime('%H:%M:%S', time.localtime(state.get('time', time.time())))}",
                style="dim")
    parts.append(head)
    if error:
        parts.append(Panel(Text(error), style="red", title="not fresh"))
    if broker and not broker.get("connected", True):
        parts.append(Panel(Text(broker.get("message") or "the MQTT broker is unreachable"), style="bold red",
                           title="broker down"))

    edges = Table(title=f"Edges ({state.get('live_edges', 0)} live)", box=box.SIMPLE_HEAD, title_justify="left")
    for column, right in (("DEVICE", False), ("STATE", False), ("PROFILE", False), ("RUNTIME", False),
                          ("MODEL BUILD", False), ("SLOTS", True), ("QUEUE", True), ("TOK/S", True),
                          ("HEARTBEAT", True), ("TASKS", True), ("ANSWERED", True), ("REFUSED", True)):
        edges.add_column(column, justify="right" if right else "left", no_wrap=True)
    for e in state.get("edges", []):
        used = "-" if e["slots_used"] is None else e["slots_used"]
        heartbeat = f"{_secs(e['last_heartbeat_s'])} ago" + (f" / {_secs(e['timeout_s'])}" if e["timeout_s"] else "")
        edges.add_row(e["device_id"], Text(e["state"], style="green" if e["state"] == "live" else "yellow"),
                      e["profile"] or "-", e["runtime"] or "-", e["model_id"] or "-", f"{used}/{e['slots_total']}",
                      _num(e["queue_depth"]), _num(e["tokens_per_s"], 1) if e["tokens_per_s"] else "-", heartbeat,
                      _num(e["tasks"]), _num(e["candidates"]), _num(e["refusals"]))
    parts.append(edges)
    for g in state.get("gone", []):
        parts.append(Text(f"  x {g['device_id']} gone {_secs(g['gone_s'])} ago (last will or missed heartbeats)"
                          + (f" · ran {g['model_id']}" if g["model_id"] else ""), style="red"))

    requests = state.get("requests")
    if requests:
        table = Table(title="Requests", box=box.SIMPLE_HEAD, title_justify="left")
        outcomes = ("ok", "rejected", "invalid", "error", "cancelled")
        for column in ("MODE", *(o.upper() for o in outcomes), "MEAN LATENCY", "MEAN FIRST TOKEN"):
            table.add_column(column, justify="left" if column == "MODE" else "right")
        for mode, counts in requests["by_mode"].items():
            latency = requests["latency"].get(mode, {})
            table.add_row(mode, *(_num(counts.get(o, 0)) for o in outcomes), _secs(latency.get("mean_s")),
                          _secs(latency.get("mean_first_token_s")))
        points = requests["points"]
        parts.append(table)
        parts.append(Text(
            f"  in flight {requests['in_flight']}/{requests['max_concurrent']} · queued "
            f"{requests['queued']}/{requests['max_queue']} · refused {requests['rejected']} · points by the edges "
            f"{points.get('edge', 0)}, by the cloud {points.get('cloud', 0)} (fallback share "
            f"{_pct(requests['fallback_share'])}) · answered cloud-only {_pct(requests['cloud_only_share'])}"))

    ledger = state.get("ledger")
    if ledger:
        table = Table(title="Cloud work", box=box.SIMPLE_HEAD, title_justify="left")
        for column in ("PURPOSE", "MODEL", "CALLS", "PREFILL TOK", "DECODE TOK", "SECONDS"):
            table.add_column(column, justify="left" if column in ("PURPOSE", "MODEL") else "right")
        for p in ledger["purposes"]:
            table.add_row(p["purpose"], p["kind"], _num(p["calls"]), _num(p["prefill_tokens"]),
                          _num(p["decode_tokens"]), _num(p["seconds"], 2))
        llm = ledger["llm"]
        table.add_row("total (LLM)", "llm", _num(llm["calls"]), _num(llm["prefill_tokens"]), _num(llm["decode_tokens"]),
                      _num(llm["seconds"], 2), style="dim")
        parts.append(table)
        parts.append(Text(
            f"  decoded by the edges {_num(ledger['edge_decode_tokens'])} tok, by the cloud LLM "
            f"{_num(llm['decode_tokens'])} tok: the edges' share (saved) {_pct(ledger['edge_share_of_decoding'])}; "
            f"cloud decoding on cloud-only answers {_pct(ledger['cloud_only_share_of_cloud_decoding'])}"))

    guards = state.get("guards")
    if guards:
        titles = {"sketch_refused": "sketches refused", "sketch_repaired": "sketches repaired",
                  "candidate_refused": "edge expansions refused", "cloud_expansion_refused": "cloud expansions refused"}
        lines = [f"  {title}: " + (", ".join(f"{reason} {n}" for reason, n in guards.get(key, {}).items()) or "none")
                 for key, title in titles.items()]
        parts.append(Text("Refusals\n" + "\n".join(lines)))

    rollout = state.get("rollout")
    if rollout:
        lines = list(rollout.get("summary") or [])
        if not rollout["active"]:
            lines.insert(0, "no rollout announced")
        if rollout["builds"]:
            lines.append("builds: " + "; ".join(f"{b} on {', '.join(d)}" for b, d in rollout["builds"].items()))
        parts.append(Text("Rollout\n" + "\n".join(f"  {line}" for line in lines)))
    if not requests:
        parts.append(Text("requests, cloud work and refusals: give --cloud http://CLOUD:PORT (the cloud's API)",
                          style="dim"))
    return Group(*parts)


def cloud_source(url: str, api_key: str | None) -> tuple[StateSource, Callable[[], Awaitable[None]]]:
    """Reads ``URL/fleet/state``; returns (read, close)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=10)

    async def read() -> dict[str, Any]:
        response = await client.get("/fleet/state")
        if response.status_code == 401:
            raise ConfigError(f"{url} wants its API key: pass --api-key (or PICE_API_KEY)")
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        return state

    return read, client.aclose


@contextlib.asynccontextmanager
async def broker_source(broker_url: str | None, *, credentials: dict[str, Any] | None, fleet_name: str,
                        interfaces: Any, zeroconf: bool) -> AsyncIterator[StateSource]:
    """Keeps a connection to the broker (given, or the fleet's cloud's on zeroconf) and yields a
    reader of the edges and the rollout as they stand."""
    from pice_cloud.fleet_cli import listening
    from pice_cloud.server.fleet_page import GoneTracker, edges_section, rollout_section

    gone = GoneTracker()
    async with listening(broker_url, credentials=credentials, fleet_name=fleet_name, interfaces=interfaces,
                         zeroconf=zeroconf) as (url, fleet, listener, link):

        async def read() -> dict[str, Any]:
            now = time.time()
            rows = fleet.snapshot()
            connected = link.connected
            return {"time": now, "broker": {"url": url, "connected": connected,
                                            "message": None if connected else f"the MQTT broker {url} is unreachable; "
                                            "reconnecting (the edges below are the last heard)"},
                    "edges": edges_section(fleet, rows), "gone": gone.update(rows, now),
                    "live_edges": sum(1 for r in rows if r.state == "live"),
                    "rollout": rollout_section(rows, listener.rollout, dict(listener.states), now=now,
                                               broker_url=url)}

        yield read


async def watch(read: StateSource, *, interval: float, console: Console, count: int | None = None) -> int:
    """Redraw ``read()``'s state every ``interval`` seconds (``count`` times, or until Ctrl-C)."""
    from rich.live import Live

    shown = 0
    last: dict[str, Any] | None = None
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while count is None or shown < count:
            error = None
            try:
                last = await read()
            except ConfigError:
                raise
            except Exception as exc:  # the cloud restarting, the network: say so, keep trying
                error = f"{type(exc).__name__}: {exc}" + ("; showing the last state" if last else "")
            live.update(render(last or {"time": time.time()}, error=error), refresh=True)
            shown += 1
            if count is None or shown < count:
                await asyncio.sleep(interval)
    return 0


async def run_watch(args: argparse.Namespace, credentials: dict[str, Any] | None) -> int:
    """``pice-cloud fleet --watch``."""
    try:
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich comes with the cloud's dependencies
        raise ConfigError("--watch draws with rich: pip install rich") from None
    from pice_edge.discovery import check_fleet, parse_interfaces

    console = Console()
    count = args.watch_count
    try:
        if args.cloud:
            read, close = cloud_source(args.cloud, args.api_key)
            try:
                return await watch(read, interval=args.interval, console=console, count=count)
            finally:
                await close()
        async with broker_source(args.broker, credentials=credentials, fleet_name=check_fleet(args.fleet),
                                 interfaces=parse_interfaces(args.interfaces), zeroconf=not args.no_zeroconf) as read:
            await asyncio.sleep(min(args.wait, 1.0))  # retained statuses arrive
            return await watch(read, interval=args.interval, console=console, count=count)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
