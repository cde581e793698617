"""Export for inference: a real tiny run exported and reloaded reproduces the run's test accuracy and
the trained model's logits; every method exports; broken or foreign artefacts raise clear errors."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from experiments.builders.models import build_model
from experiments.deployment.exported import ExportFormatError, load_exported
from experiments.export import RunExportError, export_run
from experiments.export import main as export_main
from tests.helpers import METHODS, ROOT
from wasi import WSILinear


@pytest.fixture(scope="module")
def wasi_run(method_sweep: Path) -> Path:
    """The WASI job of the session's six-method sweep: a real run of train.py, as a user would produce it."""
    return method_sweep / str(METHODS.index("wasi"))


@pytest.fixture(scope="module")
def wasi_export(wasi_run: Path) -> Path:
    """The run exported through the command line entry point, to its default folder."""
    export_main([str(wasi_run)])
    return wasi_run / "export"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, max_batches: int | None) -> float:
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        correct += (model(x).argmax(-1) == y).sum().item()
        total += y.numel()
    return correct / total


def test_exported_model_reproduces_the_run(wasi_run: Path, wasi_export: Path):
    cfg = OmegaConf.load(wasi_run / ".hydra" / "config.yaml")
    results = json.loads((wasi_run / "results.json").read_text())
    exported = load_exported(wasi_export)

    # The original: replay the run's build (same seed order as the training loop), load its best weights.
    seed_all(cfg.seed)
    data = hydra.utils.instantiate(cfg.dataset)(image_size=cfg.model.image_size, seed=cfg.seed)
    original = build_model(cfg.model, data.num_classes)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(data.train, cfg.trainer.batch_size, shuffle=True, generator=shuffle)
    # Activation ranks only shape the backward pass, so fixed ones spare the calibration HOSVD here.
    method = hydra.utils.instantiate(cfg.method, epsilon_act=None, ranks=[2, 2, 2])
    method.apply(original, train, torch.device("cpu"))
    original.load_state_dict(load_file(str(wasi_run / "best.safetensors")), strict=True)
    original.eval()

    test = DataLoader(data.test, cfg.trainer.batch_size)
    assert accuracy(exported, test, cfg.trainer.eval_batches) == results["test/acc"]
    x, _ = next(iter(test))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), original(x), rtol=1e-6, atol=1e-6)

    # Structure: one low-rank WSILinear per converted layer, with the run's ranks K and no dense weight.
    ranks = {layer["name"]: layer["weight_rank"] for layer in results["method/layers"]}
    low_rank = {n: m.rank for n, m in exported.named_modules() if isinstance(m, WSILinear)}
    assert low_rank == ranks and len(ranks) == 4
    assert not any(k.endswith("mlp.fc1.weight") or k.endswith("mlp.fc2.weight") for k in exported.state_dict())
    spec = json.loads((wasi_export / "model.json").read_text())
    assert spec["num_classes"] == 10 and spec["image_size"] == 32 and spec["timm_kwargs"]["depth"] == 2


def test_loader_imports_no_training_code(wasi_export: Path):
    # timm itself imports wandb when it is installed (timm.utils.summary), so wandb counts only
    # among the modules that appear after torch, timm and safetensors are imported.
    probe = textwrap.dedent(f"""
        import json, sys, torch, timm, safetensors.torch
        before = set(sys.modules)
        from experiments.deployment.exported import load_exported
        load_exported({str(wasi_export)!r})(torch.zeros(1, 3, 32, 32))
        bad = {{"hydra", "omegaconf", "peft", "experiments.run", "experiments.builders.methods",
               "experiments.builders.models", "experiments.data.datasets", "experiments.export",
               "experiments.training.logger"}}
        found = [n for n in sys.modules if n in bad or n.split(".")[0] in bad]
        found += [n for n in set(sys.modules) - before if n.split(".")[0] == "wandb"]
        json.dump(sorted(found), sys.stdout)
    """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def fake_run(cfg: DictConfig, run_dir: Path) -> tuple[nn.Module, torch.Tensor]:
    """Apply cfg's method to a tiny model, take one optimizer step, save it as train.py does;
    returns the live trained model (eval mode) and a probe batch."""
    seed_all(0)
    model = build_model(cfg.model, int(cfg.dataset.num_classes))
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    method = hydra.utils.instantiate(cfg.method)
    method.apply(model, [(x, y)], torch.device("cpu"))
    optimizer = method.build_optimizer(model, hydra.utils.instantiate(cfg.optimizer, lr=0.5))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "best.safetensors"))
    return model.eval(), x


