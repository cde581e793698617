"""experiments.cost end to end on the tiny CPU model (2 blocks, for speed): files, ratio columns,
hand-counted layer bytes, saved-tensor breakdown."""
import csv
import json

import torch

from experiments import cost
from experiments.models import build_model

torch.set_num_threads(1)


def test_cost_tables_for_tiny_model(tmp_path):
    out = cost.main(["--model", "vit_tiny_cpu", "--batch", "4", "--eps", "0.6", "--no-timing", "--data", "random",
                     "--set", "model.kwargs.depth=2", "--out", str(tmp_path)])
    assert out == tmp_path
    assert all((tmp_path / f).is_file() for f in ("cost.csv", "cost.md", "saved_tensors.csv"))
    with (tmp_path / "cost.csv").open() as f:
        vanilla, wasi = list(csv.DictReader(f))
    assert (vanilla["method"], wasi["method"], float(wasi["epsilon"]), float(wasi["epsilon_act"])) == ("vanilla", "wasi", 0.6, 0.6)
    assert not any(k.startswith("time/") for k in wasi)  # --no-timing
    v = {k: float(x) for k, x in vanilla.items() if x and k not in ("method",)}
    w = {k: float(x) for k, x in wasi.items() if x and k not in ("method", "K", "act_ranks")}
    assert float(wasi["layers/reduction"]) == w["memory/compressed_layers_vanilla_bytes"] / w["memory/compressed_layers_bytes"]
    compared = [k for k in cost.COMPARED if not k.startswith("time/")]
    for key in compared:
        assert w[f"{key}/reduction"] == v[key] / w[key]
        assert v[f"{key}/reduction"] == 1.0
    ks = json.loads(wasi["K"])
    assert len(ks) == 4 and w["K_mean"] == sum(ks) / 4  # 2 blocks x (fc1, fc2)
    assert len(json.loads(wasi["act_ranks"])) == 4 and all(len(r) == 3 for r in json.loads(wasi["act_ranks"]))
    # Hand count from the model's shapes: dense x (B, T, I) + W + b of every fc1 (D -> H) and fc2 (H -> D), float32.
    model = build_model(cost.compose_cfg(["model=vit_tiny_cpu", "model.kwargs.depth=2"]).model, 10)
    t, (h, d) = model.patch_embed.num_patches + 1, model.blocks[0].mlp.fc1.weight.shape
    per_block = 4 * t * d + h * d + h + 4 * t * h + d * h + d
    assert w["memory/compressed_layers_vanilla_bytes"] == 2 * per_block * 4
    # The breakdown sums the same saved storages as memory/activation_bytes, by another path.
    with (tmp_path / "saved_tensors.csv").open() as f:
        sources = list(csv.DictReader(f))
    for row, name in ((v, "vanilla"), (w, "wasi ε=0.6")):
        assert sum(int(s[name]) for s in sources) == row["memory/activation_bytes"]
    by_source = {s["source"]: (int(s["vanilla"]), int(s["wasi ε=0.6"])) for s in sources}
    gelu_input = 2 * 4 * t * h * 4  # (B, T, H) float32 per block: saved by GELU always, by dense fc2 in vanilla
    assert by_source["mlp.act (GELU) / Gelu"] == (gelu_input, gelu_input)
    assert by_source["mlp.fc2 (Linear) / Addmm"] == (gelu_input, 0)
    md = (tmp_path / "cost.md").read_text()
    assert "random init" in md and "| wasi | 0.6 |" in md and "mlp.act (GELU) / Gelu" in md
