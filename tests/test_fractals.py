"""experiments/data/fractals.py: FractalDB-style classes and images, deterministic, balanced, not degenerate."""
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from experiments.data import fractals as F
from tests.helpers import compose

SMALL = F.RenderSettings(walkers=16, steps=48)  # fewer points: fast, still well drawn at 32x32


@pytest.fixture(scope="module")
def classes():
    return F.search_classes(12, seed=0)


def test_class_search_accepts_filled_systems_deterministically(classes):
    again = F.search_classes(12, seed=0)
    assert np.array_equal(classes.maps, again.maps) and np.array_equal(classes.probs, again.probs)
    assert classes.maps.shape == (12, F.MAX_MAPS, 6) and len(classes.n_maps) == 12
    assert ((classes.n_maps >= 2) & (classes.n_maps <= 8)).all()
    assert (classes.fill >= 0.2).all() and classes.candidates >= 12
    for maps, probs, n in zip(classes.maps, classes.probs, classes.n_maps):
        assert np.abs(maps[:n]).max() <= 1 and not maps[n:].any()  # a..f ~ U[-1, 1], no maps past n
        det = np.abs(maps[:n, 0] * maps[:n, 3] - maps[:n, 1] * maps[:n, 2])
        assert np.allclose(probs[:n], det / det.sum(), atol=1e-9) and not probs[n:].any()
    other = F.search_classes(12, seed=1)
    assert not np.array_equal(classes.maps, other.maps)


def test_fewer_classes_are_a_prefix_of_more(classes):
    five = F.search_classes(5, seed=0)
    assert np.array_equal(five.maps, classes.maps[:5]) and np.array_equal(five.n_maps, classes.n_maps[:5])


@pytest.mark.slow  # make test-slow
def test_stricter_fill_rate_accepts_fuller_attractors(classes):
    strict = F.search_classes(4, seed=0, fill_rate=0.24)
    assert (strict.fill >= 0.24).all() and strict.candidates > F.search_classes(4, seed=0).candidates
    with pytest.raises(RuntimeError, match="lower it"):  # at FractalDB's density no attractor fills 1/3
        F.search_classes(1, seed=0, fill_rate=0.34)


def test_render_deterministic_per_image_and_split(classes):
    a, labels = F.render_fractals(40, "train", 0, classes, SMALL)
    b, _ = F.render_fractals(40, "train", 0, classes, SMALL)
    longer, _ = F.render_fractals(70, "train", 0, classes, SMALL)
    test, _ = F.render_fractals(40, "test", 0, classes, SMALL)
    reseeded, _ = F.render_fractals(40, "train", 1, classes, SMALL)
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(a, longer[:40])  # image i depends on (seed, split, i) only
    assert not np.array_equal(a, test) and not np.array_equal(a, reseeded)
    assert np.array_equal(labels, np.arange(40) % 12)


def test_render_independent_of_chunking(classes, monkeypatch):
    whole, _ = F.render_fractals(30, "train", 0, classes, SMALL)
    monkeypatch.setattr(F, "_CHUNK", 7)
    chunked, _ = F.render_fractals(30, "train", 0, classes, SMALL)
    assert np.array_equal(whole, chunked)


def test_images_not_blank_or_degenerate(classes):
    images, _ = F.render_fractals(240, "train", 0, classes, SMALL)
    lit = (images.max(-1) > 0).mean((1, 2))  # share of non-background pixels per image
    assert lit.min() > 0.03 and lit.max() < 0.95
    assert images.reshape(len(images), -1).max(1).min() >= 128  # every fractal is drawn in a bright colour
    assert images.std((1, 2, 3)).min() > 10
    assert len({im.tobytes() for im in images}) == len(images)  # no two instances alike


def test_distinct_classes_draw_distinct_attractors(classes):
    """Each class's own maps (no jitter, full frame, no flip): every pair differs in many pixels."""
    n = len(classes.n_maps)
    rng = np.random.default_rng(0)
    start, choice = rng.uniform(-1, 1, (n, 64, 2)), rng.random((n, 116, 64))
    xs, ys, _ = F.chaos_game(classes.maps, classes.probs, classes.n_maps, start, choice, burn_in=20)
    u, v, ok = F._normalise(xs, ys)
    assert ok.all()
    px, py = (np.clip(u * 32, 0, 31).astype(int).reshape(n, -1), np.clip(v * 32, 0, 31).astype(int).reshape(n, -1))
    masks = np.zeros((n, 32, 32), bool)
    for c in range(n):
        masks[c, py[c], px[c]] = True
    for i in range(n):
        for j in range(i + 1, n):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (i, j, iou)


def test_instances_of_a_class_vary(classes):
    images, labels = F.render_fractals(36, "train", 0, classes, SMALL)
    same = images[labels == 0]
    assert len(same) == 3 and not np.array_equal(same[0], same[1])


def test_loader_through_the_dataset_config():
    cfg = compose("dataset=fractals", "dataset.num_classes=10", "dataset.source.train_size=200",
                  "dataset.source.test_size=50", "dataset.source.walkers=16", "dataset.source.steps=32").dataset
    splits = instantiate(cfg)(image_size=32, seed=0)
    assert splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (190, 10, 50)
    x, y = splits.test[3]
    assert x.shape == (3, 32, 32) and y == 3
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # black background, normalised with 0.5/0.5
    train_labels = [splits.train.base.dataset.labels[i] for i in splits.train.base.indices]
    test_labels = [y for _, y in splits.test]
    assert np.bincount(test_labels).tolist() == [5] * 10  # balanced
    assert np.bincount(train_labels, minlength=10).min() >= 17


def test_the_test_split_may_be_the_validation_split():
    """experiment=pretrain selects its weights on the held-out images: the training split is used whole."""
    cfg = compose("experiment=pretrain", "dataset.num_classes=4", "dataset.source.train_size=40",
                  "dataset.source.test_size=12", "dataset.source.walkers=16", "dataset.source.steps=32").dataset
    splits = instantiate(cfg)(image_size=32, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 12, 12)
    assert all(torch.equal(splits.val[i][0], splits.test[i][0]) for i in range(12))
