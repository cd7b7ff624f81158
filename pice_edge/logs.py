"""Logging set-up for the command-line tools (library code only uses `logging.getLogger`)."""

from __future__ import annotations

import logging
import os
import warnings

LEVELS = ("debug", "info", "warning", "error")


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
