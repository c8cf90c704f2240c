"""Hardware probe: what this worker has to sell, as a JSON-able dict.

The shape matches ``protocol.workers.HardwareDescriptor`` (memory in MiB). Every step is
guarded: a missing torch or NVML, or a call that fails, leaves ``None``/empty in the answer
instead of raising, so a worker on a plain CPU box (or with a broken driver) still registers.

GPU facts come from two sources, each optional:

- torch (imported lazily): whether CUDA works for jobs, device names, VRAM, compute capability,
  and the CUDA runtime torch was built against. GPU ``index`` is torch's index (``cuda:N``),
  which honours ``CUDA_VISIBLE_DEVICES``.
- NVML (``pynvml``): driver version, UUID, and the same facts for GPUs torch cannot use. NVML
  numbers GPUs in PCI order, which can differ from torch's, so the two are joined by UUID.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["probe_hardware"]

logger = logging.getLogger(__name__)

PROC_CPUINFO = Path("/proc/cpuinfo")
PROC_MEMINFO = Path("/proc/meminfo")
UNKNOWN_CPU_MODEL = "unknown"
BYTES_PER_MIB = 1024 * 1024
KIB_PER_MIB = 1024
# /proc/cpuinfo keys naming the CPU, in order of preference (x86, then common ARM kernels).
_CPUINFO_MODEL_KEYS = ("model name", "Hardware", "Processor", "cpu model")


def probe_hardware() -> dict[str, Any]:
    """Describe this machine: CPU, RAM (MiB), platform, torch and GPUs. Never raises.

    Returns a dict with keys ``cpu_model``, ``cpu_cores`` (logical CPUs this process may use),
    ``ram_mb``, ``platform``, ``python``, ``torch_version``, ``cuda_available`` (torch can run
    CUDA jobs here) and ``gpus`` (a list of dicts with ``index``, ``name``, ``vram_mb``,
    ``compute_capability``, ``driver_version``, ``cuda_version`` and ``uuid``).
    """
    torch = _import_optional("torch")
    cuda_available = _torch_cuda_available(torch)
    with _nvml_session() as nvml:
        try:
            gpus = _probe_gpus(torch if cuda_available else None, nvml)
        except Exception:  # a library answering in an unexpected shape; the CPU facts still count
            logger.warning("hardware probe: GPU enumeration failed", exc_info=True)
            gpus = []
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": _cpu_cores(),
        "ram_mb": _ram_mb(),
        "platform": f"{platform.system()}-{platform.release()}-{platform.machine()}",
        "python": platform.python_version(),
        "torch_version": _text(str(getattr(torch, "__version__", ""))) if torch else None,
        "cuda_available": cuda_available,
        "gpus": gpus,
    }


# --- CPU and memory ------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        text = PROC_CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    for key in _CPUINFO_MODEL_KEYS:
        if key in fields:
            return fields[key]
    return _call(platform, "processor") or UNKNOWN_CPU_MODEL


def _cpu_cores() -> int:
    """Logical CPUs this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _ram_mb() -> int:
    """Total RAM in MiB from /proc/meminfo, else sysconf; 0 when neither answers."""
    try:
        for line in PROC_MEMINFO.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // KIB_PER_MIB  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // BYTES_PER_MIB
    except (AttributeError, ValueError, OSError):
        return 0


# --- GPUs ----------------------------------------------------------------------------------


def _probe_gpus(torch: Any | None, nvml: Any | None) -> list[dict[str, Any]]:
    """GPUs torch can use (enriched from NVML), else the GPUs NVML sees; [] when neither."""
    nvml_gpus = _nvml_gpus(nvml) if nvml is not None else []
    driver_version = _nvml_driver_version(nvml) if nvml is not None else None
    nvml_cuda_version = _nvml_cuda_version(nvml) if nvml is not None else None
    torch_gpus = _torch_gpus(torch) if torch is not None else []
    if not torch_gpus:
        for gpu in nvml_gpus:
            gpu["driver_version"] = driver_version
            gpu["cuda_version"] = nvml_cuda_version
        return nvml_gpus

    by_uuid = {_uuid_key(gpu["uuid"]): gpu for gpu in nvml_gpus if gpu["uuid"]}
    torch_cuda_version = _attr(torch, "version.cuda")
    for gpu in torch_gpus:
        match = by_uuid.get(_uuid_key(gpu["uuid"])) if gpu["uuid"] else None
        if match is not None:
            gpu["uuid"] = match["uuid"]
            gpu["compute_capability"] = gpu["compute_capability"] or match["compute_capability"]
        gpu["driver_version"] = driver_version
        # The runtime torch was built with is what jobs use; the driver's is only a ceiling.
        gpu["cuda_version"] = str(torch_cuda_version) if torch_cuda_version else nvml_cuda_version
    return torch_gpus


