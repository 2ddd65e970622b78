"""Pictures of the viz results: pure renderers that return uint8 arrays (what a web page shows) and matplotlib figures
saved as PNG (what `opendino viz` writes).

Conventions kept in every picture: patch maps are upsampled by nearest neighbour (one block per patch, nothing
invented between patches); background patches are black in PCA pictures and dimmed to a quarter in foreground
overlays; attention uses `inferno` with each map scaled to its own maximum; depth uses `magma_r` (near bright, far
dark) with a colorbar in metres; segmentation uses the evaluation's palette with a legend of the classes present.
No axes, ticks or frames; every panel has a title saying what it shows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from opendino.eval.pictures import pyplot, save_figure, save_image_grid
from opendino.viz.attention import AttentionMaps
from opendino.viz.heads import DepthMap, SegMap
from opendino.viz.match import Matches

__all__ = [
    "colormap",
    "depth_picture",
    "foreground_overlay",
    "heatmap",
    "mask_picture",
    "match_picture",
    "pca_picture",
    "save_attention_figure",
    "save_depth_figure",
    "save_match_figure",
    "save_npy",
    "save_pca_figure",
    "save_pca_grid",
    "save_png",
    "save_seg_figure",
    "seg_picture",
    "upsample",
]

BACKGROUND_DIM = 0.25  # brightness kept by background pixels in foreground overlays


# ---------------------------------------------------------------------------------------------- renderers
def upsample(grid: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(h, w, ...) patch map -> (H, W, ...) by nearest neighbour (exact blocks when H, W are multiples of h, w)."""
    h, w = grid.shape[:2]
    rows = np.arange(size[0]) * h // size[0]
    cols = np.arange(size[1]) * w // size[1]
    return grid[rows][:, cols]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def colormap(values: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """(...) values -> (..., 3) uint8 colours of matplotlib's `cmap` over [vmin, vmax]."""
    import matplotlib

    scaled = (np.asarray(values, dtype=np.float64) - vmin) / (vmax - vmin if vmax > vmin else 1.0)
    return _to_uint8(matplotlib.colormaps[cmap](np.clip(scaled, 0, 1))[..., :3])


def pca_picture(rgb: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(h, w, 3) PCA colours in [0, 1] -> (H, W, 3) uint8."""
    return _to_uint8(upsample(rgb, size))


def mask_picture(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(h, w) bool -> (H, W) uint8, foreground 255, background 0."""
    return upsample(np.asarray(mask, dtype=bool), size).astype(np.uint8) * 255


def foreground_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 image with its background patches dimmed to BACKGROUND_DIM."""
    keep = upsample(np.asarray(mask, dtype=bool), image.shape[:2])[..., None]
    return np.where(keep, image, (image * BACKGROUND_DIM).astype(np.uint8))


def heatmap(values: np.ndarray, size: Sequence[int], cmap: str = "inferno") -> np.ndarray:
    """(h, w) non-negative map -> (H, W, 3) uint8, scaled from 0 to its maximum."""
    return colormap(upsample(values, size), cmap, 0.0, float(np.max(values)))


def depth_picture(depth: np.ndarray, vmin: float, vmax: float, cmap: str = "magma_r") -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8 over [vmin, vmax] (near bright, far dark with the default map)."""
    return colormap(depth, cmap, vmin, vmax)


def seg_picture(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 with `colours` (K, 3) in [0, 1]; unknown classes black."""
    table = np.concatenate([np.asarray(colours, dtype=np.float64), np.zeros((1, 3))])
    index = np.where((labels >= 0) & (labels < len(colours)), labels, len(colours))
    return _to_uint8(table[index])


def match_picture(
    image_a: np.ndarray,
    image_b: np.ndarray,
    matches: Matches,
    colours: np.ndarray,
    patch_size: int,
    *,
    gap: int = 16,
) -> np.ndarray:
    """Both images side by side (top-aligned, white around) with a line per match from patch centre to patch centre,
    `colours` (n, 3) in [0, 1]; the strongest matches are drawn last (on top)."""
    (ha, wa), (hb, wb) = image_a.shape[:2], image_b.shape[:2]
    canvas = Image.new("RGB", (wa + gap + wb, max(ha, hb)), (255, 255, 255))
    canvas.paste(Image.fromarray(image_a), (0, 0))
    canvas.paste(Image.fromarray(image_b), (wa + gap, 0))
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(min(ha, hb) / 150))
    radius = width + 2
    half = patch_size / 2
    for k in reversed(range(len(matches))):
        (ra, ca), (rb, cb) = matches.a[k], matches.b[k]
        xa, ya = ca * patch_size + half, ra * patch_size + half
        xb, yb = wa + gap + cb * patch_size + half, rb * patch_size + half
        colour = tuple(int(v) for v in _to_uint8(np.asarray(colours[k])))
        draw.line([(xa, ya), (xb, yb)], fill=colour, width=width)
        for x, y in ((xa, ya), (xb, yb)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(255, 255, 255))
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------------- files
def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def save_png(path: str | os.PathLike[str], picture: np.ndarray) -> Path:
    """A (H, W) or (H, W, 3) uint8 array as a PNG, written atomically."""
    path = Path(path)
    tmp = _tmp(path)
    Image.fromarray(np.ascontiguousarray(picture)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """`array` as a .npy file, written atomically."""
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return path


def _panels(n: int, *, cell: float = 4.0, ncols: int | None = None, height_ratio: float = 1.0):
    plt = pyplot()
    ncols = ncols or n
    nrows = -(-n // ncols)
    size = (cell * ncols, (cell * height_ratio + 0.3) * nrows + 0.4)  # room for titles and the suptitle
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return plt, fig, list(axes.flat)


def _save(plt, fig, path: str | os.PathLike[str], title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=12)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _ratio(image: np.ndarray) -> float:
    return image.shape[0] / image.shape[1]


def save_pca_figure(
    path: str | os.PathLike[str], image: np.ndarray, mask: np.ndarray, rgb: np.ndarray, *, title: str = ""
) -> Path:
    """image | foreground (background dimmed) | PCA colours (background black)."""
    size = image.shape[:2]
    h, w = mask.shape
    share = 100 * float(np.mean(mask))
    plt, fig, axes = _panels(3, height_ratio=_ratio(image))
    panels = [
        (image, f"input {size[1]}x{size[0]} px ({w}x{h} patches)"),
        (foreground_overlay(image, mask), f"foreground: {share:.0f}% of patches"),
        (pca_picture(rgb, size), "PCA of foreground patches (RGB = PC 1-3)"),
    ]
    for ax, (pic, text) in zip(axes, panels, strict=True):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(text, fontsize=10)
    return _save(plt, fig, path, title)


def save_pca_grid(
    path: str | os.PathLike[str],
    names: Sequence[str],
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    rgbs: Sequence[np.ndarray],
) -> Path:
    """One row per image: image | foreground | PCA colours (one PCA over the whole set)."""
    rows = [
        [img, foreground_overlay(img, m), pca_picture(c, img.shape[:2])]
        for img, m, c in zip(images, masks, rgbs, strict=True)
    ]
    titles = ["image", "foreground (1st component)", "PCA of the set's foreground"]
    return save_image_grid(rows, path, column_titles=titles, row_titles=[n[:24] for n in names], cell_size=3.0)


def save_attention_figure(path: str | os.PathLike[str], maps: AttentionMaps, *, title: str = "") -> Path:
    """image | mean over heads | one panel per head, each map scaled to its own maximum."""
    size = maps.image.shape[:2]
    n = 2 + len(maps.heads)
    ncols = -(-n // -(-n // 6))  # at most 6 columns, rows filled evenly (8 panels: 2 x 4)
    plt, fig, axes = _panels(n, cell=3.0, ncols=ncols, height_ratio=_ratio(maps.image))
    axes[0].imshow(maps.image)
    axes[0].set_title("input", fontsize=10)
    axes[1].imshow(heatmap(maps.mean, size), interpolation="nearest")
    axes[1].set_title("mean of the heads", fontsize=10)
    for i, head in enumerate(maps.heads):
        axes[2 + i].imshow(heatmap(head, size), interpolation="nearest")
        axes[2 + i].set_title(f"head {i} (max {head.max():.3f})", fontsize=10)
    return _save(plt, fig, path, title)


def save_match_figure(path: str | os.PathLike[str], picture: np.ndarray, *, title: str = "") -> Path:
    """The side-by-side picture of `match_picture` with a title."""
    plt, fig, axes = _panels(1, cell=8.0, height_ratio=_ratio(picture))
    axes[0].imshow(picture)
    return _save(plt, fig, path, title)


def save_depth_figure(path: str | os.PathLike[str], dm: DepthMap, *, title: str = "") -> Path:
    """image | predicted depth with a colorbar in metres (over the prediction's own range)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    lo, hi = float(dm.depth.min()), float(dm.depth.max())
    hi = hi if hi > lo else lo + 1e-3
    plt, fig, axes = _panels(2, height_ratio=_ratio(dm.image))
    axes[0].imshow(dm.image)
    axes[0].set_title("input", fontsize=10)
    axes[1].imshow(depth_picture(dm.depth, lo, hi))
    axes[1].set_title(f"predicted depth ({lo:.2f}-{hi:.2f} m)", fontsize=10)
    mappable = ScalarMappable(Normalize(lo, hi), cmap="magma_r")
    fig.colorbar(mappable, ax=axes[1], fraction=0.046, pad=0.02).set_label("depth (m)")
    return _save(plt, fig, path, title)


def save_seg_figure(path: str | os.PathLike[str], sm: SegMap, *, title: str = "") -> Path:
    """image | predicted classes, with a legend of the classes present (largest first, with their share)."""
    from matplotlib.patches import Patch

    counts = np.bincount(sm.labels.ravel(), minlength=len(sm.class_names))
    present = [k for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    plt, fig, axes = _panels(2, height_ratio=_ratio(sm.image))
    axes[0].imshow(sm.image)
    axes[0].set_title("input", fontsize=10)
    axes[1].imshow(seg_picture(sm.labels, sm.colours), interpolation="nearest")
    axes[1].set_title(f"predicted classes ({len(present)} present)", fontsize=10)
    handles = [
        Patch(color=tuple(sm.colours[k]), label=f"{sm.class_names[k]} {100 * counts[k] / counts.sum():.0f}%")
        for k in present
    ]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    return _save(plt, fig, path, title)
