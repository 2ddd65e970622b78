"""Torch k-means and hierarchical k-means with resampling (Vo et al. 2024), on CPU or GPU, seeded.

Follows the in-memory reference `hierarchical_kmeans_with_resampling` of facebookresearch/ssl-data-curation @ f540537
(`src/hierarchical_kmeans_gpu.py`, `src/kmeans_gpu.py`; curation facts sheet §5, §8):

- `kmeans`: greedy k-means++ (first centre uniform; every next centre the best, by potential, of 2 + int(ln k)
  candidates drawn with probability proportional to D²) or k distinct random points; one assignment after the
  initialisation, then exactly `n_iters` rounds of (update, assign), no early stop; squared L2 on the raw vectors;
  means accumulated in float64; an empty cluster keeps its centroid; k capped at n (with a warning); best of `n_init`
  runs by SSE.
- `hierarchical_kmeans`: level 1 clusters the data, level t > 1 the centroids of level t - 1. Where r_t > 1 the level
  is resampled `n_resamples` times: r_t points per cluster (the closest to the centroid, or random) get a fresh
  k-means++ k-means, and all of the level's input is reassigned to its centroids.

Deviations, each a choice: distances and matmuls run in float32 whatever the input dtype (rows are converted chunk by
chunk, so float16 embeddings stay float16 in memory); negative rounding residues of D² are clamped to 0 in k-means++;
the SSE is measured against the returned centroids (the reference re-averages the final clusters); a level's clusters
are sorted by distance to the centroid (as in the reference's distributed path, not its in-memory one); chunks hold
about 1e8 / (k + d) rows (the reference: 1e8 / k, counting only the distance block). Every random draw comes from a
CPU `torch.Generator`, level t's from (seed, t), so a level computed after a resume is bit-identical to one computed
in a single run. `fit_sample` (fit on a seeded random subset, then assign every point) is the scale path for pools
of 100M+ images; the reference has no such option.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

__all__ = [
    "MEMORY_BUDGET",
    "KMeansResult",
    "Level",
    "assign",
    "flat_sizes",
    "hierarchical_kmeans",
    "kmeans",
    "level_generator",
    "load_levels",
    "point_clusters",
    "save_level",
    "save_levels",
]

MEMORY_BUDGET = 10**8  # float32 elements per chunk: the (rows, k) distance block plus the rows converted to float32
_INITS = ("kmeans++", "random")
_STRATEGIES = ("closest", "random")


@dataclass
class KMeansResult:
    centroids: Tensor  # (k, d) float32, on the compute device
    assignment: Tensor  # (n,) int64: the cluster of every point
    sq_dist: Tensor  # (n,) float32: squared L2 distance of every point to its own centroid
    sse: float  # sum of sq_dist, accumulated in float64


@dataclass
class Level:
    centroids: Tensor  # (k, d) float32 on the CPU: the input of the next level
    assignment: np.ndarray  # (n_in,) int64: the cluster of every input row of this level
    clusters: list[np.ndarray]  # k arrays of input-row indices, each sorted closest to its centroid first


# ---------------------------------------------------------------------------------------------- checks and chunks


def _matrix(x: Tensor | np.ndarray, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # a read-only memmap: we never write to x
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(x)
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: a 2-D floating-point tensor (n, d) expected, got {getattr(x, 'shape', type(x))}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: an empty matrix of shape {tuple(x.shape)}")
    return x


def _positive_int(value: object, name: str, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: an integer >= {minimum} expected")
    return int(value)


def _rows(width: int, dim: int, chunk_size: int | None) -> int:
    """Rows per chunk: `chunk_size` if given, else what keeps (rows, width) distances + (rows, dim) rows in budget."""
    if chunk_size is not None:
        return _positive_int(chunk_size, "chunk_size")
    return max(1, MEMORY_BUDGET // (width + dim))


def _chunks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _check_finite(x: Tensor, name: str, rows: int) -> None:
    for s, e in _chunks(len(x), rows):
        if not torch.isfinite(x[s:e]).all():
            raise ValueError(f"{name} holds NaN or infinite values (in rows {s}..{e - 1})")


def level_generator(seed: int, level: int) -> torch.Generator:
    """The CPU generator of level `level` (1-based) of `hierarchical_kmeans`: a function of (seed, level) only."""
    state = np.random.SeedSequence([_positive_int(seed, "seed", 0), level]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


# ------------------------------------------------------------------------------------------------------- k-means


def _assign(x: Tensor, centroids: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    device, k = centroids.device, len(centroids)
    c_sq = centroids.square().sum(1)
    assignment = torch.empty(len(x), dtype=torch.int64, device=device)
    sq_dist = torch.empty(len(x), dtype=torch.float32, device=device)
    for s, e in _chunks(len(x), rows):
        xc = x[s:e].to(device, torch.float32)
        # ||c||² - 2 x·c: ||x||² is the same for every centroid, so the argmin needs only these (rows, k) numbers
        scores = torch.addmm(c_sq.expand(e - s, k), xc, centroids.T, alpha=-2)
        a = scores.argmin(1)
        assignment[s:e] = a
        sq_dist[s:e] = (xc - centroids[a]).square().sum(1)  # exact, not the cancellation-prone expansion
    return assignment, sq_dist


def assign(x: Tensor | np.ndarray, centroids: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest centroid (squared L2) of every row of x -> (assignment (n,) int64, squared distance (n,) float32).

    Runs on the centroids' device in chunks of rows (`chunk_size`, by default about 1e8 / (k + d)); each chunk is
    moved there and converted to float32 (x may be float16, or a CPU array when the centroids are on a GPU). Ties
    go to the lower centroid index.
    """
    x = _matrix(x, "x")
    centroids = _matrix(centroids, "centroids").float()
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x has {x.shape[1]} dimensions but the centroids have {centroids.shape[1]}")
    rows = _rows(len(centroids), x.shape[1], chunk_size)
    _check_finite(centroids, "centroids", rows)
    _check_finite(x, "x", rows)
    return _assign(x, centroids, rows)


