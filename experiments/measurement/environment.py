"""What a measured number depends on besides the code: library versions and the machine."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("torch", "torchvision", "timm", "hydra-core", "wandb", "fvcore", "peft", "numpy", "safetensors")


def revision() -> dict[str, Any]:
    """{"commit": the repository's HEAD, "dirty": whether tracked files other than results/ and Markdown (what
    measurements write) differ from it}; None values outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results",
                               ":(exclude)*.md"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(diff.stdout.strip())}


def environment(device: torch.device | None = None) -> dict[str, dict[str, Any]]:
    """{"code": `revision()`, "versions": Python's and each of LIBRARIES', "machine": architecture, CPU model,
    its family and model numbers (x86: "family 26 model 2"; a model name such as "AMD EPYC" can stand for several
    generations), the vector instructions torch's CPU kernels use, logical CPUs, torch threads, OMP_WAIT_POLICY
    (None: OpenMP's default) and the device (with the GPU's name on CUDA)}."""
    versions = {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}}
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []

    def field(*names: str) -> str | None:
        return next((line.split(":", 1)[1].strip() for line in info if line.split(":", 1)[0].strip() in names), None)

    cpu = field("model name", "Model") or platform.processor()
    family, model = field("cpu family"), field("model")
    machine: dict[str, Any] = {"architecture": platform.machine(), "cpu": cpu,
                               "cpu_id": None if family is None else f"family {family} model {model}",
                               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if device is not None:
        machine["device"] = str(device)
        if device.type == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(device)
    return {"code": revision(), "versions": versions, "machine": machine}
