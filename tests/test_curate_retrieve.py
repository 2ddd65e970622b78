"""Sample- and cluster-based retrieval (opendino.curate.retrieve) against brute-force references."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

pytest.importorskip("faiss")

from opendino.curate.retrieve import cluster_retrieval, nearest_centroid, sample_retrieval
from opendino.curate.search import build_index

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near(rng: np.random.Generator, centres: np.ndarray, noise: float) -> np.ndarray:
    x = centres + noise * unit(rng, *centres.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_retrieval(pool, seeds, k, excluded=None, min_similarity=None):
    """Per pool image: (hits, best similarity, best seed), from the full similarity matrix."""
    sims = seeds.astype(np.float64) @ pool.astype(np.float64).T
    if excluded is not None:
        sims[:, excluded] = -np.inf
    found = defaultdict(list)
    for s, row in enumerate(sims):
        for p in np.argsort(-row, kind="stable")[:k]:
            if min_similarity is None or row[p] >= min_similarity:
                found[int(p)].append((-row[p], s))
    return {p: (len(v), -min(v)[0], min(v)[1]) for p, v in found.items()}


def check_against(result, reference):
    assert result.pool_ids.tolist() == sorted(reference)
    assert result.hits.tolist() == [reference[p][0] for p in result.pool_ids]
    assert result.best_seed.tolist() == [reference[p][2] for p in result.pool_ids]
    np.testing.assert_allclose(result.best_similarity, [reference[p][1] for p in result.pool_ids], atol=1e-5)
    assert (result.cluster == -1).all() and len(result) == len(reference)


def test_sample_retrieval_returns_planted_neighbours():
    rng = np.random.default_rng(0)
    seeds = unit(rng, 30, 64)
    planted = near(rng, np.repeat(seeds, 4, axis=0), 0.2)  # 4 close images per seed
    others = unit(rng, 2000, 64)
    order = rng.permutation(2120)
    pool = np.concatenate([others, planted])[order]
    owner = np.concatenate([np.full(2000, -1), np.repeat(np.arange(30), 4)])[order]
    result = sample_retrieval(pool, seeds, k=4)
    np.testing.assert_array_equal(result.pool_ids, np.flatnonzero(owner >= 0))
    np.testing.assert_array_equal(result.best_seed, owner[result.pool_ids])
    assert (result.hits == 1).all()
    check_against(result, reference_retrieval(pool, seeds, 4))


def test_collisions_are_counted():
    rng = np.random.default_rng(1)
    centre = unit(rng, 1, 32)
    seeds = near(rng, np.repeat(centre, 5, axis=0), 0.05)  # 5 seeds sharing their neighbours
    pool = np.concatenate([unit(rng, 500, 32), near(rng, np.repeat(centre, 6, axis=0), 0.1)])
    result = sample_retrieval(pool, seeds, k=4, batch_size=2)
    reference = reference_retrieval(pool, seeds, 4)
    assert sum(hits for hits, _, _ in reference.values()) == 20 and max(h for h, _, _ in reference.values()) > 1
    check_against(result, reference)
    assert result.hits.sum() == 20 and set(result.pool_ids) <= set(range(500, 506))


def test_exclusion_widens_the_search_and_min_similarity_drops():
    rng = np.random.default_rng(2)
    pool = unit(rng, 800, 32)
    seeds = np.concatenate([pool[:10], unit(rng, 10, 32)])  # 10 seeds whose own pool copy will be excluded
    excluded = np.zeros(800, dtype=bool)
    excluded[:10] = True
    excluded[rng.choice(800, 300, replace=False)] = True
    reference = reference_retrieval(pool, seeds, 6, excluded=excluded)
    for exclude in (excluded, np.flatnonzero(excluded)):
        result = sample_retrieval(pool, seeds, k=6, exclude=exclude)
        check_against(result, reference)
        assert not excluded[result.pool_ids].any() and result.hits.sum() == 20 * 6
    index = build_index(pool, kind="flat")
    floor = float(np.median(list(v[1] for v in reference.values())))
    check_against(
        sample_retrieval(index, seeds, k=6, exclude=excluded, min_similarity=floor),
        reference_retrieval(pool, seeds, 6, excluded=excluded, min_similarity=floor),
    )


def test_sample_retrieval_over_an_ivf_index_of_a_float16_memmap(tmp_path):
    rng = np.random.default_rng(3)
    seeds = unit(rng, 50, 48)
    pool = np.concatenate([unit(rng, 3000, 48), near(rng, np.repeat(seeds, 2, axis=0), 0.15)]).astype(np.float16)
    np.save(tmp_path / "pool.npy", pool)
    disk = np.load(tmp_path / "pool.npy", mmap_mode="r")
    first = sample_retrieval(build_index(disk, kind="ivf"), seeds, k=2)
    second = sample_retrieval(disk, seeds, k=2, kind="ivf")
    np.testing.assert_array_equal(first.pool_ids, np.arange(3000, 3100))  # the planted pairs
    for field in ("pool_ids", "hits", "best_similarity", "best_seed"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))


def test_nearest_centroid_is_squared_l2():
    rng = np.random.default_rng(4)
    centroids = unit(rng, 12, 16) * rng.uniform(0.3, 1.0, (12, 1)).astype(np.float32)  # k-means means: not unit
    x = unit(rng, 200, 16)
    assignment, sq_dist = nearest_centroid(x, centroids, batch_size=7)
    distances = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(assignment, distances.argmin(1))
    np.testing.assert_allclose(sq_dist, distances.min(1), atol=1e-5)
    assert (assignment != (x @ centroids.T).argmax(1)).any()  # the inner product would choose differently


def clustered_pool(rng: np.random.Generator, sizes: list[int], d: int = 32):
    centroids = unit(rng, len(sizes), d)
    assignment = np.repeat(np.arange(len(sizes)), sizes)
    pool = near(rng, centroids[assignment], 0.4)
    order = rng.permutation(len(pool))
    return pool[order], assignment[order], centroids


def test_cluster_retrieval_takes_the_clusters_with_more_than_min_seeds():
    rng = np.random.default_rng(5)
    _, assignment, centroids = clustered_pool(rng, [50, 80, 30, 60, 70, 40, 90, 20])
    seeds_per_cluster = np.array([0, 3, 4, 1, 6, 5, 2, 9])  # clusters 2, 4, 5, 7 have more than 3
    seeds = near(rng, np.repeat(centroids, seeds_per_cluster, axis=0), 0.3)
    result = cluster_retrieval(assignment, centroids, seeds, min_seeds=3, per_cluster=25, cap=None)
    taken = np.bincount(assignment[result.pool_ids], minlength=8)
    np.testing.assert_array_equal(taken, [0, 0, 25, 0, 25, 25, 0, 20])  # cluster 7 holds only 20
    np.testing.assert_array_equal(result.cluster, assignment[result.pool_ids])
    assert (result.hits == 1).all()
    np.testing.assert_array_equal(np.bincount(nearest_centroid(seeds, centroids)[0], minlength=8), seeds_per_cluster)
    assert np.isnan(result.best_similarity).all() and (result.best_seed == -1).all()
    assert (np.diff(result.pool_ids) > 0).all()
    # the cap: clusters by seed count (7: 9 seeds, 4: 6, 5: 5, 2: 4), the last one cut
    capped = cluster_retrieval(assignment, centroids, seeds, per_cluster=25, cap=60)
    np.testing.assert_array_equal(np.bincount(assignment[capped.pool_ids], minlength=8), [0, 0, 0, 0, 25, 15, 0, 20])
    assert set(capped.pool_ids) <= set(result.pool_ids)  # a cluster's draw does not depend on the cap
    assert len(cluster_retrieval(assignment, centroids, seeds, min_seeds=9)) == 0
    assert len(cluster_retrieval(assignment, centroids, seeds, min_seeds=0, per_cluster=1000, cap=None)) == 440 - 50


def test_cluster_retrieval_strategies_and_exclusion():
    rng = np.random.default_rng(6)
    pool, assignment, centroids = clustered_pool(rng, [100, 100, 100])
    seeds = near(rng, np.repeat(centroids[:2], 5, axis=0), 0.3)
    sq_dist = ((pool - centroids[assignment]) ** 2).sum(1)
    closest = cluster_retrieval(assignment, centroids, seeds, per_cluster=10, strategy="closest", pool_sq_dist=sq_dist)
    for c in (0, 1):
        members = np.flatnonzero(assignment == c)
        expected = members[np.argsort(sq_dist[members], kind="stable")[:10]]
        np.testing.assert_array_equal(closest.pool_ids[closest.cluster == c], np.sort(expected))
    first = cluster_retrieval(assignment, centroids, seeds, per_cluster=10, seed=1)
    again = cluster_retrieval(assignment, centroids, seeds, per_cluster=10, seed=1)
    other = cluster_retrieval(assignment, centroids, seeds, per_cluster=10, seed=2)
    np.testing.assert_array_equal(first.pool_ids, again.pool_ids)
    assert not np.array_equal(first.pool_ids, other.pool_ids)
    more = cluster_retrieval(assignment, centroids, seeds, min_seeds=0, per_cluster=10, seed=1)  # + cluster 2
    np.testing.assert_array_equal(more.pool_ids[more.cluster < 2], first.pool_ids)
    excluded = np.flatnonzero(assignment == 0)[:95]
    kept = cluster_retrieval(assignment, centroids, seeds, per_cluster=10, exclude=excluded)
    assert not np.isin(kept.pool_ids, excluded).any()
    np.testing.assert_array_equal(np.bincount(kept.cluster, minlength=3), [5, 10, 0])


def test_bad_input_is_rejected():
    rng = np.random.default_rng(7)
    pool, assignment, centroids = clustered_pool(rng, [20, 20])
    seeds = unit(rng, 8, 32)
    with pytest.raises(ValueError, match="dimension"):
        sample_retrieval(pool, unit(rng, 3, 16))
    with pytest.raises(ValueError, match="k="):
        sample_retrieval(pool, seeds, k=0)
    with pytest.raises(ValueError, match="min_similarity"):
        sample_retrieval(pool, seeds, min_similarity=2)
    with pytest.raises(ValueError, match="exclude"):
        sample_retrieval(pool, seeds, exclude=np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="exclude"):
        sample_retrieval(pool, seeds, exclude=[40])
    nan_seeds = seeds.copy()
    nan_seeds[2, 0] = np.nan
    with pytest.raises(ValueError, match="row 2 has NaN"):
        sample_retrieval(pool, nan_seeds)
    with pytest.raises(ValueError, match=r"cluster ids in \[0, 2\)"):
        cluster_retrieval(assignment + 1, centroids, seeds)
    with pytest.raises(ValueError, match="int array"):
        cluster_retrieval(assignment.astype(np.float32), centroids, seeds)
    with pytest.raises(ValueError, match="strategy="):
        cluster_retrieval(assignment, centroids, seeds, strategy="furthest")
    with pytest.raises(ValueError, match="pool_sq_dist"):
        cluster_retrieval(assignment, centroids, seeds, strategy="closest")
    for name in ("min_seeds", "per_cluster", "cap", "seed"):
        with pytest.raises(ValueError, match=name):
            cluster_retrieval(assignment, centroids, seeds, **{name: -1})
    with pytest.raises(ValueError, match="dimension"):
        cluster_retrieval(assignment, centroids, unit(rng, 3, 16))
    with pytest.raises(ValueError, match="centroids"):
        nearest_centroid(seeds, np.full((2, 32), np.nan))
