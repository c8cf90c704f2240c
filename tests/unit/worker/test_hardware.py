"""The hardware probe: real facts on this machine, and survival when GPU libraries misbehave.

No GPU exists on the development machines, so the GPU paths run against small stand-ins for
torch and pynvml injected through ``sys.modules``; the probe imports both lazily.
"""

from __future__ import annotations

import platform
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from protocol.workers import HardwareDescriptor
from worker import hardware
from worker.hardware import probe_hardware

TOP_LEVEL_KEYS = {
    "cpu_model",
    "cpu_cores",
    "ram_mb",
    "platform",
    "python",
    "torch_version",
    "cuda_available",
    "gpus",
}
GPU_KEYS = {
    "index",
    "name",
    "vram_mb",
    "compute_capability",
    "driver_version",
    "cuda_version",
    "uuid",
}
MIB = 1024 * 1024


def assert_shape(probe: dict[str, Any]) -> None:
    assert set(probe) == TOP_LEVEL_KEYS
    assert isinstance(probe["cpu_model"], str) and probe["cpu_model"]
    assert isinstance(probe["cpu_cores"], int) and probe["cpu_cores"] >= 1
    assert isinstance(probe["ram_mb"], int) and probe["ram_mb"] >= 0
    assert isinstance(probe["platform"], str) and probe["platform"]
    assert probe["python"] == platform.python_version()
    assert probe["torch_version"] is None or isinstance(probe["torch_version"], str)
    assert isinstance(probe["cuda_available"], bool)
    assert isinstance(probe["gpus"], list)
    for gpu in probe["gpus"]:
        assert set(gpu) == GPU_KEYS
        assert isinstance(gpu["index"], int) and gpu["index"] >= 0
        assert isinstance(gpu["name"], str) and gpu["name"]
        assert isinstance(gpu["vram_mb"], int) and gpu["vram_mb"] >= 0
        for key in ("compute_capability", "driver_version", "cuda_version", "uuid"):
            assert gpu[key] is None or isinstance(gpu[key], str)
    HardwareDescriptor.model_validate(probe)


def nvml_works_here() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


# --- this machine --------------------------------------------------------------------------


def test_probe_on_this_machine_has_the_descriptor_shape() -> None:
    probe = probe_hardware()

    assert_shape(probe)
    assert probe["ram_mb"] > 0
    assert probe["platform"].startswith(platform.system())


def test_probe_on_this_machine_reports_torch_and_cuda_as_torch_does() -> None:
    torch = pytest.importorskip("torch")

    probe = probe_hardware()

    assert probe["torch_version"] == str(torch.__version__)
    assert probe["cuda_available"] is torch.cuda.is_available()
    if not torch.cuda.is_available() and not nvml_works_here():  # the CPU development machines
        assert probe["gpus"] == []


# --- missing or failing libraries ----------------------------------------------------------


def test_probe_without_torch_or_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    monkeypatch.setitem(sys.modules, "pynvml", None)

    probe = probe_hardware()

    assert_shape(probe)
    assert probe["torch_version"] is None
    assert probe["cuda_available"] is False
    assert probe["gpus"] == []


def test_probe_survives_libraries_whose_calls_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("driver exploded")

    torch = types.SimpleNamespace(
        __version__="9.9.9",
        cuda=types.SimpleNamespace(
            is_available=broken, device_count=broken, get_device_properties=broken
        ),
    )
    pynvml = types.SimpleNamespace(nvmlInit=broken, nvmlShutdown=broken)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)

    probe = probe_hardware()

    assert_shape(probe)
    assert probe["torch_version"] == "9.9.9"
    assert probe["cuda_available"] is False
    assert probe["gpus"] == []


def test_probe_survives_nvml_failing_after_init(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([FakeNvmlGpu("GPU-aaaa", "NVIDIA A10", 24 * 1024 * MIB, (8, 6))])
    nvml.fail = {"nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo", "nvmlSystemGetDriverVersion"}
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    probe = probe_hardware()

    assert_shape(probe)
    assert probe["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA A10",
            "vram_mb": 0,
            "compute_capability": "8.6",
            "driver_version": None,
            "cuda_version": "12.4",
            "uuid": None,
        }
    ]
    assert nvml.shutdowns == nvml.inits == 1


def test_probe_survives_nvml_failing_to_count(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([FakeNvmlGpu("GPU-aaaa", "NVIDIA A10", MIB, (8, 6))])
    nvml.fail = {"nvmlDeviceGetCount"}
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    probe = probe_hardware()

    assert probe["gpus"] == []
    assert nvml.shutdowns == 1


# --- GPU paths with stand-ins --------------------------------------------------------------


class FakeNvmlGpu:
    def __init__(self, uuid: str, name: str, total_bytes: int, capability: tuple[int, int]):
        self.uuid, self.name, self.total_bytes, self.capability = (
            uuid,
            name,
            total_bytes,
            capability,
        )


class FakeNvml(types.ModuleType):
    """Just the pynvml functions the probe calls; names in ``fail`` raise."""

    def __init__(self, gpus: list[FakeNvmlGpu]) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.fail: set[str] = set()
        self.inits = self.shutdowns = 0

    def _check(self, name: str) -> None:
        if name in self.fail:
            raise RuntimeError(f"NVML error in {name}")

    def nvmlInit(self) -> None:
        self._check("nvmlInit")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeNvmlGpu:
        self._check("nvmlDeviceGetHandleByIndex")
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeNvmlGpu) -> bytes:
        return gpu.name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, gpu: FakeNvmlGpu) -> str:
        self._check("nvmlDeviceGetUUID")
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeNvmlGpu) -> Any:
        self._check("nvmlDeviceGetMemoryInfo")
        return types.SimpleNamespace(total=gpu.total_bytes, free=0, used=0)

    def nvmlDeviceGetCudaComputeCapability(self, gpu: FakeNvmlGpu) -> tuple[int, int]:
        return gpu.capability

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040


