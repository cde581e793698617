"""Targets by name (PEFT's semantics), blocks and last_n, heads and modules_to_save, what inject refuses, and the
other optimizers: on tiny timm and Hugging Face models (tests/families.py)."""
import copy
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import wasi
from tests.families import FAMILIES
from wasi import WASIConfig, find_blocks, find_head, find_targets, inject
from wasi.probe import logits_of, run_model


def _family(name: str):
    family = FAMILIES[name]
    return family.build(), family.batch(2, 0)


def test_target_modules_names_suffixes_regex_and_all_linear():
    vit = FAMILIES["vit"].build()
    assert find_targets(vit, target_modules=["fc2"]) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert find_targets(vit, target_modules=["blocks.1.mlp.fc1", "attn.proj"]) == [
        "blocks.0.attn.proj", "blocks.1.attn.proj", "blocks.1.mlp.fc1"]
    assert find_targets(vit, target_modules=r"blocks\.\d+\.attn\.qkv") == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        find_targets(vit, target_modules=r"attn\.qkv")  # a regular expression matches the whole name
    every = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear)]
    assert find_targets(vit, target_modules="all-linear") == [n for n in every if n != "head"]
    llama = FAMILIES["hf_llama"].build()
    linears = find_targets(llama, target_modules="all-linear")
    assert "score" not in linears and len(linears) == 14  # 7 per decoder layer, the head left out
    with pytest.raises(ValueError, match=r"matches \['blocks.0.mlp', 'blocks.1.mlp'\] \(Mlp\), which are not "
                                         r"nn.Linear"):
        find_targets(vit, target_modules=["mlp"])
    with pytest.raises(ValueError, match=r"no module of VisionTransformer is named \['fc3'\]"):
        find_targets(vit, target_modules=["fc3"])


@pytest.mark.parametrize("name, blocks, mlp", [
    ("vit", "blocks.1", ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]),
    ("swin", "layers.1.blocks.0", ["layers.1.blocks.0.mlp.fc1", "layers.1.blocks.0.mlp.fc2"]),
    ("pvt_v2", "stages.3.blocks.0", ["stages.3.blocks.0.mlp.fc1", "stages.3.blocks.0.mlp.fc2"]),
    ("maxvit", "stages.3.blocks.0", [f"stages.3.blocks.0.{a}.mlp.fc{i}" for a in ("attn_block", "attn_grid")
                                     for i in (1, 2)]),
    ("davit", "stages.3.blocks.0.1", ["stages.3.blocks.0.1.mlp.fc1", "stages.3.blocks.0.1.mlp.fc2"]),
    ("hf_vit", "vit.layers.1", ["vit.layers.1.mlp.fc1", "vit.layers.1.mlp.fc2"]),
    ("hf_bert", "bert.encoder.layer.1", [f"bert.encoder.layer.1.{p}.dense" for p in ("intermediate", "output")]),
    ("hf_gpt2", "transformer.h.1", ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]),
    ("hf_llama", "model.layers.1", [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]),
    ("eva02", "blocks.1", ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]),
])
def test_blocks_and_last_n_count_blocks(name, blocks, mlp):
    """The last block of each layout and `last_n=1`: that block's MLP linears (timm's relative-position MLP inside
    the attention is not one of them)."""
    model = FAMILIES[name].build()
    assert find_blocks(model)[-1] == blocks
    assert find_targets(model, last_n=1) == mlp


