"""``pice-cloud serve`` and ``pice-cloud site``: flags, configuration and the server's life (kept
apart from cli.py). A site is a server with a ``site`` section (`pice_cloud.site`).

Flags override ``PICE_*`` environment variables, which override the ``--config`` file.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, get_args

from pice_cloud.config import BackendKind, CloudConfig
from pice_edge.credentials import CLOUD_USERNAME, add_credential_options, credential_fields
from pice_edge.errors import ConfigError


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` sub-command's flags; every one maps onto a config field."""
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML configuration file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (secrets masked) and exit")
    parser.add_argument("--host", default=None, help="listen address (server.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (server.port; default 8000)")
    parser.add_argument("--broker", default=None, metavar="URL",
                        help="external MQTT broker (broker.url); default: an embedded one on loopback")
    parser.add_argument("--edges", type=int, default=None,
                        help="local edge nodes (edges.local; default 2, or 0 with an external broker)")
    parser.add_argument("--llm", default=None, choices=list(get_args(BackendKind)),
                        help="cloud LLM backend (llm.kind)")
    parser.add_argument("--model", default=None, help="cloud LLM model name, folder or remote id (llm.model)")
    parser.add_argument("--sketch-model", default=None,
                        help="a second model for the sketches only, e.g. a fine-tuned sketcher (llm.sketch_model)")
    parser.add_argument("--llm-url", default=None, help="OpenAI-compatible server for --llm openai (llm.url)")
    parser.add_argument("--edge-model", default=None, help="local edges' model (edges.model)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the cloud LLM (llm.threads)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="server.max_concurrent")
    parser.add_argument("--max-queue", type=int, default=None, help="server.max_queue")
    add_credential_options(parser, default_username=CLOUD_USERNAME)


def add_site_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``site`` sub-command's flags: those of ``serve`` and the site's own."""
    add_serve_arguments(parser)
    parser.add_argument("--name", default=None, help="the site's name (site.name; its service is cloud_id site-NAME)")
    parser.add_argument("--cloud", default=None, metavar="URL",
                        help="the cloud's API, e.g. https://cloud.example:8000/v1 (site.cloud_url); default: learned "
                             "from the cloud's status on the bridged site broker, or zeroconf")
    parser.add_argument("--cloud-id", default=None,
                        help="the cloud replica whose MQTT status the site follows (site.cloud_id)")
    parser.add_argument("--profile", default=None, metavar="NAME",
                        help="device profile: the site's LLM (llm.kind edge, on llm.runtime) takes its execution "
                             "providers, precision and threads, and the budget of its `site:` section")


def site_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``site`` flags that were given, nested like the configuration file (always with a
    ``site`` section: that is what makes the server a site)."""
    out = overrides(args)
    if args.profile is not None:
        # Only what --profile names is a flag; the sizes the profile's site section suggests
        # stay below the file and PICE_* variables (`apply_site_profile`).
        out["llm"] = {"kind": "edge", "profile": args.profile, **out.get("llm", {})}
    site: dict[str, Any] = {}
    for flag, key in (("name", "name"), ("cloud", "cloud_url"), ("cloud_id", "cloud_id")):
        value = getattr(args, flag, None)
        if value is not None:
            site[key] = value
    out["site"] = site
    return out


def apply_site_profile(config: CloudConfig) -> CloudConfig:
    """``server.max_concurrent`` from the device profile's ``site:`` section when nothing set it
    (the LLM's own sizes come from the profile in the backend, `pice_cloud.llm.edge_runtime`)."""
    if config.llm.kind != "edge" or not config.llm.profile or "max_concurrent" in config.server.model_fields_set:
        return config
    from pice_cloud.llm.edge_runtime import site_llm_overrides

    try:
        concurrent = site_llm_overrides(config.llm.profile)["server"]["max_concurrent"]
    except ConfigError:
        return config  # a profile without a site section: the backend sizes from its edge settings
    server = config.server.model_copy(update={"max_concurrent": concurrent})
    return config.model_copy(update={"server": server})


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, nested like the configuration file."""
    mapping = {
        "host": ("server", "host"), "port": ("server", "port"), "max_concurrent": ("server", "max_concurrent"),
        "max_queue": ("server", "max_queue"), "broker": ("broker", "url"), "edges": ("edges", "local"),
        "llm": ("llm", "kind"), "model": ("llm", "model"), "sketch_model": ("llm", "sketch_model"),
        "llm_url": ("llm", "url"),
        "edge_model": ("edges", "model"), "threads": ("llm", "threads"),
    }
    out: dict[str, Any] = {}
    for flag, (section, key) in mapping.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def load_with_credentials(path: str | None, flags: dict[str, Any], args: argparse.Namespace) -> CloudConfig:
    """`load_config` with the broker credentials of the flags and ``PICE_BROKER_*`` variables
    (the same ones the edge takes) folded into the ``broker`` section.

    Raises:
        ConfigError: invalid configuration, or credentials without a broker to use them on.
    """
    from pice_cloud.config import load_config

    credentials = credential_fields(args, default_username=CLOUD_USERNAME)
    if not credentials:
        return load_config(path, flags)
    config = load_config(path, flags)
    if config.broker is None:
        raise ConfigError("broker credentials were given (--username, --password-file, --ca-file, --cert-file, "
                          "--key-file or PICE_BROKER_* variables) but no broker: give --broker mqtts://HOST:PORT or "
                          "broker.url; the embedded broker needs none")
    broker = {**flags.get("broker", {}), **credentials}
    return load_config(path, {**flags, "broker": broker})


def run_serve(args: argparse.Namespace) -> int:
    """Load and validate the configuration, then serve until SIGTERM/SIGINT. Errors raise
    `PiceError` (the caller prints them and exits 2)."""
    from pice_cloud.config import dump_config

    site = args.command == "site"
    config = load_with_credentials(args.config, site_overrides(args) if site else overrides(args), args)
    if site:
        config = apply_site_profile(config)
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return 0
    from pice_cloud.server import install_sigterm_as_exit, serve

    install_sigterm_as_exit()

    def ready(url: str) -> None:
        role = f"site {config.site.name} " if config.site is not None else ""
        print(f"[pice] {role}serving on {url}/v1 (OpenAI-compatible; GET {url}/health)", file=sys.stderr, flush=True)

    asyncio.run(serve(config, on_ready=ready, log_level=args.log_level))
    return 0
