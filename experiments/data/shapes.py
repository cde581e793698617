"""Generated shapes: ten classes of geometric shapes over coloured clutter, rendered in memory.

Offline, no files, a few seconds for the default 7000 images. Image i of a split depends only on
(seed, split, i, resolution), so the benchmark is the same for every run and machine.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from experiments.data.datasets import ArrayImages, RawSplits


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
