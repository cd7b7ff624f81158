"""Real edge processes for the fault and security tests: started, killed (SIGKILL), logged to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class EdgeProcess:
    """``python -m pice_edge.cli run ...`` (or ``tests.fault_edge`` with an injected fault).

    stderr goes to a file, not a pipe: a chatty process must never block on a full pipe.
    """

    def __init__(self, device_id: str, broker_url: str, model: Path, logdir: Path, *, heartbeat: float = 0.5,
                 extra: tuple[str, ...] = (), fault: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.device_id = device_id
        self.log_path = logdir / f"{device_id}.log"
        module = "tests.fault_edge" if fault else "pice_edge.cli"
        # --no-zeroconf: tests never advertise beyond loopback.
        cmd = [sys.executable, "-m", module, *fault, "run", "--broker", broker_url, "--no-zeroconf",
               "--device-id", device_id,
               "--model", str(model), "--threads", "1", "--heartbeat", str(heartbeat), "--log-level", "info",
               *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                         env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[1])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, no offline status; only the broker's last will speaks for it."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it does not exit in time."""
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
