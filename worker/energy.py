"""Energy meters: joules a device spent over an interval (the ``EnergyMeter`` seam).

A meter measures the **whole device** during the interval: one GPU, or every CPU package.
When several jobs run on that device at once, each interval includes the others' energy;
splitting it between them is the caller's job (see ``apportion``). Sources, best first:

- ``nvml``: the GPU's own energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules,
  Volta and newer); on older GPUs its power reading (``nvmlDeviceGetPowerUsage``, milliwatts)
  integrated over time by a background sampler.
- ``rapl``: the CPU package counters under ``/sys/class/powercap`` (microjoules). Often
  root-only (kernels restrict ``energy_uj`` since CVE-2020-8694) and absent in VMs/containers.
- ``estimate``: duration x an assumed power, marked ``"estimate"`` so that nobody reads it as a
  measurement.

Every meter is a cumulative joule counter plus a clock: ``start()`` takes a reading, ``stop()``
returns the difference, so overlapping intervals on one meter are fine. ``measure()`` wraps a
block and never lets a metering failure replace the block's own outcome.

Units: energy in joules, time in seconds (monotonic), power in watts.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

from protocol.workers import EnergySource

__all__ = [
    "DEFAULT_CPU_WATTS_PER_CORE",
    "DEFAULT_GPU_WATTS",
    "DEFAULT_POWERCAP_ROOT",
    "DEFAULT_POWER_SAMPLE_INTERVAL_S",
    "EnergyMeasurement",
    "EnergyMeter",
    "EnergyMeterError",
    "EnergyMeterUnavailable",
    "EnergyReading",
    "EstimatedEnergyMeter",
    "NvmlEnergyMeter",
    "PendingMeasurement",
    "RaplEnergyMeter",
    "apportion",
    "default_cpu_watts",
    "select_energy_meter",
]

logger = logging.getLogger(__name__)

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
# Rough average draw per logical CPU under load (a 65 W desktop part with 12 threads, a 280 W
# server part with 64): the estimate is an order of magnitude, and is labelled as one.
DEFAULT_CPU_WATTS_PER_CORE = 5.0
# A mid-range datacenter or gaming card under load; used when a GPU has no working NVML.
DEFAULT_GPU_WATTS = 250.0
# NVML refreshes its power reading every 20-100 ms depending on the GPU; sampling faster
# only repeats values.
DEFAULT_POWER_SAMPLE_INTERVAL_S = 0.1
SAMPLER_JOIN_TIMEOUT_S = 2.0

MILLIJOULES_PER_JOULE = 1_000.0
MICROJOULES_PER_JOULE = 1_000_000.0
MILLIWATTS_PER_WATT = 1_000.0

# Top-level RAPL zones only ("intel-rapl:0", not the subzone "intel-rapl:0:0"): a package's
# core/uncore/dram subzones are parts of it or separate, and summing them would double count.
# "intel-rapl-mmio:N" mirrors the same package through MMIO, so it does not match either.
_RAPL_TOP_LEVEL_ZONE = re.compile(r"^intel-rapl:\d+$")
_RAPL_PACKAGE_NAME_PREFIX = "package"  # "psys" is also top-level, and contains the packages

Clock = Callable[[], float]
NvmlMethod = Literal["total_energy", "power_sampling"]
_DeviceKind = Literal["auto", "cpu", "cuda"]
_DEVICE_KINDS: dict[str, _DeviceKind] = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}


class EnergyMeterError(RuntimeError):
    """A meter could not read its source."""


class EnergyMeterUnavailable(EnergyMeterError):
    """This source cannot be used on this machine (no library, no device, no permission)."""


@dataclass(frozen=True)
class EnergyReading:
    """A meter's cumulative counter (joules) at a monotonic time (seconds)."""

    counter_j: float
    time_s: float


@dataclass(frozen=True)
class EnergyMeasurement:
    """Energy (joules) the whole device spent over ``duration_s`` seconds."""

    energy_j: float
    duration_s: float
    source: EnergySource

    @property
    def mean_power_w(self) -> float:
        """Average power in watts over the interval; 0 for an empty interval."""
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0


@dataclass
class PendingMeasurement:
    """Yielded by ``measure()``: ``result`` is set when the block exits (also on an exception).

    If the meter fails to read, ``result`` stays None and ``error`` says why.
    """

    result: EnergyMeasurement | None = None
    error: EnergyMeterError | None = None


