"""Text through the whole suite, on model=llama_tiny and dataset=yesno: every method family trains Llama blocks in
the one loop (W&B, results, checkpoints), exports and reloads with transformers + wasi, reports; resume is exact;
recompute (block, and the gated-MLP path) leaves every method's step unchanged; the per-layer and whole-step costs
against hand counts; the benchmark on token batches."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import hydra
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, default_collate

import experiments.run as run_module
import wasi
from experiments import bench, report
from experiments.builders.inputs import data_arguments, logits
from experiments.builders.variant import build_variant, train_step
from experiments.deployment.exported import load_exported, load_tokenizer
from experiments.export import export_run
from experiments.measurement import metrics
from experiments.training import checkpoint
from tests.helpers import ROOT, compose, sweep_results, train
from tests.wandb_log import summary as wandb_summary

#: A short text run: llama_tiny with 2 of its 4 layers, 80 generated items (64 train), 6 steps of batch 8.
TEXT = ["model=llama_tiny", "model.config.num_hidden_layers=2", "dataset=yesno", "dataset.source.train_size=80",
        "dataset.source.test_size=32", "trainer.epochs=2", "trainer.batch_size=8", "trainer.max_steps=6",
        "trainer.eval_batches=2", "trainer.timing_repeats=1"]
METHODS = ["vanilla", "wsi", "asi", "wasi"]


@pytest.fixture(scope="module")
def text_sweep(tmp_path_factory) -> Path:
    """`train.py -m method=vanilla,wsi,asi,wasi` on the short text run (W&B offline): job i is METHODS[i]."""
    sweep = tmp_path_factory.mktemp("text_sweep")
    train("-m", *TEXT, "logger.mode=offline", f"method={','.join(METHODS)}", f"hydra.sweep.dir={sweep}",
          f"paths.cache_dir={sweep}/cache")
    return sweep


def test_every_method_trains_llama_blocks_through_the_loop(text_sweep: Path):
    results = sweep_results(text_sweep)
    assert [r["method"] for r in results] == METHODS
    for job, r in enumerate(results):
        assert r["train/steps"] == 6 and 0 <= r["test/acc"] <= 1 and r["dataset"] == "yesno"
        assert r["flops/train_step"] > 3 * r["flops/inference_per_sequence"] > 0  # 8 sequences, forward + backward
        assert "flops/inference_per_image" not in r and r["time/inference_per_sequence_s"] > 0
        assert r["flops/layers_train_step"] > 0 and r["flops/layers_inference"] > 0
        assert r["memory/layers_weight_bytes"] > 0 and r["memory/activation_bytes"] > 0
        run_dir = text_sweep / str(job)
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in logged if "train/loss" in row] == list(range(1, 7))
        assert wandb_summary(run_dir)["test/acc"] == r["test/acc"]  # the offline W&B run holds the results
        assert (run_dir / "best.safetensors").is_file() and (run_dir / "last.ckpt").is_file()
    vanilla, wsi, asi, wasi_run = results
    layers = [layer["name"] for layer in wasi_run["method/layers"]]
    assert layers == [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")]
    assert all(layer["weight_rank"] for layer in wasi_run["method/layers"]) and wasi_run["method/recompute"] == "mlp"
    for r in (asi, wasi_run):  # Tucker factors instead of the inputs
        assert r["memory/layers_activation_bytes"] < r["memory/layers_activation_dense_bytes"]
    for r in (wsi, wasi_run):  # L, R instead of W
        assert r["memory/layers_weight_bytes"] < r["memory/layers_weight_dense_bytes"]
    assert vanilla["memory/layers_activation_bytes"] == wasi_run["memory/layers_activation_dense_bytes"]
    assert wasi_run["flops/layers_inference"] < vanilla["flops/layers_inference"]


@torch.no_grad()
def test_each_text_run_exports_and_reloads_with_transformers_and_wasi(text_sweep: Path, tmp_path: Path):
    for job, r in enumerate(sweep_results(text_sweep)):
        out = export_run(text_sweep / str(job), tmp_path / str(job))
        model, tokenizer = load_exported(out), load_tokenizer(out)
        spec = model.export_spec
        assert (spec.inputs, spec.max_length, spec.transformers_class) == ("text", 64, "LlamaForSequenceClassification")
        assert bool(spec.layers) == (r["method"] in ("wsi", "wasi"))  # low-rank layers stay low-rank
        cfg = compose(*TEXT, f"method={r['method']}")
        test = hydra.utils.instantiate(cfg.dataset)(**data_arguments(cfg.model), seed=cfg.seed).test
        correct = total = 0
        for i, (x, y) in enumerate(DataLoader(test, batch_size=8)):
            if i == 2:  # trainer.eval_batches
                break
            correct += int((logits(model, x).argmax(-1) == y).sum())
            total += len(y)
        assert correct / total == r["test/acc"], r["method"]
        text = "the owl is red . [SEP] is there a bird"  # the tokenizer saved with the export reads as the run's
        assert tokenizer(text)["input_ids"] == data_arguments(cfg.model)["tokenizer"](text)["input_ids"]
    proc = subprocess.run([sys.executable, "-m", "experiments.inference", str(tmp_path / "3"), text, "the fox is red",
                           "--top-k", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert rows[0] == ["text", "class_1", "score_1", "class_2", "score_2"] and rows[1][0] == text and len(rows) == 3
    assert abs(float(rows[1][2]) + float(rows[1][4]) - 1) < 1e-3


def test_the_report_of_a_text_sweep_keeps_its_summary_csv(text_sweep: Path, tmp_path: Path):
    written = report.write_report(report.find_results(text_sweep), tmp_path)
    assert tmp_path / "summary.csv" in written
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["method"] for r in rows] == METHODS
    results = sweep_results(text_sweep)
    for row, r in zip(rows, results):
        for key in ("test/acc", "flops/inference_per_sequence", "flops/layers_train_step",
                    "memory/layers_weight_bytes"):
            assert float(row[key]) == pytest.approx(r[key]), key
    assert "flops/inference_per_sequence (MFLOPs)" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------- resume, recompute


def tiny_text(run_dir: Path, *overrides: str):
    return compose(*TEXT, "trainer.max_steps=null", "trainer.measure=false", "logger.mode=disabled", "method=wasi",
                   "optimizer.momentum=0.9", "trainer.checkpoint_every=3", "hardware.threads=1", *overrides,
                   run_dir=run_dir)


def test_an_interrupted_text_run_resumes_exactly(tmp_path, monkeypatch):
    """16 steps (64 items / 8, 2 epochs), WASI with momentum: killed during step 11 (last checkpoint: step 9), then
    resumed, it ends with the uninterrupted run's weights, optimizer state and metrics."""
    whole = run_module.run(tiny_text(tmp_path / "whole"))
    calls, original = [0], run_module.train_step

    def crashing(model, optimizer, x, y, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 11:
            raise KeyError("crash")
        return original(model, optimizer, x, y, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_step", crashing)
    with pytest.raises(KeyError):
        run_module.run(tiny_text(tmp_path / "cut"))
    assert checkpoint.read(tmp_path / "cut" / "last.ckpt")["progress"]["step"] == 9
    monkeypatch.undo()
    resumed = run_module.run(tiny_text(tmp_path / "cut", "resume=true"))
    assert resumed["train/steps"] == whole["train/steps"] == 16
    assert {k: v for k, v in resumed.items() if not k.startswith("config/")} == \
           {k: v for k, v in whole.items() if not k.startswith("config/")}
    a, b = (load_file(str(tmp_path / d / "best.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a, last_b = (checkpoint.read(tmp_path / d / "last.ckpt") for d in ("whole", "cut"))
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])


def token_batch(cfg, n: int = 8):
    data = hydra.utils.instantiate(cfg.dataset)(**data_arguments(cfg.model), seed=0)
    return default_collate([data.train[i] for i in range(n)])


@pytest.mark.parametrize("method,modes", [("vanilla", ["block"]), ("asi", ["block"]), ("wsi", ["mlp", "block"]),
                                          ("wasi", ["mlp", "block"])])
def test_recompute_leaves_each_methods_steps_unchanged_on_llama_blocks(method, modes):
    """Two training steps (momentum, clipping) with every recompute mode end with the weights of recompute=none: the
    checkpointed decoder layers and the fused gated MLP (gate/up/down) compute the same gradients."""
    def run(mode: str) -> dict[str, torch.Tensor]:
        cfg = compose(*TEXT, f"method={method}", f"method.recompute={mode}", "optimizer.momentum=0.9",
                      *(["method.epsilon=0.6"] if method != "vanilla" else []))
        x, y = token_batch(cfg)
        torch.manual_seed(0)
        variant = build_variant(cfg, 2, [(x, y)], torch.device("cpu"))
        assert variant.summary.get("recompute", mode) == mode
        for _ in range(2):
            train_step(variant.model, variant.optimizer, x, y, 2.0, torch.autocast("cpu", enabled=False))
        return {k: v.clone() for k, v in wasi.merge(variant.model).state_dict().items()}

    reference = run("none")
    for mode in modes:
        state = run(mode)
        assert all(torch.allclose(state[k], reference[k], atol=2e-5, rtol=1e-4) for k in reference), (method, mode)


def test_paper_wasi_on_tinyllama_takes_its_activation_ranks_from_the_weight_epsilon():
    cfg = compose(*TEXT, "method=paper/wasi_tinyllama", "method.last_n=1")
    x, y = token_batch(cfg)
    variant = build_variant(cfg, 2, [(x, y)], torch.device("cpu"))
    assert {layer["act_epsilon"] for layer in variant.summary["layers"]} == {0.1} and cfg.method.train_rest
    assert [layer["name"] for layer in variant.summary["layers"]] == [f"model.layers.1.mlp.{p}_proj"
                                                                       for p in ("gate", "up", "down")]
    frozen = {n for n, p in variant.model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen and "model.layers.1.self_attn.q_proj.weight" in frozen
    assert "model.layers.1.post_attention_layernorm.weight" not in frozen and "score.weight" not in frozen


# ----------------------------------------------------------------------------- costs against hand counts


def llama(layers: int = 2):
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, num_labels=2, use_cache=False))


D, H, HEADS, KV, C = 64, 176, 4, 2, 2


def test_inference_flops_of_a_token_batch_is_the_analytic_count():
    model, n = llama(), 16
    ids = torch.randint(1, 50, (1, n))
    per_layer = n * (D * D + 2 * D * (D * KV // HEADS) + D * D) + HEADS * n * n * 2 * (D // HEADS) + n * 3 * D * H
    macs = 2 * per_layer + n * D * C  # the score head runs on every position; norms, rotary, SiLU: not counted
    by = metrics.inference_flops_by_module(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert by[""] == metrics.inference_flops(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert by[""] == 2 * macs
    assert metrics.tuned_layers(by, model, wasi.find_targets(model, "mlp", last_n=1)) == 2 * n * 3 * D * H


def test_the_fine_tuned_layers_train_flops_are_the_hand_count():
    model, n = llama(), 2 * 16
    ids, y = torch.randint(1, 50, (2, 16)), torch.tensor([0, 1])
    names = wasi.find_targets(model, "mlp", last_n=2)

    def forward() -> torch.Tensor:
        return F.cross_entropy(model(input_ids=ids).logits, y)

    # forward 2·T·O·I, weight gradient 2·T·O·I, input gradient 2·T·O·I per linear (each input needs a gradient)
    assert metrics.tuned_layers_train_flops(model, names, forward) == 2 * 3 * 6 * n * D * H
    for module in (model.model.embed_tokens, model.model.layers[0], model.model.layers[1].self_attn,
                   model.model.layers[1].input_layernorm, model.model.layers[1].post_attention_layernorm):
        module.requires_grad_(False)
    # now block 0 is frozen and block 1's MLP input needs no gradient: gate and up compute none
    expected = (2 * 4 + 6) * n * D * H + 3 * 6 * n * D * H
    assert metrics.tuned_layers_train_flops(model, names[3:], forward) == expected - 3 * 6 * n * D * H
    assert metrics.tuned_layers_train_flops(model, [], forward) == 0


def test_the_fine_tuned_layers_memory_is_the_hand_count():
    model, (b, n) = llama(), (2, 16)
    ids, y = torch.randint(1, 50, (b, n)), torch.tensor([0, 1])
    names = wasi.find_targets(model, "mlp")
    counts = metrics.tuned_layer_bytes(model, names, lambda: F.cross_entropy(model(input_ids=ids).logits, y))
    inputs = 2 * (2 * b * n * D + b * n * H) * 4  # gate and up read (B, N, D), down (B, N, H), float32
    weights = 2 * 3 * D * H * 4  # no biases in Llama's MLP
    assert counts == {"memory/layers_activation_bytes": inputs, "memory/layers_weight_bytes": weights,
                      "memory/layers_activation_dense_bytes": inputs, "memory/layers_weight_dense_bytes": weights}
    wasi.inject(model, wasi.WASIConfig(epsilon=0.5), calibration=({"input_ids": ids}, y))
    compressed = metrics.tuned_layer_bytes(model, names, lambda: F.cross_entropy(model(input_ids=ids).logits, y))
    reports = [model.get_submodule(n).memory_report() for n in names]
    assert compressed["memory/layers_weight_bytes"] == sum(r["weight_bytes"] for r in reports) < weights
    assert compressed["memory/layers_activation_bytes"] == sum(r["activation_bytes"] for r in reports) < inputs
    assert compressed["memory/layers_activation_dense_bytes"] == inputs


def test_held_activations_add_up_the_decoder_layers():
    model = llama()
    ids, y = torch.randint(1, 50, (2, 16)), torch.tensor([0, 1])
    held = metrics.held_activations(lambda: F.cross_entropy(model(input_ids=ids).logits, y), model)
    assert not any("layers." in key for key in held)
    assert sum(held.values()) == metrics.activation_bytes(lambda: F.cross_entropy(model(input_ids=ids).logits, y),
                                                          model)
    # named within their block; outside the blocks, by their own names
    assert {"mlp.gate_proj (Linear) / mm", "block (LlamaDecoderLayer) / add",
            "model.embed_tokens (Embedding) / embedding"} <= set(held)


def test_the_benchmark_measures_a_text_model_on_token_batches(tmp_path):
    small = ["model.config.num_hidden_layers=2", "dataset.source.train_size=20", "dataset.source.test_size=4"]
    out = bench.main(["--model", "llama_tiny", "--batch", "4", "--data", "yesno", "--methods", "vanilla", "wasi",
                      "--eps", "0.5", "--set", *small, "--out", str(tmp_path / "b")])
    table = pd.read_csv(out / "variants.csv")
    assert list(table.label) == ["vanilla", "wasi ε=0.5"]
    for key in ("flops/inference_per_sequence", "flops/layers_train_step", "flops/layers_inference",
                "memory/layers_activation_bytes", "memory/layers_weight_bytes", "flops/layers_train_step ×"):
        assert table[key].notna().all(), key
    wasi_row = table.set_index("label").loc["wasi ε=0.5"]
    assert wasi_row["layers activation ×"] == pytest.approx(
        wasi_row["memory/layers_activation_dense_bytes"] / wasi_row["memory/layers_activation_bytes"])
    assert "the first 4 training sequences of 64 tokens of dataset=yesno" in (out / "summary.md").read_text()
    noise = bench.main(["--model", "llama_tiny", "--batch", "2", "--data", "noise", "--methods", "vanilla", "--set",
                        *small[:1], "--out", str(tmp_path / "n")])
    assert "random token ids" in (noise / "summary.md").read_text()