@pytest.mark.parametrize("overrides, n_low_rank", [
    (["method=vanilla"], 0),
    (["method=asi", "method.ranks=[4,4,4]", "method.epsilon_act=null"], 0),
    (["method=wsi"], 4),
    (["method=wasi", "method.weight_update=reference", "method.ranks=[4,4,4]", "method.epsilon_act=null"], 4),
    (["method=lora", "method.targets=mlp+attn"], 0),
    (["method=svd_llm"], 4),
    (["method=svd_llm", "method.finetune=factors", "method.last_n=1"], 2),  # the last block's two MLP linears
    (["method=velora"], 0),
    (["method=lora_fa", "optimizer=adamw"], 0),
    (["method=galore", "optimizer=adamw"], 0),
])
def test_every_method_exports_its_deployed_model(make_cfg, tmp_path: Path, overrides: list[str], n_low_rank: int):
    cfg = make_cfg("model.kwargs.depth=2", *overrides)
    run_dir = Path(cfg.paths.run_dir)
    model, x = fake_run(cfg, run_dir)
    lora_b = [v for k, v in load_file(str(run_dir / "best.safetensors")).items() if ".lora_B." in k]
    assert all(b.abs().sum() > 0 for b in lora_b)  # the adapters moved, so merging them matters
    exported = load_exported(export_run(run_dir, tmp_path / "export"))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    low_rank = [m for m in exported.modules() if isinstance(m, WSILinear)]
    assert len(low_rank) == n_low_rank
    dense = sum(p.numel() for p in build_model(cfg.model, 10).parameters())
    size = sum(p.numel() for p in exported.parameters())
    assert (size < dense) if n_low_rank else (size == dense)  # LoRA merged: no adapter tensors left


def test_broken_artefacts_raise_clear_errors(wasi_export: Path, wasi_run: Path, tmp_path: Path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(wasi_export, tmp_path / name))

    with pytest.raises(FileNotFoundError, match="not an export folder"):
        load_exported(tmp_path / "nowhere")
    bad = copy("json")
    (bad / "model.json").write_text("{not json")
    with pytest.raises(ExportFormatError, match="not valid JSON"):
        load_exported(bad)
    bad = copy("foreign_json")
    (bad / "model.json").write_text(json.dumps({"architectures": ["ViTModel"]}))
    with pytest.raises(ExportFormatError, match="not a WASI export"):
        load_exported(bad)
    bad = copy("truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportFormatError, match="corrupted"):
        load_exported(bad)
    bad = copy("foreign_weights")
    save_file(load_file(str(bad / "model.safetensors")), str(bad / "model.safetensors"))  # no export tag
    with pytest.raises(ExportFormatError, match="not a WASI export"):
        load_exported(bad)
    bad = copy("rank")
    spec = json.loads((bad / "model.json").read_text())
    spec["layers"][0]["rank"] += 1
    (bad / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ExportFormatError, match="other shapes"):
        load_exported(bad)
    with pytest.raises(RunExportError, match="not a run folder"):
        export_run(wasi_export)
    bad_run = Path(shutil.copytree(wasi_run / ".hydra", tmp_path / "run" / ".hydra")).parent
    save_file({"head.weight": torch.zeros(3, 3)}, str(bad_run / "best.safetensors"))
    with pytest.raises(RunExportError, match="does not fit"):
        export_run(bad_run)
