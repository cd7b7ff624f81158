"""``pice-edge doctor``: what this device has and whether it can serve.

Every check yields a `Check`: a status (``ok``, ``warn``, ``fail``, ``info``), what was found,
and for anything missing the command or change that fixes it. A ``fail`` is only given to what
the edge cannot run without (the configured runtime's library, the model, the broker); what
merely makes it slower (no TensorRT, another power mode) is a ``warn``.

Libraries are probed by importing them, so their absence never breaks the doctor itself.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pice_edge.errors import ModelNotFoundError, PiceError
from pice_edge.profiles import DeviceProfile

Status = Literal["ok", "warn", "fail", "info"]

_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
_DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
#: Seconds allowed to the nvpmodel query.
_NVPMODEL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    """One line of the doctor's checklist."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    #: Whether the edge cannot serve while this check fails.
    required: bool = False


@dataclass(frozen=True)
class DoctorConfig:
    """What the edge would run with (the same values `pice-edge run` resolves)."""

    model: str
    runtime: str
    profile: DeviceProfile | None = None
    broker_url: str | None = None
    fleet: str = "default"
    interfaces: Any = "all"
    timeout_s: float = 3.0
    #: The device id `run` would use: checked against the broker's ACL when given.
    device_id: str | None = None
    #: `BrokerSettings` credential fields (username, password, TLS files), as `pice_edge.credentials` gives them.
    credentials: dict[str, Any] = field(default_factory=dict)


def failed(checks: list[Check]) -> list[Check]:
    """The required checks that failed (the doctor exits non-zero when there is any)."""
    return [c for c in checks if c.status == "fail"]


def report_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not failed(checks), "checks": [asdict(c) for c in checks]}


# --- host ---------------------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's marketing name, or the best the platform tells."""
    info = _read(Path("/proc/cpuinfo"))
    for key in ("model name", "Model", "Hardware"):
        for line in info.splitlines():
            if line.split(":", 1)[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def memory_mb() -> tuple[int, int] | None:
    """(total, available) memory in MB, from /proc/meminfo; None elsewhere."""
    values: dict[str, int] = {}
    for line in _read(Path("/proc/meminfo")).splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) // 1024
    if "MemTotal" not in values:
        return None
    return values["MemTotal"], values.get("MemAvailable", values.get("MemFree", 0))