class EnergyMeter(Protocol):
    """Measures the energy of one device (a GPU, or all CPU packages) over intervals."""

    @property
    def source(self) -> EnergySource: ...

    def start(self) -> EnergyReading:
        """Read the counter now. Raises EnergyMeterError if the source cannot be read."""
        ...

    def stop(self, reading: EnergyReading) -> EnergyMeasurement:
        """Energy (joules) and time (seconds) since ``reading``. Raises EnergyMeterError."""
        ...

    def measure(self) -> AbstractContextManager[PendingMeasurement]:
        """Measure a ``with`` block; read failures land in ``error``, never raise."""
        ...

    def close(self) -> None:
        """Release the source (NVML handle, sampler thread). Idempotent."""
        ...


class _CounterMeter:
    """A cumulative joule counter plus a clock; subclasses supply ``_read_counter_j``."""

    source: EnergySource

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def _read_counter_j(self, now_s: float) -> float:
        """The cumulative counter in joules at ``now_s``; raises EnergyMeterError."""
        raise NotImplementedError

    def start(self) -> EnergyReading:
        now_s = self._clock()
        return EnergyReading(counter_j=self._read_counter_j(now_s), time_s=now_s)

    def stop(self, reading: EnergyReading) -> EnergyMeasurement:
        now_s = self._clock()
        energy_j = self._read_counter_j(now_s) - reading.counter_j
        if energy_j < 0:  # e.g. the NVIDIA driver reloaded and its counter restarted
            logger.warning("%s energy counter went backwards; reporting 0 J", self.source)
            energy_j = 0.0
        duration_s = max(0.0, now_s - reading.time_s)
        return EnergyMeasurement(energy_j=energy_j, duration_s=duration_s, source=self.source)

    @contextmanager
    def measure(self) -> Iterator[PendingMeasurement]:
        pending = PendingMeasurement()
        try:
            reading: EnergyReading | None = self.start()
        except EnergyMeterError as exc:
            logger.warning("energy meter (%s) failed to start: %s", self.source, exc)
            pending.error, reading = exc, None
        try:
            yield pending
        finally:
            if reading is not None:
                try:
                    pending.result = self.stop(reading)
                except EnergyMeterError as exc:
                    logger.warning("energy meter (%s) failed to stop: %s", self.source, exc)
                    pending.error = exc

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- NVML ----------------------------------------------------------------------------------