def _update(x: Tensor, assignment: Tensor, centroids: Tensor, rows: int) -> Tensor:
    """Cluster means (float64 sums, float32 result); an empty cluster keeps its centroid."""
    k, d = centroids.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=centroids.device)
    for s, e in _chunks(len(x), rows):
        sums.index_add_(0, assignment[s:e], x[s:e].to(sums.device, torch.float64))
    counts = torch.bincount(assignment, minlength=k)
    means = (sums / counts.clamp_min(1)[:, None]).float()
    return torch.where((counts > 0)[:, None], means, centroids)


def _sq_dist_to(x: Tensor, x_sq: Tensor, y: Tensor, rows: int) -> Tensor:
    """(n, m) float64 squared distances of the rows of x to the m rows of y (float32 math, clamped at 0)."""
    y_sq = y.square().sum(1)
    out = torch.empty(len(x), len(y), dtype=torch.float64, device=y.device)
    for s, e in _chunks(len(x), rows):
        block = torch.addmm(y_sq.expand(e - s, len(y)), x[s:e].float(), y.T, alpha=-2) + x_sq[s:e, None]
        out[s:e] = block.clamp_min_(0)
    return out


def _kmeans_plusplus(x: Tensor, first: int, uniforms: Tensor, *, rows: int, progress: bool = False) -> Tensor:
    """Greedy k-means++ from given random numbers -> (k,) indices of the chosen rows of x.

    `first` is the first centre's row; row c - 1 of `uniforms` (k - 1, n_trials), numbers in [0, 1), picks the
    candidates of centre c by inverse-CDF sampling of D² (`searchsorted` of u · potential in the cumulative D²).
    The candidate whose addition gives the lowest potential (sum of D²) is kept.
    """
    n, k = len(x), len(uniforms) + 1
    x_sq = torch.cat([x[s:e].float().square().sum(1) for s, e in _chunks(n, rows)])
    chosen = torch.empty(k, dtype=torch.int64, device=x.device)
    chosen[0] = first
    closest = _sq_dist_to(x, x_sq, x[first : first + 1].float(), rows)[:, 0]  # (n,) D² to the nearest centre
    potential = closest.sum()
    uniforms = uniforms.to(x.device, torch.float64)
    for c in tqdm(range(1, k), desc="k-means++", disable=not progress, leave=False):
        candidates = torch.searchsorted(torch.cumsum(closest, 0), uniforms[c - 1] * potential).clamp_(max=n - 1)
        d_sq = torch.minimum(_sq_dist_to(x, x_sq, x[candidates].float(), rows), closest[:, None])  # (n, n_trials)
        potentials = d_sq.sum(0)
        best = potentials.argmin()
        potential, closest, chosen[c] = potentials[best], d_sq[:, best], candidates[best]
    return chosen


