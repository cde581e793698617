"""Text classification datasets from the `dataset` config group: raw splits of fields and labels, joined by one
template and tokenized by the model's tokenizer.

Each conf/dataset/<task>.yaml of a text task instantiates (partially) `build_text_datasets` with the raw loader under
`source` (also partial), so `hydra.utils.instantiate(cfg.dataset)(tokenizer=tok, max_length=L, seed=s)` gives
`DataSplits` whose items are ({"input_ids": (L,), "attention_mask": (L,)}, label): every sequence padded (or cut)
to exactly L tokens, so every batch has the same shape, as the authors' code pads BoolQ (and as the Tucker factors
of ASI/WASI, warm-started from one step to the next, need). A loader returns `RawSplits` of `Texts`.

`boolq` reads BoolQ through the Hugging Face `datasets` library from the hub (`aps/super_glue`, config `boolq`, as
the authors load it) or from a local folder laid out as that hub repo; offline, it fails in one line naming the fix.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from experiments.builders.models import hub_unreachable
from experiments.data.datasets import DatasetNotFoundError, DataSplits, RawSplits, check_classes, split_indices

log = logging.getLogger(__name__)


class Texts(Dataset):
    """A raw text split: items (fields, label), fields a mapping of the task's text fields (question, passage, …)."""

    def __init__(self, fields: Sequence[Mapping[str, str]], labels: Sequence[int]) -> None:
        if len(fields) != len(labels):
            raise ValueError(f"{len(fields)} texts but {len(labels)} labels")
        self.fields, self.labels = list(fields), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Mapping[str, str], int]:
        return self.fields[index], int(self.labels[index])


