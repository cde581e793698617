"""Model building: fresh head, local checkpoints loaded safely, clear errors, no silent random weights;
pretrained weights from the local Hugging Face cache without the network, and a fast error without."""
import time

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from experiments.builders.models import CheckpointMismatchError, PretrainedWeightsUnavailableError, build_model

TINY = dict(timm_name="vit_tiny_patch16_224", image_size=32, kwargs=dict(img_size=32, patch_size=8, depth=2))


def cfg(**over):
    return OmegaConf.create({"name": "t", "pretrained": False, "checkpoint": None, **TINY, **over})


def test_head_sized_for_dataset():
    model = build_model(cfg(), num_classes=7)
    assert model.get_classifier().out_features == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_loads_backbone_and_replaces_head(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model(TINY["timm_name"], num_classes=1000, **TINY["kwargs"])
    path = tmp_path / f"w{suffix}"
    state = source.state_dict()
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model = build_model(cfg(checkpoint=str(path)), num_classes=5)
    for name, value in model.state_dict().items():
        if not name.startswith("head"):
            assert torch.equal(value, state[name]), name
    assert model.get_classifier().out_features == 5


@pytest.mark.parametrize("other, message", [
    (dict(patch_size=8, depth=3), "unexpected.*blocks.2"),  # another model: a block too many
    (dict(patch_size=4, depth=2), "other shapes"),  # the same blocks, other patches
])
def test_checkpoint_of_another_architecture_is_rejected(tmp_path, other, message):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, **other).state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError, match=message):
        build_model(cfg(checkpoint=str(path)), num_classes=10)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        build_model(cfg(checkpoint=str(tmp_path / "nope.safetensors")), num_classes=10)


def test_pretrained_offline_is_an_error_not_random_weights(tmp_path, monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1, so the hub cannot be reached; the cache is empty."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailableError, match="model.checkpoint=") as err:
        build_model(cfg(pretrained=True), num_classes=10)
    assert "model.pretrained=false" in str(err.value)


def fake_hub_cache(cache, repo: str, state: dict) -> None:
    """The Hugging Face cache layout (models--org--name/refs/main + snapshots/<commit>/model.safetensors)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(state, str(folder / "snapshots" / ("0" * 40) / "model.safetensors"))


def test_pretrained_weights_in_the_cache_load_without_the_network(tmp_path, monkeypatch):
    import huggingface_hub

    torch.manual_seed(0)
    source = timm.create_model(TINY["timm_name"], num_classes=1000, **TINY["kwargs"])
    fake_hub_cache(tmp_path, timm.models.get_pretrained_cfg(TINY["timm_name"]).hf_hub_id, source.state_dict())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_hub)
    model = build_model(cfg(pretrained=True), num_classes=10)
    for name, value in model.state_dict().items():
        if not name.startswith("head"):
            assert torch.equal(value, source.state_dict()[name]), name
    assert model.get_classifier().out_features == 10


def test_an_unreachable_hub_fails_at_once_with_the_fix(tmp_path, monkeypatch):
    """Not in offline mode, no cache, the hub refuses connections: one probe, no retries."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailableError, match="cannot reach the Hugging Face hub") as err:
        build_model(cfg(pretrained=True), num_classes=10)
    assert time.monotonic() - start < 5  # on main: ~50 s of retries
    assert "model.checkpoint=" in str(err.value) and "model.pretrained=false" in str(err.value)
