"""Logging set-up for the command-line tools (library code only uses `logging.getLogger`)."""

from __future__ import annotations

import argparse
import logging
import os
import warnings

LEVELS = ("debug", "info", "warning", "error")


def log_level_option(default: str | None = None) -> argparse.ArgumentParser:
    """A parent parser with ``--log-level``, so the flag works before or after a sub-command.

    The top-level parser passes the ``default``; sub-commands pass none so that their copy of
    the flag does not overwrite a value given before the sub-command.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--log-level", choices=LEVELS, default=default if default else argparse.SUPPRESS,
                        help="logging verbosity" + (" (default %(default)s)" if default else ""))
    return parent


def setup_logging(level: str = "warning") -> None:
    """Log to stderr at ``level``; quiet the chatty libraries unless debugging."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if level != "debug":
        for noisy in ("transitions", "httpx", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # amqtt logs clients that vanish during shutdown as errors with tracebacks.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore", module="transformers")
