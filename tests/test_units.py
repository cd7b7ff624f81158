"""The systemd units: valid (``systemd-analyze verify``), hardened (``systemd-analyze security``),
and restart semantics that match the commands' exit statuses."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pice_edge.errors import EXIT_CONFIG, EXIT_UNAVAILABLE

UNITS = Path(__file__).resolve().parents[1] / "tools" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
#: Most exposure `systemd-analyze security` may rate a unit, in its tenths (2.5 of 10).
MAX_EXPOSURE = 25
ALL_UNITS = ["pice-cloud.service", "pice-edge.service", "pice-site.service"]


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def _service(name: str) -> configparser.SectionProxy:
    return _unit(name)["Service"]


@pytest.mark.parametrize("name", ALL_UNITS)
def test_restart_semantics_match_exit_statuses(name: str) -> None:
    service = _service(name)
    assert service["RestartPreventExitStatus"].split() == [str(EXIT_CONFIG)]
    assert service["Restart"] in ("on-failure", "always")  # both restart EXIT_UNAVAILABLE
    assert str(EXIT_UNAVAILABLE) not in service.get("RestartPreventExitStatus", "")
    assert "StartLimitIntervalSec=0" in (UNITS / name).read_text(), "systemd must never stop retrying"


@pytest.mark.parametrize("name", ["pice-edge.service", "pice-site.service"])
def test_jetson_units_can_reach_jetson_gpus(name: str) -> None:
    assert "video" in _service(name)["SupplementaryGroups"].split()


def test_site_unit_runs_for_months_after_its_broker() -> None:
    service = _service("pice-site.service")
    # A site is unattended like an edge: back even after a clean exit, except on a config error.
    assert service["Restart"] == "always"
    assert service["ExecStart"].split()[:4] == ["/opt/pice/venv/bin/pice-cloud", "site", "--config",
                                                "/etc/pice/site.yaml"]
    assert service["EnvironmentFile"] == "-/etc/pice/site.env"
    assert "mosquitto.service" in _unit("pice-site.service")["Unit"]["After"].split()


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ALL_UNITS)
def test_units_verify_and_are_hardened(name: str, tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    # The unit as installed, with ExecStart pointing at this environment's commands.
    bindir = str(Path(sys.executable).parent) + "/"
    unit = tmp_path / name
    unit.write_text((UNITS / name).read_text().replace("/opt/pice/venv/bin/", bindir))
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", f"--threshold={MAX_EXPOSURE}",
                               str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert security.returncode == 0, security.stdout[-600:]


def test_example_cloud_config_validates() -> None:
    from pice_cloud.config import load_config

    config = load_config(UNITS / "cloud.yaml")
    assert config.broker is not None
    assert config.broker.username == "pice-cloud"
    assert config.local_edges == 0


def test_example_site_config_validates() -> None:
    from pice_cloud.config import load_config
    from pice_edge.profiles import load_profile

    config = load_config(UNITS / "site.yaml")
    assert config.site is not None
    assert config.site.cloud_url is not None
    assert config.site.cloud_url.startswith("https://")
    assert config.broker is not None
    assert config.broker.url.startswith(("mqtt://127.0.0.1:", "mqtts://127.0.0.1:"))  # the site's own broker
    assert config.llm.kind == "edge"
    assert config.llm.runtime == "onnxruntime"
    assert config.llm.profile is not None
    profile = load_profile(config.llm.profile)  # a packaged profile, sized for the site role
    assert profile.site is not None
    assert config.server.max_concurrent == profile.site.max_concurrent
    assert config.service.router == "heuristic"  # the MiniLM router needs torch, which a site has not
    assert config.local_edges == 0
