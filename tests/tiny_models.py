"""Tiny timm ViT and Swin, batches for them, and a few-step training loop: the models every test builds by hand."""
from __future__ import annotations

import contextlib

import timm
import torch
import torch.nn.functional as F
from torch import nn

import wasi

CLASSES = 5


def vit(seed: int = 0, image_size: int = 32, width: int = 48, depth: int = 2) -> nn.Module:
    """By default 2 blocks, width 48, 2 heads, 32×32 images in 4×4 patches: tokens (B, 65, 48), MLP hidden 192."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=4,
                             embed_dim=width, depth=depth, num_heads=2, num_classes=CLASSES)


def swin(seed: int = 0) -> nn.Module:
    """Stages of 2 blocks (window and shifted window), widths 24/48 on 14×14 and 7×7 maps (56×56 images);
    timm's default stochastic depth (drop path) is on, so runs seed the global RNG."""
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24,
                             depths=(2, 2), num_heads=(1, 2), window_size=7, num_classes=CLASSES)


MODELS = {"vit": (vit, 32, [2, 9, 8]), "swin": (swin, 56, [2, 5, 4, 8])}  # maker, image size, fixed ranks


def batches(size: int, n: int = 3, batch: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
            for _ in range(n)]


def injected(name: str, **config) -> nn.Module:
    """`name` with fixed activation ranks (unless epsilon_act is given), injected with a calibration batch of 2."""
    make, size, ranks = MODELS[name]
    model = make()
    if config.get("activation", True) and "epsilon_act" not in config:
        config.setdefault("ranks", ranks)
    calibration = batches(size, n=1, batch=2, seed=9)[0]
    wasi.inject(model, wasi.WASIConfig(**{"epsilon": 0.9, **config}), calibration=calibration)
    return model


def train(model: nn.Module, data: list, lr: float = 0.05, momentum: float = 0.9, bf16: bool = False) -> None:
    """SubspaceSGD steps with momentum and weight decay on `data`, from global RNG seed 0 (drop path)."""
    torch.manual_seed(0)
    opt = wasi.SubspaceSGD(model, lr, momentum=momentum, weight_decay=1e-3)
    model.train()
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> dict[str, torch.Tensor]:
    """One training backward from global RNG seed 0 (drop path): the input grad, every parameter .grad, and each
    factored layer's ∇W = G Pᵀ."""
    torch.manual_seed(0)
    model.train()
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    out = {"input": x.grad}
    out.update({f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, layer in wasi.factored_layers(model):
        if layer.factored_grad is not None:
            g, p = layer.factored_grad
            out[f"{name}.G_Pt"] = g.float() @ p.float().T
    return out


def saved_tensors(fn):
    """(fn(), the tensors autograd saved for backward while it ran)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
