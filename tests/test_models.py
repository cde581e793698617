"""Model building: fresh head, local checkpoints loaded safely, clear errors, no silent random weights."""
import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from experiments.models import CheckpointMismatchError, PretrainedWeightsUnavailableError, build_model

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


def test_checkpoint_of_other_model_is_rejected(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=3)
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError, match="unexpected.*blocks.2"):
        build_model(cfg(checkpoint=str(path)), num_classes=10)


def test_checkpoint_with_wrong_shapes_is_rejected(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError, match="other shapes"):
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
