"""Energy counters of the machine a benchmark runs on, read around the timed calls (`experiments.bench
--measure energy`).

`open_meter(device)` returns an `EnergyMeter` over every energy domain the machine exposes, each a cumulative
counter in joules, read through Zeus (`zeus.device`):
- the NVIDIA GPU the benchmark runs on: NVML's total-energy counter (Volta and newer): domain "gpu<i>";
- x86 CPUs: Linux RAPL (powercap `intel-rapl:<i>` package zones and their `dram` subzone): "cpu<i>", "dram<i>";
- an NVIDIA Jetson: its INA3221 rails (hwmon `in<i>_label` with `in<i>_input` × `curr<i>_input`, the files the
  paper's authors read), power sampled and integrated by Zeus's poller: "soc_cpu" (the rail whose label names
  the CPU: VDD_CPU_GPU_CV on an Orin Nano/NX, the one the authors report), "soc_gpu", "soc_total" (VDD_IN).
The counters advance at their own pace (RAPL about every millisecond, NVML every few to tens of milliseconds,
Zeus's Jetson poller every 0.1 s), so one short window reads 0 or a whole jump: report means over many windows.
A machine with none of them (a VM, a Raspberry Pi 5) raises NoEnergySensor, whose message says so in one line.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

log = logging.getLogger(__name__)

__all__ = ["EnergyMeter", "NoEnergySensor", "Source", "open_meter", "gpu_source", "rapl_source", "soc_source"]


class NoEnergySensor(RuntimeError):
    """No energy counter is readable on this machine; the message (one line) says what was looked for."""


@dataclass(frozen=True)
class Source:
    """One sensor: what it is (`description`) and `read()`, cumulative joules per domain name."""

    description: str
    read: Callable[[], dict[str, float]]


class EnergyMeter:
    """Every readable Source of a machine, read together: `read()` -> {domain: cumulative joules}."""

    def __init__(self, sources: list[Source]) -> None:
        if not sources:
            raise ValueError("an EnergyMeter needs at least one Source")
        self.sources = sources
        self.domains = list(self.read())

    @property
    def description(self) -> str:
        return "; ".join(s.description for s in self.sources)

    def read(self) -> dict[str, float]:
        return {domain: joules for s in self.sources for domain, joules in s.read().items()}


def gpu_source(index: int) -> Source:
    """The total-energy counter of CUDA device `index` (NVML, through zeus.device.get_gpus; mJ -> J)."""
    from zeus.device import get_gpus

    gpus = get_gpus()
    if index >= len(gpus):
        raise NoEnergySensor(f"GPU {index}: NVML sees {len(gpus)} GPU(s)")
    if not gpus.supports_get_total_energy_consumption(index):
        raise NoEnergySensor(f"GPU {index} has no total-energy counter (NVML has one from Volta on)")
    name = gpus.gpus[index].get_name() if hasattr(gpus, "gpus") else f"GPU {index}"
    return Source(f"NVML total energy of GPU {index} ({name})",
                  lambda: {f"gpu{index}": gpus.get_total_energy_consumption(index) / 1000.0})


def rapl_source() -> Source:
    """Every RAPL package zone and its DRAM subzone (zeus.device.get_cpus; mJ -> J)."""
    from zeus.device import get_cpus

    cpus = get_cpus()
    n = len(cpus)

    def read() -> dict[str, float]:
        out = {}
        for i in range(n):
            m = cpus.get_total_energy_consumption(i)
            out[f"cpu{i}"] = m.cpu_mj / 1000.0
            if m.dram_mj is not None:
                out[f"dram{i}"] = m.dram_mj / 1000.0
        return out

    return Source(f"RAPL (powercap) energy of {n} CPU package(s)", read)


def soc_source() -> Source:
    """An SoC's energy domains (a Jetson's INA3221 rails, integrated by Zeus's poller; zeus.device.get_soc): one
    domain "soc_<field>" per measured field of its measurement (cpu_energy_mj -> soc_cpu); mJ -> J."""
    from zeus.device import get_soc

    soc = get_soc()

    def read() -> dict[str, float]:
        m = soc.get_total_energy_consumption()
        return {f"soc_{f.name.removesuffix('_mj').removesuffix('_energy')}": getattr(m, f.name) / 1000.0
                for f in fields(m) if getattr(m, f.name) is not None}

    return Source(f"{type(soc).__name__} power rails (Zeus)", read)


def open_meter(device: torch.device) -> EnergyMeter:
    """An EnergyMeter over every source readable here: the GPU of `device` when it is a CUDA device, RAPL, an SoC.
    NoEnergySensor (one line, naming what was looked for) when there is none."""
    from zeus.device.cpu.common import ZeusCPUInitError, ZeusCPUNoPermissionError
    from zeus.device.cpu.rapl import RAPL_DIR
    from zeus.device.gpu.common import ZeusGPUInitError
    from zeus.device.soc.common import ZeusSoCInitError
    from zeus.exception import ZeusBaseError

    absent = {ZeusGPUInitError: "no NVIDIA GPU through NVML", ZeusCPUInitError: f"no RAPL counters at {RAPL_DIR}",
              ZeusCPUNoPermissionError: "RAPL counters not readable (energy_uj needs root)",
              ZeusSoCInitError: "not a Jetson (no INA3221 rails)"}
    tries: list[Callable[[], Source]] = [rapl_source, soc_source]
    missing = [] if device.type == "cuda" else [f"no GPU in use (device {device.type})"]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        tries.insert(0, lambda: gpu_source(index))
    sources = []
    for make in tries:
        try:
            sources.append(make())
        except (ZeusBaseError, NoEnergySensor, OSError) as err:
            why = next((text for cls, text in absent.items() if isinstance(err, cls)), None)
            missing.append(why or (str(err).splitlines()[0] if str(err) else type(err).__name__))
    if not sources:
        raise NoEnergySensor(f"no energy sensor is readable on this machine: {'; '.join(missing)}")
    meter = EnergyMeter(sources)
    log.info("energy: %s (domains %s)", meter.description, ", ".join(meter.domains))
    return meter