class Tokenized(Dataset):
    """Tokenized sequences: input_ids, attention_mask: (N, L) int64, labels: (N,) -> items
    ({"input_ids": (L,), "attention_mask": (L,)}, int label)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: np.ndarray) -> None:
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        inputs = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        return inputs, int(self.labels[index])


def build_text_datasets(source: Callable[[], RawSplits], name: str, num_classes: int, template: str,
                        val_fraction: float, *, tokenizer: Any, max_length: int, seed: int) -> DataSplits:
    """Load `source()`, join each item's fields with `template` (e.g. "{question} [SEP] {passage}") and tokenize
    every split with `tokenizer`, padded and truncated to `max_length` tokens. Unless the source has its own
    validation split, a `val_fraction` share of the training split, drawn with `seed`, becomes it. `num_classes`
    must cover every label (experiments.data.datasets.check_classes)."""
    raw = source()
    check_classes(raw, name, int(num_classes))
    if raw.val is None:
        train_idx, val_idx = split_indices(len(raw.train), float(val_fraction), seed)
        train, val = Subset(raw.train, train_idx), Subset(raw.train, val_idx)
    else:
        train, val = raw.train, raw.val
    splits = DataSplits(*(tokenize(split, template, tokenizer, int(max_length), part, name)
                          for part, split in (("train", train), ("val", val), ("test", raw.test))),
                        num_classes=int(num_classes))
    log.info("dataset %s: %d train, %d val, %d test sequences of %d tokens, %d classes", name, len(splits.train),
             len(splits.val), len(splits.test), max_length, splits.num_classes)
    return splits


def tokenize(split: Dataset, template: str, tokenizer: Any, max_length: int, part: str, name: str) -> Tokenized:
    """Every item of a raw text split joined by `template` and tokenized in one call (padding and truncation to
    max_length; the tokenizer's own padding and truncation sides). Logs how many sequences were cut."""
    items = [split[i] for i in range(len(split))]
    try:
        texts = [template.format(**fields) for fields, _ in items]
    except KeyError as err:
        fields = sorted(items[0][0]) if items else []
        raise ValueError(f"dataset.template={template!r} names the field {err}, which the {part} split of {name} does "
                         f"not have (its fields: {fields})") from None
    full = tokenizer(texts, truncation=False)["input_ids"]
    cut = sum(len(ids) > max_length for ids in full)
    if cut:
        log.warning("%s %s: %d of %d sequences are longer than model.max_length=%d tokens and are cut (%s side)",
                    name, part, cut, len(texts), max_length, tokenizer.truncation_side)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    labels = np.asarray([label for _, label in items], dtype=np.int64)
    return Tokenized(encoded["input_ids"].long(), encoded["attention_mask"].long(), labels)


# ---------------------------------------------------------------------------------------------
# BoolQ through the Hugging Face datasets library.
# ---------------------------------------------------------------------------------------------

def boolq(path: str = "aps/super_glue", name: str | None = "boolq", train_split: str = "train",
          test_split: str = "validation") -> RawSplits:
    """BoolQ (Clark et al., 2019; SuperGLUE): 9427 training and 3270 validation (question, passage) pairs with a
    yes/no label (1 = yes), read by `datasets.load_dataset(path, name)`: the hub's SuperGLUE repo (the authors'
    `load_dataset("super_glue", "boolq")`) or a local folder laid out as it (a README.md whose `configs` name the
    `boolq/<split>-*.parquet` files). SuperGLUE hides the test labels, so `test_split` is the validation split, as in
    the authors' runs; the validation split of a run is drawn from the training split (dataset.val_fraction)."""
    data = load_hub_dataset(path, name)
    missing = [s for s in (train_split, test_split) if s not in data]
    if missing:
        raise DatasetNotFoundError(f"{path} ({name}) has no split {missing[0]!r} (it has {sorted(data)}). Fix: "
                                   f"dataset.source.train_split / dataset.source.test_split among {sorted(data)}")
    return RawSplits(train=_boolq_texts(data[train_split], path), test=_boolq_texts(data[test_split], path))


def _boolq_texts(split: Any, path: str) -> Texts:
    columns = set(split.column_names)
    if not {"question", "passage", "label"} <= columns:
        raise ValueError(f"{path} is not BoolQ as SuperGLUE has it: it needs the columns question, passage and label "
                         f"(it has {sorted(columns)})")
    labels = np.asarray(split["label"], dtype=np.int64)
    if (labels < 0).any():
        raise ValueError(f"{path}: the split has {int((labels < 0).sum())} unlabelled items (label -1, as SuperGLUE's "
                         "hidden test split). Fix: dataset.source.test_split=validation")
    return Texts([{"question": q, "passage": p} for q, p in zip(split["question"], split["passage"])], labels)


def load_hub_dataset(path: str, name: str | None) -> Any:
    """`datasets.load_dataset(path, name)` (a DatasetDict of every split): a local folder as it is; a hub id from
    the hub after one quick reachability check, or from the `datasets` cache with HF_HUB_OFFLINE=1. A failure is
    DatasetNotFoundError naming the fix."""
    import datasets

    local = Path(path).expanduser().is_dir()
    fix = (f"Fix: on a machine with internet run `python -c \"import datasets; datasets.load_dataset('{path}', "
           f"{name!r})\"` and copy its cache (HF_HOME) here, then run with HF_HUB_OFFLINE=1; or download the repo's "
           f"data files (huggingface-cli download {path} --repo-type dataset --local-dir DIR) and set "
           "dataset.source.path=DIR")
    if not local and (unreachable := hub_unreachable(path, filename="README.md", repo_type="dataset")):
        if "HF_HUB_OFFLINE" not in unreachable:
            raise DatasetNotFoundError(f"the dataset {path} ({name}) cannot be downloaded: {unreachable}. {fix}")
    try:
        return datasets.load_dataset(path, name)
    except Exception as err:  # offline without a cached copy, a folder of another layout, a missing config
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        where = f"the folder {Path(path).absolute()}" if local else f"the hub dataset {path}"
        raise DatasetNotFoundError(f"{where} ({name}) cannot be loaded ({reason}). {fix}") from None
