"""Text and Hugging Face models from the `model` group: TinyLlama (its architecture written in the config, random
init without a download; offline, one line within seconds; from the Hugging Face cache without the network),
llama_tiny, the generic `model=timm` and `model=hf` configs, and an image model with a text dataset (or the other
way round) refused before anything is built, naming both settings."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from experiments import bench
from experiments.builders import hub
from experiments.builders.inputs import logits
from experiments.builders.models import PretrainedWeightsUnavailableError, build_model
from experiments.configuration.schema import ConfigError, validate
from experiments.data.yesno import word_tokenizer
from tests.helpers import compose, train

TINYLLAMA = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
WORDS = "model.tokenizer=checkpoints/words_tokenizer"
SMALL = ["model.config.hidden_size=32", "model.config.intermediate_size=88", "model.config.num_hidden_layers=2",
         "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2"]


def test_tinyllama_config_holds_its_architecture():
    cfg = compose("model=tinyllama", "dataset=yesno").model
    assert (cfg.hub_id, cfg.auto_class, cfg.inputs, cfg.tokenizer, cfg.max_length) == (
        TINYLLAMA, "AutoModelForSequenceClassification", "text", TINYLLAMA, 128)
    architecture = {k: cfg.config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "vocab_size")}
    assert architecture == dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                                num_key_value_heads=4, vocab_size=32000)


def test_tinyllama_at_random_init_is_built_from_its_config_without_a_download():
    cfg = compose("model=tinyllama", "dataset=yesno", "model.pretrained=false", WORDS, *SMALL).model
    model = build_model(cfg, 2)
    assert isinstance(model, transformers.LlamaForSequenceClassification) and model.training
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == (32, 2, 2, 32000)
    assert c.pad_token_id == word_tokenizer().pad_token_id and c.use_cache is False and c.num_labels == 2
    assert next(model.parameters()).dtype == torch.float32 and model.score.out_features == 2


def test_tinyllama_offline_fails_in_one_line_within_seconds_naming_the_fix():
    """conftest sets HF_HUB_OFFLINE=1 and the Hugging Face cache holds no TinyLlama."""
    start = time.monotonic()
    with pytest.raises(hub.TokenizerUnavailableError) as err:
        build_model(compose("model=tinyllama", "dataset=yesno").model, 2)
    assert "\n" not in str(err.value) and "model.tokenizer=checkpoints/words_tokenizer" in str(err.value)
    with pytest.raises(PretrainedWeightsUnavailableError) as err:  # with a tokenizer at hand: the weights
        build_model(compose("model=tinyllama", "dataset=yesno", WORDS).model, 2)
    message = str(err.value)
    assert "\n" not in message and TINYLLAMA in message and "model.pretrained=false" in message
    assert "AutoModelForSequenceClassification.from_pretrained" in message and "model.hub_id=" in message
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_train_py_with_tinyllama_offline_ends_with_one_line(tmp_path):
    start = time.monotonic()
    proc = train("model=tinyllama", "dataset=yesno", f"hydra.run.dir={tmp_path}", "logger.mode=disabled", check=False)
    assert proc.returncode == 1 and time.monotonic() - start < 60
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TokenizerUnavailableError: Could not load the tokenizer")


def fake_hub_repo(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """The Hugging Face cache layout (models--org--name/refs/main + snapshots/<commit>/<files>)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())


@pytest.mark.slow  # make test-slow
def test_tinyllama_from_the_cache_loads_its_weights_without_the_network(tmp_path, monkeypatch):
    """A TinyLlama-shaped checkpoint (small widths) and the word tokenizer written into the cache as the hub lays
    them out: from_pretrained reads them with the network off, weights and all, and a fresh `score` head."""
    import huggingface_hub

    saved = tmp_path / "saved"
    torch.manual_seed(0)
    causal = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=88,
                                                                    num_hidden_layers=2, num_attention_heads=4,
                                                                    num_key_value_heads=2))
    causal.save_pretrained(str(saved))
    word_tokenizer().save_pretrained(str(saved))
    fake_hub_repo(tmp_path / "cache", TINYLLAMA, {p.name: p for p in saved.iterdir()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_unreachable", lambda *a, **k: pytest.fail("the hub was asked"))
    model = build_model(compose("model=tinyllama", "dataset=yesno").model, 2)
    assert model.config.hidden_size == 32 and model.score.out_features == 2
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in causal.state_dict().items() if k in own and k != "lm_head.weight")
    assert sum(k in own for k in causal.state_dict()) == len(own) - 1  # every weight but the new head


def test_llama_tiny_takes_token_ids_and_gives_logits():
    cfg = compose("model=llama_tiny", "dataset=yesno").model
    model = build_model(cfg, 2)
    assert model.config.vocab_size == len(word_tokenizer()) and model.config.num_hidden_layers == 4
    ids = torch.randint(0, model.config.vocab_size, (3, cfg.max_length))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    assert logits(model, {"input_ids": ids, "attention_mask": mask}).shape == (3, 2)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 300_000


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    cfg = compose("model=llama_tiny", "dataset=yesno", "model.config.vocab_size=10").model
    size = len(word_tokenizer())
    with pytest.raises(ConfigError, match=rf"model.config.vocab_size=10: the tokenizer .* has {size} tok"):
        build_model(cfg, 2)


def test_max_length_beyond_the_models_positions_is_refused():
    cfg = compose("model=llama_tiny", "dataset=yesno", "model.max_length=200").model
    with pytest.raises(ConfigError, match=r"model.max_length=200: llama_tiny has 128 positions"):
        build_model(cfg, 2)


# ----------------------------------------------------------------------------- model=timm, model=hf


def test_model_timm_builds_any_timm_model_by_name():
    cfg = compose("model=timm", "model.name=deit_tiny_patch16_224", "model.pretrained=false", "model.image_size=32",
                  "+model.kwargs.img_size=32", "+model.kwargs.depth=1").model
    model = build_model(cfg, 4)
    assert model.default_cfg["architecture"] == "deit_tiny_patch16_224" and model.get_classifier().out_features == 4
    with pytest.raises(ConfigError, match=r"model.name has no value"):
        validate(compose("model=timm", run_dir=Path("unused")))


def test_model_timm_pretrained_offline_fails_in_one_line():
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailableError, match="model.pretrained=false"):
        build_model(compose("model=timm", "model.name=deit_tiny_patch16_224").model, 4)
    assert time.monotonic() - start < 10


