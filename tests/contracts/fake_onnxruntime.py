"""A stand-in for onnxruntime with the TensorRT execution provider, for tests without a GPU.

Mirrors, from microsoft/onnxruntime (https://github.com/microsoft/onnxruntime, main; each file
at the commit that last changed it in the copy we read):

- ``onnxruntime/core/providers/tensorrt/tensorrt_execution_provider_info.cc`` @
  3a282a295475775510fbfa5234bda55a2db6f015: the TensorRT provider's option names
  (``ProviderOptionsParser``: any other name is an error) and their types (booleans parsed from
  their string form, ``trt_profile_{min,max,opt}_shapes`` as ``name:d0xd1,...``);
- ``onnxruntime/core/providers/tensorrt/tensorrt_execution_provider.cc`` (the explicit-profile
  check): min, max and opt shapes given together, and "User needs to provide all the dynamic
  shape inputs with associated profiles if they want to explicitly set profiles through
  provider options." when a dynamic input has none;
- ``onnxruntime/python/onnxruntime_inference_collection.py``: ``InferenceSession(path,
  sess_options, providers=[...], provider_options=[{...}])`` with option values turned into
  strings, ``get_providers()``, ``get_inputs()``, ``get_outputs()``.

Each session's inputs are those of PICE's decoder export for ``LAYERS`` layers, all dynamic.
``FakeSession.created`` records what every session was given.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

TRT = "TensorrtExecutionProvider"
PROVIDERS = [TRT, "CUDAExecutionProvider", "CPUExecutionProvider"]
TRT_OPTIONS = frozenset({
    "device_id", "has_user_compute_stream", "trt_max_partition_iterations", "trt_min_subgraph_size",
    "trt_max_workspace_size", "trt_fp16_enable", "trt_int8_enable", "trt_int8_calibration_table_name",
    "trt_int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core", "trt_dump_subgraphs",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_engine_decryption_enable",
    "trt_engine_decryption_lib_path", "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable",
    "trt_layer_norm_fp32_fallback", "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache",
    "trt_detailed_build_log", "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level",
    "trt_auxiliary_streams", "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes",
    "trt_profile_max_shapes", "trt_profile_opt_shapes", "trt_cuda_graph_enable"})
BOOLEANS = frozenset({"trt_fp16_enable", "trt_int8_enable", "trt_engine_cache_enable", "trt_timing_cache_enable",
                      "trt_dump_subgraphs", "trt_cuda_graph_enable", "trt_force_timing_cache"})
PROFILES = ("trt_profile_min_shapes", "trt_profile_max_shapes", "trt_profile_opt_shapes")
LAYERS = 2


class Fail(RuntimeError):
    """``onnxruntime.capi.onnxruntime_pybind11_state.Fail``."""


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in text.split(","):
        name, _, dims = item.rpartition(":")
        if not name or not dims:
            raise Fail(f"invalid profile shape {item!r}")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


class _Arg:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeSession:
    created: ClassVar[list[dict[str, Any]]] = []
    #: Inner inputs of a graph TensorRT splits (to exercise the profile check); none by default.
    extra_dynamic_inputs: tuple[str, ...] = ()

    def __init__(self, path: str, sess_options: Any = None, providers: list[str] | None = None,
                 provider_options: list[dict[str, Any]] | None = None) -> None:
        providers = list(providers or [])
        options = [{str(k): str(v) for k, v in o.items()} for o in (provider_options or [{} for _ in providers])]
        if len(options) != len(providers):
            raise ValueError("'providers' and 'provider_options' should be the same length if both are given.")
        self.inputs = ["input_ids", "attention_mask", "position_ids",
                       *(f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value"))]
        for name, opts in zip(providers, options, strict=True):
            if name == TRT:
                self._check_trt(opts)
        self.providers = providers
        FakeSession.created.append({"path": path, "providers": providers, "options": options})

    def _check_trt(self, options: dict[str, str]) -> None:
        for key, value in options.items():
            if key not in TRT_OPTIONS:
                raise Fail(f"Unknown provider option: \"{key}\".")
            if key in BOOLEANS and value not in ("True", "False", "true", "false", "1", "0"):
                raise Fail(f"Failed to parse provider option \"{key}\": {value!r}")
        given = [key for key in PROFILES if key in options]
        if not given:
            return
        if len(given) != 3:
            raise Fail("trt_profile_min_shapes, trt_profile_max_shapes and trt_profile_opt_shapes go together")
        low, high, opt = (parse_shapes(options[key]) for key in PROFILES)
        if not set(low) == set(high) == set(opt):
            raise Fail("the min, max and opt profiles name different inputs")
        for name in low:
            if not all(lo <= o <= hi for lo, o, hi in zip(low[name], opt[name], high[name], strict=True)):
                raise Fail(f"profile of {name}: min <= opt <= max does not hold")
        missing = [name for name in (*self.inputs, *self.extra_dynamic_inputs) if name not in low]
        if missing:
            raise Fail("User needs to provide all the dynamic shape inputs with associated profiles if they want to "
                       f"explicitly set profiles through provider options. (missing {missing})")

    def get_providers(self) -> list[str]:
        return self.providers

    def get_inputs(self) -> list[_Arg]:
        return [_Arg(n) for n in self.inputs]

    def get_outputs(self) -> list[_Arg]:
        return [_Arg("logits"), *(_Arg(f"present.{i}.{k}") for i in range(LAYERS) for k in ("key", "value"))]


def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeSession]]:
    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "fake-trt"  # type: ignore[attr-defined]
    ort.InferenceSession = FakeSession  # type: ignore[attr-defined]
    ort.SessionOptions = types.SimpleNamespace  # type: ignore[attr-defined]
    ort.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99)  # type: ignore[attr-defined]
    ort.get_available_providers = lambda: list(PROVIDERS)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    FakeSession.created = []
    FakeSession.extra_dynamic_inputs = ()
    yield FakeSession
    FakeSession.created = []
    FakeSession.extra_dynamic_inputs = ()