def test_llama_last_n_blocks_mlp_and_attention():
    """The paper's "last n decoder layers" of TinyLlama: last_n counts Llama's decoder layers."""
    llama = FAMILIES["hf_llama"].build()
    names = find_targets(llama, "mlp+attn", last_n=1)
    assert names == [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"] + \
        [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
    model, (x, y) = _family("hf_llama")
    summary = inject(model, WASIConfig(targets="mlp+attn", last_n=1), calibration=(x, y))
    assert [l.name for l in summary.layers] == names
    assert summary.trains == ["model.layers.1.self_attn", "model.layers.1.mlp", "score"]


def test_a_timm_vit_inside_a_wrapper():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = FAMILIES["vit"].build()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

    model, (x, y) = Wrapper(), FAMILIES["vit"].batch(2, 0)
    summary = inject(model, WASIConfig(), calibration=(x, y))
    assert [l.name for l in summary.layers][0] == "backbone.blocks.0.mlp.fc1"
    assert find_head(model) == ["backbone.head"] and summary.trains[-1] == "backbone.head"
    assert wasi.checkpoint_blocks(copy.deepcopy(model)) == ["backbone.blocks.0", "backbone.blocks.1"]


@pytest.mark.parametrize("name, head", [("vit", ["head"]), ("deit_distilled", ["head", "head_dist"]),
                                        ("swin", ["head.fc"]), ("hf_vit", ["classifier"]), ("hf_llama", ["score"]),
                                        ("hf_gpt2", ["score"])])
def test_heads(name, head):
    assert find_head(FAMILIES[name].build()) == head


class _NoHead(nn.Module):
    """Two blocks and nothing outside them: no head to find."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(timm.models.vision_transformer.Block(16, 2) for _ in range(2)))
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x)).mean(1)


def test_a_model_without_a_head_needs_modules_to_save():
    x, y = torch.randn(2, 5, 16), torch.randint(0, 3, (2,))
    model = _NoHead()
    with pytest.raises(ValueError, match=r"no classifier head found in _NoHead .* modules_to_save=\[\.\.\.\] "
                                         r"\(modules_to_save=\[\] for none\), or set train_rest=True"):
        inject(model, WASIConfig(), calibration=(x, y))
    assert not any(isinstance(m, wasi.WSILinear) for m in model.modules())  # refused before converting anything
    summary = inject(model, WASIConfig(modules_to_save=["norm"]), calibration=(x, y))
    assert summary.trains == ["blocks.0.mlp", "blocks.1.mlp", "norm"]
    only = inject(_NoHead(), WASIConfig(modules_to_save=[]), calibration=(x, y))
    assert only.trains == ["blocks.0.mlp", "blocks.1.mlp"]
    with pytest.raises(ValueError, match=r"named \['norm3'\]"):
        inject(_NoHead(), WASIConfig(modules_to_save=["norm3"]), calibration=(x, y))


def test_two_dimensional_inputs_compress_over_two_modes():
    """A plain MLP classifier on (B, C) rows: its linear compresses (B, C), exactly at full rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 3))
    dense = copy.deepcopy(model)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    summary = inject(model, WASIConfig(target_modules=["0"], epsilon=1.0, epsilon_act=1.0), calibration=(x, y))
    assert summary.layers[0].input_shape == [5, 6] and len(summary.layers[0].act_ranks) == 2
    assert summary.trains == ["0", "2"]  # the last linear is the head
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(dense(x), y).backward()
    g, p = model[0].factored_grad
    torch.testing.assert_close(g @ p.T, dense[0].weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name, layer", [("beit", "blocks.0.attn.qkv"), ("eva02", "blocks.0.attn.qkv"),
                                         ("swinv2", "layers.0.blocks.0.attn.qkv")])
@pytest.mark.parametrize("weight", [True, False])
def test_a_target_its_parent_bypasses_is_refused(name, layer, weight):
    """BEiT, EVA-02 and Swin V2 attention call F.linear(x, self.qkv.weight): converting qkv would do nothing (ASI)
    or break (WSI/WASI), so inject refuses it by name, before converting anything."""
    model, batch = _family(name)
    with pytest.raises(ValueError, match=rf"targets \['{layer}'.* never ran on the calibration batch: .*F.linear.* "
                                         r"leave them out with target_modules=\[\.\.\.\] or targets='mlp'"):
        inject(model, WASIConfig(targets="mlp+attn", weight=weight), calibration=batch)
    assert not any(isinstance(m, (wasi.WSILinear, wasi.ASILinear)) for m in model.modules())


def test_an_mlp_with_a_hidden_norm_is_refused_by_recompute_mlp():
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=3, img_size=28, patch_size=7,
                              depth=1, embed_dim=48, num_heads=2, scale_mlp=True)
    batch = FAMILIES["eva02"].batch(2, 0)
    with pytest.raises(ValueError, match=r"cannot fuse the MLP blocks.0.mlp \(SwiGLU, timm SwiGLU\): the fused path "
                                         r"does not recompute a hidden norm .*set recompute='none' or "
                                         r"recompute='block'"):
        inject(model, WASIConfig(recompute="mlp"), calibration=batch)
    assert inject(model, WASIConfig(recompute="block"), calibration=batch).checkpointed_blocks == ["blocks.0"]


def test_inject_needs_a_calibration_batch():
    with pytest.raises(ValueError, match=r"inject needs a calibration batch: pass calibration=\(x, y\)"):
        inject(FAMILIES["vit"].build(), WASIConfig())


def test_a_larger_training_batch_than_the_calibration_batch_is_said_once(caplog):
    model = FAMILIES["vit"].build()
    inject(model, WASIConfig(epsilon_act=0.99), calibration=FAMILIES["vit"].batch(2, 0))
    x, y = FAMILIES["vit"].batch(5, 1)
    with caplog.at_level(logging.WARNING, logger="wasi.layers"):
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
    said = [r.getMessage() for r in caplog.records if "calibration batch" in r.getMessage()]
    assert len(said) == 1 and "mode 0 of size 5" in said[0] and "calibration batch's (2)" in said[0]


