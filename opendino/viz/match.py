"""Patch matching between two images: mutual nearest neighbours by cosine similarity of patch features, as in the
paper's matching figure (§7.5). The selection rule is ours: mutual nearest neighbours among the allowed patches
(foreground ones in `opendino viz match`), strongest first, ties broken by the first image's patch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opendino.viz.core import ImageFeatures

__all__ = ["Matches", "mutual_nearest_neighbours"]


@dataclass(frozen=True)
class Matches:
    """Matched patches, most similar first."""

    a: np.ndarray  # (n, 2) int: (row, column) in the first image's patch grid
    b: np.ndarray  # (n, 2) int: (row, column) in the second image's patch grid
    similarity: np.ndarray  # (n,) float32 cosine similarity, descending

    def __len__(self) -> int:
        return len(self.similarity)


def _unit(patches: np.ndarray) -> np.ndarray:
    x = patches.reshape(-1, patches.shape[-1]).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mutual_nearest_neighbours(
    a: ImageFeatures,
    b: ImageFeatures,
    *,
    mask_a: np.ndarray | None = None,
    mask_b: np.ndarray | None = None,
    top: int = 0,
) -> Matches:
    """Pairs (i in a, j in b) where j is i's most cosine-similar patch of b and i is j's of a, among the patches where
    `mask_a` / `mask_b` ((h, w) bool, default all) are True; the `top` most similar (0 = all)."""
    if a.patches.shape[-1] != b.patches.shape[-1]:
        raise ValueError(f"feature sizes differ: {a.patches.shape[-1]} vs {b.patches.shape[-1]}")
    if top < 0:
        raise ValueError(f"top={top}: must be >= 0 (0 = all matches)")
    masks = []
    for name, feats, mask in (("mask_a", a, mask_a), ("mask_b", b, mask_b)):
        m = np.ones(feats.grid, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if m.shape != feats.grid:
            raise ValueError(f"{name} has shape {m.shape}, expected the patch grid {feats.grid}")
        masks.append(np.flatnonzero(m))
    ia, ib = masks
    empty = Matches(np.zeros((0, 2), int), np.zeros((0, 2), int), np.zeros(0, np.float32))
    if len(ia) == 0 or len(ib) == 0:
        return empty
    sim = _unit(a.patches)[ia] @ _unit(b.patches)[ib].T  # (na, nb)
    best_b = sim.argmax(axis=1)  # first maximum: deterministic ties
    best_a = sim.argmax(axis=0)
    mutual = np.flatnonzero(best_a[best_b] == np.arange(len(ia)))
    scores = sim[mutual, best_b[mutual]]
    order = np.argsort(-scores, kind="stable")
    if top:
        order = order[:top]
    rows_a, rows_b = ia[mutual[order]], ib[best_b[mutual[order]]]
    wa, wb = a.grid[1], b.grid[1]
    return Matches(
        np.stack([rows_a // wa, rows_a % wa], axis=1),
        np.stack([rows_b // wb, rows_b % wb], axis=1),
        scores[order].astype(np.float32),
    )
