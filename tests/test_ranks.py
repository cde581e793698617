import copy
import itertools
import json
import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wasi.ranks import InfeasibleBudgetError, RankTable, build_rank_table, ranks_for, solve_budget
from wasi.subspace import truncated_hosvd


def _random_table(rng: random.Random, n_layers: int, n_eps: int, scale: int = 1) -> RankTable:
    eps = sorted(rng.sample([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], n_eps))
    memory = [sorted(rng.randint(1, 60) * scale for _ in eps) for _ in range(n_layers)]
    perplexity = [[rng.uniform(0.0, 10.0) for _ in eps] for _ in range(n_layers)]
    ranks = [[[j + 1, j + 2, 2 * j + 1] for j in range(n_eps)] for _ in range(n_layers)]
    return RankTable(eps_set=eps, layers=[f"blocks.{l}.mlp.fc1" for l in range(n_layers)], ranks=ranks,
                     memory_bytes=memory, perplexity=perplexity, calibration_shape=[4, 3, 8, 8])


def _brute_force(table: RankTable, budget: int) -> float:
    """Min Σ p over all ε assignments with Σ m ≤ budget (inf when none)."""
    best = float("inf")
    for choice in itertools.product(range(len(table.eps_set)), repeat=len(table.layers)):
        if sum(table.memory_bytes[l][e] for l, e in enumerate(choice)) <= budget:
            best = min(best, sum(table.perplexity[l][e] for l, e in enumerate(choice)))
    return best


def _cost(table: RankTable, assignment: dict[str, float]) -> tuple[float, int]:
    idx = [table.eps_set.index(assignment[name]) for name in table.layers]
    return (sum(table.perplexity[l][e] for l, e in enumerate(idx)),
            sum(table.memory_bytes[l][e] for l, e in enumerate(idx)))