class NvmlEnergyMeter(_CounterMeter):
    """One NVIDIA GPU through NVML.

    ``gpu_index`` is NVML's index (nvidia-smi's order, which ignores ``CUDA_VISIBLE_DEVICES``
    and may differ from torch's ``cuda:N``); pass ``gpu_uuid`` (as ``probe_hardware`` reports
    it) to pin the exact GPU a torch device runs on. ``method`` says which NVML path is used:
    ``"total_energy"`` (the driver's counter) or ``"power_sampling"`` (a sampler thread
    integrates watts every ``sample_interval_s`` seconds while any interval is open; with
    ``sample_interval_s=None`` only the interval's two endpoints are sampled).
    ``nvml`` replaces the ``pynvml`` module, for tests. Raises EnergyMeterUnavailable.
    """

    source: EnergySource = "nvml"

    def __init__(
        self,
        gpu_index: int = 0,
        *,
        gpu_uuid: str | None = None,
        nvml: Any | None = None,
        clock: Clock = time.monotonic,
        sample_interval_s: float | None = DEFAULT_POWER_SAMPLE_INTERVAL_S,
    ) -> None:
        super().__init__(clock)
        if sample_interval_s is not None and not sample_interval_s > 0:
            raise ValueError(f"sample_interval_s must be > 0 or None, got {sample_interval_s}")
        self.gpu_index = gpu_index
        self._sample_interval_s = sample_interval_s
        self._nvml = nvml if nvml is not None else _import_pynvml()
        self._lock = threading.Lock()
        self._closed = False
        # Power-sampling state: integrated joules and the last (time_s, watts) sample.
        self._sampled_j = 0.0
        self._last_sample: tuple[float, float] | None = None
        self._open_intervals = 0
        self._sampler: threading.Thread | None = None
        self._sampler_stop: threading.Event | None = None
        try:
            self._nvml.nvmlInit()
        except Exception as exc:
            raise EnergyMeterUnavailable(f"NVML did not initialise: {exc!r}") from exc
        try:
            self._handle = self._device_handle(gpu_index, gpu_uuid)
            self.method: NvmlMethod = self._choose_method()
        except BaseException:
            self._shutdown_nvml()
            raise

    def _device_handle(self, gpu_index: int, gpu_uuid: str | None) -> Any:
        try:
            if gpu_uuid is not None:
                return self._nvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
            return self._nvml.nvmlDeviceGetHandleByIndex(gpu_index)
        except Exception as exc:
            which = gpu_uuid if gpu_uuid is not None else f"index {gpu_index}"
            raise EnergyMeterUnavailable(f"no NVML GPU {which}: {exc!r}") from exc

    def _choose_method(self) -> NvmlMethod:
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            return "total_energy"
        except Exception as exc:  # NVML_ERROR_NOT_SUPPORTED before Volta
            logger.info("NVML total energy unsupported (%r); sampling power instead", exc)
        try:
            self._nvml.nvmlDeviceGetPowerUsage(self._handle)
        except Exception as exc:
            raise EnergyMeterUnavailable(f"NVML reports neither energy nor power: {exc!r}") from exc
        return "power_sampling"

    def start(self) -> EnergyReading:
        if self.method == "power_sampling":
            self._open_interval()
            try:
                return super().start()
            except BaseException:
                self._close_interval()
                raise
        return super().start()

    def stop(self, reading: EnergyReading) -> EnergyMeasurement:
        if self.method == "power_sampling":
            try:
                return super().stop(reading)
            finally:
                self._close_interval()
        return super().stop(reading)

    def _read_counter_j(self, now_s: float) -> float:
        if self.method == "total_energy":
            try:
                millijoules = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            except Exception as exc:
                raise EnergyMeterError(f"NVML energy read failed: {exc!r}") from exc
            return float(millijoules) / MILLIJOULES_PER_JOULE
        with self._lock:
            return self._sample_locked(now_s)

    def _sample_locked(self, now_s: float) -> float:
        """Take one power sample at ``now_s`` and integrate (trapezoid); returns joules."""
        try:
            watts = float(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / MILLIWATTS_PER_WATT
        except Exception as exc:
            raise EnergyMeterError(f"NVML power read failed: {exc!r}") from exc
        if self._last_sample is not None:
            last_s, last_w = self._last_sample
            if now_s >= last_s:
                self._sampled_j += (last_w + watts) / 2 * (now_s - last_s)
        if self._last_sample is None or now_s >= self._last_sample[0]:
            self._last_sample = (now_s, watts)
        return self._sampled_j

    def _open_interval(self) -> None:
        with self._lock:
            self._open_intervals += 1
            if self._open_intervals > 1:
                return
            self._last_sample = None  # do not integrate across a gap with no interval open
            if self._sample_interval_s is None:
                return
            self._sampler_stop = threading.Event()
            self._sampler = threading.Thread(
                target=self._run_sampler,
                args=(self._sampler_stop, self._sample_interval_s),
                name=f"nvml-power-sampler-{self.gpu_index}",
                daemon=True,
            )
            self._sampler.start()

    def _close_interval(self) -> None:
        with self._lock:
            self._open_intervals = max(0, self._open_intervals - 1)
            if self._open_intervals > 0:
                return
            # Detach under the lock, so a start() racing in gets a fresh sampler, not this one.
            sampler, stop_event = self._detach_sampler_locked()
        self._stop_sampler(sampler, stop_event)

    def _detach_sampler_locked(self) -> tuple[threading.Thread | None, threading.Event | None]:
        sampler, stop_event = self._sampler, self._sampler_stop
        self._sampler = self._sampler_stop = None
        return sampler, stop_event

    @staticmethod
    def _stop_sampler(sampler: threading.Thread | None, stop_event: threading.Event | None) -> None:
        if stop_event is not None:
            stop_event.set()
        if sampler is not None:
            sampler.join(SAMPLER_JOIN_TIMEOUT_S)

    def _run_sampler(self, stop_event: threading.Event, interval_s: float) -> None:
        while not stop_event.wait(interval_s):
            try:
                with self._lock:
                    self._sample_locked(self._clock())
            except EnergyMeterError as exc:  # the interval's stop() will report it if it lasts
                logger.debug("NVML power sample failed: %s", exc)

    def close(self) -> None:
        """Stop the sampler and shut NVML down (NVML counts inits, so one shutdown each)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._open_intervals = 0
            sampler, stop_event = self._detach_sampler_locked()
        self._stop_sampler(sampler, stop_event)
        self._shutdown_nvml()

    def _shutdown_nvml(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            logger.debug("nvmlShutdown failed: %r", exc)


def _import_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except Exception as exc:
        raise EnergyMeterUnavailable(f"pynvml (nvidia-ml-py) is not importable: {exc!r}") from exc


# --- RAPL ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RaplZone:
    name: str
    energy_path: Path
    max_energy_range_uj: int | None

    def read_uj(self) -> int:
        return int(self.energy_path.read_text(encoding="ascii").strip())


class RaplEnergyMeter(_CounterMeter):
    """All CPU packages through Linux powercap (RAPL), summed over the package zones.

    Only top-level ``intel-rapl:N`` zones named ``package-*`` count (the kernel exposes AMD
    packages under the same name). Each zone's counter wraps at ``max_energy_range_uj``;
    a wrap between two reads of this meter is corrected, but more than one wrap between reads
    (an interval of tens of minutes at full power, with no other read in between) undercounts.
    ``powercap_root`` is injectable for tests. Raises EnergyMeterUnavailable when no package
    zone is readable.
    """

    source: EnergySource = "rapl"

    def __init__(
        self, powercap_root: Path = DEFAULT_POWERCAP_ROOT, *, clock: Clock = time.monotonic
    ) -> None:
        super().__init__(clock)
        self._zones = _find_rapl_packages(Path(powercap_root))
        if not self._zones:
            raise EnergyMeterUnavailable(f"no readable RAPL package zone under {powercap_root}")
        self._lock = threading.Lock()
        self._total_j = 0.0
        self._last_uj = [zone.read_uj() for zone in self._zones]

    @property
    def zones(self) -> tuple[str, ...]:
        """Names of the zones summed, e.g. ("package-0", "package-1")."""
        return tuple(zone.name for zone in self._zones)

    def _read_counter_j(self, now_s: float) -> float:
        with self._lock:
            try:
                raw_uj = [zone.read_uj() for zone in self._zones]
            except (OSError, ValueError) as exc:
                raise EnergyMeterError(f"RAPL read failed: {exc!r}") from exc
            for i, (zone, now_uj) in enumerate(zip(self._zones, raw_uj, strict=True)):
                self._total_j += _wrapped_delta_uj(self._last_uj[i], now_uj, zone) / (
                    MICROJOULES_PER_JOULE
                )
                self._last_uj[i] = now_uj
            return self._total_j


def _wrapped_delta_uj(before_uj: int, after_uj: int, zone: _RaplZone) -> int:
    """Microjoules between two counter values, allowing for one wrap at the zone's range."""
    if after_uj >= before_uj:
        return after_uj - before_uj
    if zone.max_energy_range_uj is None:  # wrapped, range unknown: count from zero
        return after_uj
    return zone.max_energy_range_uj - before_uj + after_uj


def _find_rapl_packages(root: Path) -> list[_RaplZone]:
    zones = []
    for zone_dir in sorted(root.glob("intel-rapl:*")):
        if not _RAPL_TOP_LEVEL_ZONE.match(zone_dir.name):
            continue
        name = _read_text(zone_dir / "name")
        if name is not None and not name.startswith(_RAPL_PACKAGE_NAME_PREFIX):
            continue
        zone = _RaplZone(
            name=name or zone_dir.name,
            energy_path=zone_dir / "energy_uj",
            max_energy_range_uj=_read_int(zone_dir / "max_energy_range_uj"),
        )
        try:
            zone.read_uj()
        except (OSError, ValueError) as exc:  # PermissionError when not root, usually
            logger.debug("RAPL zone %s unreadable: %r", zone_dir, exc)
            continue
        zones.append(zone)
    return zones


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# --- estimate ------------------------------------------------------------------------------


def default_cpu_watts(cpu_cores: int | None = None) -> float:
    """Assumed CPU power in watts: ``DEFAULT_CPU_WATTS_PER_CORE`` x logical CPUs.

    ``cpu_cores`` defaults to the logical CPUs this process may run on.
    """
    if cpu_cores is None:
        try:
            cpu_cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpu_cores = os.cpu_count() or 1
    return DEFAULT_CPU_WATTS_PER_CORE * max(1, cpu_cores)


class EstimatedEnergyMeter(_CounterMeter):
    """Duration (seconds) x ``assumed_watts``; results say ``source="estimate"``.

    Assumes the device draws ``assumed_watts`` for the whole interval, so for an idle or
    lightly loaded device it overestimates. ``assumed_watts`` defaults to
    ``default_cpu_watts()``.
    """

    source: EnergySource = "estimate"

    def __init__(
        self, assumed_watts: float | None = None, *, clock: Clock = time.monotonic
    ) -> None:
        super().__init__(clock)
        watts = default_cpu_watts() if assumed_watts is None else float(assumed_watts)
        if not (math.isfinite(watts) and watts > 0):
            raise ValueError(f"assumed_watts must be a positive number of watts, got {watts}")
        self.assumed_watts = watts

    def _read_counter_j(self, now_s: float) -> float:
        return self.assumed_watts * now_s


# --- selection and attribution -------------------------------------------------------------


def select_energy_meter(
    device: str = "auto",
    gpu_index: int = 0,
    assumed_watts: float | None = None,
    *,
    gpu_uuid: str | None = None,
    powercap_root: Path = DEFAULT_POWERCAP_ROOT,
    nvml: Any | None = None,
    clock: Clock = time.monotonic,
) -> EnergyMeter:
    """The best meter that works here for ``device``.

    - ``"auto"``: NVML for GPU ``gpu_index`` (or ``gpu_uuid``), else RAPL, else an estimate at
      ``assumed_watts`` (default ``default_cpu_watts()``).
    - ``"cpu"``: RAPL, else the estimate.
    - ``"cuda"`` or ``"cuda:N"`` (N is NVML's index): NVML, else an estimate at
      ``assumed_watts`` (default ``DEFAULT_GPU_WATTS``). RAPL is skipped: it measures the CPU.

    ``powercap_root`` and ``nvml`` (a stand-in for the ``pynvml`` module) are for tests.
    """
    kind, index = _parse_device(device, gpu_index)
    if kind in ("auto", "cuda"):
        try:
            return NvmlEnergyMeter(index, gpu_uuid=gpu_uuid, nvml=nvml, clock=clock)
        except EnergyMeterUnavailable as exc:
            logger.info("NVML energy meter unavailable: %s", exc)
    if kind in ("auto", "cpu"):
        try:
            return RaplEnergyMeter(powercap_root, clock=clock)
        except EnergyMeterUnavailable as exc:
            logger.info("RAPL energy meter unavailable: %s", exc)
    if assumed_watts is None and kind == "cuda":
        assumed_watts = DEFAULT_GPU_WATTS
    return EstimatedEnergyMeter(assumed_watts, clock=clock)


def _parse_device(device: str, gpu_index: int) -> tuple[_DeviceKind, int]:
    kind = _DEVICE_KINDS.get(device)
    if kind is not None:
        return kind, gpu_index
    prefix, sep, suffix = device.partition(":")
    if prefix == "cuda" and sep and suffix.isdigit():
        return "cuda", int(suffix)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def apportion(total_j: float, weights: Sequence[float]) -> list[float]:
    """Split ``total_j`` joules in proportion to ``weights`` (items, seconds, pixels...).

    The shares sum to ``total_j``. All-zero weights split it evenly. Raises ValueError for a
    negative or non-finite total or weight, or for no weights.
    """
    if not (math.isfinite(total_j) and total_j >= 0):
        raise ValueError(f"total_j must be a finite, non-negative number of joules: {total_j}")
    if not weights:
        raise ValueError("apportion needs at least one weight")
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"weights must be finite and non-negative: {list(weights)}")
    weight_sum = math.fsum(weights)
    if weight_sum == 0:
        weights = [1.0] * len(weights)
        weight_sum = float(len(weights))
    shares = [total_j * w / weight_sum for w in weights]
    # Rounding leaves a residue of a few ulps; give it to the largest share so sums match.
    largest = max(range(len(shares)), key=shares.__getitem__)
    shares[largest] = max(0.0, shares[largest] + total_j - math.fsum(shares))
    return shares
