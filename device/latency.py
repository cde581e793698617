"""On-device latency (`make pi-latency`): `experiments.bench` with the Raspberry Pi 5 profile.

    python -m device.latency [any experiments.bench flag]

Defaults: `--hardware cpu_pi` (4 threads, fp32), `--measure time`, ViT-B/32 at batch 128, vanilla and
WASI at each ε, results under results/pi_latency/<tag or timestamp>/. Later flags override these.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import bench

DEFAULTS = ["--hardware", "cpu_pi", "--measure", "time", "--out-root", "results/pi_latency"]


def main(argv: Sequence[str] | None = None) -> Path:
    return bench.main([*DEFAULTS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    bench.cli([*DEFAULTS, *sys.argv[1:]])  # one line and exit status 2 for a wrong flag, as the tool itself
