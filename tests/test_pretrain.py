"""experiments/pretrain.py and the shipped checkpoint: experiment=pretrain through the training loop takes
exactly the steps of the recipe's own loop that made the shipped file; its backbone loads into vit_tiny_cpu
with a fresh head; the card keeps its hand-written notes; model=vit_tiny_pretrained finds the file from any
directory."""
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from experiments import pretrain
from experiments.builders.models import build_model
from experiments.data.fractals import fractals
from experiments.training import checkpoint
from tests.helpers import ROOT, compose

SHIPPED = ROOT / "checkpoints" / "vit_tiny_fractal.safetensors"
TINY = ["dataset.num_classes=6", "dataset.source.train_size=200", "dataset.source.test_size=60",
        "dataset.source.walkers=16", "dataset.source.steps=32", "trainer.epochs=3", "trainer.batch_size=32",
        "hardware.threads=1"]  # 200 // 32 = 6 steps per epoch (the last 8 images dropped), 18 in all
NOTES = "## Notes by hand\n\nKept as written.\n"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "tiny.safetensors"
    out.with_name("tiny.notes.md").write_text(NOTES)
    return pretrain.main([*TINY, "--out", str(out), "--run-dir", str(out.parent / "run")])


def reference_recipe(cfg) -> dict:
    """The pretraining loop the shipped checkpoint was made with (experiments/pretrain.py before it ran through
    experiments.run), on cfg's settings: every image in memory as uint8, one shuffle generator, the last
    incomplete batch dropped, lr set before each step, torch's gradient clipping, the best held-out weights."""
    src, tc = cfg.dataset.source, cfg.trainer
    raw = fractals(src.classes, src.train_size, src.test_size, src.resolution, src.seed, src.fill_rate, src.jitter,
                   src.min_scale, src.trim, src.supersample, src.walkers, src.steps)

    def tensors(split):
        return torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(split.labels).long()

    (x_train, y_train), (x_val, y_val) = tensors(raw.train), tensors(raw.test)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.dataset.num_classes)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    lr = cfg.optimizer.lr
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optimizer.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=lr)
    per_epoch = len(y_train) // tc.batch_size
    total, warmup = tc.epochs * per_epoch, round(cfg.scheduler.warmup_epochs * per_epoch)
    min_ratio = cfg.scheduler.min_lr_ratio

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    order = torch.Generator().manual_seed(cfg.seed)
    losses, accuracies, best, best_state, step = [], [], -1.0, None, 0
    for _ in range(tc.epochs):
        perm = torch.randperm(len(y_train), generator=order)
        for i in range(per_epoch):
            idx = perm[i * tc.batch_size:(i + 1) * tc.batch_size]
            x, y = (x_train[idx].float() / 255.0 - 0.5) / 0.5, y_train[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step)
            loss = F.cross_entropy(model(x), y, label_smoothing=tc.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            step += 1
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            correct = sum((model((x_val[i:i + 500].float() / 255.0 - 0.5) / 0.5).argmax(-1) == y_val[i:i + 500])
                          .sum().item() for i in range(0, len(y_val), 500))
        model.train()
        accuracies.append(correct / len(y_val))
        if accuracies[-1] > best:
            best, best_state = accuracies[-1], {k: v.clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "accuracies": accuracies, "final": model.state_dict(), "best": best_state}


def test_the_loop_takes_exactly_the_recipes_steps(pretrained):
    """Step by step the same losses (float for float), the same held-out accuracies, and bit-identical final and
    best weights: so the shipped file is what `python -m experiments.pretrain` makes today."""
    run_dir = pretrained.parent / "run"
    reference = reference_recipe(compose("experiment=pretrain", *TINY))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["train/loss"] for e in logged if "train/loss" in e] == reference["losses"]
    assert len(reference["losses"]) == 18
    assert [e["val/acc"] for e in logged if "val/acc" in e] == reference["accuracies"]
    final = checkpoint.read(run_dir / "last.ckpt")["model"]
    assert final.keys() == reference["final"].keys()
    assert all(torch.equal(final[k], reference["final"][k]) for k in final)
    best = load_file(str(run_dir / "best.safetensors"))
    assert all(torch.equal(best[k], reference["best"][k]) for k in best)


