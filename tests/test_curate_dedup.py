"""Near-duplicate removal (opendino.curate.dedup) on synthetic pools with planted copies, against reference loops."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("scipy")

from opendino.curate.dedup import (
    RELATIVE_THRESHOLD,
    SELF_THRESHOLD,
    calibrate_threshold,
    connected_components,
    duplicate_examples,
    knn_graph,
    relative_dedup,
    self_dedup,
)
from opendino.curate.search import build_index

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def copies_of(rng: np.random.Generator, originals: np.ndarray, cosines: np.ndarray) -> np.ndarray:
    """Unit vectors at exactly the given cosine similarity to their original (a random orthogonal direction)."""
    noise = unit(rng, *originals.shape)
    noise -= np.einsum("nd,nd->n", noise, originals)[:, None] * originals
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return cosines[:, None] * originals + np.sqrt(1 - cosines**2)[:, None] * noise


def planted_pool(seed: int = 0, d: int = 64):
    """A shuffled pool: 600 originals (half of them in tight clusters of look-alikes at cosine ~0.8 that are NOT
    duplicates), 1 to 4 copies each for 150 of them (cosine 0.93-0.99 to the original), float16.

    Returns (pool, group): group[i] = the original's planted-group id, -1 for images without copies.
    """
    rng = np.random.default_rng(seed)
    centres = unit(rng, 30, d)
    lookalikes = copies_of(rng, centres[rng.integers(0, 30, 300)], rng.uniform(0.88, 0.92, 300))  # pairs ~0.8
    originals = np.concatenate([unit(rng, 300, d), lookalikes])
    n_copies = rng.integers(1, 5, 150)
    sources = np.repeat(rng.choice(600, 150, replace=False), n_copies)
    copies = copies_of(rng, originals[sources], rng.uniform(0.93, 0.99, len(sources)))
    x = np.concatenate([originals, copies])
    group = np.full(len(x), -1)
    group[sources] = sources
    group[600:] = sources
    order = rng.permutation(len(x))
    return x[order].astype(np.float16), group[order]


def reference_components(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """Union-find with a Python loop, components numbered by lowest member."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    roots = [root(i) for i in range(n)]
    numbering = {r: c for c, r in enumerate(sorted(set(roots)))}
    return np.array([numbering[r] for r in roots])


def test_knn_graph_matches_brute_force_without_self():
    rng = np.random.default_rng(1)
    x = unit(rng, 300, 32).astype(np.float32)
    x[7] = x[3]  # an exact copy: either may rank first for the other, the row's own id must still go
    sims, ids = knn_graph(x, k=5, batch_size=64)
    assert sims.shape == ids.shape == (300, 5) and sims.dtype == np.float32 and ids.dtype == np.int64
    assert not (ids == np.arange(300)[:, None]).any()
    assert ids[3, 0] == 7 and ids[7, 0] == 3 and np.allclose(sims[[3, 7], 0], 1)
    full = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_allclose(sims, -np.sort(-full, axis=1)[:, :5], atol=1e-5)


def test_connected_components_match_union_find():
    rng = np.random.default_rng(2)
    n, k = 400, 3
    sims = rng.uniform(-1, 1, (n, k)).astype(np.float32)
    ids = rng.integers(-1, n, (n, k))
    component = connected_components((sims, ids), 0.8)
    edges = [(i, int(ids[i, j])) for i in range(n) for j in range(k) if sims[i, j] > 0.8 and ids[i, j] >= 0]
    np.testing.assert_array_equal(component, reference_components(n, edges))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_self_dedup_finds_planted_copies(kind):
    x, group = planted_pool()
    result = self_dedup(x, k=16, threshold=0.9, index=build_index(x, kind=kind))
    planted = group >= 0
    # recall: every planted group is one component
    same = [len(set(result.component[group == g])) == 1 for g in np.unique(group[planted])]
    assert np.mean(same) >= 0.99
    # false removals: no image outside the planted groups (look-alikes included) loses its own component
    alone = ~planted
    assert np.mean(np.bincount(result.component)[result.component[alone]] > 1) <= 0.01
    # one kept per component, the lowest pool index
    for g in np.unique(group[planted]):
        members = np.flatnonzero(group == g)
        assert result.keep[members].tolist() == [i == members.min() for i in members]
    assert result.keep.sum() == result.n_components == len(x) - result.n_removed
    assert result.n_removed == planted.sum() - len(np.unique(group[planted]))


def test_rethresholding_a_given_graph_needs_no_search():
    x, _ = planted_pool(seed=3)
    graph = knn_graph(x, k=8)
    for threshold in (0.85, 0.95):
        from_graph = self_dedup(x, threshold=threshold, graph=graph)
        searched = self_dedup(x, k=8, threshold=threshold)
        np.testing.assert_array_equal(from_graph.component, searched.component)
        np.testing.assert_array_equal(from_graph.keep, searched.keep)
    assert self_dedup(x, threshold=0.95, graph=graph).n_removed < self_dedup(x, threshold=0.85, graph=graph).n_removed


def test_self_dedup_of_a_float16_memmap_is_deterministic(tmp_path):
    x, _ = planted_pool(seed=4)
    np.save(tmp_path / "pool.npy", x)
    disk = np.load(tmp_path / "pool.npy", mmap_mode="r")
    first = self_dedup(disk, k=8, kind="ivf")
    second = self_dedup(disk, k=8, kind="ivf")
    in_memory = self_dedup(x.astype(np.float32), k=8)
    np.testing.assert_array_equal(first.component, second.component)
    np.testing.assert_array_equal(first.keep, in_memory.keep)


