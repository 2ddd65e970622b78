"""Balanced sampling from a hierarchy of k-means clusters, top level down (Vo et al. 2024).

Follows `hierarchical_sampling` of facebookresearch/ssl-data-curation @ f540537 (`src/hierarchical_sampling.py`;
curation facts sheet §6, §8):

- Water-filling: a budget N over clusters of capacities s_i (flat sizes, i.e. original points, times the multiplier
  m) gives every cluster min(x, s_i) with x the largest integer with sum(min(x, s_i)) <= N; the N - sum left over
  goes as +1 to that many clusters with s_i > x, chosen uniformly at random. If N >= sum(s_i) every cluster gets s_i
  and the sample is smaller than N (the caller should say so: `BalancedSample.shortfall`).
- The top level water-fills N over its clusters; every cluster splits its budget over its children the same way,
  by the children's flat sizes; a level-1 cluster C with budget b gives all of C m times if m|C| <= b, else
  floor(b / |C|) copies of C plus b mod |C| points: uniformly random ones ("random", the reference's default "r") or
  the first in stored order, the closest to the centroid ("closest", "c").

Every cluster of a level is handled at once (vectorised over groups), and every random choice comes from one
`numpy.random.default_rng(seed)`, so a sample is a function of (levels, n, multiplier, strategy, seed). The returned
indices are sorted (the reference can sort them too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from opendino.curate.kmeans import Level, _all_flat_sizes, _check_levels

__all__ = ["BalancedSample", "balanced_counts", "balanced_sample"]

_STRATEGIES = ("random", "closest")


@dataclass
class BalancedSample:
    indices: np.ndarray  # (m,) int64 original point indices, ascending; a point appears up to `multiplier` times
    picks: list[np.ndarray]  # picks[t - 1][c]: points (copies counted) taken from level-t cluster c
    requested: int  # the n asked for

    @property
    def shortfall(self) -> int:
        """How many fewer points than requested the pool could give (0 when the sample has n points)."""
        return self.requested - len(self.indices)


def _nonnegative_int(value: object, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r}: an integer >= 0 expected")
    return int(value)


def _grouped_counts(caps: np.ndarray, group: np.ndarray, budgets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Water-fill budgets[g] over the capacities of the members of every group g at once -> (len(caps),) counts.

    Within a group sorted by capacity c_(0) <= ... <= c_(g-1), f(c_(j)) = sum_{i<j} c_(i) + c_(j) (g - j) is the
    total at cap c_(j); J, the number of members with f <= budget, are taken whole; the other g - J get
    x = (budget - sum_{i<J} c_(i)) // (g - J) each (x < c_(J), so x is the largest feasible cap), and the remainder,
    below g - J, is +1 for that many of them chosen at random.
    """
    n_groups = len(budgets)
    if len(caps) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((caps, group))
    c, g = caps[order], group[order]
    members = np.bincount(group, minlength=n_groups)
    start = np.cumsum(members) - members
    before = np.cumsum(c) - c  # sum of all sorted capacities before each position
    below = before - before[start[g]]  # ... within its own group
    rank = np.arange(len(c)) - start[g]
    fits = below + c * (members[g] - rank) <= budgets[g]
    whole = np.bincount(g[fits], minlength=n_groups)  # J per group
    open_ = whole < members  # groups whose budget does not cover every member
    rest = np.maximum(members - whole, 1)
    taken = np.where(open_, below[np.minimum(start + whole, len(c) - 1)], 0)
    cap = np.where(open_, (budgets - taken) // rest, 0)
    remainder = np.where(open_, budgets - taken - cap * rest, 0)

    counts = np.where(open_[g], np.minimum(c, cap[g]), c)
    candidates = np.flatnonzero(rank >= whole[g])  # members with capacity above the cap (none in whole groups)
    if len(candidates):
        cg = g[candidates]
        shuffled = candidates[np.lexsort((rng.random(len(candidates)), cg))]
        n_cand = np.bincount(cg, minlength=n_groups)
        cand_rank = np.arange(len(shuffled)) - (np.cumsum(n_cand) - n_cand)[g[shuffled]]
        counts[shuffled[cand_rank < remainder[g[shuffled]]]] += 1
    out = np.empty_like(counts)
    out[order] = counts
    return out


def balanced_counts(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Water-filling of n over clusters of the given sizes -> (len(sizes),) int64 counts (see the module docstring).

    The counts sum to min(n, sum(sizes)); with n >= sum(sizes) they are the sizes (the caller should warn).
    """
    sizes = np.asarray(sizes)
    if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
        raise ValueError(f"sizes: a 1-D array of non-negative integers expected, got {sizes!r}")
    n = _nonnegative_int(n, "n")
    sizes = sizes.astype(np.int64)
    return _grouped_counts(sizes, np.zeros(len(sizes), np.int64), np.array([n], np.int64), rng)


def _leaf_picks(
    clusters: list[np.ndarray], budgets: np.ndarray, multiplier: int, strategy: str, rng: np.random.Generator
) -> np.ndarray:
    """Per leaf cluster: whole copies, then the remainder (random, or first in stored order) -> point indices."""
    sizes = np.array([len(c) for c in clusters], dtype=np.int64)
    points = np.concatenate(clusters).astype(np.int64) if len(clusters) else np.zeros(0, np.int64)
    cluster = np.repeat(np.arange(len(clusters)), sizes)
    start = np.cumsum(sizes) - sizes
    whole = sizes * multiplier <= budgets
    copies = np.where(whole, multiplier, budgets // np.maximum(sizes, 1))
    remainder = np.where(whole, 0, budgets - copies * sizes)
    rank = np.arange(len(points)) - start[cluster]  # stored order: closest to the centroid first
    if strategy == "random":
        drawn = np.flatnonzero(remainder[cluster] > 0)  # only clusters that need a random remainder
        shuffled = drawn[np.lexsort((rng.random(len(drawn)), cluster[drawn]))]
        rank[drawn] = rank[shuffled]  # a uniformly random order of each such cluster
    repeats = copies[cluster] + (rank < remainder[cluster])
    return np.sort(np.repeat(points, repeats))


def balanced_sample(
    levels: Sequence[Level], n: int, *, multiplier: int = 1, strategy: str = "random", seed: int = 0
) -> BalancedSample:
    """n original points balanced over the hierarchy `levels` (see the module docstring) -> `BalancedSample`.

    A point is picked at most `multiplier` times. Leaf `strategy` "random" (the reference default) or "closest" (the
    level-1 clusters' stored order, closest to the centroid first, as `hierarchical_kmeans` writes them).
    """
    if not levels:
        raise ValueError("balanced sampling needs at least one level of clusters")
    _check_levels(levels)
    n = _nonnegative_int(n, "n")
    if not isinstance(multiplier, (int, np.integer)) or isinstance(multiplier, bool) or multiplier < 1:
        raise ValueError(f"multiplier={multiplier!r}: an integer >= 1 expected")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: one of {_STRATEGIES} expected")
    rng = np.random.default_rng(_nonnegative_int(seed, "seed"))
    top, sizes = len(levels), _all_flat_sizes(levels)
    picks = [np.zeros(0, np.int64)] * top
    picks[top - 1] = balanced_counts(sizes[top - 1] * multiplier, n, rng)
    for t in range(top, 1, -1):  # the level-t clusters split their budgets over their children at level t - 1
        caps = sizes[t - 2] * multiplier
        picks[t - 2] = _grouped_counts(caps, np.asarray(levels[t - 1].assignment, np.int64), picks[t - 1], rng)
    indices = _leaf_picks(levels[0].clusters, picks[0], multiplier, strategy, rng)
    return BalancedSample(indices, picks, n)
