"""A labelled image set drawn procedurally: the no-download data of the quickstart and of tests.

Ten classes of shapes and textures (disc, square, triangle, cross, ring, horizontal / vertical / diagonal stripes,
checkerboard, dots) with random colours, sizes, positions, backgrounds and noise, written as PNG files in the
ImageFolder layout `root/<class>/<class>_<i>.png`. The same seed gives the same files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "make_shapes_dataset", "render_shape"]

CLASSES = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "hstripes",
    "vstripes",
    "dstripes",
    "checker",
    "dots",
)


def _colour(rng: np.random.Generator, avoid: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    while True:
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        if avoid is None or sum(abs(a - b) for a, b in zip(c, avoid, strict=True)) > 200:
            return c  # type: ignore[return-value]


def _box(rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    r = size * rng.uniform(0.18, 0.38)
    cx, cy = rng.uniform(r, size - r, 2)
    return float(cx), float(cy), float(r)


def _shape(kind: str) -> Callable[[ImageDraw.ImageDraw, np.random.Generator, int, tuple], None]:
    def draw(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, fg: tuple) -> None:
        cx, cy, r = _box(rng, size)
        if kind == "disc":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        elif kind == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
        elif kind == "triangle":
            angle = rng.uniform(0, 2 * np.pi)
            pts = [
                (cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
                for k in range(3)
            ]
            d.polygon(pts, fill=fg)
        elif kind == "cross":
            w = r / 3
            d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
            d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
        elif kind == "ring":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=max(2, int(r / 3)))

    return draw


def _texture(kind: str) -> Callable[[ImageDraw.ImageDraw, np.random.Generator, int, tuple], None]:
    def draw(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, fg: tuple) -> None:
        period = int(rng.integers(max(4, size // 12), max(6, size // 5)))
        half = max(1, period // 2)
        if kind == "hstripes":
            for y in range(int(rng.integers(0, period)), size, period):
                d.rectangle((0, y, size, y + half - 1), fill=fg)
        elif kind == "vstripes":
            for x in range(int(rng.integers(0, period)), size, period):
                d.rectangle((x, 0, x + half - 1, size), fill=fg)
        elif kind == "dstripes":
            sign = 1 if rng.random() < 0.5 else -1
            for k in range(-2 * size, 2 * size, period):
                d.line([(k, 0), (k + sign * size, size)], fill=fg, width=half)
        elif kind == "checker":
            for i, y in enumerate(range(0, size, half)):
                for j, x in enumerate(range(0, size, half)):
                    if (i + j) % 2 == 0:
                        d.rectangle((x, y, x + half - 1, y + half - 1), fill=fg)
        elif kind == "dots":
            rad = max(1.5, period / 4)
            for cy in np.arange(rng.uniform(0, period), size, period).tolist():
                for cx in np.arange(rng.uniform(0, period), size, period).tolist():
                    d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=fg)

    return draw


_DRAW = {k: (_shape(k) if k in CLASSES[:5] else _texture(k)) for k in CLASSES}


def render_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `kind`: a random background, the figure in a contrasting colour, pixel noise."""
    if kind not in _DRAW:
        raise ValueError(f"unknown class {kind!r}: expected one of {CLASSES}")
    bg = _colour(rng)
    img = Image.new("RGB", (size, size), bg)
    _DRAW[kind](ImageDraw.Draw(img), rng, size, _colour(rng, avoid=bg))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_shapes_dataset(
    root: str | Path, *, n_per_class: int = 30, size: int = 64, seed: int = 0
) -> list[tuple[str, int]]:
    """Write `n_per_class` images of each class under `root`; return [(path, label)] in class order."""
    if n_per_class <= 0 or size < 16:
        raise ValueError(f"n_per_class={n_per_class} must be positive and size={size} at least 16")
    rng = np.random.default_rng(seed)
    root = Path(root)
    items = []
    for label, kind in enumerate(CLASSES):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            path = folder / f"{kind}_{i:04d}.png"
            render_shape(kind, size, rng).save(path)
            items.append((str(path), label))
    return items
