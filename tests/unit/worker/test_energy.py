"""Energy meters: RAPL against a fake sysfs tree, NVML against a stand-in pynvml (no GPU on
the development machines), the estimate with a fake clock, selection, and apportioning.

Clocks are injected, so nothing here sleeps or asserts on wall-clock time.
"""

from __future__ import annotations

import math
import random
import sys
import threading
from pathlib import Path

import pytest

from worker.energy import (
    DEFAULT_CPU_WATTS_PER_CORE,
    DEFAULT_GPU_WATTS,
    DEFAULT_POWERCAP_ROOT,
    EnergyMeasurement,
    EnergyMeter,
    EnergyMeterError,
    EnergyMeterUnavailable,
    EstimatedEnergyMeter,
    NvmlEnergyMeter,
    RaplEnergyMeter,
    apportion,
    default_cpu_watts,
    select_energy_meter,
)

SAMPLER_WAIT_S = 10.0  # a bound on waiting for the sampler thread, not a timing assertion


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, now_s: float = 1_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- RAPL ----------------------------------------------------------------------------------

MAX_RANGE_UJ = 262_143_328_850  # a real package's max_energy_range_uj


def write_zone(
    root: Path, zone: str, name: str, energy_uj: int, max_range_uj: int | None = MAX_RANGE_UJ
) -> Path:
    zone_dir = root / zone
    zone_dir.mkdir(parents=True, exist_ok=True)
    (zone_dir / "name").write_text(f"{name}\n")
    (zone_dir / "energy_uj").write_text(f"{energy_uj}\n")
    if max_range_uj is not None:
        (zone_dir / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return zone_dir


def set_energy(root: Path, zone: str, energy_uj: int) -> None:
    (root / zone / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two sockets with core/uncore/dram subzones, a psys zone and the MMIO mirror."""
    root = tmp_path / "powercap"
    write_zone(root, "intel-rapl:0", "package-0", 1_000_000)
    write_zone(root, "intel-rapl:0:0", "core", 500_000)
    write_zone(root, "intel-rapl:0:1", "dram", 200_000)
    write_zone(root, "intel-rapl:1", "package-1", 2_000_000)
    write_zone(root, "intel-rapl:1:0", "core", 700_000)
    write_zone(root, "intel-rapl:2", "psys", 9_000_000)
    write_zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000)
    (root / "intel-rapl").mkdir()  # the control-type directory, no counters
    return root


def test_rapl_sums_package_zones_only(powercap: Path) -> None:
    meter = RaplEnergyMeter(powercap)

    assert meter.zones == ("package-0", "package-1")
    assert meter.source == "rapl"


def test_rapl_measures_joules_over_the_interval(powercap: Path, clock: FakeClock) -> None:
    meter = RaplEnergyMeter(powercap, clock=clock)
    reading = meter.start()
    set_energy(powercap, "intel-rapl:0", 1_000_000 + 30_000_000)  # +30 J
    set_energy(powercap, "intel-rapl:1", 2_000_000 + 12_500_000)  # +12.5 J
    for subzone in ("intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:1:0", "intel-rapl:2"):
        set_energy(powercap, subzone, 999_000_000)  # must not count
    set_energy(powercap, "intel-rapl-mmio:0", 999_000_000)
    clock.advance(2.0)

    measurement = meter.stop(reading)

    assert measurement == EnergyMeasurement(energy_j=42.5, duration_s=2.0, source="rapl")
    assert measurement.mean_power_w == pytest.approx(21.25)


def test_rapl_counter_wraparound(powercap: Path, clock: FakeClock) -> None:
    set_energy(powercap, "intel-rapl:0", MAX_RANGE_UJ - 4_000_000)  # 4 J before the wrap
    meter = RaplEnergyMeter(powercap, clock=clock)
    reading = meter.start()
    set_energy(powercap, "intel-rapl:0", 6_000_000)  # wrapped, then 6 J more
    clock.advance(1.0)

    assert meter.stop(reading).energy_j == pytest.approx(10.0)


def test_rapl_wrap_with_unknown_range_counts_from_zero(tmp_path: Path) -> None:
    write_zone(tmp_path, "intel-rapl:0", "package-0", 50_000_000, max_range_uj=None)
    meter = RaplEnergyMeter(tmp_path)
    reading = meter.start()
    set_energy(tmp_path, "intel-rapl:0", 3_000_000)

    assert meter.stop(reading).energy_j == pytest.approx(3.0)  # a lower bound


def test_rapl_overlapping_intervals(powercap: Path, clock: FakeClock) -> None:
    meter = RaplEnergyMeter(powercap, clock=clock)
    first = meter.start()
    set_energy(powercap, "intel-rapl:0", 1_000_000 + 10_000_000)
    clock.advance(1.0)
    second = meter.start()
    set_energy(powercap, "intel-rapl:0", MAX_RANGE_UJ)  # up to the top
    set_energy(powercap, "intel-rapl:0", 5_000_000)  # and over: wrapped
    clock.advance(1.0)

    outer, inner = meter.stop(first), meter.stop(second)

    inner_j = (MAX_RANGE_UJ - 11_000_000 + 5_000_000) / 1e6
    assert inner.energy_j == pytest.approx(inner_j)
    assert outer.energy_j == pytest.approx(10.0 + inner_j)
    assert (outer.duration_s, inner.duration_s) == (2.0, 1.0)


def test_rapl_zone_without_name_file_counts(tmp_path: Path) -> None:
    (write_zone(tmp_path, "intel-rapl:0", "ignored", 1) / "name").unlink()

    assert RaplEnergyMeter(tmp_path).zones == ("intel-rapl:0",)


def test_rapl_unavailable_without_readable_package(tmp_path: Path) -> None:
    with pytest.raises(EnergyMeterUnavailable):
        RaplEnergyMeter(tmp_path / "absent")
    write_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("")  # unreadable counter
    write_zone(tmp_path, "intel-rapl:0:0", "core", 5)  # readable, but only a subzone
    with pytest.raises(EnergyMeterUnavailable):
        RaplEnergyMeter(tmp_path)


def test_rapl_read_failure_mid_block_keeps_the_block_result(
    powercap: Path, clock: FakeClock
) -> None:
    meter = RaplEnergyMeter(powercap, clock=clock)

    with meter.measure() as pending:
        (powercap / "intel-rapl:1" / "energy_uj").unlink()
        job_output = "done"

    assert job_output == "done"
    assert pending.result is None
    assert isinstance(pending.error, EnergyMeterError)
    with pytest.raises(EnergyMeterError):
        meter.stop(meter.start())


# --- estimate ------------------------------------------------------------------------------


def test_estimate_is_duration_times_watts(clock: FakeClock) -> None:
    meter = EstimatedEnergyMeter(40.0, clock=clock)
    reading = meter.start()
    clock.advance(2.5)

    assert meter.stop(reading) == EnergyMeasurement(
        energy_j=100.0, duration_s=2.5, source="estimate"
    )


def test_estimate_default_watts_scale_with_cores() -> None:
    assert default_cpu_watts(8) == 8 * DEFAULT_CPU_WATTS_PER_CORE
    assert default_cpu_watts(0) == DEFAULT_CPU_WATTS_PER_CORE
    assert EstimatedEnergyMeter().assumed_watts == default_cpu_watts()
    assert default_cpu_watts() >= DEFAULT_CPU_WATTS_PER_CORE


@pytest.mark.parametrize("watts", [0.0, -5.0, math.nan, math.inf])
def test_estimate_rejects_nonsense_watts(watts: float) -> None:
    with pytest.raises(ValueError, match="assumed_watts"):
        EstimatedEnergyMeter(watts)


def test_measure_sets_result_on_exit(clock: FakeClock) -> None:
    meter = EstimatedEnergyMeter(10.0, clock=clock)

    with meter.measure() as pending:
        clock.advance(3.0)
        assert pending.result is None

    assert pending.result == EnergyMeasurement(energy_j=30.0, duration_s=3.0, source="estimate")
    assert pending.error is None


def test_measure_sets_result_when_the_block_raises(clock: FakeClock) -> None:
    meter = EstimatedEnergyMeter(10.0, clock=clock)

    with pytest.raises(RuntimeError, match="job failed"), meter.measure() as pending:
        clock.advance(1.5)
        raise RuntimeError("job failed")

    assert pending.result is not None and pending.result.energy_j == 15.0


# --- NVML ----------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The pynvml calls the meter makes, on GPUs whose counters tests set by hand.

    ``energy_mj`` is None for a GPU without the total-energy counter (pre-Volta);
    ``power_mw`` None for one that reports no power either.
    """

    def __init__(self, gpu_count: int = 1) -> None:
        self.gpu_count = gpu_count
        self.energy_mj: int | None = 5_000_000
        self.power_mw: int | None = 100_000
        self.init_error: Exception | None = None
        self.inits = self.shutdowns = 0
        self.power_reads = 0
        self.power_reads_seen = threading.Event()
        self.power_reads_wanted = 0
        self.handles_by_uuid = {"GPU-aaaa": "handle-uuid"}

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if not 0 <= index < self.gpu_count:
            raise FakeNVMLError("NVML_ERROR_INVALID_ARGUMENT")
        return f"handle-{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid not in self.handles_by_uuid:
            raise FakeNVMLError("NVML_ERROR_NOT_FOUND")
        return self.handles_by_uuid[uuid]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        if self.energy_mj is None:
            raise FakeNVMLError("NVML_ERROR_NOT_SUPPORTED")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        if self.power_mw is None:
            raise FakeNVMLError("NVML_ERROR_NOT_SUPPORTED")
        self.power_reads += 1
        if self.power_reads_wanted and self.power_reads >= self.power_reads_wanted:
            self.power_reads_seen.set()
        return self.power_mw


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nvml-power-sampler")]


def test_nvml_total_energy_delta(clock: FakeClock) -> None:
    nvml = FakeNvml()
    meter = NvmlEnergyMeter(0, nvml=nvml, clock=clock)
    reading = meter.start()
    nvml.energy_mj += 250_000  # type: ignore[operator]
    clock.advance(5.0)

    measurement = meter.stop(reading)
    meter.close()
    meter.close()

    assert meter.method == "total_energy"
    assert measurement == EnergyMeasurement(energy_j=250.0, duration_s=5.0, source="nvml")
    assert nvml.inits == nvml.shutdowns == 1


def test_nvml_counter_reset_reports_zero(clock: FakeClock) -> None:
    nvml = FakeNvml()
    with NvmlEnergyMeter(nvml=nvml, clock=clock) as meter:
        reading = meter.start()
        nvml.energy_mj = 10  # the driver reloaded
        assert meter.stop(reading).energy_j == 0.0


def test_nvml_power_sampling_integrates_watts_over_time(clock: FakeClock) -> None:
    nvml = FakeNvml()
    nvml.energy_mj = None
    meter = NvmlEnergyMeter(0, nvml=nvml, clock=clock, sample_interval_s=None)
    reading = meter.start()  # 100 W at t=0
    nvml.power_mw = 200_000
    clock.advance(10.0)

    measurement = meter.stop(reading)  # 200 W at t=10: trapezoid gives 1500 J
    meter.close()

    assert meter.method == "power_sampling"
    assert measurement == EnergyMeasurement(energy_j=1500.0, duration_s=10.0, source="nvml")


def test_nvml_power_sampling_overlapping_intervals(clock: FakeClock) -> None:
    nvml = FakeNvml()
    nvml.energy_mj = None
    with NvmlEnergyMeter(nvml=nvml, clock=clock, sample_interval_s=None) as meter:
        first = meter.start()
        clock.advance(2.0)
        second = meter.start()
        clock.advance(3.0)
        inner = meter.stop(second)
        clock.advance(1.0)
        outer = meter.stop(first)

    assert inner.energy_j == pytest.approx(300.0)
    assert outer.energy_j == pytest.approx(600.0)


def test_nvml_sampler_thread_runs_only_while_an_interval_is_open(clock: FakeClock) -> None:
    nvml = FakeNvml()
    nvml.energy_mj = None
    nvml.power_mw = 50_000
    nvml.power_reads_wanted = 5  # the start() read plus at least four from the sampler
    meter = NvmlEnergyMeter(nvml=nvml, clock=clock, sample_interval_s=0.001)
    assert sampler_threads() == []

    reading = meter.start()
    assert len(sampler_threads()) == 1
    assert nvml.power_reads_seen.wait(SAMPLER_WAIT_S)
    clock.advance(4.0)
    measurement = meter.stop(reading)

    # Constant power, so however the samples interleave the integral is 50 W x 4 s.
    assert measurement.energy_j == pytest.approx(200.0)
    assert sampler_threads() == []
    meter.close()


def test_nvml_sampler_threads_do_not_leak_under_concurrent_intervals(clock: FakeClock) -> None:
    nvml = FakeNvml()
    nvml.energy_mj = None
    meter = NvmlEnergyMeter(nvml=nvml, clock=clock, sample_interval_s=0.0001)

    def job() -> None:
        for _ in range(50):
            meter.stop(meter.start())

    jobs = [threading.Thread(target=job) for _ in range(8)]
    for thread in jobs:
        thread.start()
    for thread in jobs:
        thread.join(SAMPLER_WAIT_S)

    assert not any(thread.is_alive() for thread in jobs)
    assert sampler_threads() == []
    meter.close()


def test_nvml_close_stops_an_open_sampler(clock: FakeClock) -> None:
    nvml = FakeNvml()
    nvml.energy_mj = None
    meter = NvmlEnergyMeter(nvml=nvml, clock=clock, sample_interval_s=0.001)
    meter.start()

    meter.close()

    assert sampler_threads() == []
    assert nvml.shutdowns == 1


def test_nvml_falls_back_to_power_and_then_gives_up() -> None:
    nvml = FakeNvml()
    nvml.energy_mj = None
    nvml.power_mw = None

    with pytest.raises(EnergyMeterUnavailable, match="neither energy nor power"):
        NvmlEnergyMeter(nvml=nvml)
    assert nvml.inits == nvml.shutdowns == 1  # NVML's init count stays balanced


def test_nvml_unavailable_when_init_fails_or_gpu_missing() -> None:
    nvml = FakeNvml()
    nvml.init_error = FakeNVMLError("NVML_ERROR_LIBRARY_NOT_FOUND")
    with pytest.raises(EnergyMeterUnavailable, match="initialise"):
        NvmlEnergyMeter(nvml=nvml)

    nvml = FakeNvml(gpu_count=1)
    with pytest.raises(EnergyMeterUnavailable, match="index 3"):
        NvmlEnergyMeter(3, nvml=nvml)
    assert nvml.inits == nvml.shutdowns == 1


def test_nvml_by_uuid(clock: FakeClock) -> None:
    with NvmlEnergyMeter(gpu_uuid="GPU-aaaa", nvml=FakeNvml(), clock=clock) as meter:
        assert meter._handle == "handle-uuid"
    with pytest.raises(EnergyMeterUnavailable, match="GPU-zzzz"):
        NvmlEnergyMeter(gpu_uuid="GPU-zzzz", nvml=FakeNvml())


def test_nvml_read_failure_mid_block_keeps_the_block_result(clock: FakeClock) -> None:
    nvml = FakeNvml()
    with NvmlEnergyMeter(nvml=nvml, clock=clock) as meter, meter.measure() as pending:
        nvml.energy_mj = None

    assert pending.result is None
    assert isinstance(pending.error, EnergyMeterError)


def test_nvml_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)

    with pytest.raises(EnergyMeterUnavailable, match="pynvml"):
        NvmlEnergyMeter()


# --- selection -----------------------------------------------------------------------------


def nvml_gpu0_works_here() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    try:
        pynvml.nvmlDeviceGetHandleByIndex(0)
        return True
    except Exception:
        return False
    finally:
        pynvml.nvmlShutdown()


def rapl_package_readable_here() -> bool:
    for zone in DEFAULT_POWERCAP_ROOT.glob("intel-rapl:*"):
        if zone.name.count(":") != 1:
            continue
        try:
            if not (zone / "name").read_text().startswith("package"):
                continue
            int((zone / "energy_uj").read_text())
            return True
        except (OSError, ValueError):
            continue
    return False


def expected_source_here() -> str:
    if nvml_gpu0_works_here():
        return "nvml"  # and only if NVML also reports energy or power; true on NVIDIA GPUs
    return "rapl" if rapl_package_readable_here() else "estimate"


def test_selection_on_this_machine() -> None:
    meter = select_energy_meter()
    try:
        assert meter.source == expected_source_here()
        with meter.measure() as pending:
            pass
        assert pending.result is not None and pending.result.energy_j >= 0
    finally:
        meter.close()


def test_selection_prefers_nvml_then_rapl_then_estimate(powercap: Path, tmp_path: Path) -> None:
    working, broken = FakeNvml(), FakeNvml()
    broken.init_error = FakeNVMLError("NVML_ERROR_DRIVER_NOT_LOADED")
    empty = tmp_path / "empty"

    chosen = [
        select_energy_meter(powercap_root=powercap, nvml=working),
        select_energy_meter(powercap_root=powercap, nvml=broken),
        select_energy_meter(powercap_root=empty, nvml=broken),
    ]

    assert [type(meter) for meter in chosen] == [
        NvmlEnergyMeter,
        RaplEnergyMeter,
        EstimatedEnergyMeter,
    ]
    assert chosen[2].assumed_watts == default_cpu_watts()  # type: ignore[attr-defined]
    for meter in chosen:
        meter.close()


def test_selection_for_cpu_skips_nvml(powercap: Path, tmp_path: Path) -> None:
    nvml = FakeNvml()
    assert isinstance(
        select_energy_meter("cpu", nvml=nvml, powercap_root=powercap), RaplEnergyMeter
    )
    estimate = select_energy_meter("cpu", assumed_watts=65.0, nvml=nvml, powercap_root=tmp_path)
    assert isinstance(estimate, EstimatedEnergyMeter) and estimate.assumed_watts == 65.0
    assert nvml.inits == 0


def test_selection_for_cuda_never_uses_rapl(powercap: Path) -> None:
    broken = FakeNvml()
    broken.init_error = FakeNVMLError("NVML_ERROR_LIBRARY_NOT_FOUND")

    meter = select_energy_meter("cuda", nvml=broken, powercap_root=powercap)
    sized = select_energy_meter("cuda:0", assumed_watts=70.0, nvml=broken, powercap_root=powercap)

    assert isinstance(meter, EstimatedEnergyMeter) and meter.assumed_watts == DEFAULT_GPU_WATTS
    assert isinstance(sized, EstimatedEnergyMeter) and sized.assumed_watts == 70.0


def test_selection_cuda_index_picks_the_gpu(powercap: Path) -> None:
    nvml = FakeNvml(gpu_count=2)

    meter = select_energy_meter("cuda:1", nvml=nvml, powercap_root=powercap)
    missing = select_energy_meter("cuda:2", nvml=nvml, powercap_root=powercap)

    assert isinstance(meter, NvmlEnergyMeter) and meter.gpu_index == 1
    assert isinstance(missing, EstimatedEnergyMeter)
    meter.close()


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_selection_rejects_unknown_devices(device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        select_energy_meter(device)


def test_every_meter_satisfies_the_protocol(powercap: Path) -> None:
    meters: list[EnergyMeter] = [
        NvmlEnergyMeter(nvml=FakeNvml()),
        RaplEnergyMeter(powercap),
        EstimatedEnergyMeter(1.0),
    ]
    assert [meter.source for meter in meters] == ["nvml", "rapl", "estimate"]
    for meter in meters:
        meter.close()


# --- apportion -----------------------------------------------------------------------------


def test_apportion_by_weight() -> None:
    assert apportion(100.0, [1, 3]) == [25.0, 75.0]
    assert apportion(90.0, [0, 0, 0]) == [30.0, 30.0, 30.0]
    assert apportion(0.0, [2.5, 1]) == [0.0, 0.0]
    assert apportion(7.0, [0, 4]) == [0.0, 7.0]


def test_apportion_sums_to_total() -> None:
    rng = random.Random(20240611)
    for _ in range(500):
        total_j = rng.uniform(0, 1e6)
        weights = [rng.choice([0.0, 0.1, 1 / 3, rng.uniform(0, 1e3)]) for _ in range(13)]

        shares = apportion(total_j, weights)

        assert len(shares) == len(weights)
        assert all(share >= 0 for share in shares)
        assert math.fsum(shares) == pytest.approx(total_j, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    ("total_j", "weights"),
    [(-1.0, [1]), (math.nan, [1]), (1.0, []), (1.0, [1, -1]), (1.0, [math.inf])],
)
def test_apportion_rejects_bad_input(total_j: float, weights: list[float]) -> None:
    with pytest.raises(ValueError):
        apportion(total_j, weights)
