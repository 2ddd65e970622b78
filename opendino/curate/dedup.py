"""Near-duplicate removal: within the pool (self-dedup) and against evaluation images (relative dedup).

DINOv2 paper App. A.3 (facts sheet §3): every pool image's k = 64 nearest neighbours by cosine similarity, the edges
with similarity > threshold, the connected components of that graph (union-find), one image kept per component.
Relative dedup searches the pool with every reference (evaluation) image and removes the pool images above a
stricter threshold together with their whole duplicate component; the paper reuses the pool graph for it, so we
do: the pool graph is thresholded at the relative threshold (`expand_components`).

Thresholds: the paper's 0.6 (self) and 0.45 (relative) are for SSCD copy-detection descriptors, whose similarities
spread differently from DINOv2 CLS features; ours are CLS features, so `SELF_THRESHOLD` and `RELATIVE_THRESHOLD`
are only starting points (high, to stay on the side of keeping images; the relative one lower than the self one,
as in the paper). Calibrate them on the pool: `calibrate_threshold` with the similarities of planted copies.

Choices the paper leaves open: the image kept in a component is its lowest pool index (the first in the pool's
order, i.e. sorted paths); an edge needs similarity strictly above the threshold; a relative match is a pool image
among a reference's k nearest; a removed image is attributed to its most similar reference (ties: lower index).
Components: `scipy.sparse.csgraph.connected_components` on the thresholded k-NN graph, numbered by lowest member.
Memory: the graph is 12·k bytes per pool image (float32 similarity + int64 id): 768 B at k = 64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from opendino.curate.search import build_index, check_rows, checked_rows, search

__all__ = [
    "RELATIVE_THRESHOLD",
    "SELF_THRESHOLD",
    "Calibration",
    "RelativeDedup",
    "SelfDedup",
    "calibrate_threshold",
    "connected_components",
    "duplicate_examples",
    "knn_graph",
    "relative_dedup",
    "self_dedup",
]

SELF_THRESHOLD = 0.9  # cosine of DINOv2 CLS features above which two pool images are duplicates (paper: SSCD, 0.6)
RELATIVE_THRESHOLD = 0.8  # the same against evaluation images, looser to remove more (paper: SSCD, 0.45)
Graph = tuple[np.ndarray, np.ndarray]  # (sims float32 (n, k), ids int64 (n, k)): the k-NN graph of a pool


@dataclass(frozen=True)
class SelfDedup:
    """Result of `self_dedup` over a pool of n images."""

    keep: np.ndarray  # bool (n,): the one image kept per component
    component: np.ndarray  # int64 (n,): component id, numbered by lowest member (0 holds image 0)
    n_components: int  # = keep.sum()
    n_removed: int  # = n - n_components


@dataclass(frozen=True)
class RelativeDedup:
    """Result of `relative_dedup` over a pool of n images."""

    removed: np.ndarray  # bool (n,): pool images to drop
    matched_ref: np.ndarray  # int64 (n,): the reference image that removed it, -1 if kept
    similarity: np.ndarray  # float32 (n,): cosine to that reference (exact, also for expanded ones), -inf if kept
    direct: np.ndarray  # bool (n,): removed as a reference's neighbour (False: removed with its component)

    @property
    def n_removed(self) -> int:
        return int(self.removed.sum())


@dataclass(frozen=True)
class Calibration:
    """A threshold from `calibrate_threshold` and what it does on the given similarities."""

    threshold: float
    recall: float  # share of the duplicate similarities above the threshold
    false_rate: float  # share of the other similarities above it


def _check_threshold(threshold: Any, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating):
        raise TypeError(f"{name}={threshold!r}: a cosine similarity (float in [-1, 1]) expected")
    if not -1 <= threshold <= 1:  # also rejects NaN
        raise ValueError(f"{name}={threshold}: a cosine similarity in [-1, 1] expected")
    return float(threshold)


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r}: a positive integer expected")
    return int(value)


def _pool_index(x: np.ndarray, index: Any, kind: str, seed: int, device: str, progress: bool) -> Any:
    """`index` after checking that it holds the rows of `x`, or a new one built over them."""
    if index is None:
        return build_index(x, kind=kind, seed=seed, device=device, progress=progress)
    if index.ntotal != len(x) or index.d != x.shape[1]:
        raise ValueError(f"index holds {index.ntotal} vectors of dimension {index.d}; the pool is {x.shape}")
    return index


def knn_graph(
    x: Any,
    *,
    k: int = 64,
    index: Any = None,
    kind: str = "auto",
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16384,
    progress: bool = False,
) -> Graph:
    """The k nearest other pool images of every pool image: (sims float32 (n, k), ids int64 (n, k)), best first.

    `index` is an index over exactly the rows of `x` (`build_index(x)`, reused by the other stages); without it one
    is built with `kind`, `seed`, `device`. The image itself is taken out of its list (when it is not found, e.g. an
    exact copy outranks it in an IVF list, the last neighbour goes instead); missing neighbours are -1 / -inf.
    """
    k, batch_size = _check_count(k, "k"), _check_count(batch_size, "batch_size")
    x = check_rows(x, "x")
    index = _pool_index(x, index, kind, seed, device, progress)
    n = len(x)
    sims = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for start in tqdm(
        range(0, n, batch_size), desc="k-NN graph", unit="batch", dynamic_ncols=True, disable=not progress
    ):
        stop = min(start + batch_size, n)
        batch_sims, batch_ids = search(index, x[start:stop], k + 1, batch_size=batch_size)
        is_self = batch_ids == np.arange(start, stop)[:, None]  # at most one per row: ids in a row are distinct
        is_self[~is_self.any(axis=1), -1] = True
        sims[start:stop] = batch_sims[~is_self].reshape(stop - start, k)
        ids[start:stop] = batch_ids[~is_self].reshape(stop - start, k)
    return sims, ids


def _check_graph(graph: Any, n: int, name: str) -> Graph:
    if not isinstance(graph, tuple | list) or len(graph) != 2:
        raise TypeError(f"{name}: the (sims, ids) pair returned by knn_graph expected")
    sims, ids = np.asarray(graph[0]), np.asarray(graph[1])
    if sims.ndim != 2 or sims.shape != ids.shape or len(ids) != n:
        raise ValueError(f"{name}: sims and ids of shape ({n}, k) expected, got {sims.shape} and {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < -1 or ids.max() >= n)):
        raise ValueError(f"{name}: ids must be integers in [-1, {n})")
    return sims, ids


def connected_components(graph: Graph, threshold: float) -> np.ndarray:
    """Component of every image (int64 (n,)) in the graph of the edges with similarity > threshold.

    Components are numbered 0, 1, ... in the order of their lowest member, so the numbering depends only on the
    partition. Union-find's result; computed by `scipy.sparse.csgraph.connected_components`.
    """
    try:
        from scipy.sparse import coo_array
        from scipy.sparse.csgraph import connected_components as scipy_components
    except ImportError as error:
        raise ImportError("deduplication needs scipy: pip install 'opendino[curate]'") from error
    threshold = _check_threshold(threshold)
    sims, ids = graph
    n = len(ids)
    rows, cols = np.nonzero((sims > threshold) & (ids >= 0))
    edges = coo_array((np.ones(len(rows), dtype=np.int8), (rows, ids[rows, cols])), shape=(n, n)).tocsr()
    _, labels = scipy_components(edges, directed=False)
    _, lowest_member, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(lowest_member), dtype=np.int64)
    rank[np.argsort(lowest_member)] = np.arange(len(lowest_member))
    return rank[inverse]


def self_dedup(
    x: Any,
    *,
    k: int = 64,
    threshold: float = SELF_THRESHOLD,
    graph: Graph | None = None,
    index: Any = None,
    kind: str = "auto",
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
) -> SelfDedup:
    """Near-duplicate components of a pool of unit vectors `x` (n, d), keeping the lowest pool index of each.

    Pass `graph` (from `knn_graph`, any k) to rethreshold without searching again; otherwise it is computed with `k`
    and `index` (or a new index of `kind`).
    """
    threshold = _check_threshold(threshold)
    x = check_rows(x, "x")
    if graph is None:
        graph = knn_graph(x, k=k, index=index, kind=kind, seed=seed, device=device, progress=progress)
    component = connected_components(_check_graph(graph, len(x), "graph"), threshold)
    keep = np.zeros(len(x), dtype=bool)
    keep[np.unique(component, return_index=True)[1]] = True
    n_components = int(component.max()) + 1
    return SelfDedup(keep=keep, component=component, n_components=n_components, n_removed=len(x) - n_components)


def relative_dedup(
    pool: Any,
    refs: Any,
    *,
    k: int = 64,
    threshold: float = RELATIVE_THRESHOLD,
    pool_graph: Graph | None = None,
    expand_components: bool = True,
    index: Any = None,
    kind: str = "auto",
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16384,
    progress: bool = False,
) -> RelativeDedup:
    """Pool images that are near-duplicates (similarity > threshold) of a reference image, to be removed.

    Each reference's k nearest pool images above the threshold are removed; with `expand_components` so is every
    image of their duplicate component in the pool graph thresholded at the same threshold (`pool_graph` from
    `knn_graph`, or computed with `k`), which also catches a reference's copies beyond its k nearest.
    """
    threshold = _check_threshold(threshold)
    pool, refs = check_rows(pool, "pool"), check_rows(refs, "refs")
    if refs.shape[1] != pool.shape[1]:
        raise ValueError(f"refs have dimension {refs.shape[1]}, the pool dimension {pool.shape[1]}")
    n = len(pool)
    index = _pool_index(pool, index, kind, seed, device, progress)
    sims, ids = search(index, refs, _check_count(k, "k"), batch_size=batch_size, progress=progress)
    ref_rows, cols = np.nonzero((sims > threshold) & (ids >= 0))
    hit_pool, hit_sims = ids[ref_rows, cols], sims[ref_rows, cols]
    order = np.lexsort((ref_rows, -hit_sims, hit_pool))  # by pool image, then most similar, then lower reference
    direct_ids, first = np.unique(hit_pool[order], return_index=True)
    matched_ref = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, -np.inf, dtype=np.float32)
    matched_ref[direct_ids] = ref_rows[order][first]
    similarity[direct_ids] = hit_sims[order][first]
    direct = np.zeros(n, dtype=bool)
    direct[direct_ids] = True
    removed = direct.copy()
    if expand_components and len(direct_ids):
        if pool_graph is None:
            pool_graph = knn_graph(pool, k=k, index=index, batch_size=batch_size, progress=progress)
        component = connected_components(_check_graph(pool_graph, n, "pool_graph"), threshold)
        # a component goes with the reference of its most similar direct match (ties: lower pool index)
        by_component = np.lexsort((direct_ids, -similarity[direct_ids], component[direct_ids]))
        components, first = np.unique(component[direct_ids][by_component], return_index=True)
        component_ref = np.full(int(component.max()) + 1, -1, dtype=np.int64)
        component_ref[components] = matched_ref[direct_ids][by_component][first]
        removed = np.isin(component, components)
        expanded = np.flatnonzero(removed & ~direct)
        matched_ref[expanded] = component_ref[component[expanded]]
        similarity[expanded] = _pair_similarities(pool, refs, expanded, matched_ref[expanded], batch_size)
    return RelativeDedup(removed=removed, matched_ref=matched_ref, similarity=similarity, direct=direct)


def _pair_similarities(
    pool: np.ndarray, refs: np.ndarray, rows: np.ndarray, ref_rows: np.ndarray, batch_size: int
) -> np.ndarray:
    """Cosine of pool[rows[i]] and refs[ref_rows[i]] for every i, read in batches."""
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        stop = min(start + batch_size, len(rows))
        pool_batch = checked_rows(pool, rows[start:stop], "pool")
        out[start:stop] = np.einsum("ij,ij->i", pool_batch, checked_rows(refs, ref_rows[start:stop], "refs"))
    return out


def duplicate_examples(
    component: Any, n: int = 8, *, seed: int = 0, min_size: int = 2, max_members: int = 8
) -> list[list[int]]:
    """Up to `n` duplicate components of at least `min_size` images, drawn at random by `seed`, for a report.

    Returns a list of lists of pool indices, largest component first; each list is in pool order (the kept image
    first), cut to `max_members`.
    """
    component = np.asarray(component)
    if (
        component.ndim != 1
        or not np.issubdtype(component.dtype, np.integer)
        or (component.size and component.min() < 0)
    ):
        raise ValueError("component: the non-negative int (n,) component ids of SelfDedup expected")
    for value, name in ((n, "n"), (min_size, "min_size"), (max_members, "max_members")):
        _check_count(value, name)
    sizes = np.bincount(component)
    candidates = np.flatnonzero(sizes >= min_size)
    chosen = np.random.default_rng(seed).choice(candidates, size=min(n, len(candidates)), replace=False)
    chosen = chosen[np.lexsort((chosen, -sizes[chosen]))]
    return [np.flatnonzero(component == c)[:max_members].tolist() for c in chosen]


def calibrate_threshold(duplicate_sims: Any, other_sims: Any, *, max_false_rate: float = 0.01) -> Calibration:
    """The lowest threshold (a value of `other_sims`) with at most `max_false_rate` of `other_sims` above it.

    `duplicate_sims`: similarities of known copies (e.g. each planted augmented copy to its original);
    `other_sims`: similarities of pairs that are not copies (e.g. the first neighbours of images without planted
    copies; natural duplicates among them make the threshold conservative). `recall` says what share of the copies
    the threshold finds.
    """
    duplicates = np.asarray(duplicate_sims, dtype=np.float64).ravel()
    others = np.sort(np.asarray(other_sims, dtype=np.float64).ravel())[::-1]
    if not len(duplicates) or not len(others) or not (np.isfinite(duplicates).all() and np.isfinite(others).all()):
        raise ValueError("calibrate_threshold needs non-empty, finite duplicate and other similarities")
    if not 0 <= max_false_rate < 1:
        raise ValueError(f"max_false_rate={max_false_rate}: a share in [0, 1) expected")
    threshold = float(others[math.floor(max_false_rate * len(others))])  # at most that many values are above it
    return Calibration(
        threshold=threshold,
        recall=float(np.mean(duplicates > threshold)),
        false_rate=float(np.mean(others > threshold)),
    )
