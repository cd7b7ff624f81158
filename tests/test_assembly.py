"""One edge assembly (`pice_edge.assembly`) for ``pice-edge run`` and the cloud's local edges:
settings from a profile and flags, the KV-cache budget, the model's build."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pice_cloud.bootstrap import start_system
from pice_cloud.config import CloudConfig
from pice_cloud.llm.transformers import TransformersBackend
from pice_edge import cli, model_store
from pice_edge.assembly import EdgeSettings, assemble_edge, kv_budget_mb, resolve_settings
from pice_edge.profiles import DeviceProfile, load_profile
from pice_edge.prompts import EXPANSION_NO_REPEAT_NGRAM_SIZE, EXPANSION_REPETITION_PENALTY
from pice_edge.transport import BrokerSettings
from tests.conftest import cloud_config

#: A CPU profile whose memory budget the tiny model's weights take a known share of.
PROFILE = """description: test board
runtime: transformers
execution_providers: [CPUExecutionProvider]
precision: fp32
max_batch: 3
memory_budget_mb: 512
threads: 1
repetition_penalty: 1.2
no_repeat_ngram_size: 0
"""


@pytest.fixture
def board(tmp_path: Path) -> DeviceProfile:
    path = tmp_path / "test-board.yaml"
    path.write_text(PROFILE)
    return load_profile(path)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model installed in a model store: a folder with a manifest, so it has a build."""
    return model_store.install(tiny_model, "tiny-build", root=tmp_path_factory.mktemp("store"))


def weights_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def test_flags_win_over_the_profile_which_wins_over_the_defaults(board: DeviceProfile) -> None:
    assert resolve_settings() == EdgeSettings()
    from_profile = resolve_settings(board)
    assert (from_profile.max_batch, from_profile.threads, from_profile.repetition_penalty,
            from_profile.no_repeat_ngram_size, from_profile.profile_name) == (3, 1, 1.2, 0, "test-board")
    flagged = resolve_settings(board, max_batch=2, threads=4, providers=("cpu",), memory_budget_mb=100.0)
    assert (flagged.max_batch, flagged.threads, flagged.providers, flagged.memory_budget_mb) == (2, 4, ("cpu",), 100.0)
    bare = resolve_settings(max_batch=5)
    assert (bare.max_batch, bare.repetition_penalty, bare.no_repeat_ngram_size, bare.profile_name) == (
        5, EXPANSION_REPETITION_PENALTY, EXPANSION_NO_REPEAT_NGRAM_SIZE, "")


def test_pice_edge_run_flags_resolve_through_the_assembly(board: DeviceProfile, tmp_path: Path) -> None:
    args = cli._parser().parse_args(["run", "--profile", str(tmp_path / "test-board.yaml"), "--max-batch", "2",
                                     "--providers", "cuda, cpu", "--model", "some-model"])
    assert cli._config(args) == resolve_settings(board, model="some-model", max_batch=2, providers=("cuda", "cpu"))


async def test_a_profiles_kv_budget_and_the_build_reach_the_node(board: DeviceProfile, installed: Path) -> None:
    settings = resolve_settings(board, model=str(installed))
    node = await assemble_edge(settings, device_id="assembled", broker=BrokerSettings(url="mqtt://127.0.0.1:1"),
                               follow_rollout=True, api_key="key")
    try:
        # The profile's memory budget less the weights the runtime loaded: what is left for KV.
        budget = board.memory_budget_mb - weights_mb(installed)
        assert 64 < budget < board.memory_budget_mb
        assert node.memory_budget_bytes == int(budget * 2**20)
        assert node.model_build == model_store.build_id(installed) is not None
        assert node.model_id == f"tiny-build@{node.model_build}"
        assert (node.profile, node.max_batch, node.repetition_penalty, node.no_repeat_ngram_size) == (
            "test-board", 3, 1.2, 0)
        assert node.rollout is not None
        assert node.rollout.api_key == "key"
        # A rolled-out build loads with the same settings: the same runtime, the new folder.
        reloaded = node.rollout.loader(installed)
        assert reloaded.model_id == node.runtime.model_id
        reloaded.close()
    finally:
        node.runtime.close()  # never started: nothing else to stop


@pytest.fixture
async def tiny_llm(tiny_model: Path) -> AsyncIterator[TransformersBackend]:
    llm = TransformersBackend(tiny_model, threads=1)
    yield llm
    await llm.close()


async def test_the_clouds_local_edges_are_assembled_with_the_build(installed: Path,
                                                                    tiny_llm: TransformersBackend) -> None:
    config = cloud_config(None, edges=1, edge_model=installed)
    async with start_system(config, llm=tiny_llm) as system:
        [node] = system.edges
        assert node.model_build == model_store.build_id(installed) is not None
        # What the cloud schedules by: the node's status names the build.
        [edge] = [e for e in system.service.fleet.live() if e.device_id == node.device_id]
        assert edge.status.model_id == f"tiny-build@{node.model_build}"
        assert (node.profile, node.max_batch) == ("local", config.edges.max_batch)
        assert node.memory_budget_bytes is None  # the edges section names no device profile


async def test_the_clouds_local_edges_take_a_profiles_kv_budget(board: DeviceProfile, installed: Path,
                                                                 tiny_llm: TransformersBackend, tmp_path: Path) -> None:
    """The cloud's local edges go through the same settings -> KV budget path as a device: given
    a profile (``edges.profile``), its budget (less the weights) bounds their batches."""
    path = tmp_path / "test-board.yaml"
    path.write_text(PROFILE)
    config = _with_profile(cloud_config(None, edges=1, edge_model=installed), str(path))
    async with start_system(config, llm=tiny_llm) as system:
        [node] = system.edges
        assert node.memory_budget_bytes == int((board.memory_budget_mb - weights_mb(installed)) * 2**20)
        expected = kv_budget_mb(resolve_settings(board, model=str(installed)), node.runtime)
        assert expected is not None
        assert node.memory_budget_bytes == int(expected * 2**20)
        assert node.model_build == model_store.build_id(installed)
        assert node.profile == str(path)
    with pytest.raises(Exception, match="profile"):
        async with start_system(_with_profile(cloud_config(None, edges=1, edge_model=installed), "no-such-board"),
                                llm=tiny_llm):
            pass


def _with_profile(config: CloudConfig, profile: str) -> CloudConfig:
    config.edges = config.edges.model_copy(update={"profile": profile})
    return config


def test_edgellm_gets_the_profiles_repetition_control_to_check_at_start() -> None:
    from pice_edge.assembly import runtime_options

    thor = load_profile("jetson-agx-thor")
    options = runtime_options(resolve_settings(thor))
    assert (options["repetition_penalty"], options["no_repeat_ngram_size"]) == (1.0, thor.no_repeat_ngram_size)
    asking = thor.model_copy(update={"repetition_penalty": 1.1})
    assert runtime_options(resolve_settings(asking))["repetition_penalty"] == 1.1  # the runtime then refuses it
