"""The texture-mosaic benchmark: real textures in seeded layouts, with exact label maps.

Each image is assembled from 2-8 regions; every region is filled with a different real
texture (scikit-image's bundled brick, grass and gravel textures and crops of its bundled
photographs), so the ground truth is exact by construction. Three layouts:

* ``"voronoi"``: the Voronoi cells of random sites (convex regions, straight borders);
* ``"polygons"``: a background texture with random star-shaped polygons painted on it;
* ``"cracks"``: a background texture crossed by thin meandering bands of other textures, a
  stand-in for cracks (thin, elongated structures, as in OmniCrack30k).

Labels are *texture classes* (indices into :data:`MOSAIC_CLASSES`), so the same class means
the same texture in every image and the dataset-level protocol is meaningful;
``return_regions=True`` also gives the region map, in which 0 is the background of the
``polygons`` and ``cracks`` layouts.

How it is made, so that anyone can regenerate it bit for bit
-------------------------------------------------------------
1. Seeds: image ``i`` of version ``v`` uses ``benchmark_seed(v, i)``, the first 8 bytes
   (little-endian) of ``sha256(f"segbook-mosaic:{v}:{i}")``. Its layout is
   ``LAYOUTS[i % 3]``.
2. Randomness: only the raw 64-bit output of numpy's PCG64 bit generator seeded with that
   seed (``np.random.PCG64(seed).random_raw()``), mapped to integers by ``% n``. numpy
   guarantees that raw stream; its distribution methods may change between releases, so
   they are not used.
3. Geometry in integers only: Voronoi cells by exact squared distances (ties to the lowest
   site), polygons rasterised by an even-odd test in integer cross products with vertex
   directions from a fixed table of integers, bands by an integer random walk dilated by an
   integer disk. No floating point touches a label.
4. Textures: lossless PNGs bundled with scikit-image (JPEG sources are avoided: decoders
   differ), cropped by fixed boxes, rotated/flipped by a random multiple of 90 degrees,
   mirror-tiled and shifted by a random offset. :func:`texture_digest` hashes them.
5. Checks: a layout is redrawn (from the same stream) until every region keeps a minimum
   area. ``tests/test_mosaic.py`` pins the sha256 of one image and label map.

A change to any of this must bump the version (``MOSAIC_VERSIONS``).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

MOSAIC_VERSIONS = ("v1",)
LAYOUTS = ("voronoi", "polygons", "cracks")
MIN_REGIONS, MAX_REGIONS = 2, 8


@dataclass(frozen=True)
class Texture:
    """A texture class: a box cropped from a bundled scikit-image picture."""

    name: str
    loader: str  # skimage.data function
    box: tuple[int, int, int, int] | None  # rows r0:r1, columns c0:c1; None = whole image
    description: str


#: Texture classes of version v1; a label value is an index into this tuple.
TEXTURES = (
    Texture("brick", "brick", None, "brick wall (CC0Textures Bricks25, CC0)"),
    Texture("grass", "grass", None, "grass (DeviantArt linolafett, CC0)"),
    Texture("gravel", "gravel", None, "gravel (CC0Textures Gravel04, CC0)"),
    Texture("fur", "chelsea", (150, 300, 0, 120), "cat fur and whiskers (chelsea, CC0)"),
    Texture("wood", "coffee", (0, 110, 440, 600), "wooden table top (coffee, CC0)"),
    Texture("fabric", "astronaut", (350, 512, 0, 110),
            "orange flight-suit fabric (astronaut, public domain)"),
    Texture("moon", "moon", (0, 250, 300, 512), "lunar surface (moon)"),
    Texture("coins", "coins", None, "rows of coins on grey (coins, no known restrictions)"),
    Texture("stroma", "immunohistochemistry", (200, 512, 400, 512),
            "blue-stained stroma (immunohistochemistry, no known restrictions)"),
    Texture("glands", "immunohistochemistry", (0, 150, 0, 150),
            "brown-stained glands (immunohistochemistry, no known restrictions)"),
)
MOSAIC_CLASSES = tuple(t.name for t in TEXTURES)

# Integer directions round(1024 * (sin, cos)) of 32 equally spaced angles (row, column).
_DIR32 = (
    (0, 1024), (200, 1004), (392, 946), (569, 851), (724, 724), (851, 569), (946, 392),
    (1004, 200), (1024, 0), (1004, -200), (946, -392), (851, -569), (724, -724), (569, -851),
    (392, -946), (200, -1004), (0, -1024), (-200, -1004), (-392, -946), (-569, -851),
    (-724, -724), (-851, -569), (-946, -392), (-1004, -200), (-1024, 0), (-1004, 200),
    (-946, 392), (-851, 569), (-724, 724), (-569, 851), (-392, 946), (-200, 1004),
)
# 8-neighbour steps (row, column), counter-clockwise from "right".
_DIR8 = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
_MAX_TRIES = 200


class _IntStream:
    """Integers from PCG64's raw output only (stable across numpy releases)."""

    def __init__(self, seed: int):
        self._bits = np.random.PCG64(seed)

    def below(self, n: int) -> int:
        return int(self._bits.random_raw()) % n

    def between(self, lo: int, hi: int) -> int:  # inclusive
        return lo + self.below(hi - lo + 1)

    def sample(self, n: int, k: int) -> list[int]:
        """k distinct values of range(n), by a partial Fisher-Yates shuffle."""
        pool = list(range(n))
        for i in range(k):
            j = i + self.below(n - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


def benchmark_seed(version: str, index: int) -> int:
    """The seed of image ``index`` of benchmark ``version``."""
    digest = hashlib.sha256(f"segbook-mosaic:{version}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@functools.cache
def _texture(index: int) -> np.ndarray:
    from skimage import data as skdata

    from segbook.data.samples import to_rgb_uint8

    tex = TEXTURES[index]
    image = to_rgb_uint8(getattr(skdata, tex.loader)())
    if tex.box is not None:
        r0, r1, c0, c1 = tex.box
        image = image[r0:r1, c0:c1]
    image = np.ascontiguousarray(image)
    image.setflags(write=False)
    return image


def texture_digest() -> str:
    """sha256 over the texture crops (what the bundled pictures contribute to the benchmark)."""
    h = hashlib.sha256()
    for i in range(len(TEXTURES)):
        t = _texture(i)
        h.update(repr(t.shape).encode())
        h.update(t.tobytes())
    return h.hexdigest()


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _voronoi(s: _IntStream, h: int, w: int, n: int):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.int64)
    min_gap = min(h, w) // (n + 2)
    for _ in range(_MAX_TRIES):
        sites = [(s.below(h), s.below(w)) for _ in range(n)]
        if any((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 < min_gap ** 2
               for i, a in enumerate(sites) for b in sites[:i]):
            continue
        d2 = np.stack([(yy - y) ** 2 + (xx - x) ** 2 for y, x in sites])
        regions = d2.argmin(axis=0)
        if np.bincount(regions.ravel(), minlength=n).min() >= h * w // 50:
            return regions
    raise RuntimeError("could not draw a Voronoi layout with large enough cells")


def _polygon_mask(ys: list[int], xs: list[int], h: int, w: int) -> np.ndarray:
    """Even-odd rasterisation at integer pixel positions, in exact integer arithmetic."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.int64)
    inside = np.zeros((h, w), bool)
    for k in range(len(ys)):
        y1, x1, y2, x2 = ys[k - 1], xs[k - 1], ys[k], xs[k]
        if y1 == y2:
            continue
        crosses = (y1 > yy) != (y2 > yy)
        # x < x1 + (y - y1)(x2 - x1)/(y2 - y1), multiplied through by (y2 - y1).
        lhs = (xx - x1) * (y2 - y1)
        rhs = (yy - y1) * (x2 - x1)
        left = lhs < rhs if y2 > y1 else lhs > rhs
        inside ^= crosses & left
    return inside


def _polygons(s: _IntStream, h: int, w: int, n: int):
    side = min(h, w)
    for _ in range(_MAX_TRIES):
        regions = np.zeros((h, w), np.int64)
        for k in range(1, n):
            cy, cx = s.between(h // 8, h - 1 - h // 8), s.between(w // 8, w - 1 - w // 8)
            n_vertices = s.between(5, 9)
            angles = sorted(s.sample(len(_DIR32), n_vertices))
            ys, xs = [], []
            for a in angles:
                r = s.between(side // 10, side // 3)
                ys.append(cy + _DIR32[a][0] * r // 1024)
                xs.append(cx + _DIR32[a][1] * r // 1024)
            regions[_polygon_mask(ys, xs, h, w)] = k
        if np.bincount(regions.ravel(), minlength=n).min() >= h * w // 60:
            return regions
    raise RuntimeError("could not draw a polygon layout with large enough regions")


def _walk(s: _IntStream, h: int, w: int) -> np.ndarray:
    """A meandering path across the image: heading within 45 degrees of its start."""
    side = s.below(4)
    if side == 0:
        y, x, base = 0, s.below(w), 2          # from the top, heading down
    elif side == 1:
        y, x, base = s.below(h), w - 1, 4      # from the right, heading left
    elif side == 2:
        y, x, base = h - 1, s.below(w), 6      # from the bottom, heading up
    else:
        y, x, base = s.below(h), 0, 0          # from the left, heading right
    heading, run = base, s.between(4, 16)
    path = np.zeros((h, w), bool)
    for _ in range(4 * (h + w)):
        if not (0 <= y < h and 0 <= x < w):
            break
        path[y, x] = True
        run -= 1
        if run == 0:
            turn = s.below(3) - 1                # -1, 0 or +1 (in 45-degree steps)
            offset = ((heading + turn - base + 4) % 8) - 4
            if -1 <= offset <= 1:
                heading = (base + offset) % 8
            run = s.between(4, 16)
        dy, dx = _DIR8[heading]
        y, x = y + dy, x + dx
    return path


def _cracks(s: _IntStream, h: int, w: int, n: int):
    for _ in range(_MAX_TRIES):
        regions = np.zeros((h, w), np.int64)
        for k in range(1, n):
            band = ndimage.binary_dilation(_walk(s, h, w), structure=_disk(s.between(1, 3)))
            regions[band] = k
        if np.bincount(regions.ravel(), minlength=n).min() >= min(h, w):
            return regions
    raise RuntimeError("could not draw a crack layout with visible bands")


_LAYOUT_FUNCS = {"voronoi": _voronoi, "polygons": _polygons, "cracks": _cracks}


def _texture_canvas(s: _IntStream, index: int, h: int, w: int) -> np.ndarray:
    tex = _texture(index)
    turn = s.below(8)
    tex = np.rot90(tex, turn % 4)
    if turn >= 4:
        tex = tex[:, ::-1]
    top = np.concatenate([tex, tex[:, ::-1]], axis=1)
    block = np.concatenate([top, top[::-1]], axis=0)  # mirror tiling: no seams
    bh, bw = block.shape[:2]
    oy, ox = s.below(bh), s.below(bw)
    reps_y, reps_x = -(-(h + oy) // bh), -(-(w + ox) // bw)
    return np.tile(block, (reps_y, reps_x, 1))[oy:oy + h, ox:ox + w]


def _check_size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be an int or (height, width), got {size!r}") from None
    if h < 32 or w < 32:
        raise ValueError(f"size must be at least 32 x 32, got {h} x {w}")
    return h, w


def make_mosaic(seed: int, size=256, n_regions: int | None = None, layout: str = "voronoi",
                return_regions: bool = False):
    """One texture mosaic and its exact label map.

    Parameters
    ----------
    seed : non-negative integer; the same seed gives the same bytes on any machine.
    size : ``H`` (square) or ``(H, W)``, at least 32.
    n_regions : 2-8; default drawn from the seed's stream.
    layout : ``"voronoi"``, ``"polygons"`` or ``"cracks"``.
    return_regions : also return the region map (0 = background for polygons/cracks).

    Returns
    -------
    image : (H, W, 3) uint8.
    labels : (H, W) int64 texture classes (indices into :data:`MOSAIC_CLASSES`); every region
        has a different texture.
    regions : (H, W) int64 region ids ``0..n_regions-1`` (only with ``return_regions``).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    h, w = _check_size(size)
    s = _IntStream(int(seed))
    if n_regions is None:
        n_regions = s.between(MIN_REGIONS, MAX_REGIONS)
    if not isinstance(n_regions, (int, np.integer)) or not MIN_REGIONS <= n_regions <= MAX_REGIONS:
        raise ValueError(f"n_regions must be an integer in [{MIN_REGIONS}, {MAX_REGIONS}], "
                         f"got {n_regions!r}")
    n_regions = int(n_regions)
    regions = _LAYOUT_FUNCS[layout](s, h, w, n_regions)
    classes = np.array(s.sample(len(TEXTURES), n_regions), np.int64)
    image = np.zeros((h, w, 3), np.uint8)
    for k in range(n_regions):
        mask = regions == k
        image[mask] = _texture_canvas(s, int(classes[k]), h, w)[mask]
    labels = classes[regions]
    return (image, labels, regions) if return_regions else (image, labels)


@dataclass
class MosaicBenchmark:
    """A fixed, versioned set of mosaics (see :func:`mosaic_benchmark`).

    ``bench[i]`` is ``(image, labels)``; ``len(bench)`` the number of images.
    """

    version: str
    size: tuple[int, int]
    seeds: list[int]
    layouts: list[str]
    images: list[np.ndarray] = field(repr=False)
    labels: list[np.ndarray] = field(repr=False)
    regions: list[np.ndarray] = field(repr=False)
    class_names: tuple[str, ...] = MOSAIC_CLASSES

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_regions(self) -> list[int]:
        return [int(r.max()) + 1 for r in self.regions]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def digest(self) -> str:
        """sha256 over every image and label map, in order (to compare two regenerations)."""
        h = hashlib.sha256()
        for image, labels in zip(self.images, self.labels):
            h.update(image.tobytes())
            h.update(labels.astype("<i8").tobytes())
        return h.hexdigest()


def mosaic_benchmark(version: str = "v1", n: int = 30, size=256) -> MosaicBenchmark:
    """The first ``n`` images of the fixed benchmark ``version``.

    Image ``i`` is ``make_mosaic(benchmark_seed(version, i), size, layout=LAYOUTS[i % 3])``
    (its number of regions drawn from its own stream), so a longer benchmark extends a
    shorter one. The canonical size is 256; other sizes give other (equally deterministic)
    images.
    """
    if version not in MOSAIC_VERSIONS:
        raise ValueError(f"unknown mosaic version {version!r}; known: {', '.join(MOSAIC_VERSIONS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    h, w = _check_size(size)
    seeds, layouts, images, labels, regions = [], [], [], [], []
    for i in range(int(n)):
        seed, layout = benchmark_seed(version, i), LAYOUTS[i % len(LAYOUTS)]
        image, lab, reg = make_mosaic(seed, (h, w), layout=layout, return_regions=True)
        seeds.append(seed)
        layouts.append(layout)
        images.append(image)
        labels.append(lab)
        regions.append(reg)
    return MosaicBenchmark(version, (h, w), seeds, layouts, images, labels, regions)
