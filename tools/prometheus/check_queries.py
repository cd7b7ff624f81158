#!/usr/bin/env python3
"""Check the Grafana dashboard and the alert rules against a Prometheus that scrapes PICE.

Every panel query of ``tools/grafana/pice_fleet.json`` must return data (at least one finite
sample), with the dashboard's variables set as below. For the alert rules
(``tools/prometheus/pice_alerts.yml``):

- ``--alerts selectors`` (the default): every series an alert reads exists, i.e. each metric
  selector in its expression returns data. A healthy system fires no alert, so this is the check
  to run against a production Prometheus after an upgrade: it catches a renamed metric or label.
- ``--alerts firing``: every alert's expression returns data, i.e. its condition holds (tests
  that drive the system into each condition use this; ``--skip-alert`` and ``--alert`` choose).
- ``--alerts none``: rules not checked.

Prints one line per query and exits 1 if any failed. Only the standard library is needed.

    python tools/prometheus/check_queries.py --prometheus http://127.0.0.1:9090
    python tools/prometheus/check_queries.py --prometheus URL --alerts firing --time 1767225600
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parent / "grafana" / "pice_fleet.json"
RULES = HERE / "pice_alerts.yml"

#: Grafana's built-in interval variables and the dashboard's own, as substituted here.
DEFAULT_VARIABLES = {"job": ".+", "__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
#: A metric selector in PromQL: a pice_* name with its optional label matchers.
_SELECTOR = re.compile(r"\b(pice_[a-z0-9_]+)(\{[^}]*\})?")


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every target of every panel, rows' nested panels too."""
    dash = json.loads(path.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((f"panel {panel.get('title', '?')!r} {target.get('refId', '')}", target["expr"]))

    walk(dash.get("panels", []))
    return out


def _rules(path: Path) -> list[dict[str, Any]]:
    """The rules of a rules file (YAML; JSON is YAML too). PyYAML when present."""
    text = path.read_text()
    try:
        import yaml
    except ImportError:  # pragma: no cover - PICE depends on PyYAML
        sys.exit("PyYAML is needed to read the rules file (pip install PyYAML)")
    data = yaml.safe_load(text)
    return [rule for group in data.get("groups", []) for rule in group.get("rules", [])]


def alert_queries(path: Path, mode: str, *, only: set[str], skip: set[str]) -> list[tuple[str, str]]:
    """What to evaluate for each alert: its expression (``firing``) or each selector in it."""
    out: list[tuple[str, str]] = []
    for rule in _rules(path):
        name = rule.get("alert") or rule.get("record")
        if not name or (only and name not in only) or name in skip:
            continue
        expr = " ".join(str(rule["expr"]).split())
        if mode == "firing":
            out.append((f"alert {name}", expr))
        elif mode == "selectors":
            for selector in dict.fromkeys(m.group(0) for m in _SELECTOR.finditer(expr)):
                out.append((f"alert {name} reads", selector))
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """The query with Grafana's ``$name`` / ``${name}`` variables replaced (longest names first)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def evaluate(prometheus: str, expr: str, at: float | None) -> tuple[int, int, str | None]:
    """(samples, finite samples, error) of an instant query."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    url = prometheus.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
    except Exception as exc:  # HTTPError carries Prometheus's own message in its body
        detail = getattr(exc, "read", lambda: b"")().decode(errors="replace")
        return 0, 0, f"{exc} {detail}".strip()
    if body.get("status") != "success":
        return 0, 0, str(body.get("error"))
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        values = [data["result"][1]]
    else:
        values = [item["value"][1] for item in data["result"]]
    finite = sum(1 for v in values if not math.isnan(float(v)) and not math.isinf(float(v)))
    return len(values), finite, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD, help="Grafana dashboard JSON "
                                                                          "(default %(default)s)")
    parser.add_argument("--no-dashboard", action="store_true", help="check the alert rules only")
    parser.add_argument("--rules", type=Path, default=RULES, help="alert rules (default %(default)s)")
    parser.add_argument("--alerts", choices=("selectors", "firing", "none"), default="selectors")
    parser.add_argument("--alert", action="append", default=[], help="check only this alert (repeatable)")
    parser.add_argument("--skip-alert", action="append", default=[], help="leave this alert out (repeatable)")
    parser.add_argument("--time", type=float, default=None, help="evaluate at this Unix time (default: now)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="a dashboard variable (defaults: job=.+, __rate_interval=5m)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    variables = dict(DEFAULT_VARIABLES)
    for item in args.var:
        name, _, value = item.partition("=")
        variables[name] = value
    queries = [] if args.no_dashboard else dashboard_queries(args.dashboard)
    if args.alerts != "none":
        queries += alert_queries(args.rules, args.alerts, only=set(args.alert), skip=set(args.skip_alert))
    if not queries:
        print("nothing to check", file=sys.stderr)
        return 1
    results = []
    for what, expr in queries:
        query = substitute(expr, variables)
        samples, finite, error = evaluate(args.prometheus, query, args.time)
        ok = error is None and finite > 0
        results.append({"what": what, "query": query, "samples": samples, "finite": finite, "error": error, "ok": ok})
        status = "ok  " if ok else "FAIL"
        note = error or ("no data" if samples == 0 else f"{samples} series" + ("" if finite else ", none finite"))
        print(f"[{status}] {what}: {note}\n         {query}")
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json is not None:
        args.json.write_text(json.dumps({"prometheus": args.prometheus, "time": args.time, "results": results},
                                        indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
