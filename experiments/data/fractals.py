"""Formula-driven fractal images (FractalDB, Kataoka et al., ACCV 2020), generated in memory.

Each class is one iterated function system (IFS) of 2-8 random affine maps
`(x, y) -> (a x + b y + e, c x + d y + f)` with a..f uniform in [-1, 1], picked with probability
proportional to |ad - bc|, and accepted only if its attractor, drawn with the chaos game and
stretched to the frame, fills at least `fill_rate` of the pixels (FractalDB's check: 100k points
on 512x512, rate 0.2; here the same points-per-pixel density on a `check_resolution` grid).
Candidates are drawn in a fixed order from `(seed, search stream, j)` and the first
`num_classes` accepted ones are the classes, so a smaller class count is a prefix of a larger one.

An instance of a class multiplies every map parameter by a factor uniform in
[1 - jitter, 1 + jitter], gives each map a random bright colour (a point takes the colour of the
map that made it), stretches the attractor (its [trim, 1 - trim] quantiles per axis; the few
outlying points are dropped) into a random square box (side `min_scale`..1 of the image) and
flips it at random horizontally and vertically. It is drawn by the chaos game (`walkers` parallel
points, `burn_in` discarded steps, then `steps` plotted steps each) on a grid `supersample` times
finer than `resolution` and area-averaged down, on a black background. Everything is vectorised over a chunk of images.

Image i of a split depends only on (seed, split, i) and the settings, so the splits never share
a random stream and a larger size extends a smaller one; label i is i % num_classes (balanced).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from experiments.data.datasets import ArrayImages, RawSplits

MIN_MAPS, MAX_MAPS = 2, 8
_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}
_SEARCH_CODE = 100  # random stream of the class search, apart from every split's
_FRACTALDB_DENSITY = 100_000 / 512**2  # FractalDB's check: points per pixel
_CHUNK = 512  # images rendered together (memory: a few tens of MB)


@dataclass(frozen=True)
class FractalClasses:
    """maps: (C, 8, 6) affine parameters (a, b, c, d, e, f), zero rows past n_maps;
    probs: (C, 8) map probabilities, zero past n_maps; n_maps: (C,); fill: (C,) filling rates."""

    maps: np.ndarray
    probs: np.ndarray
    n_maps: np.ndarray
    fill: np.ndarray
    candidates: int  # IFSs drawn to find them (accepted + rejected)


def _ifs_probs(maps: np.ndarray, n_maps: np.ndarray) -> np.ndarray:
    """(B, 8) probabilities |det A_k| / sum over the n_maps real maps (uniform if all are singular)."""
    det = np.abs(maps[..., 0] * maps[..., 3] - maps[..., 1] * maps[..., 2])
    det = np.where(np.arange(MAX_MAPS) < n_maps[:, None], det + 1e-12, 0.0)
    return det / det.sum(1, keepdims=True)


def chaos_game(maps: np.ndarray, probs: np.ndarray, n_maps: np.ndarray, start: np.ndarray,
               choice: np.ndarray, burn_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the chaos game for B systems at once.

    maps: (B, 8, 6), probs: (B, 8), n_maps: (B,), start: (B, W, 2) initial points, choice: (B, T, W)
    uniforms in [0, 1) that pick the map of each step. Returns x, y: (B, T - burn_in, W) float32
    points and k: (B, T - burn_in, W) the map that produced each point.
    """
    b, t, w = choice.shape
    cum = np.cumsum(probs, axis=1)
    cum[np.arange(MAX_MAPS) >= n_maps[:, None] - 1] = 1.0  # exact 1 at the last real map: u < 1 never passes it
    # map k is the number of cumulative bounds <= u (probability probs[k]): one sorted search for all
    # systems, system i's bounds shifted into [2i, 2i + 1] so the concatenation stays sorted
    offset = 2.0 * np.arange(b)
    bounds = (cum + offset[:, None]).ravel()
    k_all = np.searchsorted(bounds, choice + offset[:, None, None], side="right")  # = i * 8 + k
    flat = maps.reshape(b * MAX_MAPS, 6).astype(np.float32)
    x, y = start[..., 0].astype(np.float32), start[..., 1].astype(np.float32)
    xs = np.empty((b, t - burn_in, w), np.float32)
    ys = np.empty_like(xs)
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(t):
            p = flat[k_all[:, step]]  # (B, W, 6)
            x, y = p[..., 0] * x + p[..., 1] * y + p[..., 4], p[..., 2] * x + p[..., 3] * y + p[..., 5]
            if step >= burn_in:
                xs[:, step - burn_in], ys[:, step - burn_in] = x, y
    return xs, ys, k_all[:, burn_in:] - (np.arange(b) * MAX_MAPS)[:, None, None]