def test_block_recompute_refuses_a_kv_cache_with_states():
    from transformers import DynamicCache

    model, (x, _) = _family("hf_llama")
    inject(model, WASIConfig(recompute="block"), calibration=(x, None))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.eval()
        model.model(**x, cache=cache, use_cache=True)
        model.train()
    assert cache.get_seq_length() > 0
    with pytest.raises(ValueError, match="cannot replay a block that reads a KV cache holding 7 positions"):
        model.model(**x, cache=cache, use_cache=True)


# --- optimizers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_update", ["factored", "reference"])
def test_other_optimizers_are_refused_at_their_first_step(weight_update):
    model, (x, y) = _family("vit")
    inject(model, WASIConfig(weight_update=weight_update), calibration=(x, y))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"AdamW cannot update WSI/WASI layers .*: build wasi.SubspaceSGD"):
        optimizer.step()
    copied = copy.deepcopy(model)  # deep copies are guarded as well
    with pytest.raises(RuntimeError, match="wasi.SubspaceSGD"):
        torch.optim.SGD([p for p in copied.parameters() if p.requires_grad], lr=0.1).step()


def test_any_optimizer_steps_asi_layers():
    """ASI keeps a dense weight with an ordinary .grad: AdamW trains it."""
    model, (x, y) = _family("vit")
    inject(model, WASIConfig(weight=False), calibration=(x, y))
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, before)


def test_subspace_sgd_max_grad_norm_clips_as_clip_grad_norm():
    family = FAMILIES["hf_llama"]
    (x, y), models = family.batch(2, 0), [family.build(), family.build()]
    for m in models:
        inject(m, WASIConfig(targets="mlp+attn"), calibration=(x, y))
    clipped = wasi.SubspaceSGD(models[0], lr=0.5, max_grad_norm=0.01)
    manual = wasi.SubspaceSGD(models[1], lr=0.5)
    for model, optimizer in ((models[0], clipped), (models[1], manual)):
        F.cross_entropy(logits_of(run_model(model, x)), y).backward()
        if optimizer is manual:
            assert wasi.clip_grad_norm_(model, 0.01) > 0.01  # clipping acts
        optimizer.step()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_transformers_trainer_with_clipping_over_the_factored_gradients(tmp_path):
    """transformers.Trainer with SubspaceSGD(max_grad_norm=...) and its own clipping off: the same weights as a plain
    loop of SubspaceSGD steps with wasi.clip_grad_norm_; its model.zero_grad() does not keep old factored grads."""
    from transformers import Trainer, TrainingArguments

    family = FAMILIES["hf_bert"]
    (x, y), models = family.batch(4, 0), [family.build(), family.build()]
    for m in models:
        inject(m, WASIConfig(epsilon_act=1.0), calibration=(x, y))  # full activation ranks: any batch order
    rows = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "labels": y[i]}
            for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
                             lr_scheduler_type="constant", max_grad_norm=0, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=models[0], args=args, train_dataset=rows,
                      optimizers=(wasi.SubspaceSGD(models[0], lr=0.5, max_grad_norm=0.05), None))
    trainer.train()
    optimizer = wasi.SubspaceSGD(models[1], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        models[1](**x, labels=y).loss.backward()
        assert wasi.clip_grad_norm_(models[1], 0.05) > 0.05
        optimizer.step()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


# --- loading -------------------------------------------------------------------------------------------------------

def test_a_dense_checkpoint_loads_into_an_injected_model():
    """A plain state_dict (weight, no L, R) loads with strict=True: a factored layer takes its rank-K SVD, so at
    full rank the injected model computes what the checkpoint's plain model does; GPT-2's Conv1D weights (I, O)
    are read transposed."""
    for name in ("vit", "hf_gpt2"):
        family = FAMILIES[name]
        model, (x, y) = family.build(), family.batch(2, 0)
        inject(model, WASIConfig(epsilon=1.0, recompute="none"), calibration=(x, y))
        trained = family.build()
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.load_state_dict(trained.state_dict(), strict=True)
        model.eval(), trained.eval()
        with torch.no_grad():
            torch.testing.assert_close(logits_of(run_model(model, x)), logits_of(run_model(trained, x)),
                                       atol=1e-5, rtol=1e-4)


def test_rebuild_refuses_a_foreign_record():
    model, batch = _family("vit")
    record = inject(model, WASIConfig(), calibration=batch).to_config()
    with pytest.raises(ValueError, match="not a WASI injection record"):
        wasi.rebuild(FAMILIES["vit"].build(), {"format": "other"})
    with pytest.raises(ValueError, match="which this model does not have as such a layer"):
        wasi.rebuild(FAMILIES["swin"].build(), record)
