"""What a measured number depends on besides the code: library versions and the machine."""
from __future__ import annotations

import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("torch", "torchvision", "timm", "hydra-core", "wandb", "fvcore", "peft", "numpy", "safetensors")


def environment(device: torch.device | None = None) -> dict[str, dict[str, Any]]:
    """{"versions": Python's and each of LIBRARIES', "machine": architecture, CPU model, logical CPUs, torch
    threads, and the device (with the GPU's name on CUDA)}."""
    versions = {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}}
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith(("model name", "Model"))),
               platform.processor())
    machine: dict[str, Any] = {"architecture": platform.machine(), "cpu": cpu, "logical_cpus": os.cpu_count(),
                               "torch_threads": torch.get_num_threads()}
    if device is not None:
        machine["device"] = str(device)
        if device.type == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(device)
    return {"versions": versions, "machine": machine}
