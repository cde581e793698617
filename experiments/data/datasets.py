"""Datasets from the `dataset` config group: raw splits, paper preprocessing, validation split.

Each `conf/dataset/*.yaml` instantiates (partially) `build_datasets`, with the raw loader nested
under `source` (also partial), so `hydra.utils.instantiate(cfg.dataset)(image_size=S, seed=s)` gives
`DataSplits`. A loader returns `RawSplits` of (PIL RGB image, int label); loaders that read files
raise `DatasetNotFoundError` (path + fix) when the files are absent.
"""
from __future__ import annotations

import logging
import urllib.error
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

from experiments.configuration.schema import invalid

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
    `seed`, becomes the validation split. `num_classes` must cover every label and, for an image folder,
    equal its number of class folders (check_classes).
    """
    raw = source()
    check_classes(raw, name, int(num_classes))
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    eval_tf = image_transform(image_size, mean, std)
    train_tf = image_transform(image_size, mean, std, hflip=bool(hflip))
    if raw.val is None:
        train_idx, val_idx = split_indices(len(raw.train), float(val_fraction), seed)
        train, val = Subset(raw.train, train_idx), Subset(raw.train, val_idx)
    else:
        train, val = raw.train, raw.val
    check_splits(name, source, raw, len(train), len(val), float(val_fraction))
    splits = DataSplits(train=Transformed(train, train_tf), val=Transformed(val, eval_tf),
                        test=Transformed(raw.test, eval_tf), num_classes=int(num_classes))
    log.info("dataset %s: %d train, %d val, %d test images at %dx%d, %d classes", name, len(splits.train),
             len(splits.val), len(splits.test), image_size, image_size, splits.num_classes)
    return splits


def check_splits(name: str, source: Callable[[], RawSplits], raw: RawSplits, n_train: int, n_val: int,
                 val_fraction: float) -> None:
    """ConfigError (naming the setting and a value that fits) when a split is left empty: no training images
    (nothing to train on), no validation images (no weights can be chosen as the best, so test/acc would be of
    the first evaluated weights), or no test images. n_train, n_val: the sizes after `val_fraction` is split off."""
    sizes = getattr(source, "keywords", {})  # a partial of the source's loader: its size settings, e.g. train_size
    for split, raw_split in (("train", raw.train), ("val", raw.val), ("test", raw.test)):
        if raw_split is not None and len(raw_split) == 0:  # type: ignore[arg-type]
            key = f"{split}_size"
            if key in sizes:
                raise invalid(f"dataset.source.{key}", sizes[key], f"leaves the {split} split of {name} empty",
                              f"dataset.source.{key}=<a number of images >= 1>")
            raise ValueError(f"the {split} split of {name} has no images, so there is nothing to "
                             f"{'train on' if split == 'train' else 'evaluate'}. Fix: check dataset.source (its "
                             "root folder and files)")
    n = len(raw.train)  # type: ignore[arg-type]
    fits = f"dataset.val_fraction={max(0.2, 1 / max(n, 1)):.3g}"
    if raw.val is None and n_train == 0:
        raise invalid("dataset.val_fraction", val_fraction, f"leaves none of the {n} training images of {name} to "
                      "train on", fits)
    if raw.val is None and n_val == 0:
        raise invalid("dataset.val_fraction", val_fraction, f"leaves no validation images (of the {n} training images "
                      f"of {name}), so no weights can be chosen as the best", fits)


def labels_of(dataset: Dataset) -> np.ndarray | None:
    """The labels of a raw split, read without loading its images: the `targets` (torchvision, image folders),
    `labels` (ArrayImages, LabelledImages) or `_labels` (torchvision's Flowers102, Pets, Food101) it keeps, through
    any Subset; None when it keeps none."""
    if isinstance(dataset, Subset):
        labels = labels_of(dataset.dataset)
        return None if labels is None else labels[np.asarray(dataset.indices, dtype=np.int64)]
    for attribute in ("targets", "labels", "_labels"):
        if (labels := getattr(dataset, attribute, None)) is not None:
            return np.asarray(labels, dtype=np.int64).reshape(-1)
    return None


def folder_classes(dataset: Dataset) -> list[str] | None:
    """The classes of an image-folder split (torchvision's ImageFolder: one folder per class, which are then all
    the classes there are), through any Subset; None for other datasets."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return list(dataset.classes) if isinstance(dataset, tvd.DatasetFolder) else None


def check_classes(raw: RawSplits, name: str, num_classes: int) -> None:
    """ConfigError (naming dataset.num_classes and the value that fits) when a label of any split is outside
    [0, num_classes), or when an image-folder training split has another number of class folders (e.g. 3,
    configured as cub200's 200): the head would be sized for classes the data does not have."""
    classes = folder_classes(raw.train)
    if classes is not None and len(classes) != num_classes:
        shown = ", ".join(classes[:5]) + (", …" if len(classes) > 5 else "")
        raise invalid("dataset.num_classes", num_classes, f"the training split of {name} has {len(classes)} classes "
                      f"({shown})", f"dataset.num_classes={len(classes)}")
    for split, dataset in (("train", raw.train), ("val", raw.val), ("test", raw.test)):
        labels = labels_of(dataset) if dataset is not None else None
        if labels is None or not len(labels):
            continue
        if labels.min() < 0:
            raise ValueError(f"the {split} split of {name} has a negative label ({labels.min()}); labels must be "
                             f"class indices 0 … num_classes - 1")
        if (top := int(labels.max())) >= num_classes:
            raise invalid("dataset.num_classes", num_classes, f"the {split} labels of {name} go up to {top}, so it "
                          f"has at least {top + 1} classes", f"dataset.num_classes={top + 1}")


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
        raise invalid("dataset.val_fraction", fraction, "must be in [0, 1)", "dataset.val_fraction=0.2")
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
    """`cls(root, download=download, **split)`, turning "not found" and a download without a network into
    DatasetNotFoundError."""
    try:
        return cls(root, download=download, **split)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:  # download=true, but no network
        path = Path(root).absolute() / folder
        raise DatasetNotFoundError(
            f"{cls.__name__} cannot be downloaded into {path} (dataset.source.download=true; {type(err).__name__}: "
            f"{err}): this machine is offline. Fix: on a machine with internet, run once with "
            f"dataset.source.download=true and copy {path} here, or set paths.data_dir=/path (or WASI_DATA_DIR=/path) "
            f"to a folder that already holds {folder}/."
        ) from None
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


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST, Food-101 and ISIC 2018 (the authors' other datasets).
# ---------------------------------------------------------------------------------------------

#: Where Debian's package `dataset-fashion-mnist` puts the four *-ubyte.gz files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = tuple(name for name, _ in tvd.FashionMNIST.resources)  # train/t10k images/labels .gz


def to_rgb(image: Image.Image) -> Image.Image:
    """A grey (mode L) PIL image as RGB, the three channels equal."""
    return image.convert("RGB")


def fashion_mnist(root: str, download: bool = False, train_size: int | None = None,
                  system_dir: str = FASHION_MNIST_SYSTEM_DIR) -> RawSplits:
    """Fashion-MNIST (60000 train, 10000 test, 28x28 grey, 10 classes) read by torchvision's FashionMNIST
    from `root/FashionMNIST/raw`, items as RGB.

    The four `*-ubyte.gz` files are taken from the first folder that has all of them: `system_dir`
    (Debian's `dataset-fashion-mnist`), `root/FashionMNIST/raw`, `root/fashion-mnist`; they are unpacked
    into `root/FashionMNIST/raw` (torchvision's layout) unless it already holds the unpacked files. With
    none of them, `download=True` lets torchvision download them. `train_size`: keep a class-stratified
    subset of that many training images (`train_test_split`, random_state 0: the same images for every
    run seed); the test split is always all 10000.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    unpacked = [raw / name.removesuffix(".gz") for name in FASHION_MNIST_FILES]
    if not all(f.is_file() for f in unpacked):
        places = [Path(system_dir), raw, Path(root) / "fashion-mnist"]
        found = next((d for d in places if all((d / name).is_file() for name in FASHION_MNIST_FILES)), None)
        if found is not None:
            _gunzip_all(found, raw)
        elif not download:
            raise DatasetNotFoundError(
                f"Fashion-MNIST not found: none of {', '.join(str(p) for p in places)} holds "
                f"{', '.join(FASHION_MNIST_FILES)}. Fix: apt-get install dataset-fashion-mnist (puts them in "
                f"{system_dir}), or run with dataset.source.download=true to download them into {raw}, or set "
                "paths.data_dir=/path (or WASI_DATA_DIR=/path) to a folder that holds FashionMNIST/raw/."
            )
    train = _torchvision(tvd.FashionMNIST, "FashionMNIST", root, download, train=True, transform=to_rgb)
    test = _torchvision(tvd.FashionMNIST, "FashionMNIST", root, download, train=False, transform=to_rgb)
    if train_size is not None:
        train = training_subset(train, train.targets.numpy(), train_size, "dataset.source.train_size")
    return RawSplits(train=train, test=test)


def _gunzip_all(source: Path, target: Path) -> None:
    """Unpack every FASHION_MNIST_FILES .gz of `source` into `target` (atomically: a concurrent reader never
    sees a half-written file)."""
    import gzip
    import os
    import shutil
    import tempfile

    target.mkdir(parents=True, exist_ok=True)
    log.info("unpacking Fashion-MNIST from %s into %s (torchvision's layout)", source, target)
    for name in FASHION_MNIST_FILES:
        with gzip.open(source / name, "rb") as src, tempfile.NamedTemporaryFile(dir=target, delete=False) as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(dst.name, 0o644)
        os.replace(dst.name, target / name.removesuffix(".gz"))


def training_subset(dataset: Dataset, labels: np.ndarray, size: int, key: str) -> Dataset:
    """A class-stratified subset of `size` items of a training split (`train_test_split`, random_state 0),
    in their original order. labels: (N,) ints."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if not 0 < size <= n:
        raise invalid(key, size, f"must be in [1, {n}] (the training split has {n} images)",
                      f"{key}=null for all of them, or a smaller number")
    if size == n:
        return dataset
    keep, _ = train_test_split(np.arange(n), train_size=size, stratify=labels, random_state=0)
    return Subset(dataset, sorted(keep.tolist()))


def food101(root: str, download: bool = False) -> RawSplits:
    """Food-101 (75750 train, 25250 test, 101 classes; meta/train.json and meta/test.json) from
    `root/food-101`, read by torchvision's Food101."""
    return RawSplits(
        train=_torchvision(tvd.Food101, "food-101", root, download, split="train"),
        test=_torchvision(tvd.Food101, "food-101", root, download, split="test"),
    )


#: ISIC 2018 task 3 diagnosis columns of the ground-truth CSVs, in the files' order (label = column index).
ISIC2018_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC2018_SPLITS = {"train": "Training", "validation": "Validation", "test": "Test"}


class LabelledImages(Dataset):
    """Image files and their labels -> items (PIL RGB, int)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int]) -> None:
        self.files, self.labels = list(files), [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.files[index]) as image:
            return image.convert("RGB"), self.labels[index]


def isic2018_split(base: Path, split: str) -> LabelledImages:
    """One split of the ISIC 2018 task 3 release under `base`: the images
    `ISIC2018_Task3_<Split>_Input/<image>.jpg` and the one-hot labels of
    `ISIC2018_Task3_<Split>_GroundTruth/ISIC2018_Task3_<Split>_GroundTruth.csv` (columns image, MEL, NV, BCC,
    AKIEC, BKL, DF, VASC; label = the index of the column holding 1)."""
    import pandas as pd

    name = f"ISIC2018_Task3_{ISIC2018_SPLITS[split]}"
    images, csv = base / f"{name}_Input", base / f"{name}_GroundTruth" / f"{name}_GroundTruth.csv"
    if not images.is_dir() or not csv.is_file():
        raise DatasetNotFoundError(
            f"ISIC 2018 {split} split not found: expected {images}/ and {csv}. Fix: download {name}_Input.zip "
            f"and {name}_GroundTruth.zip (task 3, https://challenge.isic-archive.com/data/#2018) and unzip both "
            f"into {base}, or set paths.data_dir=/path (or WASI_DATA_DIR=/path) to a folder that holds isic2018/."
        )
    table = pd.read_csv(csv)
    missing = [c for c in ("image", *ISIC2018_CLASSES) if c not in table.columns]
    onehot = table[list(ISIC2018_CLASSES)].to_numpy() if not missing else None
    if missing or not ((onehot == 0) | (onehot == 1)).all() or not (onehot.sum(1) == 1).all():
        raise ValueError(f"{csv} is not an ISIC 2018 task 3 ground truth: it needs the columns image, "
                         f"{', '.join(ISIC2018_CLASSES)} with exactly one 1 per row"
                         + (f" (missing {missing})" if missing else ""))
    files = [images / f"{image}.jpg" for image in table["image"]]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise DatasetNotFoundError(f"{len(absent)} images listed in {csv} are not in {images} (e.g. {absent[:3]}). "
                                   f"Fix: unzip {name}_Input.zip completely into {base}")
    return LabelledImages(files, onehot.argmax(1))


def isic2018(root: str, test_split: str = "validation") -> RawSplits:
    """ISIC 2018 task 3 (skin lesion diagnosis, 7 classes ISIC2018_CLASSES) from `root/isic2018`: the 10015
    training images train (and give the validation split), `test_split` tests: "validation" (the challenge's
    193-image validation set, the authors' held-out split) or "test" (its 1512-image test set)."""
    if test_split not in ("validation", "test"):
        raise invalid("dataset.source.test_split", test_split, "must be validation or test",
                      "dataset.source.test_split=validation")
    base = Path(root).absolute() / "isic2018"
    return RawSplits(train=isic2018_split(base, "train"), test=isic2018_split(base, test_split))
