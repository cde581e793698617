"""A stand-in for pretrained weights in benchmarks: random-init singular vectors, pretrained-like spectra.

No pretrained ViT-B/32 or Swin-T weights reach an offline machine, and random-init weights have
nearly flat spectra, so the weight rank K that an explained-variance threshold ε gives is far larger
than a pretrained model's (about 470 of 768 at ε = 0.8 instead of about 250). `pretrained_like_`
keeps each target weight's singular vectors and Frobenius norm and gives it singular values whose
explained variance at ε = 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 keeps exactly K = 61, 92, 135, 178, 246, 350
of 768 directions: the ranks the authors' SVD-LLM baseline pairs with each ε on ImageNet ViT-B/32
(parameter ratios 0.1, 0.15, 0.22, 0.29, 0.4, 0.57 of O·I/(O+I)). Other widths scale K by
min(O, I) / 768. See docs/method.md, "Pretrained-like spectrum".
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from wasi.config import EPS_SET
from wasi.subspace import explained_variance_rank

__all__ = ["RANKS_768", "pretrained_ranks", "pretrained_spectrum", "pretrained_like_"]

RANKS_768 = (61, 92, 135, 178, 246, 350)
_MARGIN = 1e-5  # cumulative energy at K_j is ε_j + margin, so float rounding cannot push the rank to K_j + 1


def pretrained_ranks(width: int) -> list[int]:
    """K for each of EPS_SET at min(O, I) = width: RANKS_768 scaled by width / 768, rounded, increasing."""
    ranks = []
    for k in RANKS_768:
        ranks.append(min(width, max(round(k * width / 768), ranks[-1] + 1 if ranks else 1)))
    if ranks[-1] >= width:
        raise ValueError(f"a pretrained-like spectrum needs width > {len(RANKS_768)}, got {width}")
    return ranks


def pretrained_spectrum(width: int) -> torch.Tensor:
    """Singular values (width,), float64, non-increasing, unit energy, whose explained variance crosses each
    ε of EPS_SET exactly at index pretrained_ranks(width).

    The energy ε_j − ε_{j−1} is spread evenly over the directions between consecutive ranks; where
    rounding the scaled ranks makes a later stretch denser than an earlier one, the two are pooled
    (pool-adjacent-violators), which keeps the spectrum sorted. The ranks are checked afterwards.
    """
    ranks = pretrained_ranks(width)
    knots = [0, *ranks, width]
    cumulative = [0.0, *(e + _MARGIN for e in EPS_SET), 1.0]
    stretches = [[b - a, cb - ca] for a, b, ca, cb in zip(knots, knots[1:], cumulative, cumulative[1:])]
    pooled: list[list[float]] = []  # [directions, energy], energy per direction non-increasing
    for n, e in stretches:
        pooled.append([n, e])
        while len(pooled) > 1 and pooled[-1][1] / pooled[-1][0] > pooled[-2][1] / pooled[-2][0]:
            n2, e2 = pooled.pop()
            pooled[-1] = [pooled[-1][0] + n2, pooled[-1][1] + e2]
    energy = torch.cat([torch.full((int(n),), e / n, dtype=torch.float64) for n, e in pooled])
    s = energy.sqrt()
    got = [explained_variance_rank(s, eps) for eps in EPS_SET]
    if got != ranks:
        raise ValueError(f"no sorted spectrum of width {width} keeps ranks {ranks} (got {got}); use a wider layer")
    return s


@torch.no_grad()
def pretrained_like_(model: nn.Module, names: Sequence[str]) -> None:
    """In place: every named nn.Linear keeps its singular vectors and ‖W‖_F and gets `pretrained_spectrum`.

    W: (O, I) = U diag(s) Vᵀ -> U diag(‖W‖_F · pretrained_spectrum(min(O, I))) Vᵀ.
    """
    for name in names:
        linear = model.get_submodule(name)
        w = linear.weight
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        new = pretrained_spectrum(s.numel()).to(s) * s.square().sum().sqrt()
        w.copy_(((u * new) @ vh).to(w.dtype))
