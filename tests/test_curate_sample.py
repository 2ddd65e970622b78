"""Balanced hierarchical sampling (opendino.curate.sample) against the reference of Vo et al. 2024 and its contract.

Reference numbers: tests/fixtures/curation/sampling_reference.json, written by tools/make_kmeans_fixtures.py from
facebookresearch/ssl-data-curation @ f540537. The reference draws its random +1s and leaf samples from an unseeded
global RNG, so the fixture holds, per case, the range of counts seen over many reference runs (and the exact sample
where every run gave the same one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from opendino.curate.kmeans import Level, hierarchical_kmeans, point_clusters
from opendino.curate.sample import _grouped_counts, balanced_counts, balanced_sample

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "curation" / "sampling_reference.json").read_text())
TREE = FIXTURE["trees"][0]


def levels_from_lists(tree: list[list[list[int]]]) -> list[Level]:
    """Levels from cluster lists in stored order (centroids are not used by sampling)."""
    levels, n_in = [], sum(len(c) for c in tree[0])
    for clusters in tree:
        assignment = np.empty(n_in, np.int64)
        for c, members in enumerate(clusters):
            assignment[members] = c
        levels.append(Level(torch.zeros(len(clusters), 1), assignment, [np.array(m, np.int64) for m in clusters]))
        n_in = len(clusters)
    return levels


def best_cap(sizes: np.ndarray, n: int) -> int:
    """The largest integer x with sum(min(x, sizes)) <= n, by walking x up (the definition)."""
    x = 0
    while x < sizes.max() and np.minimum(x + 1, sizes).sum() <= n:
        x += 1
    return x


def gini(counts: np.ndarray) -> float:
    counts = np.sort(counts.astype(float))
    n = len(counts)
    return float((2 * np.arange(1, n + 1) - n - 1) @ counts / (n * counts.sum()))


# ------------------------------------------------------------------------------------------ reference parity


@pytest.mark.parametrize("case", FIXTURE["water_filling"], ids=lambda c: f"{c['n']}x{c['multiplier']}")
def test_water_filling_matches_reference(case):
    sizes = np.array(case["sizes"]) * case["multiplier"]
    lo, hi = np.array(case["lo"]), np.array(case["hi"])
    for seed in range(5):
        counts = balanced_counts(sizes, case["n"], np.random.default_rng(seed))
        assert counts.sum() == min(case["n"], sizes.sum())
        assert ((lo <= counts) & (counts <= hi)).all(), counts


def test_water_filling_toy_from_the_facts_sheet():
    rng = np.random.default_rng(0)
    assert balanced_counts(np.array([100, 50, 10, 3, 1]), 64, rng).tolist() == [25, 25, 10, 3, 1]
    counts = balanced_counts(np.array([100, 50, 10, 3, 1]), 20, rng)
    assert sorted(counts[:3].tolist()) == [5, 5, 6] and counts[3:].tolist() == [3, 1]


@pytest.mark.parametrize("case", TREE["cases"], ids=lambda c: f"{c['n']}x{c['multiplier']}-{c['strategy']}")
def test_tree_sampling_matches_reference(case):
    levels = levels_from_lists(TREE["clusters"])
    sample = balanced_sample(levels, case["n"], multiplier=case["multiplier"], strategy=case["strategy"], seed=0)
    assert len(sample.indices) == case["total"]
    pc = point_clusters(levels)
    for t in range(3):
        picks = np.bincount(pc[sample.indices, t], minlength=len(levels[t].clusters))
        assert np.array_equal(picks, sample.picks[t])
        lo, hi = np.array(case["picks_lo"][t]), np.array(case["picks_hi"][t])
        assert np.array_equal(picks[lo == hi], lo[lo == hi])  # what the reference never varied
        if t == 2:  # top level: one water-filling, whose two possible values the reference runs all showed
            assert ((lo <= picks) & (picks <= hi)).all()
    if "indices" in case:
        assert sample.indices.tolist() == case["indices"]


def test_reference_tree_cases_include_exact_samples():
    exact = [c for c in TREE["cases"] if "indices" in c and c["total"] < 400]
    assert {c["strategy"] for c in exact} == {"closest"} and len(exact) >= 5


# ------------------------------------------------------------------------------------------ water-filling rule


def test_water_filling_is_the_largest_cap_plus_random_ones():
    rng = np.random.default_rng(1)
    for _ in range(200):
        sizes = rng.integers(0, 30, rng.integers(1, 12))
        n = int(rng.integers(0, sizes.sum() + 5))
        counts = balanced_counts(sizes, n, rng)
        x = best_cap(sizes, n) if sizes.sum() > n else sizes.max()
        extra = counts - np.minimum(x, sizes)
        assert counts.sum() == min(n, sizes.sum())
        assert set(extra.tolist()) <= {0, 1} and (sizes[extra == 1] > x).all()


def test_grouped_water_filling_fills_every_group_by_the_rule():
    rng = np.random.default_rng(2)
    caps = rng.integers(0, 40, 300)
    group = rng.integers(0, 25, 300)
    totals = np.bincount(group, weights=caps, minlength=26).astype(np.int64)  # group 25 has no members
    budgets = (totals * rng.uniform(0, 1.1, 26)).astype(np.int64)
    counts = _grouped_counts(caps, group, budgets, rng)
    for g in range(25):
        c, b = counts[group == g], caps[group == g]
        x = best_cap(b, budgets[g]) if b.sum() > budgets[g] else b.max()
        extra = c - np.minimum(x, b)
        assert c.sum() == min(budgets[g], totals[g])
        assert set(extra.tolist()) <= {0, 1} and (b[extra == 1] > x).all()


def test_leftover_goes_to_uniformly_random_clusters():
    hits = np.zeros(4)
    for seed in range(400):
        counts = balanced_counts(np.array([7, 7, 7, 7]), 10, np.random.default_rng(seed))
        assert sorted(counts.tolist()) == [2, 2, 3, 3]
        hits += counts == 3
    assert (np.abs(hits / 400 - 0.5) < 0.1).all()


# ---------------------------------------------------------------------------------------------- sampling rules


@pytest.fixture(scope="module")
def tree():
    return levels_from_lists(TREE["clusters"])


def test_sample_contract(tree):
    for multiplier in (1, 2, 3):
        for n in (0, 37, 250, 400 * multiplier, 5000):
            sample = balanced_sample(tree, n, multiplier=multiplier, seed=3)
            assert len(sample.indices) == min(n, 400 * multiplier) and sample.shortfall == n - len(sample.indices)
            assert np.bincount(sample.indices, minlength=400).max() <= multiplier
            assert (np.diff(sample.indices) >= 0).all()
            for t in (1, 2):  # every parent's picks are split over its children
                parent_of_child = tree[t].assignment
                per_parent = np.bincount(parent_of_child, weights=sample.picks[t - 1], minlength=len(tree[t].clusters))
                assert np.array_equal(per_parent.astype(np.int64), sample.picks[t])


def test_closest_takes_a_prefix_of_every_leaf(tree):
    sample = balanced_sample(tree, 150, strategy="closest")
    picked = np.bincount(sample.indices, minlength=400)
    for members, b in zip(tree[0].clusters, sample.picks[0], strict=True):
        assert np.array_equal(picked[members], (np.arange(len(members)) < b).astype(np.int64))


def test_full_copies_then_remainder(tree):
    sample = balanced_sample(tree, 1000, multiplier=3, strategy="random", seed=4)
    picked = np.bincount(sample.indices, minlength=400)
    for members, b in zip(tree[0].clusters, sample.picks[0], strict=True):
        copies, rest = divmod(int(b), len(members))
        assert sorted(picked[members].tolist()) == sorted([copies] * (len(members) - rest) + [copies + 1] * rest)


def test_sampling_is_deterministic_for_a_seed(tree):
    a, b = balanced_sample(tree, 150, seed=7), balanced_sample(tree, 150, seed=7)
    assert np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, balanced_sample(tree, 150, seed=8).indices)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda lv: balanced_sample(lv, -1), "n=-1"),
        (lambda lv: balanced_sample(lv, 10, multiplier=0), "multiplier"),
        (lambda lv: balanced_sample(lv, 10, strategy="furthest"), "strategy"),
        (lambda lv: balanced_sample([], 10), "at least one level"),
        (lambda lv: balanced_sample([lv[0], lv[2]], 10), "level 2 assigns 8 rows"),
        (lambda lv: balanced_counts(np.array([3, -1]), 2, np.random.default_rng()), "non-negative"),
        (lambda lv: balanced_counts(np.array([1.5]), 2, np.random.default_rng()), "integers"),
    ],
)
def test_bad_arguments_raise(tree, call, match):
    with pytest.raises(ValueError, match=match):
        call(tree)


# ------------------------------------------------------------------------------------- end to end, planted tail


def test_balancing_flattens_a_long_tailed_planted_distribution():
    g = torch.Generator().manual_seed(0)
    sizes = [int(1500 / (i + 1) ** 1.3) + 8 for i in range(20)]  # 1508 down to 28 points
    centres = 8.0 * torch.randn(20, 16, generator=g)
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    x = centres[labels] + torch.randn(len(labels), 16, generator=g)
    levels = hierarchical_kmeans(x, [80, 20], sample_sizes=[5, 2], n_resamples=2, n_iters=10, seed=0)
    n = 560
    balanced = np.bincount(labels.numpy()[balanced_sample(levels, n, seed=0).indices], minlength=20)
    uniform = np.bincount(labels.numpy()[np.random.default_rng(0).choice(len(x), n, replace=False)], minlength=20)
    assert gini(balanced) < 0.1 < 0.4 < gini(uniform)
    assert balanced.max() / balanced.min() < 0.25 * uniform.max() / max(uniform.min(), 1)
    assert balanced.min() >= 10  # every planted cluster is represented
