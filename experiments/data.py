"""Datasets from the `dataset` config group: raw splits, paper preprocessing, validation split.

Each `conf/dataset/*.yaml` names a loader here as `_target_`; the loader returns `RawSplits` of
(PIL RGB image, int label) and `build_datasets` resizes, normalises and carves out the validation
split. Loaders that read files raise `DatasetNotFoundError` (path + fix) when the files are absent.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_method
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd
from torchvision import transforms as T

log = logging.getLogger(__name__)

# Keys of a dataset config read by build_datasets; every other key is an argument of its loader.
PIPELINE_KEYS = frozenset({"_target_", "name", "num_classes", "mean", "std", "val_fraction", "hflip"})


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


def build_datasets(dataset_cfg: Mapping[str, Any], image_size: int, seed: int) -> DataSplits:
    """Call the loader `dataset_cfg._target_` with the config's other keys; preprocess as in the paper.

    Images are resized (not cropped) to (image_size, image_size), scaled to [0, 1] and normalised
    with the config's `mean`/`std`; `hflip: true` adds random horizontal flips to training images
    only. Unless the loader returns its own validation split, a `val_fraction` share of the
    training split, drawn with `seed`, becomes the validation split.
    """
    loader = get_method(dataset_cfg["_target_"])  # called directly: instantiate would wrap its errors
    raw: RawSplits = loader(**{k: dataset_cfg[k] for k in dataset_cfg if k not in PIPELINE_KEYS})
    mean, std = [float(m) for m in dataset_cfg["mean"]], [float(s) for s in dataset_cfg["std"]]
    eval_tf = image_transform(image_size, mean, std)
    train_tf = image_transform(image_size, mean, std, hflip=bool(dataset_cfg.get("hflip", False)))
    if raw.val is None:
        train_idx, val_idx = split_indices(len(raw.train), float(dataset_cfg["val_fraction"]), seed)
        train, val = Subset(raw.train, train_idx), Subset(raw.train, val_idx)
    else:
        train, val = raw.train, raw.val
    splits = DataSplits(
        train=Transformed(train, train_tf),
        val=Transformed(val, eval_tf),
        test=Transformed(raw.test, eval_tf),
        num_classes=int(dataset_cfg["num_classes"]),
    )
    log.info(
        "dataset %s: %d train, %d val, %d test images at %dx%d, %d classes",
        dataset_cfg["name"], len(splits.train), len(splits.val), len(splits.test), image_size, image_size,
        splits.num_classes,
    )
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


# ---------------------------------------------------------------------------------------------
# In-memory data: images held as one uint8 array.
# ---------------------------------------------------------------------------------------------

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


def _polygon(n: int, aspect: float = 1.0, start: float = np.pi / 2) -> np.ndarray:
    """(n, 2) vertices of a regular n-gon on the unit circle, y squeezed by `aspect`."""
    t = start + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), aspect * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    """(2 * points, 2) vertices alternating between radius 1 and `inner`."""
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)[:, None]
    return radius * _polygon(2 * points)


def _cross(w: float = 0.3) -> np.ndarray:
    """(12, 2) vertices of a plus sign with arms of half-width w."""
    quarter = np.array([[w, 1.0], [w, w], [1.0, w]])
    clockwise = np.array([[0.0, 1.0], [-1.0, 0.0]])  # (x, y) -> (y, -x)
    return np.concatenate([quarter @ np.linalg.matrix_power(clockwise, k).T for k in range(4)])


def _half_disk(n: int = 21) -> np.ndarray:
    """(n, 2) vertices of a half disk, centred on its centroid."""
    t = np.linspace(0.0, np.pi, n)
    return np.stack([np.cos(t), np.sin(t) - 4 / (3 * np.pi)], axis=1)


_ARROW = np.array(  # shaft from x = -1, head from x = 0.15 to the tip at x = 1
    [[-1.0, -0.18], [0.15, -0.18], [0.15, -0.55], [1.0, 0.0], [0.15, 0.55], [0.15, 0.18], [-1.0, 0.18]]
)

# (class name, unit-radius outline, hollow); drawn scaled, rotated and translated. Index = label.
SHAPES: tuple[tuple[str, np.ndarray, bool], ...] = (
    ("circle", _polygon(40), False),
    ("square", _polygon(4, start=np.pi / 4), False),
    ("triangle", _polygon(3), False),
    ("star", _star(), False),
    ("cross", _cross(), False),
    ("ring", _polygon(40), True),
    ("ellipse", _polygon(40, aspect=0.45), False),
    ("hexagon", _polygon(6), False),
    ("half-moon", _half_disk(), False),
    ("arrow", _ARROW, False),
)
_HEPTAGON = _polygon(7)  # blobs: a heptagon with random vertex radii
_SPLIT_CODES = {"train": 0, "test": 1}


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """background: (3,), foreground: (3,), clutter: (n, 3) RGB ints.

    Every channel of foreground and clutter is 64-192 steps (mod 256) from the background, and
    every clutter channel 32-96 steps from the foreground, so all three always stand apart.
    """
    background = rng.integers(0, 256, 3)
    fg_offset = rng.integers(64, 192, 3)
    clutter_offset = 64 + (fg_offset - 64 + rng.integers(32, 97, (n, 3))) % 128
    return background, (background + fg_offset) % 256, (background + clutter_offset) % 256


def _place(unit: np.ndarray, centre: np.ndarray, radius: float, angle: float) -> list[tuple[float, float]]:
    """unit: (n, 2) -> n pixel coordinates, rotated by angle, scaled by radius, moved to centre."""
    c, s = np.cos(angle), np.sin(angle)
    xy = centre + radius * unit @ np.array([[c, s], [-s, c]])
    return [tuple(p) for p in xy.tolist()]


def render_shape(rng: np.random.Generator, label: int, resolution: int) -> np.ndarray:
    """One image (resolution, resolution, 3) uint8 of shape class `label` over random clutter.

    Background colour, 1-3 thin lines and 0-2 small irregular blobs come first, then the shape
    (random colour, radius 25-42% of the side, position fully inside, rotation), then uniform
    pixel noise in [-8, 8].
    """
    r = resolution
    n_lines, n_blobs = int(rng.integers(1, 4)), int(rng.integers(0, 3))
    background, foreground, clutter = (c.tolist() for c in _colours(rng, n_lines + n_blobs))
    image = Image.new("RGB", (r, r), tuple(background))
    draw = ImageDraw.Draw(image)
    for colour in clutter[:n_lines]:
        draw.line(rng.uniform(0, r, 4).tolist(), fill=tuple(colour), width=max(1, r // 64))
    for colour in clutter[n_lines:]:
        blob = _HEPTAGON * rng.uniform(0.5, 1.0, (7, 1))
        xy = _place(blob, rng.uniform(0, r, 2), rng.uniform(0.03, 0.07) * r, rng.uniform(0, 2 * np.pi))
        draw.polygon(xy, fill=tuple(colour))
    _, unit, hollow = SHAPES[label]
    radius = rng.uniform(0.25, 0.42) * r
    xy = _place(unit, rng.uniform(radius, r - radius, 2), radius, rng.uniform(0, 2 * np.pi))
    fill = tuple(foreground)
    if hollow:
        draw.polygon(xy, outline=fill, width=max(1, round(0.35 * radius)))
    else:
        draw.polygon(xy, fill=fill)
    noisy = np.asarray(image, np.int16) + rng.integers(-8, 9, (r, r, 3), dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def render_shapes(size: int, split: str, seed: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """images: (size, resolution, resolution, 3) uint8, labels: (size,) with label i % 10.

    Image i depends only on (seed, split, i, resolution), so splits never share a random stream
    and a larger `size` extends a smaller one.
    """
    labels = np.arange(size) % len(SHAPES)
    images = np.empty((size, resolution, resolution, 3), np.uint8)
    for i in range(size):
        images[i] = render_shape(np.random.default_rng((seed, _SPLIT_CODES[split], i)), int(labels[i]), resolution)
    return images, labels


def shapes(train_size: int = 6000, test_size: int = 1000, resolution: int = 64, seed: int = 0) -> RawSplits:
    """Rendered shapes (10 classes, balanced), fixed by `seed`, drawn at `resolution` pixels."""
    return RawSplits(
        train=ArrayImages(*render_shapes(train_size, "train", seed, resolution)),
        test=ArrayImages(*render_shapes(test_size, "test", seed, resolution)),
    )


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
            f"delete {path} and run again with dataset.download=true (the downloaded copy is incomplete)"
            if download
            else f"run with dataset.download=true to download it into {root}"
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