def fake_torch(devices: list[dict[str, Any]], cuda_version: str | None = "12.1") -> Any:
    props = [types.SimpleNamespace(**device) for device in devices]
    return types.SimpleNamespace(
        __version__="2.13.0+cu121",
        version=types.SimpleNamespace(cuda=cuda_version),
        cuda=types.SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: len(props),
            get_device_properties=lambda index: props[index],
        ),
    )


def test_probe_joins_torch_and_nvml_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML lists GPUs in PCI order; torch (CUDA_VISIBLE_DEVICES=1,0 here) the other way round.
    nvml = FakeNvml(
        [
            FakeNvmlGpu("GPU-1111-aaaa", "NVIDIA H100 80GB HBM3", 80 * 1024 * MIB, (9, 0)),
            FakeNvmlGpu("GPU-2222-BBBB", "NVIDIA L4", 24 * 1024 * MIB, (8, 9)),
        ]
    )
    torch = fake_torch(
        [
            {
                "name": "NVIDIA L4",
                "total_memory": 23 * 1024 * MIB,
                "major": 8,
                "minor": 9,
                "uuid": "2222-bbbb",
            },
            {
                "name": "NVIDIA H100 80GB HBM3",
                "total_memory": 79 * 1024 * MIB,
                "major": 9,
                "minor": 0,
                "uuid": "1111-aaaa",
            },
        ]
    )
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    probe = probe_hardware()

    assert_shape(probe)
    assert probe["cuda_available"] is True
    assert probe["torch_version"] == "2.13.0+cu121"
    assert probe["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA L4",
            "vram_mb": 23 * 1024,
            "compute_capability": "8.9",
            "driver_version": "550.54.15",
            "cuda_version": "12.1",
            "uuid": "GPU-2222-BBBB",
        },
        {
            "index": 1,
            "name": "NVIDIA H100 80GB HBM3",
            "vram_mb": 79 * 1024,
            "compute_capability": "9.0",
            "driver_version": "550.54.15",
            "cuda_version": "12.1",
            "uuid": "GPU-1111-aaaa",
        },
    ]
    assert nvml.shutdowns == nvml.inits == 1


def test_probe_with_torch_cuda_but_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = fake_torch(
        [{"name": "NVIDIA T4", "total_memory": 15 * 1024 * MIB, "major": 7, "minor": 5}],
        cuda_version=None,
    )
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "pynvml", None)

    probe = probe_hardware()

    assert_shape(probe)
    assert probe["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA T4",
            "vram_mb": 15 * 1024,
            "compute_capability": "7.5",
            "driver_version": None,
            "cuda_version": None,
            "uuid": None,
        }
    ]


def test_probe_lists_nvml_gpus_when_torch_cannot_use_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = FakeNvml([FakeNvmlGpu("GPU-3333", "Tesla V100-SXM2-16GB", 16 * 1024 * MIB, (7, 0))])
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    probe = probe_hardware()

    assert_shape(probe)
    assert probe["cuda_available"] is False
    assert probe["gpus"] == [
        {
            "index": 0,
            "name": "Tesla V100-SXM2-16GB",
            "vram_mb": 16 * 1024,
            "compute_capability": "7.0",
            "driver_version": "550.54.15",
            "cuda_version": "12.4",  # what the driver supports, from 12040
            "uuid": "GPU-3333",
        }
    ]


# --- CPU and memory fallbacks --------------------------------------------------------------


def test_cpu_model_from_an_arm_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n\nHardware\t: BCM2835\n")
    monkeypatch.setattr(hardware, "PROC_CPUINFO", cpuinfo)

    assert probe_hardware()["cpu_model"] == "BCM2835"


def test_cpu_model_and_ram_without_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hardware, "PROC_CPUINFO", tmp_path / "missing-cpuinfo")
    monkeypatch.setattr(hardware, "PROC_MEMINFO", tmp_path / "missing-meminfo")

    probe = probe_hardware()

    assert probe["cpu_model"] == (platform.processor() or hardware.UNKNOWN_CPU_MODEL)
    assert probe["ram_mb"] > 0  # from sysconf
    assert_shape(probe)


def test_ram_from_meminfo_is_mib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16777216 kB\nMemFree:         1024 kB\n")
    monkeypatch.setattr(hardware, "PROC_MEMINFO", meminfo)

    assert probe_hardware()["ram_mb"] == 16384