def _torch_cuda_available(torch: Any | None) -> bool:
    if torch is None:
        return False
    return bool(_call(torch, "cuda.is_available"))


def _torch_gpus(torch: Any) -> list[dict[str, Any]]:
    count = _int(_call(torch, "cuda.device_count"))
    gpus = []
    for index in range(count):
        props = _call(torch, "cuda.get_device_properties", index)
        if props is None:
            continue
        raw_uuid = getattr(props, "uuid", None)
        major, minor = getattr(props, "major", None), getattr(props, "minor", None)
        gpus.append(
            {
                "index": index,
                "name": str(getattr(props, "name", "")) or f"cuda:{index}",
                "vram_mb": _int(getattr(props, "total_memory", 0)) // BYTES_PER_MIB,
                "compute_capability": _capability(major, minor),
                "driver_version": None,
                "cuda_version": None,
                "uuid": _nvml_style_uuid(str(raw_uuid)) if raw_uuid else None,
            }
        )
    return gpus


@contextmanager
def _nvml_session() -> Iterator[Any | None]:
    """Yield an initialised pynvml module, or None when NVML is absent or fails to start."""
    nvml = _import_optional("pynvml")
    try:
        _resolve(nvml, "nvmlInit")()
    except Exception as exc:  # no library, no driver, no GPU: all mean "no NVML facts"
        logger.debug("hardware probe: NVML unavailable: %r", exc)
        yield None
        return
    try:
        yield nvml
    finally:
        _call(nvml, "nvmlShutdown")


def _nvml_gpus(nvml: Any) -> list[dict[str, Any]]:
    count = _int(_call(nvml, "nvmlDeviceGetCount"))
    gpus = []
    for index in range(count):
        handle = _call(nvml, "nvmlDeviceGetHandleByIndex", index)
        if handle is None:
            continue
        memory = _call(nvml, "nvmlDeviceGetMemoryInfo", handle)
        capability = _call(nvml, "nvmlDeviceGetCudaComputeCapability", handle)
        uuid = _call(nvml, "nvmlDeviceGetUUID", handle)
        name = _call(nvml, "nvmlDeviceGetName", handle)
        gpus.append(
            {
                "index": index,
                "name": _text(name) or f"nvml:{index}",
                "vram_mb": _int(getattr(memory, "total", 0)) // BYTES_PER_MIB,
                "compute_capability": _capability(*capability) if _is_pair(capability) else None,
                "driver_version": None,
                "cuda_version": None,
                "uuid": _text(uuid),
            }
        )
    return gpus


def _nvml_driver_version(nvml: Any) -> str | None:
    return _text(_call(nvml, "nvmlSystemGetDriverVersion"))


def _nvml_cuda_version(nvml: Any) -> str | None:
    """Highest CUDA version the driver supports, e.g. 12040 -> "12.4"."""
    version = _call(nvml, "nvmlSystemGetCudaDriverVersion")
    if not isinstance(version, int) or version <= 0:
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


# --- small guards --------------------------------------------------------------------------


def _import_optional(name: str) -> Any | None:
    # Broad on purpose: a broken torch install can raise OSError or RuntimeError on import.
    try:
        return importlib.import_module(name)
    except Exception as exc:
        logger.debug("hardware probe: %s unavailable: %s", name, exc)
        return None


def _call(owner: Any, dotted_name: str, *args: Any) -> Any:
    """Call ``owner.<dotted_name>(*args)``; on any failure (lookup included) log, return None."""
    try:
        return _resolve(owner, dotted_name)(*args)
    except Exception as exc:
        logger.debug("hardware probe: %s failed: %r", dotted_name, exc)
        return None


def _resolve(owner: Any, dotted_name: str) -> Any:
    for part in dotted_name.split("."):
        owner = getattr(owner, part)
    return owner


def _attr(owner: Any, dotted_name: str) -> Any:
    try:
        return _resolve(owner, dotted_name)
    except AttributeError:
        return None


def _int(value: Any) -> int:
    """A non-negative int from a library answer, 0 when it is not one."""
    return value if isinstance(value, int) and value > 0 else 0


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple | list) and len(value) == 2


def _capability(major: Any, minor: Any) -> str | None:
    if isinstance(major, int) and isinstance(minor, int) and major > 0:
        return f"{major}.{minor}"
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):  # older pynvml returns bytes
        value = value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) and value else None


def _nvml_style_uuid(raw: str) -> str:
    """torch prints a bare UUID; NVML and nvidia-smi prefix it with "GPU-"."""
    return raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"


def _uuid_key(uuid: str) -> str:
    return uuid.removeprefix("GPU-").lower()