def test_relative_dedup_removes_copies_of_references_only():
    rng = np.random.default_rng(5)
    refs = unit(rng, 40, 48)
    others = unit(rng, 1000, 48)
    n_copies = rng.integers(1, 4, 40)
    sources = np.repeat(np.arange(40), n_copies)
    cosines = rng.uniform(0.85, 0.97, len(sources))
    order = rng.permutation(1000 + len(sources))
    pool = np.concatenate([others, copies_of(rng, refs[sources], cosines)])[order].astype(np.float32)
    source = np.concatenate([np.full(1000, -1), sources])[order]
    result = relative_dedup(pool, refs, k=8, threshold=0.8)
    np.testing.assert_array_equal(result.removed, source >= 0)
    np.testing.assert_array_equal(result.matched_ref, source)
    np.testing.assert_array_equal(result.direct, source >= 0)
    removed = np.flatnonzero(result.removed)
    exact = np.einsum("nd,nd->n", pool[removed], refs[source[removed]])
    np.testing.assert_allclose(result.similarity[removed], exact, atol=1e-6)
    assert np.isneginf(result.similarity[~result.removed]).all()
    assert result.n_removed == len(sources)


def test_relative_dedup_expands_along_a_duplicate_chain():
    rng = np.random.default_rng(6)
    d, theta = 32, np.arccos(0.95)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0].T  # orthonormal rows
    chain = np.cos(np.arange(6) * theta)[:, None] * basis[0] + np.sin(np.arange(6) * theta)[:, None] * basis[1]
    ref = 0.95 * basis[0] + np.sqrt(1 - 0.95**2) * basis[2]  # cosine 0.95 x cos(i theta) to chain image i
    others = copies_of(rng, np.tile(basis[3], (50, 1)), np.zeros(50))  # orthogonal to the chain and the reference
    pool = np.concatenate([others[:20], chain[::-1], others[20:]]).astype(np.float32)  # chain image i at 25 - i
    graph = knn_graph(pool, k=4)
    expanded = relative_dedup(pool, ref[None], k=4, threshold=0.92, pool_graph=graph)
    direct_only = relative_dedup(pool, ref[None], k=4, threshold=0.92, expand_components=False)
    np.testing.assert_array_equal(np.flatnonzero(direct_only.removed), [25])  # 0.9025 to chain image 1: not direct
    np.testing.assert_array_equal(np.flatnonzero(expanded.removed), np.arange(20, 26))
    np.testing.assert_array_equal(np.flatnonzero(expanded.direct), [25])
    assert (expanded.matched_ref[20:26] == 0).all() and (expanded.matched_ref[:20] == -1).all()
    np.testing.assert_allclose(expanded.similarity[20:26], pool[20:26] @ ref, atol=1e-6)  # exact, below 0.92 too
    assert relative_dedup(pool, ref[None], k=4, threshold=0.92).removed.sum() == 6  # graph computed when not given


def test_duplicate_examples():
    x, _ = planted_pool(seed=7)
    component = self_dedup(x, k=8, threshold=0.9).component
    examples = duplicate_examples(component, 5, seed=1, max_members=3)
    sizes = np.bincount(component)
    assert len(examples) == 5 and examples == duplicate_examples(component, 5, seed=1, max_members=3)
    assert [sizes[component[e[0]]] for e in examples] == sorted(
        (sizes[component[e[0]]] for e in examples), reverse=True
    )
    for members in examples:
        full = np.flatnonzero(component == component[members[0]])
        assert len(full) >= 2 and members == full[:3].tolist()  # the kept (lowest) image first
    assert len(duplicate_examples(component, 10_000)) == (sizes >= 2).sum()
    assert duplicate_examples(np.arange(10), 3) == []


def test_calibrate_threshold():
    others = np.arange(100) / 100
    duplicates = np.array([0.9, 0.95, 0.96, 0.99])
    result = calibrate_threshold(duplicates, others, max_false_rate=0.05)
    assert result.threshold == 0.94 and result.false_rate == 0.05 and result.recall == 0.75
    assert calibrate_threshold(duplicates, others, max_false_rate=0).threshold == 0.99
    with pytest.raises(ValueError, match="max_false_rate"):
        calibrate_threshold(duplicates, others, max_false_rate=1)
    with pytest.raises(ValueError, match="finite"):
        calibrate_threshold([np.nan], others)


def test_defaults_and_bad_input():
    assert -1 <= RELATIVE_THRESHOLD < SELF_THRESHOLD <= 1
    rng = np.random.default_rng(8)
    x = unit(rng, 50, 16).astype(np.float32)
    for threshold in (1.5, -1.01, np.nan):
        with pytest.raises(ValueError, match="threshold"):
            self_dedup(x, threshold=threshold)
    with pytest.raises(TypeError, match="threshold"):
        self_dedup(x, threshold="0.9")
    for k in (0, -3, 2.0):
        with pytest.raises(ValueError, match="k="):
            knn_graph(x, k=k)
    bad = x.copy()
    bad[9] = np.nan
    with pytest.raises(ValueError, match="row 9 has NaN"):
        self_dedup(bad)
    with pytest.raises(ValueError, match="index holds 50 vectors"):
        knn_graph(x[:20], index=build_index(x))
    with pytest.raises(ValueError, match="sims and ids of shape"):
        self_dedup(x, graph=knn_graph(x[:20], k=3))
    with pytest.raises(ValueError, match="dimension"):
        relative_dedup(x, unit(rng, 3, 8))
    with pytest.raises(ValueError, match="component"):
        duplicate_examples(np.array([0, -1]))
