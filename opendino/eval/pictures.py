"""Pictures of evaluation results, written with matplotlib's Agg backend (no display needed).

`save_confusion_matrix` for classifiers; `save_image_grid` for rows of images next to each other (segmentation and
depth predictions beside the ground truth, retrieval top-k rows); `thumbnail` reads an image file as a square
picture, optionally framed in a colour; `denormalize` turns a normalised CHW tensor back into an HxWx3 picture;
`pyplot` and `save_figure` for the evaluations' own plots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from opendino.data.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["denormalize", "pyplot", "save_confusion_matrix", "save_figure", "save_image_grid", "thumbnail"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def denormalize(
    image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float array in [0, 1]."""
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image.detach().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def save_figure(fig, path: str | os.PathLike[str]) -> Path:
    """Save `fig` to `path` atomically (a temporary name, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def save_confusion_matrix(
    cm: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Row-normalised confusion matrix (true label down, prediction across) with the counts written in small grids."""
    plt = pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2), 24.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), [str(c)[:18] for c in classes], rotation=90, fontsize=8)
        ax.set_yticks(range(n), [str(c)[:18] for c in classes], fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (rows normalised)")
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def save_image_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    path: str | os.PathLike[str],
    *,
    column_titles: Sequence[str] = (),
    row_titles: Sequence[str] = (),
    cmaps: Sequence[str | None] = (),
    vmin: Sequence[float | None] = (),
    vmax: Sequence[float | None] = (),
    cell_size: float = 2.4,
) -> Path:
    """A grid of pictures: rows[i][j] is (H, W, 3) in [0, 1], (H, W) drawn with cmaps[j] (per column), or None (empty).

    `vmin` / `vmax` fix the colour range of a column (e.g. the same depth range for prediction and ground truth).
    """
    plt = pyplot()
    if not rows or not rows[0]:
        raise ValueError("no pictures to draw")
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_size * n_cols, cell_size * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(row) or row[j] is None:
                continue
            img = np.asarray(row[j])
            cmap = cmaps[j] if j < len(cmaps) else None
            lo = vmin[j] if j < len(vmin) else None
            hi = vmax[j] if j < len(vmax) else None
            ax.imshow(img, cmap=cmap if img.ndim == 2 else None, vmin=lo, vmax=hi, interpolation="nearest")
            if i == 0 and j < len(column_titles):
                ax.set_title(column_titles[j], fontsize=9)
        if i < len(row_titles):
            axes[i][0].text(
                -0.05, 0.5, row_titles[i], transform=axes[i][0].transAxes, ha="right", va="center", fontsize=8
            )
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def thumbnail(
    path: str | os.PathLike[str], colour: tuple[float, float, float] | None = None, size: int = 112, *, fit: str = "pad"
) -> np.ndarray:
    """An image file as a (size, size, 3) picture in [0, 1]: padded with white (fit="pad") or centre-cropped
    (fit="crop"); with `colour`, framed by a 6-pixel border of that RGB colour."""
    from PIL import ImageOps

    from opendino.data.sources import load_image

    img = load_image(os.fspath(path))
    if fit == "pad":
        img = ImageOps.pad(img, (size, size), color=(255, 255, 255))
    elif fit == "crop":
        img = ImageOps.fit(img, (size, size))
    else:
        raise ValueError(f"fit={fit!r}: expected 'pad' or 'crop'")
    pic = np.asarray(img, dtype=np.float32) / 255.0
    if colour is None:
        return pic
    framed = np.empty((size + 12, size + 12, 3), dtype=np.float32)
    framed[:] = colour
    framed[6:-6, 6:-6] = pic
    return framed
