"""experiments/data/datasets.py: every loader on tiny files in its real on-disk layout, offline.

Images written here are single-colour, the colour encoding (label, uid) as
(2 * label + 40, 4 * uid, 200), so each loaded tensor can be checked against the
normalisation formula and against the label the loader paired it with.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.flowers102 as tv_flowers
from hydra.utils import instantiate
from PIL import Image
from torch import nn

from experiments.data import datasets as data
from experiments.data import shapes
from experiments.data.datasets import DatasetNotFoundError
from tests.helpers import compose

CIFAR = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # (mean, std) of the paper's preprocessing
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def dataset_cfg(name: str, **source):
    """conf/dataset/<name>.yaml as train.py composes it, with overrides of its source (e.g. root=tmp_path instead
    of ${paths.data_dir})."""
    return compose(f"dataset={name}", *[f"dataset.source.{k}={v}" for k, v in source.items()]).dataset


def build_datasets(cfg, image_size: int, seed: int) -> data.DataSplits:
    """What the training loop does with a dataset config."""
    return instantiate(cfg)(image_size=image_size, seed=seed)


def colour(label: int, uid: int) -> tuple[int, int, int]:
    return 2 * label + 40, 4 * uid, 200


def save_jpeg(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (30, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, quality=100, subsampling=0)


def decode(dataset, image_size: int, stats: tuple[list, list], tol: float) -> list[tuple[int, int]]:
    """(label, uid) of every item, after checking shape, uniformity and the normalised colour.

    tol: allowed error in 0..255 units (JPEG rounding); 0.5 for lossless formats.
    """
    out = []
    m, s = (torch.tensor(v)[:, None, None] for v in stats)
    for x, y in dataset:
        assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32
        assert isinstance(y, int)
        pixels = (x * s + m) * 255  # undo Normalize and ToTensor with the yaml's statistics
        assert (pixels.amax((1, 2)) - pixels.amin((1, 2))).max() <= 2 * tol
        uid = round(pixels[1].mean().item() / 4)
        expected = torch.tensor(colour(y, uid), dtype=torch.float32)[:, None, None]
        assert (pixels - expected).abs().max() <= tol, (y, uid)
        out.append((y, uid))
    return out


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision compares CIFAR and Flowers-102 files to the md5 of the real downloads, which tiny
    test files cannot match. Keep its file-exists check (md5=None) and drop only the md5 comparison."""
    real = tv_cifar.check_integrity
    for module in (tv_cifar, tv_flowers):
        monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: real(fpath))