def _initial_centroids(x: Tensor, k: int, init: str, generator: torch.Generator, rows: int, progress: bool) -> Tensor:
    n = len(x)
    if init == "random":
        chosen = torch.randperm(n, generator=generator)[:k].sort().values.to(x.device)
    else:
        n_trials = 2 + int(math.log(k))
        first = int(torch.randint(n, (1,), generator=generator))
        uniforms = torch.rand((k - 1, n_trials), generator=generator, dtype=torch.float64)
        chosen = _kmeans_plusplus(x, first, uniforms, rows=rows, progress=progress)
    return x[chosen].float()


def kmeans(
    x: Tensor | np.ndarray,
    k: int,
    *,
    n_iters: int = 50,
    init: str = "kmeans++",
    n_init: int = 1,
    seed: int = 0,
    generator: torch.Generator | None = None,
    init_centroids: Tensor | None = None,
    fit_sample: int | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> KMeansResult:
    """Lloyd's k-means of the rows of x (squared L2) as the reference: init, assign, then `n_iters` x (update, assign).

    `init` "kmeans++" (greedy) or "random" (k distinct rows); `init_centroids` (k, d) replaces it (then `n_init`
    must be 1). The best of `n_init` runs by SSE is returned. k > n is capped at n with a warning. Random draws come
    from `generator` (a CPU `torch.Generator`), else from one seeded with `seed`. `fit_sample`: fit on that many
    seeded random rows, then assign all rows (a choice for huge pools, not the reference). Computation runs on
    `device` (default: x's device): the rows fitted on are moved there once, and the final assignment of all rows
    streams chunks there. Deterministic for a seed on a given device.
    """
    x = _matrix(x, "x")
    n, d = x.shape
    k, n_iters, n_init = _positive_int(k, "k"), _positive_int(n_iters, "n_iters", 0), _positive_int(n_init, "n_init")
    if init not in _INITS:
        raise ValueError(f"init={init!r}: one of {_INITS} expected")
    device = torch.device(device) if device is not None else x.device
    generator = generator if generator is not None else torch.Generator().manual_seed(_positive_int(seed, "seed", 0))
    if k > n:
        warnings.warn(f"k-means with k={k} clusters on {n} points: k capped at {n}", stacklevel=2)
        k = n
    if init_centroids is not None:
        init_centroids = _matrix(init_centroids, "init_centroids").to(device, torch.float32)
        if init_centroids.shape != (k, d) or n_init != 1:
            raise ValueError(
                f"init_centroids of shape {tuple(init_centroids.shape)} with n_init={n_init}: ({k}, {d}) and n_init=1 "
                "expected"
            )
    n_fit = n if fit_sample is None else min(n, _positive_int(fit_sample, "fit_sample"))
    sampled = n_fit < n
    if sampled:
        if n_fit < k:
            raise ValueError(f"fit_sample={fit_sample} is smaller than k={k}: fit on at least k points")
        fit = x[torch.randperm(n, generator=generator)[:n_fit].sort().values.to(x.device)].to(device)
    else:
        fit = x.to(device)
    rows = _rows(k, d, chunk_size)
    _check_finite(fit, "x", rows)

    best: tuple[float, Tensor, Tensor, Tensor] | None = None
    for _ in range(n_init):
        if init_centroids is not None:
            centroids = init_centroids
        else:
            centroids = _initial_centroids(
                fit, k, init, generator, _rows(2 + int(math.log(k)), d, chunk_size), progress
            )
        assignment, sq_dist = _assign(fit, centroids, rows)
        for _ in tqdm(range(n_iters), desc=f"k-means (k={k})", disable=not progress, leave=False):
            centroids = _update(fit, assignment, centroids, rows)
            assignment, sq_dist = _assign(fit, centroids, rows)
        sse = float(sq_dist.sum(dtype=torch.float64))
        if best is None or sse < best[0]:
            best = (sse, centroids, assignment, sq_dist)
    assert best is not None
    sse, centroids, assignment, sq_dist = best
    if sampled:  # fitted on a sample: assign every row
        assignment, sq_dist = assign(x, centroids, chunk_size=rows)
        sse = float(sq_dist.sum(dtype=torch.float64))
    return KMeansResult(centroids, assignment, sq_dist, sse)


# ------------------------------------------------------------------------------------------ hierarchical k-means


def _group_order(group: Tensor, key: Tensor) -> Tensor:
    """Indices sorted by group, then key, then index (two stable sorts: deterministic on every device)."""
    order = torch.argsort(key, stable=True)
    return order[torch.argsort(group[order], stable=True)]


def _per_cluster_sample(
    assignment: Tensor, sq_dist: Tensor, k: int, r: int, strategy: str, generator: torch.Generator
) -> Tensor:
    """Up to r rows per cluster, cluster by cluster: the closest to the centroid first, or uniformly random ones."""
    n = len(assignment)
    key = sq_dist if strategy == "closest" else torch.randperm(n, generator=generator).to(assignment.device)
    order = _group_order(assignment, key)
    counts = torch.bincount(assignment, minlength=k)
    rank = torch.arange(n, device=assignment.device) - (torch.cumsum(counts, 0) - counts)[assignment[order]]
    return order[rank < r]


def _sorted_clusters(assignment: Tensor, sq_dist: Tensor, k: int) -> list[np.ndarray]:
    order = _group_order(assignment, sq_dist).cpu().numpy()
    counts = torch.bincount(assignment, minlength=k).cpu().numpy()
    return np.split(order, np.cumsum(counts)[:-1])


def _check_levels(levels: Sequence[Level], n: int | None = None, dim: int | None = None) -> None:
    """Levels must chain: level 1 assigns n points, level t assigns the centroids of level t - 1."""
    n_in = n
    for t, level in enumerate(levels, start=1):
        k = len(level.centroids)
        if n_in is not None and len(level.assignment) != n_in:
            raise ValueError(f"level {t} assigns {len(level.assignment)} rows, its input has {n_in}")
        if dim is not None and level.centroids.shape[1] != dim:
            raise ValueError(f"level {t} has {level.centroids.shape[1]}-d centroids, the data {dim}-d")
        if len(level.clusters) != k or sum(len(c) for c in level.clusters) != len(level.assignment):
            raise ValueError(f"level {t}: {len(level.clusters)} clusters for {k} centroids do not cover its input")
        if len(level.assignment) and (level.assignment.min() < 0 or level.assignment.max() >= k):
            raise ValueError(f"level {t}: cluster ids outside 0..{k - 1}")
        n_in = k


def _fit_level(
    inputs: Tensor, k: int, r: int, generator: torch.Generator, opts: dict, n_resamples: int, strategy: str
) -> Level:
    result = kmeans(inputs, k, generator=generator, **opts)
    centroids, assignment, sq_dist = result.centroids, result.assignment, result.sq_dist
    if r > 1:
        for _ in tqdm(range(n_resamples), desc="resampling", disable=not opts["progress"], leave=False):
            rows = _per_cluster_sample(assignment, sq_dist, len(centroids), r, strategy, generator)
            centroids = kmeans(inputs[rows.to(inputs.device)], k, generator=generator, **opts).centroids
            assignment, sq_dist = _assign(inputs, centroids, _rows(len(centroids), inputs.shape[1], opts["chunk_size"]))
    clusters = _sorted_clusters(assignment, sq_dist, len(centroids))
    return Level(centroids.cpu(), assignment.cpu().numpy(), clusters)


def hierarchical_kmeans(
    x: Tensor | np.ndarray,
    n_clusters: Sequence[int],
    *,
    sample_sizes: Sequence[int],
    n_resamples: int = 10,
    strategy: str = "closest",
    n_iters: int = 50,
    seed: int = 0,
    fit_sample: int | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    resume_from: Sequence[Level] = (),
    on_level: Callable[[int, Level], None] | None = None,
    progress: bool = False,
) -> list[Level]:
    """Levels 1..T of hierarchical k-means with resampling (Vo et al. 2024), T = len(n_clusters).

    Level 1 clusters the rows of x into n_clusters[0], level t the centroids of level t - 1 into n_clusters[t-1]
    (k-means++, `n_iters` iterations). Where sample_sizes[t-1] = r > 1, `n_resamples` times: r rows per cluster
    (`strategy` "closest" to the centroid, or "random") get a fresh k-means, and all of the level's input is
    reassigned to its centroids. Level t draws from `level_generator(seed, t)`, so passing levels 1..s computed
    before as `resume_from` (same data and settings; not checked beyond shapes) gives bit-identical levels s+1..T.
    `on_level(t, level)` is called after every newly computed level (t 1-based), e.g. with `save_level`.
    """
    x = _matrix(x, "x")
    n_clusters = [_positive_int(k, "n_clusters") for k in n_clusters]
    sample_sizes = [_positive_int(r, "sample_sizes", 0) for r in sample_sizes]
    if not n_clusters or len(sample_sizes) != len(n_clusters):
        raise ValueError(f"one sample size per level expected: n_clusters={n_clusters}, sample_sizes={sample_sizes}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: one of {_STRATEGIES} expected")
    n_resamples = _positive_int(n_resamples, "n_resamples", 0)
    if len(resume_from) > len(n_clusters):
        raise ValueError(f"{len(resume_from)} levels to resume from, but only {len(n_clusters)} levels asked for")
    _check_levels(resume_from, len(x), x.shape[1])
    for t, level in enumerate(resume_from, start=1):
        if len(level.centroids) > n_clusters[t - 1]:
            raise ValueError(f"level {t} to resume from has {len(level.centroids)} > {n_clusters[t - 1]} clusters")
    device = torch.device(device) if device is not None else x.device
    opts = dict(n_iters=n_iters, fit_sample=fit_sample, chunk_size=chunk_size, device=device, progress=progress)

    levels = list(resume_from)
    for t in tqdm(range(len(levels) + 1, len(n_clusters) + 1), desc="levels", disable=not progress):
        inputs = x if t == 1 else levels[-1].centroids.to(device)
        level = _fit_level(
            inputs, n_clusters[t - 1], sample_sizes[t - 1], level_generator(seed, t), opts, n_resamples, strategy
        )
        levels.append(level)
        if on_level is not None:
            on_level(t, level)
    return levels


# ------------------------------------------------------------------------------------------- the tree of levels


def point_clusters(levels: Sequence[Level]) -> np.ndarray:
    """(n_points, T) int64: the level-t cluster of every original point in column t - 1."""
    _check_levels(levels)
    ids = levels[0].assignment.astype(np.int64)
    columns = [ids]
    for level in levels[1:]:
        ids = level.assignment[ids]
        columns.append(ids)
    return np.stack(columns, axis=1)


def _all_flat_sizes(levels: Sequence[Level]) -> list[np.ndarray]:
    sizes = [np.bincount(levels[0].assignment, minlength=len(levels[0].centroids)).astype(np.int64)]
    for level in levels[1:]:
        weighted = np.bincount(level.assignment, weights=sizes[-1], minlength=len(level.centroids))
        sizes.append(weighted.round().astype(np.int64))
    return sizes


def flat_sizes(levels: Sequence[Level], t: int) -> np.ndarray:
    """(k_t,) int64: the number of original points in every level-t cluster (t 1-based)."""
    _check_levels(levels)
    if not isinstance(t, (int, np.integer)) or not 1 <= t <= len(levels):
        raise ValueError(f"t={t!r}: a level number in 1..{len(levels)} expected")
    return _all_flat_sizes(levels[:t])[-1]


def save_level(folder: str | os.PathLike, t: int, level: Level) -> Path:
    """Write level t to `folder/level{t}.npz` atomically (a temporary file, then `os.replace`) -> its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"level{_positive_int(t, 't')}.npz"
    order = np.concatenate(level.clusters).astype(np.int64) if level.clusters else np.zeros(0, np.int64)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                centroids=level.centroids.detach().cpu().float().numpy(),
                assignment=np.asarray(level.assignment, dtype=np.int64),
                cluster_order=order,
                cluster_sizes=np.array([len(c) for c in level.clusters], dtype=np.int64),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_levels(folder: str | os.PathLike, levels: Sequence[Level]) -> None:
    """Write every level (`save_level`) and remove higher-numbered level files left by an earlier hierarchy."""
    _check_levels(levels)
    for t, level in enumerate(levels, start=1):
        save_level(folder, t, level)
    t = len(levels) + 1
    while (Path(folder) / f"level{t}.npz").exists():
        (Path(folder) / f"level{t}.npz").unlink()
        t += 1


def load_levels(folder: str | os.PathLike) -> list[Level]:
    """The levels saved in `folder` (level1.npz, level2.npz, ... up to the first missing one); [] if none."""
    levels: list[Level] = []
    while (path := Path(folder) / f"level{len(levels) + 1}.npz").exists():
        with np.load(path) as f:
            sizes = f["cluster_sizes"]
            clusters = np.split(f["cluster_order"], np.cumsum(sizes)[:-1]) if len(sizes) else []
            levels.append(Level(torch.from_numpy(f["centroids"]), f["assignment"], clusters))
    _check_levels(levels)
    return levels