@pytest.mark.parametrize("seed,n_layers,n_eps", [(0, 3, 3), (1, 4, 3), (2, 5, 4), (3, 3, 4), (4, 5, 3)])
def test_dp_matches_brute_force(seed, n_layers, n_eps):
    rng = random.Random(seed)
    table = _random_table(rng, n_layers, n_eps)
    lo = sum(min(r) for r in table.memory_bytes)
    hi = sum(max(r) for r in table.memory_bytes)
    for budget in sorted({lo, hi, hi + 50, *(rng.randint(lo, hi) for _ in range(6))}):
        assignment = solve_budget(table, budget, granularity_bytes=1)
        cost, mem = _cost(table, assignment)
        assert mem <= budget
        assert cost == pytest.approx(_brute_force(table, budget), abs=1e-9)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_coarse_granularity_stays_within_budget(seed):
    rng = random.Random(seed)
    table = _random_table(rng, 4, 4, scale=1000)
    lo = sum(min(r) for r in table.memory_bytes)
    hi = sum(max(r) for r in table.memory_bytes)
    n = len(table.layers)
    for budget in (lo, (lo + hi) // 2, hi - 1, rng.randint(lo, hi)):
        for g in (None, 700, 5000):
            cost, mem = _cost(table, solve_budget(table, budget, granularity_bytes=g))
            bound_g = g if g is not None else -(-budget // 2048)  # default granularity is at most this
            assert mem <= budget
            assert cost >= _brute_force(table, budget) - 1e-9
            assert cost <= _brute_force(table, budget - n * bound_g) + 1e-9


def _own_best(table: RankTable) -> list[int]:
    """Each layer's lowest-perplexity ε index; ties go to the later entry of eps_set."""
    return [max(i for i, p in enumerate(row) if p == min(row)) for row in table.perplexity]


@pytest.mark.parametrize("seed", range(8))
def test_budget_affording_every_layers_best_eps_takes_it(seed):
    """From Σ m of the per-layer best assignment up to (and past) Σ max m, the default (coarse) granularity
    must still give the unconstrained optimum, which brute force confirms."""
    rng = random.Random(seed)
    table = _random_table(rng, 5, 4, scale=997)
    best = _own_best(table)
    best_mem = sum(table.memory_bytes[l][i] for l, i in enumerate(best))
    hi = sum(max(r) for r in table.memory_bytes)
    n = len(table.layers)
    for budget in sorted({best_mem, best_mem + 1, (best_mem + hi) // 2, hi - 1, hi, hi + 1, hi + n * 997 - 1}):
        if budget < best_mem:
            continue
        assignment = solve_budget(table, budget)
        cost, mem = _cost(table, assignment)
        assert mem <= budget
        assert cost == pytest.approx(_brute_force(table, budget), abs=1e-9)
        assert [table.eps_set.index(assignment[name]) for name in table.layers] == best


def test_budget_at_max_memory_gives_best_eps_on_large_tables():
    """24 layers (too many for brute force): at Σ max m and just above it every layer gets its own best ε."""
    for seed in range(30):
        rng = random.Random(100 + seed)
        table = _random_table(rng, 24, 6, scale=rng.randint(1000, 50_000))
        best = _own_best(table)
        hi = sum(max(r) for r in table.memory_bytes)
        for budget in (hi, hi + 24 * 17, hi + rng.randint(1, 24 * 1000)):
            assignment = solve_budget(table, budget)
            assert [table.eps_set.index(assignment[name]) for name in table.layers] == best


def test_own_best_ties_go_to_the_later_eps():
    table = RankTable(eps_set=[0.4, 0.6, 0.8], layers=["a", "b"], ranks=[[[1, 1, 1]] * 3] * 2,
                      memory_bytes=[[10, 20, 30], [10, 20, 30]], perplexity=[[1.0, 0.5, 0.5], [2.0, 2.0, 2.0]],
                      calibration_shape=[1, 3, 8, 8])
    assert solve_budget(table, 60) == {"a": 0.8, "b": 0.8}
    assert solve_budget(table, 60, granularity_bytes=1) == solve_budget(table, 60)


def test_infeasible_budget_states_smallest_feasible_budget():
    table = _random_table(random.Random(8), 4, 3, scale=300_000)
    smallest = min(sum(table.memory_bytes[l][e] for l, e in enumerate(c))
                   for c in itertools.product(range(3), repeat=4))
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_budget(table, smallest - 1)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    match = re.search(r"smallest feasible budget is (\d+) bytes \(([\d.]+) MiB\)", msg)
    assert match, msg
    stated = int(match.group(1))
    assert stated == smallest == info.value.min_feasible_bytes
    assert float(match.group(2)) == pytest.approx(smallest / 2**20, abs=1e-3)
    assert "budget_bytes >=" in msg
    _, mem = _cost(table, solve_budget(table, stated))
    assert mem <= stated


def test_json_round_trip_and_ranks_for():
    table = _random_table(random.Random(9), 3, 4)
    back = RankTable.from_json(table.to_json())
    assert back == table
    assignment = {name: table.eps_set[i] for i, name in enumerate(table.layers)}
    assert ranks_for(back, assignment) == {name: table.ranks[i][i] for i, name in enumerate(table.layers)}
    with pytest.raises(ValueError, match="not in the rank table"):
        ranks_for(back, {"head": 0.4})


@pytest.mark.parametrize("text,match", [
    ("not json {", "not valid JSON"),
    (json.dumps({"model": "vit", "weights": [1, 2]}), "not a WASI rank table"),
    (json.dumps([1, 2, 3]), "not a WASI rank table"),
])
def test_from_json_rejects_foreign_files(text, match):
    with pytest.raises(ValueError, match=match):
        RankTable.from_json(text)


@pytest.mark.parametrize("field,value,match", [
    ("memory_bytes", [[1, 2], [3, 4], [5, 6]], "memory_bytes must be a 3×3"),
    ("memory_bytes", [[1, -2, 3], [3, 4, 5], [5, 6, 7]], "non-negative ints"),
    ("perplexity", [[1.0, float("nan"), 1.0]] * 3, "finite"),
    ("eps_set", [0.4, 0.5, 1.5], "eps_set"),
    ("ranks", [[[0, 1, 1]] * 3] * 3, "positive ints"),
    ("version", 7, "version 7 is not supported"),
    ("eps_set", ["a", 0.5, 0.6], "list of numbers"),
    ("calibration_shape", 4, "must be lists"),
    ("input_shapes", [[2, 3]], "one list of positive ints per layer"),
])
def test_from_json_rejects_malformed_tables(field, value, match):
    data = json.loads(_random_table(random.Random(10), 3, 3).to_json())
    data[field] = value
    with pytest.raises(ValueError, match=match):
        RankTable.from_json(json.dumps(data))


class _TokenMLP(nn.Module):
    """x: (B, ..., I) -> fc1 -> GELU -> dropout -> fc2 -> mean over all but the batch and feature dims -> head."""

    def __init__(self, i: int = 10, h: int = 14, c: int = 3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(i, h), nn.Linear(h, h), nn.Linear(h, c)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.drop(F.gelu(self.fc1(x))))
        return self.head(h.flatten(1, -2).mean(1))


def _reference(model: nn.Module, name: str, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer input, output gradient and autograd ∇W from an eval-mode copy with .backward()."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    layer = model.get_submodule(name)
    saved = {}

    def hook(module, inputs, output):
        saved["x"] = inputs[0].detach()
        output.retain_grad()
        saved["y"] = output

    layer.register_forward_hook(hook)
    F.cross_entropy(model(x), y).backward()
    return saved["x"], saved["y"].grad, layer.weight.grad


def _reconstruct(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    letters = "abcd"[:core.dim()]
    spec = letters + "," + ",".join(f"{c.upper()}{c}" for c in letters) + "->" + letters.upper()
    return torch.einsum(spec, core, *factors)


def _check_table_against_reference(model, table, x, y):
    for l, name in enumerate(table.layers):
        a, dy, grad_w = _reference(model, name, x, y)
        assert table.input_shapes[l] == list(a.shape)
        exact = dy.reshape(-1, dy.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        torch.testing.assert_close(exact, grad_w, rtol=1e-4, atol=1e-6)
        for e, eps in enumerate(table.eps_set):
            core, factors = truncated_hosvd(a, eps)
            assert table.ranks[l][e] == [u.shape[1] for u in factors]
            assert table.memory_bytes[l][e] == (core.numel() + sum(u.numel() for u in factors)) * a.element_size()
            x_hat = _reconstruct(core, factors).reshape(-1, a.shape[-1])
            p_ref = torch.linalg.matrix_norm(dy.reshape(-1, dy.shape[-1]).T @ x_hat - grad_w)
            assert table.perplexity[l][e] == pytest.approx(float(p_ref), rel=1e-3, abs=1e-5 * float(grad_w.norm()))
            if eps == 1.0:
                assert table.perplexity[l][e] <= 1e-4 * float(grad_w.norm())
        assert table.perplexity[l][0] > 1e-3 * float(grad_w.norm())


@pytest.mark.parametrize("shape", [(4, 6, 10), (3, 4, 5, 10)])
def test_table_matches_dense_reference_small_model(shape):
    torch.manual_seed(0)
    model = _TokenMLP()
    model.fc1.weight.requires_grad_(False)
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    before = copy.deepcopy(model.state_dict())
    table = build_rank_table(model, ["fc1", "fc2"], x, y, eps_set=(0.3, 0.6, 0.9, 1.0))
    assert table.layers == ["fc1", "fc2"] and table.calibration_shape == list(shape)
    _check_table_against_reference(model, table, x, y)
    # the model is left as it was: parameters, flags, grads, mode, hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.fc1.weight.requires_grad and model.fc2.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.drop.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_table_on_tiny_vit_and_budget_round_trip():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10)
    names = [f"blocks.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    table = build_rank_table(model, names, x, y, eps_set=(0.5, 0.8, 1.0))
    assert table.input_shapes == [[2, 17, 192], [2, 17, 768], [2, 17, 192], [2, 17, 768]]
    _check_table_against_reference(model, table, x, y)
    table = RankTable.from_json(table.to_json())
    budget = sum(r[1] for r in table.memory_bytes)
    assignment = solve_budget(table, budget, granularity_bytes=1)  # exact DP: beats the all-0.8 choice
    assert _cost(table, assignment)[1] <= budget
    assert _cost(table, assignment)[0] <= sum(r[1] for r in table.perplexity) + 1e-9


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="not linear layers"):
        build_rank_table(_TokenMLP(), ["fc3"], torch.randn(2, 3, 10), torch.tensor([0, 1]))


def test_table_on_tiny_swin_uses_four_mode_inputs():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24,
                              depths=(1, 1), num_heads=(1, 2), window_size=7, num_classes=5)
    names = [f"layers.{s}.blocks.0.mlp.{fc}" for s in range(2) for fc in ("fc1", "fc2")]
    x, y = torch.randn(2, 3, 56, 56), torch.tensor([1, 3])
    table = build_rank_table(model, names, x, y, eps_set=(0.5, 0.8, 1.0))
    assert table.input_shapes == [[2, 14, 14, 24], [2, 14, 14, 96], [2, 7, 7, 48], [2, 7, 7, 192]]
    grids = {"layers.0": (14, 14), "layers.1": (7, 7)}
    for l, name in enumerate(names):
        a, dy, grad_w = _reference(model, name, x, y)  # a: (B, H·W, C) as the plain linear sees it
        a4 = a.reshape(a.shape[0], *grids[name[:8]], a.shape[-1])
        for e, eps in enumerate(table.eps_set):
            core, factors = truncated_hosvd(a4, eps)
            assert table.ranks[l][e] == [u.shape[1] for u in factors] and len(factors) == 4
            assert table.memory_bytes[l][e] == (core.numel() + sum(u.numel() for u in factors)) * 4
            x_hat = _reconstruct(core, factors).reshape(-1, a.shape[-1])
            p_ref = torch.linalg.matrix_norm(dy.reshape(-1, dy.shape[-1]).T @ x_hat - grad_w)
            assert table.perplexity[l][e] == pytest.approx(float(p_ref), rel=1e-3, abs=1e-5 * float(grad_w.norm()))
