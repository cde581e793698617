"""Fashion-MNIST, Food-101 and ISIC 2018 loaders on tiny files in their real on-disk formats (IDX gzip, the
Food-101 meta JSON, the ISIC 2018 task 3 folders and one-hot CSVs), offline. Never the installed package."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from experiments.data import datasets as data
from experiments.data.datasets import DatasetNotFoundError
from tests.test_data import CIFAR, IMAGENET, build_datasets, colour, dataset_cfg, decode, save_jpeg


def write_idx(path: Path, array: np.ndarray) -> None:
    """`array` (uint8) as a gzip'd IDX file: magic 0x0000 08 <ndim>, big-endian int32 sizes, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def grey(label: int, uid: int) -> int:
    return 10 * label + uid % 10  # a grey level that encodes the item


def write_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 10) -> dict[str, list[tuple[int, int]]]:
    """The four Fashion-MNIST files with uniform 28x28 images; returns the (label, grey) items per split."""
    items = {}
    for prefix, n, start in (("train", n_train, 0), ("t10k", n_test, n_train)):
        labels = np.array([uid % 10 for uid in range(start, start + n)])
        levels = np.array([grey(y, uid) for y, uid in zip(labels, range(start, start + n))])
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.broadcast_to(levels[:, None, None], (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        items[prefix] = sorted(zip(labels.tolist(), levels.tolist()))
    return items


def grey_items(split) -> list[tuple[int, int]]:
    """(label, grey level) of every item, checking it is a uniform grey image in all three channels."""
    out = []
    for x, y in split:
        assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
        pixels = (x[0] * 0.5 + 0.5) * 255
        assert pixels.max() - pixels.min() < 0.5
        out.append((y, round(pixels.mean().item())))
    return sorted(out)


def fashion_cfg(tmp_path: Path, **source):
    return dataset_cfg("fashion_mnist", root=str(tmp_path / "data"), system_dir=str(tmp_path / "system"), **source)


def test_fashion_mnist_from_the_system_folder_unpacked_into_torchvisions_layout(tmp_path):
    items = write_fashion_mnist(tmp_path / "system")
    splits = build_datasets(fashion_cfg(tmp_path), image_size=32, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (32, 8, 10, 10)
    assert sorted(grey_items(splits.train) + grey_items(splits.val)) == items["train"]
    assert grey_items(splits.test) == items["t10k"]
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(n.removesuffix(".gz") for n in data.FASHION_MNIST_FILES)
    (tmp_path / "system" / "train-images-idx3-ubyte.gz").unlink()  # unpacked once: the system copy is not needed
    again = build_datasets(fashion_cfg(tmp_path), image_size=32, seed=0)
    assert grey_items(again.test) == items["t10k"]


def test_fashion_mnist_from_the_data_dir(tmp_path):
    items = write_fashion_mnist(tmp_path / "data" / "fashion-mnist")
    splits = build_datasets(fashion_cfg(tmp_path), image_size=32, seed=0)
    assert grey_items(splits.test) == items["t10k"]


def test_fashion_mnist_training_subset_is_stratified_fixed_and_leaves_the_test_split(tmp_path):
    items = write_fashion_mnist(tmp_path / "system", n_train=60, n_test=20)
    splits = [build_datasets(fashion_cfg(tmp_path, train_size=20), image_size=32, seed=s) for s in (0, 1)]
    kept = [sorted(grey_items(s.train) + grey_items(s.val)) for s in splits]
    assert kept[0] == kept[1] and len(kept[0]) == 20 and set(kept[0]) <= set(items["train"])  # seed-independent
    assert np.bincount([y for y, _ in kept[0]]).tolist() == [2] * 10
    assert len(splits[0].val) == 4 and grey_items(splits[0].test) == items["t10k"]  # the test split: all of it
    with pytest.raises(ValueError, match=r"dataset.source.train_size=61: must be in \[1, 60\]"):
        build_datasets(fashion_cfg(tmp_path, train_size=61), image_size=32, seed=0)


def test_fashion_mnist_missing_offline_names_the_package_and_the_setting(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(fashion_cfg(tmp_path), image_size=32, seed=0)
    message = str(info.value)
    assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
    assert "dataset.source.download=true" in message and str(tmp_path / "system") in message


def test_food101_meta_json_layout(tmp_path):
    base, classes = tmp_path / "food-101", ["apple_pie", "baby_back_ribs", "baklava"]
    meta = {}
    for split, uids in (("train", range(12)), ("test", range(12, 18))):
        meta[split] = {c: [] for c in classes}
        for uid in uids:
            label = uid % 3
            save_jpeg(base / "images" / classes[label] / f"{uid}.jpg", colour(label, uid))
            meta[split][classes[label]].append(f"{classes[label]}/{uid}")
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))

    splits = build_datasets(dataset_cfg("food101", root=str(tmp_path)), image_size=16, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (10, 2, 6, 101)
    train = decode(splits.train, 16, IMAGENET, 3) + decode(splits.val, 16, IMAGENET, 3)
    assert sorted(train) == sorted((uid % 3, uid) for uid in range(12))  # label = the class's index in sorted order
    assert sorted(decode(splits.test, 16, IMAGENET, 3)) == sorted((uid % 3, uid) for uid in range(12, 18))


def test_food101_missing_names_path_and_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(dataset_cfg("food101", root=str(tmp_path)), image_size=16, seed=0)
    message = str(info.value)
    assert str(tmp_path / "food-101") in message and "dataset.source.download=true" in message
    assert "paths.data_dir=" in message and "\n" not in message


def write_isic(base: Path, split: str, uids: range) -> list[tuple[int, int]]:
    """ISIC 2018 task 3 images and one-hot ground truth of one split (as the challenge's zips unpack)."""
    name = f"ISIC2018_Task3_{split}"
    rows, items = [], []
    for uid in uids:
        label = (3 * uid) % 7
        image = f"ISIC_{24306 + uid:07d}"
        save_jpeg(base / f"{name}_Input" / f"{image}.jpg", colour(label, uid))
        rows.append({"image": image, **{c: float(i == label) for i, c in enumerate(data.ISIC2018_CLASSES)}})
        items.append((label, uid))
    csv = base / f"{name}_GroundTruth" / f"{name}_GroundTruth.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(csv, index=False)  # header: image,MEL,NV,BCC,AKIEC,BKL,DF,VASC; values 0.0/1.0
    return items


def test_isic2018_folders_and_one_hot_csv(tmp_path):
    base = tmp_path / "isic2018"
    train = write_isic(base, "Training", range(20))
    validation = write_isic(base, "Validation", range(20, 27))
    test = write_isic(base, "Test", range(27, 30))
    assert (base / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv").read_text(
    ).startswith("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_0024306,1.0,0.0,")
    splits = build_datasets(dataset_cfg("isic2018", root=str(tmp_path)), image_size=16, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (16, 4, 7, 7)
    assert sorted(decode(splits.train, 16, IMAGENET, 3) + decode(splits.val, 16, IMAGENET, 3)) == sorted(train)
    assert sorted(decode(splits.test, 16, IMAGENET, 3)) == sorted(validation)
    official = build_datasets(dataset_cfg("isic2018", root=str(tmp_path), test_split="test"), image_size=16, seed=0)
    assert sorted(decode(official.test, 16, IMAGENET, 3)) == sorted(test)


def test_isic2018_missing_or_malformed_files_say_what_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(dataset_cfg("isic2018", root=str(tmp_path)), image_size=16, seed=0)
    message = str(info.value)
    assert str(tmp_path / "isic2018" / "ISIC2018_Task3_Training_Input") in message
    assert "challenge.isic-archive.com" in message and "paths.data_dir=" in message and "\n" not in message
    base = tmp_path / "isic2018"
    write_isic(base, "Training", range(6))
    write_isic(base, "Validation", range(6, 8))
    (base / "ISIC2018_Task3_Training_Input" / "ISIC_0024307.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match="1 images listed in .* are not in"):
        build_datasets(dataset_cfg("isic2018", root=str(tmp_path)), image_size=16, seed=0)
    csv = base / "ISIC2018_Task3_Validation_GroundTruth" / "ISIC2018_Task3_Validation_GroundTruth.csv"
    pd.read_csv(csv).drop(columns="VASC").to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"missing \['VASC'\]"):
        data.isic2018_split(base, "validation")
    with pytest.raises(ValueError, match="test_split=val: must be validation or test"):
        data.isic2018(str(tmp_path), test_split="val")


def test_the_grey_fashion_images_use_the_yaml_statistics():
    cfg = dataset_cfg("fashion_mnist")
    assert (list(cfg.mean), list(cfg.std)) == CIFAR and cfg.source.train_size is None
