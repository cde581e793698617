"""A dense linear rebuilt as two factor linears (SVD-LLM's W_v, W_u): the method builds it, the export reads it."""
from __future__ import annotations

import torch
from torch import nn


def factor_linear(linear: nn.Linear, w_u: torch.Tensor, w_v: torch.Tensor) -> nn.Sequential:
    """nn.Linear(I, O) -> Sequential(Linear(I, k, no bias) = W_v, Linear(k, O) = W_u, bias).

    w_u: (O, k), w_v: (k, I)."""
    k = w_v.shape[0]
    down = nn.Linear(linear.in_features, k, bias=False)
    up = nn.Linear(k, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        down.weight.copy_(w_v)
        up.weight.copy_(w_u)
        if linear.bias is not None:
            up.bias.copy_(linear.bias)
    return nn.Sequential(down, up).to(linear.weight.device)
