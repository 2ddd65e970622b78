"""Retrieval of pool images close to curated seed images: sample-based and cluster-based, as for LVD-142M.

DINOv2 paper Sec. 3 and App. A.4 (facts sheet §4): a large seed set takes the k nearest pool images of every seed
image by cosine similarity (k = 4 for ImageNet-22k and GLDv2, 32 for ImageNet-1k); a small one takes the pool's
k-means clusters (100,000 in the paper) holding more than 3 of its seed images, 10,000 pool images from each, at most
1M per seed set. Choices the paper leaves open, and ours:

- Sample-based collisions (one image among the neighbours of several seeds): the image is returned once, `hits`
  counts the seeds that retrieved it (the paper's Table 15 counts k x |seeds|, i.e. with multiplicity; a manifest
  weight can follow `hits`). `exclude`d pool images (e.g. removed duplicates) are skipped and the search widened, so
  a seed still gets k neighbours; `min_similarity` drops neighbours below it.
- A seed image belongs to the cluster of its nearest centroid in squared L2, the metric of the k-means that assigned
  the pool (facts sheet §5); with normalised centroids it is the most cosine-similar centroid.
- Inside a qualifying cluster: `strategy` "random" (default; a permutation drawn from (seed, cluster id), so a
  cluster's images do not depend on the other clusters or the cap) or "closest" to the centroid (needs the pool's
  squared distances); a cluster smaller than `per_cluster` gives all its images.
- The cap: clusters are taken in decreasing number of seed images (ties: lower cluster id), each with its quota,
  until `cap` images; the last cluster is cut to fill the cap exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opendino.curate.search import build_index, check_rows, faiss_threads, iter_batches, load_faiss, search

__all__ = ["Retrieved", "cluster_retrieval", "nearest_centroid", "sample_retrieval"]

_STRATEGIES = ("random", "closest")


@dataclass(frozen=True)
class Retrieved:
    """Pool images retrieved for one seed set, one row each."""

    pool_ids: np.ndarray  # int64 (r,): unique, ascending
    hits: np.ndarray  # int64 (r,): how many seeds retrieved it (sample-based); 1 (cluster-based: taken once)
    best_similarity: np.ndarray  # float32 (r,): its highest similarity to a retrieving seed (NaN: cluster-based)
    best_seed: np.ndarray  # int64 (r,): that seed (ties: lower index); -1 for cluster-based
    cluster: np.ndarray  # int64 (r,): the cluster it was taken from; -1 for sample-based

    def __len__(self) -> int:
        return len(self.pool_ids)


def _count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r}: an integer >= {minimum} expected")
    return int(value)


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _excluded(exclude: Any, n: int) -> np.ndarray | None:
    """`exclude` (a bool mask (n,) or pool ids) as a bool mask (n,), None for nothing excluded."""
    if exclude is None:
        return None
    exclude = _as_numpy(exclude)
    if exclude.dtype == bool:
        if exclude.shape != (n,):
            raise ValueError(f"exclude: a bool mask of shape ({n},) expected, got {exclude.shape}")
        return exclude
    if exclude.ndim != 1 or (exclude.size and not np.issubdtype(exclude.dtype, np.integer)):
        raise ValueError("exclude: a bool mask (n,) or a 1-D array of pool ids expected")
    if exclude.size and (exclude.min() < 0 or exclude.max() >= n):
        raise ValueError(f"exclude: pool ids in [0, {n}) expected")
    mask = np.zeros(n, dtype=bool)
    mask[exclude] = True
    return mask


def _search_excluding(index: Any, queries: np.ndarray, k: int, excluded: np.ndarray | None) -> tuple:
    """`search` for the k best neighbours that are not `excluded`, widening the search (x2) where needed."""
    if excluded is None:
        return search(index, queries, k)
    n = index.ntotal
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    todo, width = np.arange(len(queries)), min(n, 2 * k)
    while len(todo):
        found_sims, found_ids = search(index, queries[todo], width)
        found_ids[(found_ids >= 0) & excluded[np.maximum(found_ids, 0)]] = -1
        first = np.argsort(found_ids < 0, axis=1, kind="stable")[:, :k]  # kept neighbours first, in rank order
        ids[todo] = np.take_along_axis(found_ids, first, axis=1)
        sims[todo] = np.where(ids[todo] >= 0, np.take_along_axis(found_sims, first, axis=1), -np.inf)
        # widen only where the search was full (a -1 from faiss means the index has no more to give)
        short = ((ids[todo] >= 0).sum(axis=1) < k) & (found_sims[:, -1] > -np.inf)
        if width >= n:
            break
        todo, width = todo[short], min(n, 2 * width)
    return sims, ids


def _gather(seed_rows: np.ndarray, pool_ids: np.ndarray, sims: np.ndarray) -> Retrieved:
    """One row per distinct pool image: hits, and its most similar seed (ties: lower seed index)."""
    order = np.lexsort((seed_rows, -sims, pool_ids))
    unique, first, hits = np.unique(pool_ids[order], return_index=True, return_counts=True)
    return Retrieved(
        pool_ids=unique.astype(np.int64),
        hits=hits.astype(np.int64),
        best_similarity=sims[order][first].astype(np.float32),
        best_seed=seed_rows[order][first].astype(np.int64),
        cluster=np.full(len(unique), -1, dtype=np.int64),
    )


def sample_retrieval(
    pool: Any,
    seeds: Any,
    *,
    k: int = 4,
    min_similarity: float | None = None,
    exclude: Any = None,
    kind: str = "auto",
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16384,
    progress: bool = False,
) -> Retrieved:
    """The k nearest pool images of every seed image (unit vectors, cosine similarity), gathered per pool image.

    pool: a faiss index over the pool (`build_index`) or the pool's vectors (n, d) (an index of `kind` is built).
    exclude: pool images never retrieved (bool mask (n,) or ids). min_similarity: neighbours below it are dropped.
    """
    k, batch_size = _count(k, "k"), _count(batch_size, "batch_size")
    if min_similarity is not None and not -1 <= min_similarity <= 1:
        raise ValueError(f"min_similarity={min_similarity}: a cosine similarity in [-1, 1] expected")
    faiss = load_faiss()
    if not isinstance(pool, faiss.Index):
        pool = build_index(check_rows(pool, "pool"), kind=kind, seed=seed, device=device, progress=progress)
    seeds = check_rows(seeds, "seeds")
    if seeds.shape[1] != pool.d:
        raise ValueError(f"seeds have dimension {seeds.shape[1]}, the pool dimension {pool.d}")
    excluded = _excluded(exclude, pool.ntotal)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start, batch in iter_batches(seeds, batch_size, "seeds", progress=progress):
        sims, ids = _search_excluding(pool, batch, k, excluded)
        keep = ids >= 0
        if min_similarity is not None:
            keep &= sims >= min_similarity
        rows, cols = np.nonzero(keep)
        found.append((rows + start, ids[rows, cols], sims[rows, cols]))
    seed_rows, pool_ids, sims = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return _gather(seed_rows, pool_ids, sims)


def nearest_centroid(x: Any, centroids: Any, *, batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of `x` in squared L2 (ties: lower centroid): (int64 (n,), float32 (n,))."""
    faiss = load_faiss()
    centroids = np.ascontiguousarray(_as_numpy(centroids), dtype=np.float32)
    if centroids.ndim != 2 or not len(centroids) or not np.isfinite(centroids).all():
        raise ValueError(f"centroids: a non-empty, finite (c, d) array expected, got shape {centroids.shape}")
    x = check_rows(x, "x")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"vectors have dimension {x.shape[1]}, the centroids {centroids.shape[1]}")
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    assignment = np.empty(len(x), dtype=np.int64)
    sq_dist = np.empty(len(x), dtype=np.float32)
    with faiss_threads():
        for start, batch in iter_batches(x, _count(batch_size, "batch_size"), "x"):
            found_sq_dist, found = index.search(batch, 1)
            assignment[start : start + len(batch)], sq_dist[start : start + len(batch)] = (
                found[:, 0],
                found_sq_dist[:, 0],
            )
    return assignment, sq_dist