def hf_image_folder(folder: Path, labels: int = 3) -> transformers.ViTForImageClassification:
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=labels))
    model.save_pretrained(str(folder))
    return model


def test_model_hf_loads_a_hugging_face_image_classifier(tmp_path):
    saved = hf_image_folder(tmp_path / "vit")
    cfg = compose("model=hf", f"model.name={tmp_path / 'vit'}", "model.image_size=32").model
    model = build_model(cfg, 3)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())  # its weights
    other = build_model(compose("model=hf", f"model.name={tmp_path / 'vit'}", "model.image_size=32").model, 5)
    assert other.classifier.out_features == 5  # a head for the dataset's classes
    assert torch.equal(other.vit.embeddings.patch_embeddings.projection.weight,
                       saved.vit.embeddings.patch_embeddings.projection.weight)
    fresh = build_model(compose("model=hf", f"model.name={tmp_path / 'vit'}", "model.image_size=32",
                                "model.pretrained=false").model, 3)
    assert not torch.equal(fresh.vit.embeddings.patch_embeddings.projection.weight,
                           saved.vit.embeddings.patch_embeddings.projection.weight)
    assert logits(model, torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ConfigError, match=r"model.image_size=64: .* takes 32x32 images.*Fix: model.image_size=32"):
        build_model(compose("model=hf", f"model.name={tmp_path / 'vit'}", "model.image_size=64").model, 3)


def test_model_hf_offline_fails_in_one_line_within_seconds():
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailableError) as err:
        build_model(compose("model=hf", "model.name=google/vit-base-patch16-224").model, 3)
    assert time.monotonic() - start < 10 and "\n" not in str(err.value)
    assert "AutoModelForImageClassification.from_pretrained" in str(err.value) and "model.hub_id=" in str(err.value)


def test_a_local_checkpoint_file_loads_into_a_hugging_face_model(tmp_path):
    cfg = compose("model=llama_tiny", "dataset=yesno").model
    source = build_model(cfg, 2)
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("score")},
              str(tmp_path / "backbone.safetensors"))
    loaded = build_model(compose("model=llama_tiny", "dataset=yesno",
                                 f"model.checkpoint={tmp_path / 'backbone.safetensors'}", "seed=1").model, 2)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items() if k != "score.weight")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("model,dataset,takes,gives", [
    ("vit_tiny_cpu", "yesno", "images", "text (token ids and an attention mask)"),
    ("llama_tiny", "shapes", "text (token ids and an attention mask)", "images"),
])
def test_a_model_and_a_dataset_of_other_inputs_are_refused_naming_both(model, dataset, takes, gives, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(compose(f"model={model}", f"dataset={dataset}", run_dir=tmp_path / "run"))
    message = str(err.value)
    assert message.startswith(f"model.name={model} takes {takes} and dataset.name={dataset} gives {gives}")
    assert "Fix: a " in message and "\n" not in message
    if model == "llama_tiny":  # what train.py prints, once (a subprocess: seconds)
        proc = train(f"model={model}", f"dataset={dataset}", f"hydra.run.dir={tmp_path / 'cli'}",
                     "logger.mode=disabled",
                     check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}"
        assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [".hydra", "train.log"]  # nothing built
    with pytest.raises(ConfigError, match=f"model.name={model} takes"):
        bench.main(["--model", model, "--data", dataset, "--out", str(tmp_path / "bench")])
    assert not (tmp_path / "bench").exists()
