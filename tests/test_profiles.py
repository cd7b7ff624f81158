"""Device profiles: every shipped profile loads; broken ones fail naming the file and field."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pice_edge.errors import ConfigError
from pice_edge.profiles import PROFILES_ENV, DeviceProfile, find_profile, list_profiles, load_profile, packaged_dir
from pice_edge.prompts import EXPANSION_NO_REPEAT_NGRAM_SIZE, EXPANSION_REPETITION_PENALTY
from pice_edge.protocol import EdgeStatus, decode, edge_status_topic
from pice_edge.transport import BrokerSettings, Message, MqttTransport
from tests.conftest import Mosquitto, eventually

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIR = ROOT / "firmware_configs"
FILES = sorted(SOURCE_DIR.glob("*.yaml"))
JETSONS = ["jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-xavier-nx"]
THOR = "jetson-agx-thor"


def test_the_six_device_classes_are_there() -> None:
    assert sorted(f.stem for f in FILES) == sorted([*JETSONS, THOR, "x86-cpu-dev"])


def test_thor_runs_tensorrt_edge_llm_and_says_what_to_install_where_it_is_absent() -> None:
    profile = load_profile(THOR)
    assert profile.runtime == "tensorrt_edgellm"
    assert "273 GB/s" in (ROOT / "pice_edge" / "firmware_configs" / f"{THOR}.yaml").read_text()
    from pice_edge.errors import RuntimeUnavailableError
    from pice_edge.runtimes import available_runtimes, create_runtime

    assert "tensorrt_edgellm" in available_runtimes()
    with pytest.raises(RuntimeUnavailableError, match="TensorRT Edge-LLM is built from source"):
        create_runtime("tensorrt_edgellm", model="smollm2-135m-instruct")
    proc = run_edge("doctor", "--profile", THOR, "--broker", "mqtt://127.0.0.1:1", "--json")
    report = json.loads(proc.stdout)
    [check] = [c for c in report["checks"] if c["name"] == "tensorrt_edgellm"]
    assert check["status"] == "fail"
    assert "built from source" in check["fix"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_profile_loads(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert load_profile(path.stem) == profile  # found by name too
    assert profile.execution_providers[-1] == "CPUExecutionProvider"
    text = path.read_text()
    assert text.startswith("#"), "each profile starts with a comment saying what it is and where values come from"


@pytest.mark.parametrize("name", JETSONS)
def test_jetson_profiles_prefer_tensorrt_then_cuda_and_cite_their_source(name: str) -> None:
    profile = load_profile(name)
    assert profile.runtime == "onnxruntime"
    assert profile.execution_providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert profile.precision == "fp16"
    assert profile.power_mode
    assert profile.engine_cache_path is not None
    assert "~" not in str(profile.engine_cache_path)
    assert "Source:" in find_profile(name).read_text()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_profile_sets_the_measured_repetition_control(path: Path) -> None:
    # Explicit in every file, so that an integrator sees the knob, at the measured default, but
    # where the profile's runtime has no repetition control (TensorRT Edge-LLM): off, or it refuses.
    assert "\nrepetition_penalty:" in path.read_text()
    profile = load_profile(path)
    expected = 1.0 if profile.runtime == "tensorrt_edgellm" else EXPANSION_REPETITION_PENALTY
    assert profile.repetition_penalty == expected
    assert profile.no_repeat_ngram_size == EXPANSION_NO_REPEAT_NGRAM_SIZE
    assert DeviceProfile(name="bare", memory_budget_mb=1024).repetition_penalty == EXPANSION_REPETITION_PENALTY


def test_memory_budgets_grow_with_the_device() -> None:
    budget = {n: load_profile(n).memory_budget_mb for n in JETSONS}
    assert budget["jetson-xavier-nx"] <= budget["jetson-orin-nano-8gb"] < budget["jetson-orin-nx-16gb"] \
        < budget["jetson-agx-orin-64gb"]
    assert budget["jetson-orin-nano-8gb"] < 8192
    assert budget["jetson-agx-orin-64gb"] < 65536


def test_profiles_ship_with_the_package() -> None:
    # The package's folder is the repository's (a symlink), and the wheel's package data takes it.
    assert {p.name for p in packaged_dir().glob("*.yaml")} == {f.name for f in FILES}
    assert packaged_dir().resolve() == SOURCE_DIR.resolve()
    package_data = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines()
                        if line.startswith("pice_edge = ["))
    assert '"firmware_configs/*.yaml"' in package_data


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


GOOD = "runtime: transformers\nmemory_budget_mb: 1024\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "max_bacth: 8\n", r"field 'max_bacth': unknown field"),
        (GOOD + "max_batch: eight\n", r"field 'max_batch': Input should be a valid integer"),
        (GOOD + "max_batch: '8'\n", r"field 'max_batch': Input should be a valid integer"),
        (GOOD + "max_batch: 0\n", r"field 'max_batch': Input should be greater than or equal to 1"),
        (GOOD + "threads: true\n", r"field 'threads'"),
        (GOOD + "precision: fp8\n", r"field 'precision': Input should be 'fp32', 'fp16'"),
        ("runtime: onnx\nmemory_budget_mb: 1024\n", r"field 'runtime': Input should be 'transformers'"),
        ("runtime: transformers\n", r"field 'memory_budget_mb': Field required"),
        (GOOD + "execution_providers: [CUDAExecutionProvider]\n", r"must end with CPUExecutionProvider"),
        (GOOD + "execution_providers: [CudaProvider, CPUExecutionProvider]\n", r"field 'execution_providers.0'"),
        (GOOD + "execution_providers: [CPUExecutionProvider, CPUExecutionProvider]\n", r"lists a provider twice"),
        (GOOD + "precision: int8\n", r"precision int8 needs runtime onnxruntime"),
        (GOOD + "name: other\n", r"field 'name': 'other' must equal the file name 'broken'"),
        (GOOD + "ensemble_temperature: 5\n", r"field 'ensemble_temperature': Input should be less than or equal"),
        (GOOD + "repetition_penalty: 0.9\n", r"field 'repetition_penalty': Input should be greater than or equal"),
        (GOOD + "no_repeat_ngram_size: -1\n", r"field 'no_repeat_ngram_size': Input should be greater than or equal"),
        (GOOD + "no_repeat_ngram_size: 3.5\n", r"field 'no_repeat_ngram_size': Input should be a valid integer"),
        ("- runtime: transformers\n", r"a profile must be a YAML mapping"),
        ("runtime: [unclosed\n", r"not valid YAML"),
    ],
)
def test_broken_profiles_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "broken", text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown profile 'jetson-nano'.*jetson-orin-nano-8gb.*x86-cpu-dev"):
        load_profile("jetson-nano")
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile("/nonexistent/board.yaml")


def test_site_profiles_dir_adds_and_shadows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "my-board", GOOD + "max_batch: 3\n")
    write(tmp_path, "x86-cpu-dev", GOOD + "max_batch: 2\n")
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert load_profile("my-board").max_batch == 3
    assert load_profile("x86-cpu-dev").max_batch == 2
    assert set(list_profiles()) >= {"my-board", *JETSONS}


def run_edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pice_edge.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)


def test_run_with_a_broken_profile_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "broken", GOOD + "max_bacth: 8\n")
    proc = run_edge("run", "--profile", str(path), "--broker", "mqtt://127.0.0.1:1")
    assert proc.returncode == 2
    assert f"{path}: field 'max_bacth': unknown field" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_edge("run", "--profile", "jetson-nano", "--broker", "mqtt://127.0.0.1:1")
    assert proc.returncode == 2
    assert "unknown profile 'jetson-nano'" in proc.stderr


def test_profiles_command_lists_them_all() -> None:
    proc = run_edge("profiles")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()[1:]]
    assert names == sorted([*JETSONS, THOR, "x86-cpu-dev"])


@pytest.mark.mosquitto
async def test_run_uses_the_profile_and_flags_override_it(mosquitto: Mosquitto, tiny_model: Path) -> None:
    """A real edge with the x86 profile: its status carries the profile, with --max-batch winning."""
    statuses: list[EdgeStatus] = []
    device = "profile-edge"
    watcher = MqttTransport(BrokerSettings(url=mosquitto.url))

    def on_status(message: Message) -> None:
        statuses.append(decode(EdgeStatus, message.payload))

    watcher.add_subscription(edge_status_topic(device), on_status)
    await watcher.connect()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pice_edge.cli", "run", "--profile", "x86-cpu-dev", "--max-batch", "2",
        "--model", str(tiny_model), "--broker", mosquitto.url, "--no-zeroconf", "--device-id", device,
        "--heartbeat", "0.5", cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ},
    )
    try:
        await eventually(lambda: any(s.online for s in statuses) or proc.returncode is not None, timeout=120,
                         what="a status from the edge")
        assert proc.returncode is None, "edge exited early"
        status = next(s for s in statuses if s.online)
        assert (status.profile, status.max_batch, status.runtime) == ("x86-cpu-dev", 2, "transformers")
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert statuses[-1].online is False  # a clean stop publishes offline
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await watcher.close()