def cluster_retrieval(
    pool_assignment: Any,
    centroids: Any,
    seeds: Any,
    *,
    min_seeds: int = 3,
    per_cluster: int = 10_000,
    cap: int | None = 1_000_000,
    strategy: str = "random",
    pool_sq_dist: Any = None,
    exclude: Any = None,
    seed: int = 0,
) -> Retrieved:
    """Pool images of the clusters holding more than `min_seeds` seed images, `per_cluster` each, `cap` in all.

    pool_assignment: int (n,) cluster of every pool image; centroids: (c, d); seeds: (m, d) unit vectors.
    strategy: "random" (drawn with `seed`) or "closest" to the centroid by `pool_sq_dist` (float (n,), e.g. the
    k-means assignment distances; ties: lower pool id). exclude: pool images never taken (bool mask (n,) or ids).
    The seed images per cluster are `np.bincount(nearest_centroid(seeds, centroids)[0], minlength=c)`.
    """
    assignment = _as_numpy(pool_assignment)
    n_clusters = len(_as_numpy(centroids))
    if assignment.ndim != 1 or not np.issubdtype(assignment.dtype, np.integer) or not len(assignment):
        raise ValueError(
            f"pool_assignment: a non-empty int array (n,) expected, got {assignment.dtype} {assignment.shape}"
        )
    if assignment.min() < 0 or assignment.max() >= n_clusters:
        raise ValueError(f"pool_assignment: cluster ids in [0, {n_clusters}) expected (one per centroid)")
    _count(min_seeds, "min_seeds", minimum=0)
    seed = _count(seed, "seed", minimum=0)
    per_cluster = _count(per_cluster, "per_cluster")
    cap = len(assignment) if cap is None else _count(cap, "cap")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: one of {_STRATEGIES} expected")
    if strategy == "closest":
        if pool_sq_dist is None:
            raise ValueError(
                "strategy='closest' needs pool_sq_dist (each pool image's squared distance to its centroid)"
            )
        pool_sq_dist = _as_numpy(pool_sq_dist)
        if pool_sq_dist.shape != assignment.shape:
            raise ValueError(f"pool_sq_dist: shape {assignment.shape} expected, got {pool_sq_dist.shape}")
    seed_counts = np.bincount(nearest_centroid(seeds, centroids)[0], minlength=n_clusters)
    qualifying = np.flatnonzero(seed_counts > min_seeds)
    qualifying = qualifying[np.lexsort((qualifying, -seed_counts[qualifying]))]  # most seed images first
    excluded = _excluded(exclude, len(assignment))
    available = np.isin(assignment, qualifying) if excluded is None else np.isin(assignment, qualifying) & ~excluded
    members = np.flatnonzero(available)
    members = members[np.argsort(assignment[members], kind="stable")]  # grouped by cluster, ascending ids inside
    bounds = np.searchsorted(assignment[members], np.arange(n_clusters + 1))
    picked: list[np.ndarray] = []
    total = 0
    for c in qualifying:
        if total >= cap:
            break
        group = members[bounds[c] : bounds[c + 1]]
        take = min(per_cluster, len(group), cap - total)
        if strategy == "random":  # a cluster's draw depends on (seed, cluster) only; a smaller take is a prefix
            picked.append(np.random.default_rng((seed, int(c))).permutation(group)[:take])
        else:
            picked.append(group[np.lexsort((group, pool_sq_dist[group]))[:take]])
        total += take
    pool_ids = np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.empty(0, dtype=np.int64)
    return Retrieved(
        pool_ids=pool_ids,
        hits=np.ones(len(pool_ids), dtype=np.int64),
        best_similarity=np.full(len(pool_ids), np.nan, dtype=np.float32),
        best_seed=np.full(len(pool_ids), -1, dtype=np.int64),
        cluster=assignment[pool_ids].astype(np.int64),
    )
