"""`pice-cloud serve` configuration: YAML file + PICE_* environment + flags, validated at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pice_cloud import defaults
from pice_cloud.config import load_config
from pice_cloud.scheduler import Budget
from pice_edge.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pice.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_single_host_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PICE_SERVER__PORT", "PICE_BROKER__URL", "PICE_LLM__KIND"):
        monkeypatch.delenv(name, raising=False)
    config = load_config()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8000
    assert config.broker is None  # embedded
    assert config.local_edges == 2
    assert config.llm.kind == "transformers"
    assert config.edge_model == config.llm.model == "smollm2-135m-instruct"


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "server:\n  port: 9000\n  host: 0.0.0.0\nbroker:\n  url: mqtt://broker.local:1883\n"
                           "  username: cloud\nservice:\n  max_points: 4\n")
    monkeypatch.setenv("PICE_SERVER__PORT", "9100")
    monkeypatch.setenv("PICE_SERVICE__TOKENS_PER_POINT", "50")
    monkeypatch.setenv("PICE_MODELS_DIR", "/tmp/elsewhere")  # another PICE_ variable: not ours, ignored
    config = load_config(path, {"server": {"port": 9200}})
    assert config.server.port == 9200  # flag over environment over file
    assert config.server.host == "0.0.0.0"  # file, merged with the other sources
    assert config.broker is not None
    assert config.broker.url == "mqtt://broker.local:1883"
    assert config.broker.username == "cloud"
    assert config.local_edges == 0  # an external broker: its own edges
    budget = Budget.from_config(config.service)
    assert budget.max_points == 4
    assert budget.tokens_per_point == 50
    assert budget.sketch_tokens == defaults.SKETCH_TOKENS  # not in the file: the one default


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: [9000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "not valid YAML" in message
    assert "line 3" in message or "line 2" in message


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- server\n- llm\n"))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/pice.yaml")


def test_unknown_field_names_file_field_and_the_expected_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  prot: 9000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"config file {path}: server.prot: unknown field" in message
    assert "port" in message.split("expected one of:")[1]


def test_unknown_section(tmp_path: Path) -> None:
    expected = r"serverr: unknown field \(expected one of: broker, cloud_id, discovery, edges"
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, "serverr:\n  port: 1\n"))


def test_invalid_broker_url(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\n  url: http://broker.local:1883\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"config file {path}: broker.url" in message
    assert "must start with mqtt:// or mqtts://" in message


def test_wrong_type_from_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PICE_SERVER__MAX_QUEUE", "lots")
    with pytest.raises(ConfigError, match=r"environment variable PICE_SERVER__MAX_QUEUE: server.max_queue: "
                                          r"Input should be a valid integer"):
        load_config()


def test_out_of_range_flag() -> None:
    with pytest.raises(ConfigError, match=r"command line: server.port: Input should be less than or equal to 65535"):
        load_config(None, {"server": {"port": 70000}})


def test_http_backend_needs_a_url() -> None:
    with pytest.raises(ConfigError, match=r"needs llm\.url"):
        load_config(None, {"llm": {"kind": "openai"}})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pice_cloud.cli", "serve", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_print_config_shows_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\n  url: mqtts://broker.local\n  username: cloud\n  password: hunter2\n"
                           "server:\n  api_key: sk-secret\n")
    proc = run_cli("--config", str(path), "--port", "9300", "--sketch-model", "my-sketcher", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout
    assert "sk-secret" not in proc.stdout
    shown = yaml.safe_load(proc.stdout)
    assert shown["server"]["port"] == 9300
    assert shown["broker"]["url"] == "mqtts://broker.local"
    assert shown["broker"]["password"] == "**********"
    assert shown["server"]["api_key"] == "**********"
    assert shown["edges"]["local"] is None
    assert shown["llm"]["sketch_model"] == "my-sketcher"
    assert shown["llm"]["model"] != "my-sketcher", "the sketch model writes the sketches only"


def test_cli_config_error_is_one_message_and_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "llm:\n  kind: onnx\n")
    proc = run_cli("--config", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pice-cloud: error: invalid configuration: ")
    assert f"config file {path}: llm.kind" in lines[0]
    assert "'transformers', 'openai', 'tensorrt_llm' or 'edge'" in lines[0]
