"""Datasets from the `dataset` config group: raw splits, paper preprocessing, validation split.

Each `conf/dataset/*.yaml` instantiates (partially) `build_datasets`, with the raw loader nested
under `source` (also partial), so `hydra.utils.instantiate(cfg.dataset)(image_size=S, seed=s)` gives
`DataSplits`. A loader returns `RawSplits` of (PIL RGB image, int label); loaders that read files
raise `DatasetNotFoundError` (path + fix) when the files are absent.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd
from torchvision import transforms as T

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk; the message names the expected path and the fix."""


@dataclass
class RawSplits:
    """Splits as loaded, items (PIL RGB image, int label); `val` only where the dataset ships one."""

    train: Dataset
    test: Dataset
    val: Dataset | None = None


@dataclass
class DataSplits:
    """Model-ready splits; items (image: (3, S, S) float32 normalised, label: int)."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int


class Transformed(Dataset):
    """Applies `transform` to the image of each (image, label) item of `base`."""

    def __init__(self, base: Dataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), int(label)


def build_datasets(source: Callable[[], RawSplits], name: str, num_classes: int, mean: Sequence[float],
                   std: Sequence[float], val_fraction: float, hflip: bool = False, *, image_size: int,
                   seed: int) -> DataSplits:
    """Load `source()` and preprocess as in the paper.

    Images are resized (not cropped) to (image_size, image_size), scaled to [0, 1] and normalised
    with `mean`/`std`; `hflip` adds random horizontal flips to training images only. Unless the
    source has its own validation split, a `val_fraction` share of the training split, drawn with
    `seed`, becomes the validation split.
    """
    raw = source()
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    eval_tf = image_transform(image_size, mean, std)
    train_tf = image_transform(image_size, mean, std, hflip=bool(hflip))
    if raw.val is None:
        train_idx, val_idx = split_indices(len(raw.train), float(val_fraction), seed)
        train, val = Subset(raw.train, train_idx), Subset(raw.train, val_idx)
    else:
        train, val = raw.train, raw.val
    splits = DataSplits(train=Transformed(train, train_tf), val=Transformed(val, eval_tf),
                        test=Transformed(raw.test, eval_tf), num_classes=int(num_classes))
    log.info("dataset %s: %d train, %d val, %d test images at %dx%d, %d classes", name, len(splits.train),
             len(splits.val), len(splits.test), image_size, image_size, splits.num_classes)
    return splits


def image_transform(
    image_size: int, mean: list[float], std: list[float], hflip: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> (3, image_size, image_size) float32, `(x / 255 - mean) / std` per channel."""
    resize = [T.Resize((image_size, image_size), antialias=True)]
    flip = [T.RandomHorizontalFlip()] if hflip else []
    return T.Compose([*resize, *flip, T.ToTensor(), T.Normalize(mean, std)])


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint (train, val) index lists covering range(n); val has round(fraction * n) items."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(fraction * n)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class ArrayImages(Dataset):
    """images: (N, H, W) grey or (N, H, W, 3) RGB uint8, labels: (N,) -> items (PIL RGB, int)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.labels[index])


# ---------------------------------------------------------------------------------------------
# Offline real data and torchvision datasets.
# ---------------------------------------------------------------------------------------------

def digits(test_fraction: float = 0.2) -> RawSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1797, 10 classes), 0..16 scaled to 0..255.

    The test split is a fixed stratified `test_fraction` (random_state 0), the same for every run.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=test_fraction, stratify=bunch.target, random_state=0
    )
    return RawSplits(
        train=ArrayImages(images[train_idx], bunch.target[train_idx]),
        test=ArrayImages(images[test_idx], bunch.target[test_idx]),
    )


def _torchvision(cls: type[tvd.VisionDataset], folder: str, root: str, download: bool, **split: Any) -> Dataset:
    """`cls(root, download=download, **split)`, turning "not found" into DatasetNotFoundError."""
    try:
        return cls(root, download=download, **split)
    except (RuntimeError, FileNotFoundError) as err:
        if isinstance(err, RuntimeError) and "not found" not in str(err):
            raise
        path = Path(root).absolute() / folder
        fix = (
            f"delete {path} and run again with dataset.source.download=true (the downloaded copy is incomplete)"
            if download
            else f"run with dataset.source.download=true to download it into {root}"
        )
        raise DatasetNotFoundError(
            f"{cls.__name__} data not found or corrupted at {path}. Fix: {fix}, or set "
            f"paths.data_dir=/path (or WASI_DATA_DIR=/path) to a folder that already holds {folder}/."
        ) from None


def cifar10(root: str, download: bool = False) -> RawSplits:
    """CIFAR-10 (50000 train, 10000 test, 32x32) from `root/cifar-10-batches-py`."""
    return RawSplits(
        train=_torchvision(tvd.CIFAR10, "cifar-10-batches-py", root, download, train=True),
        test=_torchvision(tvd.CIFAR10, "cifar-10-batches-py", root, download, train=False),
    )


def cifar100(root: str, download: bool = False) -> RawSplits:
    """CIFAR-100 fine labels (50000 train, 10000 test, 32x32) from `root/cifar-100-python`."""
    return RawSplits(
        train=_torchvision(tvd.CIFAR100, "cifar-100-python", root, download, train=True),
        test=_torchvision(tvd.CIFAR100, "cifar-100-python", root, download, train=False),
    )


def pets(root: str, download: bool = False) -> RawSplits:
    """Oxford-IIIT Pet, 37 breed labels (3680 trainval, 3669 test), from `root/oxford-iiit-pet`."""
    return RawSplits(
        train=_torchvision(tvd.OxfordIIITPet, "oxford-iiit-pet", root, download, split="trainval"),
        test=_torchvision(tvd.OxfordIIITPet, "oxford-iiit-pet", root, download, split="test"),
    )


def flowers102(root: str, download: bool = False) -> RawSplits:
    """Oxford Flowers-102 with its own splits (1020 train, 1020 val, 6149 test), `root/flowers-102`."""
    return RawSplits(
        train=_torchvision(tvd.Flowers102, "flowers-102", root, download, split="train"),
        val=_torchvision(tvd.Flowers102, "flowers-102", root, download, split="val"),
        test=_torchvision(tvd.Flowers102, "flowers-102", root, download, split="test"),
    )


def cub200(root: str) -> RawSplits:
    """CUB-200-2011 (5994 train, 5794 test) from `root/cub200/{train,test}/<class>/*.jpg`.

    torchvision cannot download it; the message of DatasetNotFoundError says how to lay it out.
    """
    base = Path(root).absolute() / "cub200"
    try:
        train, test = tvd.ImageFolder(str(base / "train")), tvd.ImageFolder(str(base / "test"))
    except FileNotFoundError as err:
        raise DatasetNotFoundError(
            f"CUB-200 data not found at {base} ({err}). Fix: lay it out as {base}/train/<class>/*.jpg "
            f"and {base}/test/<class>/*.jpg with the same class folders, from CUB_200_2011.tgz "
            "(https://www.vision.caltech.edu/datasets/cub_200_2011/; images/<class>/<file>, "
            "split by train_test_split.txt where 1 = train); or set paths.data_dir=/path "
            "(or WASI_DATA_DIR=/path) to a folder that already holds cub200/."
        ) from None
    if train.classes != test.classes:
        raise ValueError(
            f"{base}/train and {base}/test must hold the same class folders; they differ in "
            f"{sorted(set(train.classes) ^ set(test.classes))}"
        )
    return RawSplits(train=train, test=test)
