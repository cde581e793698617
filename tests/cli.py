"""Runs train.py as a user would (a subprocess, offline) and reads what a multirun wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(*overrides: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python train.py *overrides` in the repo root (extra environment variables: env); asserts success
    unless check=False."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def sweep_results(sweep_dir: Path) -> list[dict]:
    """results.json of every job of a multirun, in job order."""
    files = sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name))
    return [json.loads(f.read_text()) for f in files]
