"""Text datasets: the generated yes/no task (deterministic, balanced, answered by its passage), the shipped word
tokenizer (the one the code builds), tokenized splits (padded token ids and masks, the template, cut sequences
said), and BoolQ through the `datasets` library from files in the hub's layout, failing offline in one line."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from experiments import REPO_ROOT
from experiments.builders.inputs import data_arguments
from experiments.data import text, yesno
from experiments.data.datasets import DatasetNotFoundError
from tests.helpers import compose

SHIPPED_TOKENIZER = REPO_ROOT / "checkpoints" / "words_tokenizer"


def texts(split) -> list[tuple[dict, int]]:
    return [split[i] for i in range(len(split))]


def test_yesno_is_deterministic_balanced_and_answered_by_its_passage():
    raw = yesno.yesno(train_size=600, test_size=200, seed=3)
    assert texts(raw.train) == texts(yesno.yesno(train_size=600, test_size=200, seed=3).train)
    assert texts(raw.train) != texts(yesno.yesno(train_size=600, test_size=200, seed=4).train)
    items = texts(raw.train) + texts(raw.test)
    assert 0.4 < sum(label for _, label in items) / len(items) < 0.6
    kinds = {"animal": 0, "kind": 0}
    for fields, label in items:  # an independent reading of every item: is what the question asks in the passage?
        asked = fields["question"].split()[-1]
        words = set(fields["passage"].replace(".", " ").split())
        if asked in yesno.KINDS:
            kinds["kind"] += 1
            assert bool(words & set(yesno.KINDS[asked])) == bool(label), fields
        else:
            kinds["animal"] += 1
            assert (asked in words) == bool(label), fields
        assert 3 <= fields["passage"].count(".") <= 7
    assert min(kinds.values()) > 0.4 * len(items)  # both kinds of question


def test_yesno_passage_length_is_a_setting():
    raw = yesno.yesno(train_size=50, test_size=10, seed=0, sentences=[12, 16])
    assert all(12 <= fields["passage"].count(".") <= 16 for fields, _ in texts(raw.train))
    with pytest.raises(ValueError, match=r"dataset.source.sentences=\[5, 2\]"):
        yesno.yesno(sentences=[5, 2])


def test_the_shipped_tokenizer_is_the_one_the_code_builds(tmp_path):
    yesno.word_tokenizer().save_pretrained(str(tmp_path))
    built, shipped = (json.loads((folder / "tokenizer.json").read_text()) for folder in (tmp_path, SHIPPED_TOKENIZER))
    assert built == shipped
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER))
    vocab = tokenizer.get_vocab()
    assert set(yesno.VOCABULARY) | set(yesno.SPECIAL_TOKENS) == set(vocab) and len(tokenizer) == len(vocab)
    ids = tokenizer("The owl is RED . [SEP] is there a zebra")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", "owl", "is", "red", ".", "[SEP]", "is", "there", "a",
                                                    "[UNK]"]
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "right"


def text_cfg(*overrides: str):
    return compose("model=llama_tiny", "dataset=yesno", "dataset.source.train_size=50", "dataset.source.test_size=20",
                   *overrides)


def test_text_splits_are_padded_token_ids_and_masks_in_the_template():
    cfg = text_cfg()
    arguments = data_arguments(cfg.model)
    splits = hydra.utils.instantiate(cfg.dataset)(**arguments, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (40, 10, 20, 2)
    tokenizer, length = arguments["tokenizer"], cfg.model.max_length
    raw = yesno.yesno(train_size=50, test_size=20, seed=0)
    for i in range(len(splits.test)):
        x, label = splits.test[i]
        fields, raw_label = raw.test[i]
        assert x["input_ids"].shape == x["attention_mask"].shape == (length,) and label == raw_label
        n = int(x["attention_mask"].sum())
        assert x["attention_mask"][:n].all() and not x["attention_mask"][n:].any()  # padded on the right
        assert (x["input_ids"][n:] == tokenizer.pad_token_id).all()
        assert tokenizer.decode(x["input_ids"][:n]) == f"{fields['passage']} [SEP] {fields['question']}"
    batch, labels = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=4)))
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape == (4, length)
    assert labels.dtype == torch.int64


def test_a_sequence_longer_than_max_length_is_cut_and_said(caplog):
    cfg = text_cfg("model.max_length=8")
    with caplog.at_level(logging.WARNING):
        splits = hydra.utils.instantiate(cfg.dataset)(**data_arguments(cfg.model), seed=0)
    assert splits.train[0][0]["attention_mask"].all()
    assert any("longer than model.max_length=8 tokens and are cut (right side)" in r.message for r in caplog.records)


def test_a_template_naming_a_missing_field_is_refused():
    cfg = text_cfg("dataset.template='{question} {answer}'")
    with pytest.raises(ValueError, match=r"names the field 'answer'.*its fields: \['passage', 'question'\]"):
        hydra.utils.instantiate(cfg.dataset)(**data_arguments(cfg.model), seed=0)


# ----------------------------------------------------------------------------- BoolQ


BOOLQ = {"train": [("is the sky blue", "The sky is blue on a clear day.", 1),
                   ("do fish fly", "Fish swim in water; few glide.", 0)] * 10,
         "validation": [("is water wet", "Water makes things wet.", 1), ("is fire cold", "Fire is hot.", 0)] * 3,
         "test": [("is grass green", "Grass is green.", -1)] * 2}


def hub_layout(folder: Path) -> Path:
    """BoolQ as the hub's SuperGLUE repo lays it out: boolq/<split>-00000-of-00001.parquet with the columns question,
    passage, idx, label (test: -1, hidden), and a README.md whose YAML `configs` name the files of each config."""
    (folder / "boolq").mkdir(parents=True)
    for split, rows in BOOLQ.items():
        frame = pd.DataFrame([{"question": q, "passage": p, "idx": i, "label": y} for i, (q, p, y) in enumerate(rows)])
        frame.to_parquet(folder / "boolq" / f"{split}-00000-of-00001.parquet", index=False)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: boolq\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: boolq/{split}-*\n" for split in BOOLQ)
        + "---\n# SuperGLUE\n")
    return folder


def test_boolq_reads_the_hubs_layout_through_datasets(tmp_path):
    folder = hub_layout(tmp_path / "super_glue")
    raw = text.boolq(path=str(folder))
    assert len(raw.train) == 20 and len(raw.test) == 6  # SuperGLUE's test labels are hidden: its validation tests
    assert raw.test[0] == ({"question": "is water wet", "passage": "Water makes things wet."}, 1)
    cfg = compose("model=llama_tiny", "dataset=boolq", f"dataset.source.path={folder}")
    splits = hydra.utils.instantiate(cfg.dataset)(**data_arguments(cfg.model), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 6)  # dataset.val_fraction=0.1
    tokenizer = data_arguments(cfg.model)["tokenizer"]
    x, label = splits.test[1]
    n = int(x["attention_mask"].sum())
    # the template
    assert label == 0 and tokenizer.decode(x["input_ids"][:n]) == "is [UNK] [UNK] [SEP] [UNK] is [UNK] ."
    with pytest.raises(ValueError, match="unlabelled items .* dataset.source.test_split=validation"):
        text.boolq(path=str(folder), test_split="test")


def test_boolq_offline_fails_in_one_line_naming_the_fix():
    """conftest sets HF_HUB_OFFLINE=1 and the datasets cache has no BoolQ."""
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as err:
        text.boolq()
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "\n" not in message and "aps/super_glue" in message
    assert "dataset.source.path=DIR" in message and "HF_HUB_OFFLINE=1" in message


def test_boolq_without_a_network_fails_at_once(monkeypatch):
    monkeypatch.setattr(text, "hub_unreachable", lambda *a, **k: "cannot reach the Hugging Face hub (no network)")
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded: cannot reach the Hugging Face hub"):
        text.boolq()
    assert time.monotonic() - start < 2