def test_the_backbone_loads_with_a_fresh_head_and_the_card_keeps_its_notes(pretrained):
    weights = load_file(str(pretrained))
    assert not any(k.startswith("head") for k in weights)  # the head is left out ...
    full = load_file(str(pretrained.parent / "run" / "best.safetensors"))
    assert full["head.weight"].shape == (6, 96)  # ... but kept in the run folder
    cfg = compose("model=vit_tiny_cpu", f"model.checkpoint={pretrained}")
    model = build_model(cfg.model, num_classes=6)  # even with as many classes as pretraining, the head is fresh
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in weights.items())
    assert not torch.equal(own["head.weight"], full["head.weight"])
    card = pretrained.with_suffix(".md").read_text()
    assert hashlib.sha256(pretrained.read_bytes()).hexdigest() in card
    assert "python -m experiments.pretrain dataset.num_classes=6" in card
    assert len(re.findall(r"^\| [123] \| (6|12|18) \| ", card, flags=re.M)) == 3  # a history row per epoch
    assert card.endswith(NOTES) and pretrained.with_name("tiny.notes.md").read_text() == NOTES


def test_shipped_checkpoint_loads_from_another_directory(tmp_path, monkeypatch):
    assert SHIPPED.is_file(), "checkpoints/vit_tiny_fractal.safetensors is missing (git lfs? .gitignore?)"
    monkeypatch.chdir(tmp_path)  # the relative path in the config must still find the file
    cfg = compose("model=vit_tiny_pretrained", "dataset=digits")
    assert not Path(cfg.model.checkpoint).is_absolute()
    model = build_model(cfg.model, num_classes=cfg.dataset.num_classes)
    shipped = load_file(str(SHIPPED))
    own = model.state_dict()
    assert set(own) - set(shipped) == {"head.weight", "head.bias"} and set(shipped) <= set(own)
    for name in ("patch_embed.proj.weight", "blocks.3.mlp.fc2.weight", "norm.bias", "pos_embed"):
        assert torch.equal(own[name], shipped[name]), name
    assert model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


#: The card's setting names of the recipe that made the shipped file (before the recipe was a preset), as keys
#: of the composed config. A card regenerated today names the keys themselves.
CARD_KEYS = {"num_classes": "dataset.num_classes", "train_size": "dataset.source.train_size",
             "val_size": "dataset.source.test_size", "data_seed": "dataset.source.seed", "seed": "seed",
             "epochs": "trainer.epochs", "batch_size": "trainer.batch_size", "lr": "optimizer.lr",
             "weight_decay": "optimizer.weight_decay", "warmup_epochs": "scheduler.warmup_epochs",
             "min_lr_ratio": "scheduler.min_lr_ratio", "label_smoothing": "trainer.label_smoothing",
             "grad_clip": "trainer.grad_clip", "threads": "hardware.threads",
             **{k: f"dataset.source.{k}" for k in ("fill_rate", "jitter", "min_scale", "trim", "supersample",
                                                    "walkers", "steps")}}


def test_the_preset_is_the_recipe_the_shipped_card_records():
    card = SHIPPED.with_suffix(".md").read_text()
    recorded = dict(re.findall(r"^\| `([\w.]+)` \| ([^|]+?) \|$", card, flags=re.M))
    assert len(recorded) >= len(CARD_KEYS)
    cfg = compose("experiment=pretrain")
    for name, value in recorded.items():
        assert str(OmegaConf.select(cfg, CARD_KEYS.get(name, name))) == value, name


def test_shipped_card_matches_the_file_and_includes_its_notes():
    card = SHIPPED.with_suffix(".md").read_text()
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() in card
    assert re.search(r"python -m experiments\.pretrain", card)
    assert card.endswith(SHIPPED.with_name("vit_tiny_fractal.notes.md").read_text())
    assert 1e6 < SHIPPED.stat().st_size < 1e7  # a few MB