def cifar_batch(items: list[tuple[int, int]], label_key: str) -> dict:
    """A CIFAR python batch dict: data (n, 3072) uint8 channel-major, labels under label_key."""
    rgb = np.array([colour(label, uid) for label, uid in items], np.uint8)
    batch = {"data": np.repeat(rgb, 1024, axis=1), label_key: [label for label, _ in items]}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [label // 5 for label, _ in items]
    return batch


def stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All items as x: (N, 3, S, S), y: (N,)."""
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


# ---------------------------------------------------------------------------------------------
# File-backed datasets
# ---------------------------------------------------------------------------------------------

def test_cifar10_layout_split_and_normalisation(tmp_path, no_md5):
    base = tmp_path / "cifar-10-batches-py"
    train = [(uid % 10, uid) for uid in range(40)]
    for b in range(5):
        write_pickle(base / f"data_batch_{b + 1}", cifar_batch(train[8 * b : 8 * b + 8], "labels"))
    write_pickle(base / "test_batch", cifar_batch([(uid % 10, uid) for uid in range(40, 50)], "labels"))
    write_pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})

    splits = build_datasets(dataset_cfg("cifar10", root=str(tmp_path)), image_size=32, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (32, 8, 10, 10)
    x, _ = splits.test[0]
    assert torch.allclose(x[2], torch.full((32, 32), 2 * 200 / 255 - 1))  # (200/255 - 0.5) / 0.5
    train_items = decode(splits.train, 32, CIFAR, 0.5)
    val_items = decode(splits.val, 32, CIFAR, 0.5)
    test_items = decode(splits.test, 32, CIFAR, 0.5)
    assert sorted(train_items + val_items) == sorted(train)  # a partition of the training file, labels kept
    assert sorted(test_items) == sorted((uid % 10, uid) for uid in range(40, 50))

    again = build_datasets(dataset_cfg("cifar10", root=str(tmp_path)), image_size=32, seed=0)
    other = build_datasets(dataset_cfg("cifar10", root=str(tmp_path)), image_size=32, seed=1)
    assert decode(again.val, 32, CIFAR, 0.5) == val_items
    assert sorted(decode(other.val, 32, CIFAR, 0.5)) != sorted(val_items)

    resized = build_datasets(dataset_cfg("cifar10", root=str(tmp_path)), image_size=20, seed=0)
    assert decode(resized.val, 20, CIFAR, 0.5) == val_items


def test_cifar100_fine_labels(tmp_path, no_md5):
    base = tmp_path / "cifar-100-python"
    train = [((7 * uid) % 100, uid) for uid in range(40)]
    test = [((7 * uid) % 100, uid) for uid in range(40, 50)]
    write_pickle(base / "train", cifar_batch(train, "fine_labels"))
    write_pickle(base / "test", cifar_batch(test, "fine_labels"))
    write_pickle(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                 "coarse_label_names": [f"c{i}" for i in range(20)]})

    splits = build_datasets(dataset_cfg("cifar100", root=str(tmp_path)), image_size=16, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (32, 8, 10, 100)
    items = decode(splits.train, 16, CIFAR, 0.5) + decode(splits.val, 16, CIFAR, 0.5)
    assert sorted(items) == sorted(train)
    assert sorted(decode(splits.test, 16, CIFAR, 0.5)) == sorted(test)


def test_pets_layout_labels_and_imagenet_normalisation(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    rows = {"trainval": [(uid, uid) for uid in range(20)], "test": [(uid, uid) for uid in range(20, 30)]}
    for split, items in rows.items():
        lines = []
        for label, uid in items:
            image_id = f"breed{label}_{uid}"
            save_jpeg(base / "images" / f"{image_id}.jpg", colour(label, uid))
            lines.append(f"{image_id} {label + 1} {1 + label % 2} {uid}")  # CLASS-ID SPECIES BREED-ID
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")

    splits = build_datasets(dataset_cfg("pets", root=str(tmp_path)), image_size=24, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (16, 4, 10, 37)
    train = decode(splits.train, 24, IMAGENET, 3) + decode(splits.val, 24, IMAGENET, 3)
    assert sorted(train) == sorted(rows["trainval"])  # 1-based CLASS-ID -> 0-based label
    assert sorted(decode(splits.test, 24, IMAGENET, 3)) == sorted(rows["test"])
    x, _ = splits.test[0]
    assert abs(x[2, 0, 0].item() - (200 / 255 - 0.406) / 0.225) < 3 / 255 / 0.225


def test_flowers102_uses_its_own_val_split(tmp_path, no_md5):
    base = tmp_path / "flowers-102"
    labels = [(5 * uid) % 102 for uid in range(24)]  # image_id = uid + 1
    for uid, label in enumerate(labels):
        save_jpeg(base / "jpg" / f"image_{uid + 1:05d}.jpg", colour(label, uid))
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels]) + 1})
    ids = {"trnid": range(1, 11), "valid": range(11, 17), "tstid": range(17, 25)}
    scipy.io.savemat(base / "setid.mat", {k: np.array([list(v)]) for k, v in ids.items()})

    splits = build_datasets(dataset_cfg("flowers102", root=str(tmp_path)), image_size=16, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (10, 6, 8, 102)
    for split, image_ids in zip((splits.train, splits.val, splits.test), ids.values()):
        got = sorted(decode(split, 16, IMAGENET, 3))
        assert got == sorted((labels[i - 1], i - 1) for i in image_ids)


def test_cub200_image_folders(tmp_path):
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    for label, name in enumerate(classes):
        for k in range(4):
            save_jpeg(tmp_path / "cub200" / "train" / name / f"{k}.jpg", colour(label, 3 * label + k))
        for k in range(2):
            save_jpeg(tmp_path / "cub200" / "test" / name / f"{k}.jpg", colour(label, 20 + 2 * label + k))

    cfg = dataset_cfg("cub200", root=str(tmp_path))
    cfg.num_classes = 3  # the class folders laid out (cub200.yaml's 200 is refused: tests/test_faults.py)
    splits = build_datasets(cfg, image_size=16, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (10, 2, 6, 3)
    train = decode(splits.train, 16, IMAGENET, 3) + decode(splits.val, 16, IMAGENET, 3)
    assert sorted(train) == [(label, 3 * label + k) for label in range(3) for k in range(4)]
    assert {y for y, _ in decode(splits.test, 16, IMAGENET, 3)} == {0, 1, 2}


def test_cub200_class_folders_must_match(tmp_path):
    save_jpeg(tmp_path / "cub200" / "train" / "001.a" / "0.jpg", colour(0, 0))
    save_jpeg(tmp_path / "cub200" / "test" / "002.b" / "0.jpg", colour(0, 1))
    with pytest.raises(ValueError, match="same class folders"):
        build_datasets(dataset_cfg("cub200", root=str(tmp_path)), image_size=16, seed=0)


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                     ("pets", "oxford-iiit-pet"), ("flowers102", "flowers-102")]
)
def test_missing_torchvision_data_names_path_and_fix(tmp_path, name, folder):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(dataset_cfg(name, root=str(tmp_path)), image_size=16, seed=0)
    message = str(info.value)
    assert str(tmp_path / folder) in message
    assert "dataset.source.download=true" in message and "paths.data_dir=" in message
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.__suppress_context__  # no torchvision traceback chained underneath


def test_missing_cub200_names_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(dataset_cfg("cub200", root=str(tmp_path)), image_size=16, seed=0)
    message = str(info.value)
    assert f"{tmp_path / 'cub200'}/train/<class>/*.jpg" in message
    assert "train_test_split.txt" in message and "paths.data_dir=" in message


# ---------------------------------------------------------------------------------------------
# Offline datasets
# ---------------------------------------------------------------------------------------------

def test_digits_sizes_labels_and_pixels():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    scaled = np.rint(bunch.images * 255 / 16).astype(np.uint8)  # 0..16 -> 0..255
    known = {img.tobytes(): int(y) for img, y in zip(scaled, bunch.target)}
    splits = build_datasets(dataset_cfg("digits"), image_size=8, seed=0)
    n_test = int(np.ceil(0.2 * 1797))
    n_val = round(0.2 * (1797 - n_test))
    assert (len(splits.test), len(splits.val), len(splits.train)) == (n_test, n_val, 1797 - n_test - n_val)
    for split in (splits.train, splits.val, splits.test):
        x, y = stack(split)
        assert x.shape == (len(split), 3, 8, 8) and set(y.tolist()) == set(range(10))
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey in 3 channels
        pixels = ((x[:, 0] * 0.5 + 0.5) * 255).round().to(torch.uint8).numpy()
        assert [known[p.tobytes()] for p in pixels] == y.tolist()  # a real digit, with its own label

    other = build_datasets(dataset_cfg("digits"), image_size=32, seed=1)
    assert other.test[0][0].shape == (3, 32, 32)
    fixed_test = build_datasets(dataset_cfg("digits"), image_size=8, seed=1).test
    assert all(torch.equal(fixed_test[i][0], splits.test[i][0]) for i in range(0, 360, 7))


def test_shapes_render_deterministic_and_seeded():
    a, labels = shapes.render_shapes(20, "train", seed=0, resolution=32)
    b, _ = shapes.render_shapes(20, "train", seed=0, resolution=32)
    c, _ = shapes.render_shapes(20, "train", seed=1, resolution=32)
    t, _ = shapes.render_shapes(20, "test", seed=0, resolution=32)
    longer, _ = shapes.render_shapes(30, "train", seed=0, resolution=32)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(a, longer[:20])
    assert all(not np.array_equal(x, y) for x, y in zip(a, c))
    assert all(not np.array_equal(x, y) for x, y in zip(a, t))
    assert labels.tolist() == [i % 10 for i in range(20)]
    assert shapes.render_shapes(2, "train", seed=0, resolution=224)[0].shape == (2, 224, 224, 3)


def test_shapes_splits_balanced_and_varied():
    cfg = dataset_cfg("shapes", train_size=200, test_size=50, resolution=32)
    assert cfg.num_classes == len(shapes.SHAPES) == 10
    splits = build_datasets(cfg, image_size=16, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (160, 40, 50, 10)
    train_labels = [y for _, y in splits.train] + [y for _, y in splits.val]
    assert np.bincount(train_labels).tolist() == [20] * 10
    assert np.bincount([y for _, y in splits.test]).tolist() == [5] * 10
    x, _ = splits.train[0]
    assert x.shape == (3, 16, 16) and -1.0 <= x.min() and x.max() <= 1.0
    images, labels = shapes.render_shapes(200, "train", seed=0, resolution=32)
    for k in range(10):
        members = images[labels == k].reshape(20, -1)
        assert len(np.unique(members, axis=0)) == 20


@pytest.mark.slow
def test_shapes_learnable_by_a_small_cnn():
    """A 4-layer CNN trained for a few seconds on 16x16 images beats chance (10%) by a wide margin."""
    torch.manual_seed(0)
    splits = build_datasets(dataset_cfg("shapes", train_size=2000, test_size=500), image_size=16, seed=0)
    x, y = stack(splits.train)
    x_test, y_test = stack(splits.test)

    def block(i: int, o: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    net = nn.Sequential(*block(3, 32, 1), *block(32, 32, 2), *block(32, 64, 1), *block(64, 64, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(6):
        for b in torch.randperm(len(y)).split(64):
            loss = nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.3


# ---------------------------------------------------------------------------------------------
# Configs and shared pieces
# ---------------------------------------------------------------------------------------------

def test_image_transform_hflip_is_random_and_optional():
    ramp = np.arange(8, dtype=np.uint8) * 30
    image = Image.fromarray(np.broadcast_to(ramp[None, :, None], (8, 8, 3)).copy())  # brighter to the right
    flip, plain = data.image_transform(8, *CIFAR, hflip=True), data.image_transform(8, *CIFAR)
    torch.manual_seed(0)
    outs = [flip(image) for _ in range(20)]
    ref = plain(image)
    assert any(torch.equal(o, ref) for o in outs) and any(torch.equal(o, ref.flip(-1)) for o in outs)
    assert all(torch.equal(plain(image), ref) for _ in range(5))


def test_split_indices_partition_and_bounds():
    train, val = data.split_indices(11, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(11))
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_indices(10, 1.0, seed=0)


@pytest.mark.parametrize("overrides, line", [
    (["dataset.val_fraction=0"], "dataset.val_fraction=0.0: leaves no validation images (of the 40 training images of "
     "shapes), so no weights can be chosen as the best. Fix: dataset.val_fraction=0.2"),
    (["dataset.val_fraction=0.01"], "dataset.val_fraction=0.01: leaves no validation images (of the 40 training"),
    (["dataset.source.train_size=2", "dataset.val_fraction=0.2"], "dataset.val_fraction=0.2: leaves no validation "
     "images (of the 2 training images of shapes), so no weights can be chosen as the best. Fix: "
     "dataset.val_fraction=0.5"),
    (["dataset.val_fraction=0.9999"], "dataset.val_fraction=0.9999: leaves none of the 40 training images of shapes "
     "to train on. Fix: dataset.val_fraction=0.2"),
    (["dataset.source.train_size=0"], "dataset.source.train_size=0: leaves the train split of shapes empty. Fix: "
     "dataset.source.train_size=<a number of images >= 1>"),
    (["dataset.source.test_size=0"], "dataset.source.test_size=0: leaves the test split of shapes empty."),
])
def test_splits_that_leave_nothing_to_train_on_validate_or_test_with_are_refused(overrides, line):
    """val/acc would stay 0.0 and "best" never update (test/acc then of the first evaluated weights), or the run
    would end after 0 steps with exit status 0."""
    from experiments.configuration.schema import ConfigError
    from experiments.training import errors

    cfg = compose("dataset.source.train_size=40", "dataset.source.test_size=20", "dataset.source.resolution=16",
                  *overrides).dataset
    with pytest.raises(ConfigError) as info:
        instantiate(cfg)(image_size=8, seed=0)
    assert errors.one_line(info.value).startswith(line) and errors.status(info.value) == errors.SETTING


def test_a_split_without_images_from_files_names_the_source():
    empty = data.RawSplits(train=data.ArrayImages(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, np.int64)),
                           test=data.ArrayImages(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match=r"^the train split of files has no images, so there is nothing to train on\. "
                       r"Fix: check dataset.source \(its root folder and files\)$"):
        data.build_datasets(lambda: empty, "files", 2, [0.5] * 3, [0.5] * 3, 0.2, image_size=4, seed=0)
