"""experiments.measurement.energy on fake sensors: a RAPL powercap tree and Jetson INA3221 hwmon rails under
tmp_path, a fake NVML; and `experiments.bench --measure energy` reading a meter around the timed calls."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import zeus.device.cpu as zeus_cpu
import zeus.device.cpu.rapl as zeus_rapl
import zeus.device.gpu as zeus_gpu
import zeus.device.gpu.nvidia as zeus_nvidia
import zeus.device.soc as zeus_soc
import zeus.device.soc.jetson as zeus_jetson

from experiments import bench
from experiments.measurement import energy


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.fixture
def no_sensors(monkeypatch):
    """Zeus's device singletons cleared, and none of NVML, RAPL or an SoC present unless a test adds one."""
    for module, name in ((zeus_gpu, "_gpus"), (zeus_cpu, "_cpus"), (zeus_soc, "_soc")):
        monkeypatch.setattr(module, name, None)
    monkeypatch.setattr(zeus_rapl, "RAPL_DIR", "/nonexistent/intel-rapl")
    monkeypatch.setattr(zeus_rapl, "CONTAINER_RAPL_DIR", "/nonexistent/zeus_sys/intel-rapl")
    zeus_rapl.rapl_is_available.cache_clear()
    monkeypatch.setattr(zeus_gpu, "nvml_is_available", lambda: False)
    monkeypatch.setattr(zeus_gpu, "amdsmi_is_available", lambda: False)
    monkeypatch.setattr(zeus_soc, "jetson_is_available", lambda: False)
    monkeypatch.setattr(zeus_soc, "apple_silicon_is_available", lambda: False)
    yield
    zeus_rapl.rapl_is_available.cache_clear()


