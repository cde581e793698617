"""Tiny random-init models of every family the library is tested on (timm and Hugging Face transformers), built
from small configs without any download, with a matching calibration batch."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

CLASSES = 3


@dataclass(frozen=True)
class Family:
    """build(): a fresh model, the same weights every call; batch(n, seed): (inputs, labels) for it: images
    (n, 3, S, S), or a Hugging Face text model's keyword inputs (input_ids, attention_mask: (n, 7))."""

    build: Callable[[], nn.Module]
    batch: Callable[[int, int], tuple[Any, torch.Tensor]]


def _images(size: int) -> Callable[[int, int], tuple[Any, torch.Tensor]]:
    def batch(n: int = 2, seed: int = 0) -> tuple[Any, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return batch


def _tokens(vocab: int = 40, length: int = 7) -> Callable[[int, int], tuple[Any, torch.Tensor]]:
    def batch(n: int = 2, seed: int = 0) -> tuple[Any, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, vocab, (n, length), generator=g)
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, -2:] = 0  # one padded sequence: attention masks reach the blocks
        return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, CLASSES, (n,), generator=g)
    return batch


def _timm(name: str, size: int, **kwargs: Any) -> Family:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
    return Family(build, _images(size))


def _hf(config: Callable[[], Any], model: str, batch: Callable[[int, int], tuple[Any, torch.Tensor]]) -> Family:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, model)(config()).train()
    return Family(build, batch)


def _hf_config(name: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, name)(num_labels=CLASSES, **kwargs)
    return make


VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)
TIMM: dict[str, Family] = {
    "vit": _timm("vit_tiny_patch16_224", 32, **VIT),
    "deit_distilled": _timm("deit_tiny_distilled_patch16_224", 32, **VIT),
    "deit3": _timm("deit3_small_patch16_224", 32, **VIT),
    "dinov2_reg": _timm("vit_small_patch14_reg4_dinov2", 28, img_size=28, patch_size=7, depth=2, embed_dim=48,
                        num_heads=2),
    "clip": _timm("vit_base_patch16_clip_224", 32, **VIT),
    "beit": _timm("beit_base_patch16_224", 32, **VIT),
    "cait": _timm("cait_xxs24_224", 32, **VIT),
    "xcit": _timm("xcit_nano_12_p16_224", 32, img_size=32, depth=2, embed_dim=48, num_heads=2),
    "convit": _timm("convit_tiny", 32, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=4,
                    local_up_to_layer=1),
    "hiera": _timm("hiera_tiny_224", 64, img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)),
    "vit_relpos": _timm("vit_relpos_small_patch16_224", 32, **VIT),
    "eva02": _timm("eva02_tiny_patch14_224", 28, img_size=28, patch_size=7, depth=2, embed_dim=48, num_heads=2),
    "swin": _timm("swin_tiny_patch4_window7_224", 56, img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                  window_size=7, drop_path_rate=0.0),
    "swinv2": _timm("swinv2_tiny_window8_256", 64, img_size=64, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                    window_size=8, drop_path_rate=0.0),
    "pvt_v2": _timm("pvt_v2_b0", 64, depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2),
                    drop_path_rate=0.0),
    "tiny_vit": _timm("tiny_vit_5m_224", 64, embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1),
                      num_heads=(1, 1, 2, 2), window_sizes=(2, 2, 2, 2), drop_path_rate=0.0),
    "davit": _timm("davit_tiny", 64, embed_dims=(24, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                   drop_path_rate=0.0),
    "maxvit": _timm("maxvit_rmlp_pico_rw_256", 64, img_size=64, embed_dim=(32, 32, 64, 64), depths=(1, 1, 1, 1),
                    drop_path_rate=0.0),
}
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
HF: dict[str, Family] = {
    "hf_vit": _hf(_hf_config("ViTConfig", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, **NO_DROPOUT),
                  "ViTForImageClassification", _images(32)),
    "hf_dinov2": _hf(_hf_config("Dinov2Config", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, mlp_ratio=2, **NO_DROPOUT),
                     "Dinov2ForImageClassification", _images(32)),
    "hf_dinov2_swiglu": _hf(_hf_config("Dinov2Config", image_size=32, patch_size=8, hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, use_swiglu_ffn=True,
                                       **NO_DROPOUT),
                            "Dinov2ForImageClassification", _images(32)),
    "hf_bert": _hf(_hf_config("BertConfig", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, **NO_DROPOUT),
                   "BertForSequenceClassification", _tokens()),
    "hf_gpt2": _hf(_hf_config("GPT2Config", vocab_size=40, n_embd=32, n_layer=2, n_head=2, pad_token_id=0,
                              bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                   "GPT2ForSequenceClassification", _tokens()),
    "hf_llama": _hf(_hf_config("LlamaConfig", vocab_size=40, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                               use_cache=False),
                    "LlamaForSequenceClassification", _tokens()),
}
FAMILIES: dict[str, Family] = {**TIMM, **HF}