def _host_checks(profile: DeviceProfile | None) -> list[Check]:
    python = f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"
    checks = [Check("python", "ok", python)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    detail = f"{cpu_model()}, {cores} cores usable ({platform.machine()})"
    if profile and profile.threads and profile.threads > cores:
        checks.append(Check("cpu", "warn", f"{detail}; profile asks for {profile.threads} threads",
                            fix="lower `threads` in the profile or pass --threads"))
    else:
        checks.append(Check("cpu", "ok", detail))
    mem = memory_mb()
    if mem is None:
        checks.append(Check("memory", "info", "unknown (no /proc/meminfo)"))
    else:
        total, available = mem
        detail = f"{total} MB total, {available} MB available"
        if profile and available < profile.memory_budget_mb:
            checks.append(Check("memory", "warn", f"{detail}; profile budget is {profile.memory_budget_mb} MB",
                                fix="stop other programs, or lower memory_budget_mb / max_batch in the profile"))
        else:
            checks.append(Check("memory", "ok", detail + (f" (profile budget {profile.memory_budget_mb} MB)"
                                                          if profile else "")))
    return checks


def _jetson_checks(profile: DeviceProfile | None) -> list[Check]:
    model = _read(_DEVICE_TREE_MODEL)
    release = _read(_TEGRA_RELEASE).splitlines()
    is_jetson = bool(release) or "jetson" in model.lower()
    if not is_jetson:
        if profile and profile.power_mode:
            return [Check("jetson", "warn", f"not a Jetson, but profile {profile.name!r} is for one",
                          fix="use the x86-cpu-dev profile (or your own) on this machine")]
        return [Check("jetson", "info", "not a Jetson (no /etc/nv_tegra_release)")]
    checks = [Check("jetson", "ok", f"{model or 'Jetson'}; {release[0] if release else 'L4T release unknown'}")]
    nvpmodel = shutil.which("nvpmodel")
    if nvpmodel is None:
        checks.append(Check("power mode", "warn", "nvpmodel not found", fix="install nvidia-l4t-tools (JetPack)"))
    else:
        try:
            out = subprocess.run([nvpmodel, "-q"], capture_output=True, text=True, timeout=_NVPMODEL_TIMEOUT_S,
                                 check=False).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            out = ""
            checks.append(Check("power mode", "warn", f"nvpmodel -q failed: {exc}"))
        mode = ""
        for line in out.splitlines():
            if "Power Mode" in line and ":" in line:
                mode = line.split(":", 1)[1].strip()
        if mode:
            if profile and profile.power_mode and mode != profile.power_mode:
                checks.append(Check(
                    "power mode", "warn", f"{mode}; profile {profile.name!r} was sized for {profile.power_mode}",
                    fix=f"sudo nvpmodel -m ID (the id of {profile.power_mode} in /etc/nvpmodel.conf), or expect "
                        "lower throughput",
                ))
            else:
                checks.append(Check("power mode", "ok", mode))
    tegrastats = shutil.which("tegrastats")
    checks.append(Check("tegrastats", "ok" if tegrastats else "warn", tegrastats or "not found",
                        fix="" if tegrastats else "install nvidia-l4t-tools (JetPack) to monitor GPU and power"))
    return checks


# --- libraries ------------------------------------------------------------------------------------

def _import(name: str) -> tuple[Any, str]:
    """(module, "") or (None, reason)."""
    try:
        if importlib.util.find_spec(name) is None:
            return None, "not installed"
    except ImportError:  # a dotted name whose parent package is absent
        return None, "not installed"
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # a broken install raises anything (OSError on a missing .so, ...)
        return None, f"import failed: {type(exc).__name__}: {exc}"


def _library_checks(runtime: str, profile: DeviceProfile | None) -> list[Check]:
    checks = []
    torch, why = _import("torch")
    need = runtime == "transformers"
    if torch is None:
        checks.append(Check("torch", "fail" if need else "info", why, required=need, fix=(
            "pip install 'pice[edge-torch]' (on a Jetson, install NVIDIA's torch wheel for your JetPack first)"
            if need else "")))
    else:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            free, total = torch.cuda.mem_get_info(0)
            detail = f"{torch.__version__}, CUDA {torch.version.cuda}: {name} ({free >> 20} of {total >> 20} MB free)"
        else:
            detail = f"{torch.__version__}, CUDA not available (CPU only)"
        wants_gpu = need and profile is not None and profile.uses_gpu
        status: Status = "warn" if wants_gpu and not torch.cuda.is_available() else "ok"
        checks.append(Check("torch", status, detail, required=need, fix=(
            "install a CUDA build of torch (NVIDIA's wheel on Jetson)" if status == "warn" else "")))

    ort, why = _import("onnxruntime")
    need = runtime == "onnxruntime"
    if ort is None:
        checks.append(Check("onnxruntime", "fail" if need else "info", why, required=need, fix=(
            "pip install onnxruntime (CPU) or onnxruntime-gpu (on Jetson: the wheel for your JetPack from "
            "NVIDIA's index)" if need else "")))
    else:
        available = list(ort.get_available_providers())
        detail = f"{ort.__version__}, providers: {', '.join(available)}"
        if profile is not None and need:
            chosen = next((p for p in profile.execution_providers if p in available), None)
            preferred = profile.execution_providers[0]
            if chosen is None:
                checks.append(Check("onnxruntime", "fail", detail + "; none of the profile's providers",
                                    required=True, fix="install onnxruntime-gpu or fix execution_providers"))
            elif chosen != preferred:
                checks.append(Check("onnxruntime", "warn", f"{detail}; {preferred} missing, {chosen} will run",
                                    required=need, fix="install onnxruntime-gpu built with TensorRT/CUDA for this "
                                                       "device to use the preferred provider"))
            else:
                checks.append(Check("onnxruntime", "ok", f"{detail}; {chosen} will run", required=need))
        else:
            checks.append(Check("onnxruntime", "ok", detail, required=need))

    trt, why = _import("tensorrt")
    wants_trt = profile is not None and "TensorrtExecutionProvider" in profile.execution_providers
    if trt is None:
        checks.append(Check("tensorrt", "warn" if wants_trt else "info", why, fix=(
            "install TensorRT's Python bindings (JetPack ships them: python3-libnvinfer)" if wants_trt else "")))
    else:
        checks.append(Check("tensorrt", "ok", str(getattr(trt, "__version__", "installed"))))

    if runtime == "tensorrt_edgellm":
        from pice_edge.runtimes.tensorrt_edgellm import INSTALL_HINT

        edgellm, why = _import("experimental.server")
        checks.append(Check("tensorrt_edgellm", "ok" if edgellm else "fail",
                            "TensorRT Edge-LLM's Python API (experimental.server) imports" if edgellm else why,
                            required=True, fix="" if edgellm else INSTALL_HINT))
    if runtime == "tensorrt_llm":
        trtllm, why = _import("tensorrt_llm")
        checks.append(Check("tensorrt_llm", "ok" if trtllm else "fail",
                            str(getattr(trtllm, "__version__", "")) if trtllm else why, required=True,
                            fix="" if trtllm else "install TensorRT-LLM for this device (NVIDIA's instructions), "
                                                  "or choose another runtime"))
    return checks


def _engine_cache_check(profile: DeviceProfile | None) -> list[Check]:
    path = profile.engine_cache_path if profile else None
    if path is None:
        return []
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if os.access(existing, os.W_OK):
        return [Check("engine cache", "ok", f"{path} ({'exists' if path.exists() else 'will be created'})")]
    return [Check("engine cache", "warn", f"{path} is not writable (TensorRT engines will be rebuilt every start)",
                  fix=f"mkdir -p {path} and make it writable by this user, or change engine_cache_dir")]


# --- model and broker ------------------------------------------------------------------------------

def _model_check(model: str) -> Check:
    from pice_edge import model_store

    try:
        path = model_store.resolve(model)
    except ModelNotFoundError as exc:
        fix = (f"pice-edge models fetch {model}" if model in model_store.KNOWN_MODELS
               else "pass --model with a known model name or a Hugging Face model folder")
        return Check("model", "fail", str(exc), fix=fix, required=True)
    except PiceError as exc:
        return Check("model", "fail", str(exc), fix=f"pice-edge models fetch {Path(model).name} --force",
                     required=True)
    return Check("model", "ok", f"{model} -> {path}", required=True)


async def _broker_checks(cfg: DoctorConfig) -> list[Check]:
    from pice_edge.transport import BrokerSettings, MqttTransport

    checks: list[Check] = []
    url = cfg.broker_url
    if url is None:
        from pice_edge.discovery import Discovery

        try:
            async with Discovery(cfg.interfaces) as discovery:
                cloud = await discovery.find_cloud(cfg.fleet, timeout=cfg.timeout_s)
                url = cloud.broker_url()
        except PiceError as exc:
            return [Check("broker", "fail", f"no --broker given and {exc}", required=True,
                          fix="pass --broker mqtt://HOST:PORT, or start the cloud on this network")]
        checks.append(Check("discovery", "ok", f"cloud {cloud.id!r} of fleet {cfg.fleet!r} advertises {url}"))
    try:
        settings = BrokerSettings(url=url, **cfg.credentials)
    except ValueError as exc:
        return [*checks, Check("broker", "fail", str(exc).splitlines()[-1], required=True,
                               fix="give --broker as mqtt://HOST:PORT or mqtts://HOST:PORT")]
    started = time.perf_counter()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(settings.host, settings.port), cfg.timeout_s)
        writer.close()
        await writer.wait_closed()
    except (OSError, asyncio.TimeoutError) as exc:
        reason = str(exc) or "timed out"
        return [*checks, Check("broker", "fail", f"cannot reach {settings.host}:{settings.port} over TCP ({reason})",
                               required=True, fix=f"start the MQTT broker at {url} (e.g. `sudo systemctl start "
                                                  "mosquitto`) or fix --broker; check firewalls")]
    transport = MqttTransport(settings, client_id=f"pice-doctor-{uuid.uuid4().hex[:8]}")
    try:
        try:
            await transport.connect(timeout=cfg.timeout_s)
        except PiceError as exc:
            return [*checks, Check("broker", "fail", f"TCP ok but MQTT connect failed: {exc}", required=True,
                                   fix="check that it is an MQTT 3.1.1 broker and the credentials / TLS files")]
        ms = (time.perf_counter() - started) * 1000
        checks.append(Check("broker", "ok", f"MQTT connect to {url} in {ms:.0f} ms", required=True))
        if cfg.device_id is not None:
            checks.append(await _acl_check(transport, cfg.device_id, settings.username, cfg.timeout_s))
        return checks
    finally:
        await transport.close()