def test_no_sensor_is_one_line_naming_what_was_looked_for(no_sensors):
    with pytest.raises(energy.NoEnergySensor) as info:
        energy.open_meter(torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert message == ("no energy sensor is readable on this machine: no GPU in use (device cpu); no RAPL counters "
                       "at /nonexistent/intel-rapl; not a Jetson (no INA3221 rails)")
    with pytest.raises(energy.NoEnergySensor, match="no NVIDIA GPU through NVML"):
        energy.open_meter(torch.device("cuda", 0))


def rapl_zone(path: Path, name: str, energy_uj: int) -> Path:
    write(path / "name", name)
    write(path / "energy_uj", str(energy_uj))
    write(path / "max_energy_range_uj", str(262143328850))
    return path / "energy_uj"


def test_rapl_package_and_dram_counters_in_joules(no_sensors, monkeypatch, tmp_path):
    root = tmp_path / "sys" / "class" / "powercap" / "intel-rapl"
    package = rapl_zone(root / "intel-rapl:0", "package-0", 1_000_000)
    dram = rapl_zone(root / "intel-rapl:0" / "intel-rapl:0:0", "dram", 500_000)
    rapl_zone(root / "intel-rapl:0" / "intel-rapl:0:1", "core", 7)  # a subzone that is not DRAM: not a domain
    monkeypatch.setattr(zeus_rapl, "RAPL_DIR", str(root))
    zeus_rapl.rapl_is_available.cache_clear()

    meter = energy.open_meter(torch.device("cpu"))
    assert meter.domains == ["cpu0", "dram0"] and "RAPL" in meter.description
    start = meter.read()
    package.write_text("3500000\n")  # +2.5 J on the package, +0.25 J on DRAM (the files count microjoules)
    dram.write_text("750000\n")
    end = meter.read()
    assert end["cpu0"] - start["cpu0"] == pytest.approx(2.5) and end["dram0"] - start["dram0"] == pytest.approx(0.25)


class FakeNVML:
    """The pynvml calls Zeus makes for one Hopper GPU whose total-energy counter (mJ) advances 1500 per read."""

    def __init__(self) -> None:
        self.counter = itertools.count(10_000, 1500)

    def install(self, monkeypatch) -> None:
        pynvml = zeus_nvidia.pynvml

        def unsupported(handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

        for name, fn in {"nvmlInit": lambda: None, "nvmlDeviceGetCount": lambda: 1,
                         "nvmlDeviceGetHandleByIndex": lambda i: f"handle{i}", "nvmlDeviceGetC2cModeInfoV": unsupported,
                         "nvmlDeviceGetName": lambda h: "Fake H200",
                         "nvmlDeviceGetArchitecture": lambda h: pynvml.NVML_DEVICE_ARCH_HOPPER,
                         "nvmlDeviceGetTotalEnergyConsumption": lambda h: next(self.counter)}.items():
            monkeypatch.setattr(pynvml, name, fn)
        monkeypatch.setattr(zeus_gpu, "nvml_is_available", lambda: True)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv("ZEUSD_SOCK_PATH", raising=False)


def test_nvml_counter_of_the_gpu_in_use(no_sensors, monkeypatch):
    FakeNVML().install(monkeypatch)
    meter = energy.open_meter(torch.device("cuda", 0))
    assert meter.domains == ["gpu0"] and "Fake H200" in meter.description
    a, b = meter.read(), meter.read()
    assert b["gpu0"] - a["gpu0"] == pytest.approx(1.5)  # 1500 mJ per read
    with pytest.raises(energy.NoEnergySensor, match="GPU 3: NVML sees 1 GPU"):
        energy.gpu_source(3)
    with pytest.raises(energy.NoEnergySensor, match="no GPU in use"):  # a CPU run does not read the GPU
        energy.open_meter(torch.device("cpu"))


def test_jetson_ina3221_rails_as_the_authors_read_them(no_sensors, monkeypatch, tmp_path):
    """An Orin Nano's hwmon node: in<i>_label, in<i>_input (mV), curr<i>_input (mA). Zeus's poller integrates
    VDD_IN (10 W) as soc_total and VDD_CPU_GPU_CV (3 W, the authors' rail) as soc_cpu; VDD_SOC is not used."""
    hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for i, (label, mv, ma) in enumerate([("VDD_IN", 5000, 2000), ("VDD_CPU_GPU_CV", 5000, 600),
                                         ("VDD_SOC", 5000, 400)], start=1):
        write(hwmon / f"in{i}_label", label)
        write(hwmon / f"in{i}_input", str(mv))
        write(hwmon / f"curr{i}_input", str(ma))
    real_path = zeus_jetson.Path
    monkeypatch.setattr(zeus_jetson, "Path", lambda p: real_path(str(tmp_path) + str(p)) if str(p).startswith("/sys")
                        else real_path(p))  # Zeus reads /sys/bus/i2c/drivers/...: here, the tree under tmp_path
    monkeypatch.setattr(zeus_soc, "jetson_is_available", lambda: True)
    monkeypatch.setattr(zeus_jetson, "jetson_is_available", lambda: True)

    meter = energy.open_meter(torch.device("cpu"))
    assert sorted(meter.domains) == ["soc_cpu", "soc_total"] and "Jetson" in meter.description
    start, t0 = meter.read(), time.monotonic()
    time.sleep(1.0)
    end, elapsed = meter.read(), time.monotonic() - t0
    total, cpu = end["soc_total"] - start["soc_total"], end["soc_cpu"] - start["soc_cpu"]
    # Both rails are integrated over the same polls, but Zeus's poller queues its running measurement while it goes
    # on adding to it, so a read may hold one rail a poll ahead of the other (0.1 s, 0.3 J of the 3 W rail; longer
    # on a busy machine). VDD_SOC (2 W) read as soc_cpu would be 0.1 * total >= 0.9 J off.
    assert abs(cpu - 0.3 * total) <= 0.5
    assert 0 < total <= 10 * (elapsed + 0.5)  # 10 W; Zeus's counter lags by up to one 0.1 s poll


class CountingSource:
    """A domain whose counter advances 1 J per read: every window between two reads is 1 J."""

    def __init__(self) -> None:
        self.joules = 0.0

    def read(self) -> dict[str, float]:
        self.joules += 1.0
        return {"fake0": self.joules}


def test_bench_reads_energy_around_the_timed_calls(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "open_meter", lambda device: energy.EnergyMeter(
        [energy.Source("a fake counter", CountingSource().read)]))
    out = bench.main(["--model", "vit_tiny_cpu", "--batch", "2", "--set", "model.kwargs.depth=1", "hardware.threads=1",
                      "--methods", "vanilla", "lora", "--measure", "energy", "--warmup", "1", "--reps", "3",
                      "--out", str(tmp_path / "b")])
    raw = pd.read_csv(out / "timing_raw.csv")
    steps = raw[raw.phase.isin(["train_step", "inference"])]
    assert len(steps) == 2 * 3 * 2 and (steps["joules/fake0"] == 1.0).all()  # one window per timed call
    assert raw[raw.phase.isin(["forward", "backward", "optimizer"])]["joules/fake0"].isna().all()
    stats = pd.read_csv(out / "energy.csv")
    phases = ("train_step", "inference")
    assert set(zip(stats.label, stats.phase)) == {(m, p) for m in ("vanilla", "lora") for p in phases}
    assert (stats.mean_j == 1.0).all() and (stats.n == 3).all() and (stats.ratio == 1.0).all()
    table = pd.read_csv(out / "variants.csv").set_index("label")
    assert table.loc["lora", "energy/fake0/train_step_j"] == 1.0 and "time/train_step_s" in table
    summary = (out / "summary.md").read_text()
    assert "Energy: a fake counter; joules are means over the 3 timed rounds." in summary and "step J fake0" in summary


def test_bench_without_a_sensor_says_so_and_measures_the_rest(no_sensors, tmp_path, caplog):
    out = bench.main(["--model", "vit_tiny_cpu", "--batch", "2", "--set", "model.kwargs.depth=1", "hardware.threads=1",
                      "--methods", "vanilla", "--measure", "cost", "energy", "--out", str(tmp_path / "b")])
    summary = (out / "summary.md").read_text()
    assert "Energy: not measured (no energy sensor is readable on this machine: no GPU in use" in summary
    assert [r.message for r in caplog.records if r.message.startswith("energy:")] == [
        "energy: no energy sensor is readable on this machine: no GPU in use (device cpu); no RAPL counters at "
        "/nonexistent/intel-rapl; not a Jetson (no INA3221 rails); energy is not measured, the other measures "
        "still run"]
    table = pd.read_csv(out / "variants.csv")
    assert table["memory/peak_bytes"].iloc[0] > 0 and not (out / "energy.csv").exists()
