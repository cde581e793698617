"""The pretrained-like spectrum: exact ranks at every ε, singular vectors and norm kept."""
import pytest
import torch
from torch import nn

from experiments.builders.spectrum import RANKS_768, pretrained_like_, pretrained_ranks, pretrained_spectrum
from wasi import EPS_SET
from wasi.subspace import explained_variance_rank


@pytest.mark.parametrize("width", [96, 192, 384, 768, 3072])
def test_spectrum_keeps_the_scaled_ranks_at_every_epsilon(width):
    s = pretrained_spectrum(width)
    assert s.shape == (width,) and (s.diff() <= 0).all() and s.square().sum() == pytest.approx(1.0)
    ranks = pretrained_ranks(width)
    assert [explained_variance_rank(s.float(), e) for e in EPS_SET] == ranks
    assert all(abs(k - k768 * width / 768) <= 1 for k, k768 in zip(ranks, RANKS_768))
    assert pretrained_ranks(768) == list(RANKS_768)


def test_weights_keep_their_singular_vectors_and_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 96), nn.Linear(96, 384))
    before = [m.weight.detach().clone() for m in model]
    pretrained_like_(model, ["0", "1"])
    for w0, m in zip(before, model):
        u0, s0, v0 = torch.linalg.svd(w0.double(), full_matrices=False)
        u1, s1, v1 = torch.linalg.svd(m.weight.detach().double(), full_matrices=False)
        assert torch.allclose(s1, pretrained_spectrum(96) * s0.square().sum().sqrt(), atol=1e-5)
        # Same singular subspaces: project the new weight on the old singular vectors.
        assert torch.allclose(u0.T @ m.weight.double() @ v0.T, torch.diag(s1), atol=1e-4)
        assert [explained_variance_rank(s1, e) for e in EPS_SET] == pretrained_ranks(96)