async def _acl_check(transport: Any, device_id: str, username: str | None, timeout_s: float) -> Check:
    """Whether the broker lets ``device_id`` use its status topic: with the fleet's ACL
    (tools/mosquitto/acl) only when the device id equals the broker username. An edge the ACL
    refuses would otherwise look alive to itself while the cloud never sees it.

    The probe is an empty, non-retained message on the device's own status topic (the cloud
    ignores empty statuses): it must come back to us. Brokers drop denied publishes silently, so
    an echo is the only proof."""
    from pice_edge.protocol import edge_status_topic

    topic = edge_status_topic(device_id)
    who = f"user {username!r}" if username else "this client"
    fix = (f"run with --device-id equal to the broker username ({username or '?'}), or give the account access to "
           "the device's topics in the broker's ACL")
    echoed = asyncio.Event()

    def on_message(message: Any) -> None:
        if not message.payload and not message.retain:
            echoed.set()

    try:
        await transport.subscribe(topic, on_message, timeout=timeout_s)
        transport.publish(topic, b"")
        await asyncio.wait_for(echoed.wait(), timeout_s)
    except (PiceError, asyncio.TimeoutError) as exc:
        detail = str(exc) or f"nothing came back within {timeout_s:g}s"
        return Check("acl", "fail", f"the broker does not let {who} use the status topic of device {device_id!r} "
                                    f"({detail})", required=True, fix=fix)
    return Check("acl", "ok", f"device {device_id!r} may publish and read {topic}", required=True)


async def run_checks(cfg: DoctorConfig) -> list[Check]:
    """Every check, in checklist order."""
    checks = _host_checks(cfg.profile)
    checks += _jetson_checks(cfg.profile)
    checks += _library_checks(cfg.runtime, cfg.profile)
    checks += _engine_cache_check(cfg.profile)
    checks.append(await asyncio.get_running_loop().run_in_executor(None, _model_check, cfg.model))
    checks += await _broker_checks(cfg)
    return checks


def format_checks(checks: list[Check]) -> str:
    """The checklist as text, one line per check, a ``fix:`` line under each problem."""
    marks = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]", "info": "[info]"}
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{marks[c.status]} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in ("fail", "warn"):
            lines.append(f"       {'':<{width}}  fix: {c.fix}")
    bad = failed(checks)
    lines.append("")
    lines.append(f"{len(bad)} required check(s) failed: {', '.join(c.name for c in bad)}" if bad
                 else "ready: every required check passed")
    return "\n".join(lines)


__all__ = ["Check", "DoctorConfig", "cpu_model", "failed", "format_checks", "memory_mb", "report_json", "run_checks"]