def _normalise(xs: np.ndarray, ys: np.ndarray, trim: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (B, ...) -> u, v per system, mapping [q, 1 - q] quantiles of each axis to [0, 1] (q = trim;
    0: min-max, as FractalDB), and ok: (B,) finite and not flat. Points outside get u or v outside [0, 1]."""
    b = xs.shape[0]
    x2, y2 = xs.reshape(b, -1), ys.reshape(b, -1)
    ok = np.isfinite(x2).all(1) & np.isfinite(y2).all(1)
    x2, y2 = np.where(ok[:, None], x2, 0.0), np.where(ok[:, None], y2, 0.0)
    if trim > 0:
        lo_x, hi_x = np.quantile(x2, [trim, 1 - trim], axis=1, keepdims=True)
        lo_y, hi_y = np.quantile(y2, [trim, 1 - trim], axis=1, keepdims=True)
    else:
        lo_x, hi_x, lo_y, hi_y = x2.min(1, keepdims=True), x2.max(1, keepdims=True), y2.min(1, keepdims=True), \
            y2.max(1, keepdims=True)
    span_x, span_y = hi_x - lo_x, hi_y - lo_y
    ok &= (span_x[:, 0] > 1e-9) & (span_y[:, 0] > 1e-9) & (span_x[:, 0] < 1e30) & (span_y[:, 0] < 1e30)
    u = (x2 - lo_x) / np.maximum(span_x, 1e-30)
    v = (y2 - lo_y) / np.maximum(span_y, 1e-30)
    return u.reshape(xs.shape), v.reshape(ys.shape), ok


def _fill_rates(u: np.ndarray, v: np.ndarray, grid: int) -> np.ndarray:
    """(B,) share of the grid x grid pixels hit by points u, v in [0, 1]: (B, ...)."""
    b = u.shape[0]
    u, v = np.clip(u, 0.0, 1.0), np.clip(v, 0.0, 1.0)
    px = np.minimum((u.reshape(b, -1) * grid).astype(np.int64), grid - 1)
    py = np.minimum((v.reshape(b, -1) * grid).astype(np.int64), grid - 1)
    flat = (np.arange(b)[:, None] * grid + py) * grid + px
    hits = np.bincount(flat.ravel(), minlength=b * grid * grid).reshape(b, -1)
    return (hits > 0).mean(1)


def search_classes(num_classes: int, seed: int, fill_rate: float = 0.2, check_resolution: int = 128,
                   batch: int = 256) -> FractalClasses:
    """The first `num_classes` random IFSs (in candidate order) whose filling rate is >= fill_rate.

    Candidate j is drawn from (seed, search stream, j): n ~ U{2..8} maps, a..f ~ U[-1, 1]. Its
    attractor is drawn with FractalDB's points-per-pixel density on a check_resolution grid
    (check_resolution**2 * 100000 / 512**2 points), stretched to the frame; a diverging or
    degenerate system fails the check.
    """
    walkers = 32
    points = round(check_resolution**2 * _FRACTALDB_DENSITY)
    burn_in, steps = 20, -(-points // walkers)
    found: list[tuple[np.ndarray, np.ndarray, int, float]] = []
    j = examined = 0
    while len(found) < num_classes:
        if j > 200 * num_classes + 10_000:
            raise RuntimeError(f"fill_rate={fill_rate} accepted only {len(found)} of {j} random IFSs; lower it")
        maps = np.zeros((batch, MAX_MAPS, 6))
        n_maps = np.empty(batch, np.int64)
        start = np.empty((batch, walkers, 2))
        choice = np.empty((batch, burn_in + steps, walkers))
        for i in range(batch):
            rng = np.random.default_rng((seed, _SEARCH_CODE, j + i))
            n_maps[i] = rng.integers(MIN_MAPS, MAX_MAPS + 1)
            maps[i, : n_maps[i]] = rng.uniform(-1.0, 1.0, (n_maps[i], 6))
            start[i] = rng.uniform(-1.0, 1.0, (walkers, 2))
            choice[i] = rng.random((burn_in + steps, walkers))
        probs = _ifs_probs(maps, n_maps)
        xs, ys, _ = chaos_game(maps, probs, n_maps, start, choice, burn_in)
        u, v, ok = _normalise(xs, ys)
        rates = np.where(ok, _fill_rates(u, v, check_resolution), 0.0)
        for i in range(batch):
            if rates[i] >= fill_rate and len(found) < num_classes:
                found.append((maps[i], probs[i], int(n_maps[i]), float(rates[i])))
                examined = j + i + 1
        j += batch
    maps_, probs_, n_, fill_ = zip(*found)
    return FractalClasses(np.stack(maps_), np.stack(probs_), np.array(n_), np.array(fill_), candidates=examined)


@dataclass(frozen=True)
class RenderSettings:
    resolution: int = 32    # output side in pixels
    supersample: int = 2    # points are plotted on a grid this many times finer, then area-averaged
    walkers: int = 64       # parallel chaos-game points per image
    steps: int = 96         # plotted steps per walker (walkers * steps points per image)
    burn_in: int = 16       # discarded first steps per walker
    jitter: float = 0.05    # each map parameter is multiplied by U[1 - jitter, 1 + jitter]
    min_scale: float = 0.6  # the attractor fills a random square box of side min_scale..1 of the image
    trim: float = 0.01      # the box spans the [trim, 1 - trim] quantiles of each axis; points outside are dropped


def _hsv_colours(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) uniforms -> (..., 3) RGB in [0, 1]: any hue, saturation 0.4-1, value 0.6-1."""
    h, s, v = hsv[..., 0], 0.4 + 0.6 * hsv[..., 1], 0.6 + 0.4 * hsv[..., 2]
    rgb = np.vectorize(colorsys.hsv_to_rgb, otypes=[float, float, float])(h, s, v)
    return np.stack(rgb, axis=-1)


def _render_chunk(classes: FractalClasses, labels: np.ndarray, rngs: list[np.random.Generator],
                  s: RenderSettings) -> np.ndarray:
    """Images (B, R, R, 3) uint8 of classes[labels], image b drawn from rngs[b]."""
    b, w, t = len(labels), s.walkers, s.burn_in + s.steps
    n_small = MAX_MAPS * 6 + MAX_MAPS * 3 + 5 + w * 2
    draws = np.empty((b, n_small))
    choice = np.empty((b, t, w), np.float32)
    for i, rng in enumerate(rngs):
        draws[i] = rng.random(n_small)
        choice[i] = rng.random((t, w), dtype=np.float32)
    jitter, colour, place, start = np.split(draws, np.cumsum([MAX_MAPS * 6, MAX_MAPS * 3, 5]), axis=1)
    n_maps = classes.n_maps[labels]
    nominal = classes.maps[labels]
    maps = nominal * (1.0 + s.jitter * (2.0 * jitter.reshape(b, MAX_MAPS, 6) - 1.0))
    start = 2.0 * start.reshape(b, w, 2) - 1.0
    xs, ys, k = chaos_game(maps, _ifs_probs(maps, n_maps), n_maps, start, choice, s.burn_in)
    u, v, ok = _normalise(xs, ys, s.trim)
    if not ok.all():  # a jittered system diverged or collapsed: draw that image with the class's own maps
        bad = ~ok
        xs2, ys2, k2 = chaos_game(nominal[bad], classes.probs[labels][bad], n_maps[bad], start[bad],
                                  choice[bad], s.burn_in)
        u[bad], v[bad], _ = _normalise(xs2, ys2, s.trim)
        k[bad] = k2
    # placement: box side, its offset (2) and the two flips
    grid = s.resolution * s.supersample
    side = (s.min_scale + (1.0 - s.min_scale) * place[:, 0]) * grid
    off_x, off_y = place[:, 1] * (grid - side), place[:, 2] * (grid - side)
    u = np.where(place[:, 3, None, None] < 0.5, u, 1.0 - u)
    v = np.where(place[:, 4, None, None] < 0.5, v, 1.0 - v)
    inside = ((u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)).ravel()
    px = np.clip((off_x[:, None, None] + u * side[:, None, None]).astype(np.int64), 0, grid - 1)
    py = np.clip((off_y[:, None, None] + v * side[:, None, None]).astype(np.int64), 0, grid - 1)
    flat = ((np.arange(b)[:, None, None] * grid + py) * grid + px).ravel()[inside]
    rgb = _hsv_colours(colour.reshape(b, MAX_MAPS, 3))  # (B, 8, 3): one colour per map
    point_rgb = rgb[np.arange(b)[:, None, None], k].reshape(-1, 3)[inside]
    size = b * grid * grid
    hits = np.bincount(flat, minlength=size)
    sums = np.stack([np.bincount(flat, weights=point_rgb[:, c], minlength=size) for c in range(3)], axis=-1)
    fine = sums / np.maximum(hits, 1)[:, None]  # mean colour of the points in each fine pixel, 0 if none
    image = fine.reshape(b, s.resolution, s.supersample, s.resolution, s.supersample, 3).mean((2, 4))
    return np.rint(255.0 * image).astype(np.uint8)


def render_fractals(size: int, split: str, seed: int, classes: FractalClasses,
                    settings: RenderSettings = RenderSettings()) -> tuple[np.ndarray, np.ndarray]:
    """images: (size, R, R, 3) uint8, labels: (size,) = i % num_classes.

    Image i is drawn from the random stream (seed, split, i) alone (plus the class it shows).
    """
    labels = np.arange(size) % len(classes.n_maps)
    images = np.empty((size, settings.resolution, settings.resolution, 3), np.uint8)
    code = _SPLIT_CODES[split]
    for lo in range(0, size, _CHUNK):
        hi = min(lo + _CHUNK, size)
        rngs = [np.random.default_rng((seed, code, i)) for i in range(lo, hi)]
        images[lo:hi] = _render_chunk(classes, labels[lo:hi], rngs, settings)
    return images, labels


def fractals(classes: int = 100, train_size: int = 50_000, test_size: int = 5_000, resolution: int = 32,
             seed: int = 0, fill_rate: float = 0.2, jitter: float = 0.05, min_scale: float = 0.6, trim: float = 0.01,
             supersample: int = 2, walkers: int = 64, steps: int = 96, validate_on_test: bool = False) -> RawSplits:
    """FractalDB-style splits: `classes` IFS classes, balanced, fixed by `seed` (see the module doc).

    validate_on_test: the test split is also the validation split (pretraining selects its weights on the
    held-out images, as the shipped checkpoint's recipe did), so the training split is used whole.
    (conf/dataset/fractals.yaml sets `source.classes: ${..num_classes}`.)"""
    systems = search_classes(classes, seed, fill_rate)
    settings = RenderSettings(resolution=resolution, supersample=supersample, walkers=walkers, steps=steps,
                              jitter=jitter, min_scale=min_scale, trim=trim)
    train = ArrayImages(*render_fractals(train_size, "train", seed, systems, settings))
    test = ArrayImages(*render_fractals(test_size, "test", seed, systems, settings))
    return RawSplits(train=train, test=test, val=test if validate_on_test else None)
