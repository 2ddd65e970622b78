"""k-means and hierarchical k-means (opendino.curate.kmeans) against the reference of Vo et al. 2024 and its contract.

Reference numbers: tests/fixtures/curation/kmeans_reference.safetensors, written by tools/make_kmeans_fixtures.py
from facebookresearch/ssl-data-curation @ f540537 (Lloyd iterations from given centroids, greedy k-means++ from
recorded random draws, hierarchical k-means with resampling on planted blobs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from opendino.curate.kmeans import (
    Level,
    _kmeans_plusplus,
    assign,
    flat_sizes,
    hierarchical_kmeans,
    kmeans,
    level_generator,
    load_levels,
    point_clusters,
    save_level,
    save_levels,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "curation" / "kmeans_reference.safetensors"
LLOYD_ITERS = {"it0": 0, "it1": 1, "it3": 3, "it50": 50, "empty": 50}


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


def blobs(n_blobs: int, sizes: list[int] | int, dim: int = 8, spread: float = 10.0, std: float = 0.5, seed: int = 0):
    """Planted Gaussian blobs -> (points (n, dim) float32, blob id of every point)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [sizes] * n_blobs if isinstance(sizes, int) else sizes
    centres = spread * torch.randn(n_blobs, dim, generator=g)
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    x = centres[labels] + std * torch.randn(len(labels), dim, generator=g)
    return x, labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings describe the same partition (labels may be permuted)."""
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist(), strict=True))
    return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


def label_map(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """perm[their label] = our label, for two labelings of one partition."""
    perm = np.empty(theirs.max() + 1, np.int64)
    perm[theirs] = ours
    return perm


# ------------------------------------------------------------------------------------------ reference parity


@pytest.mark.parametrize("case", list(LLOYD_ITERS))
def test_lloyd_matches_reference(ref, case):
    x, init = ref["lloyd.x"], ref[f"lloyd.{case}.init"]
    result = kmeans(x, len(init), n_iters=LLOYD_ITERS[case], init_centroids=init, chunk_size=64)
    assert torch.equal(result.assignment, ref[f"lloyd.{case}.assignment"])
    torch.testing.assert_close(result.centroids, ref[f"lloyd.{case}.centroids"], rtol=0, atol=1e-6)
    if LLOYD_ITERS[case] > 0:  # the fixture is not trivial: the centroids moved
        assert (ref[f"lloyd.{case}.centroids"] - init).abs().max() > 0.1


def test_lloyd_iterations_change_the_reference_assignment(ref):
    assert not torch.equal(ref["lloyd.it0.assignment"], ref["lloyd.it50.assignment"])
    assert not torch.equal(ref["lloyd.it1.assignment"], ref["lloyd.it3.assignment"])


def test_empty_cluster_keeps_its_centroid(ref):
    x, init = ref["lloyd.x"], ref["lloyd.empty.init"]
    result = kmeans(x, len(init), n_iters=5, init_centroids=init)
    assert not (result.assignment == 4).any()
    assert torch.equal(result.centroids[4], init[4])


@pytest.mark.parametrize("case", [f"k{k}_s{s}" for k in (10, 40) for s in range(3)])
def test_kmeans_plusplus_matches_reference_draws(ref, case):
    chosen = _kmeans_plusplus(ref["lloyd.x"], int(ref[f"kpp.{case}.first"]), ref[f"kpp.{case}.uniforms"], rows=100)
    assert torch.equal(chosen, ref[f"kpp.{case}.indices"])


@pytest.mark.parametrize("strategy", ["closest", "random"])
def test_hierarchical_matches_reference_on_planted_blobs(ref, strategy):
    x = ref["hier.x"]
    levels = hierarchical_kmeans(x, [12, 3], sample_sizes=[5, 2], n_resamples=3, strategy=strategy)
    ref1 = ref[f"hier.{strategy}.level1.assignment"].numpy()
    ref2 = ref[f"hier.{strategy}.level2.assignment"].numpy()
    assert same_partition(levels[0].assignment, ref1)
    assert same_partition(point_clusters(levels)[:, 1], ref2[ref1])
    if strategy == "closest":  # deterministic given the partition: the means of the r closest rows, resampled
        perm1 = label_map(levels[0].assignment, ref1)
        torch.testing.assert_close(levels[0].centroids[perm1], ref["hier.closest.level1.centroids"], rtol=0, atol=1e-5)
        perm2 = label_map(levels[1].assignment[perm1], ref2)
        torch.testing.assert_close(levels[1].centroids[perm2], ref["hier.closest.level2.centroids"], rtol=0, atol=1e-5)


def test_fixture_metadata_names_the_reference_commit(ref):
    with open(FIXTURE, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert json.loads(header["__metadata__"]["info"])["reference_commit"].startswith("f540537")


# --------------------------------------------------------------------------------------------------- k-means++


def greedy_kmeans_plusplus_loop(x: np.ndarray, first: int, uniforms: np.ndarray) -> list[int]:
    """The definition, one point at a time in float64: candidates by inverse CDF of D², keep the best potential."""
    chosen = [first]
    closest = ((x - x[first]) ** 2).sum(1)
    for u in uniforms:
        cdf = np.cumsum(closest)
        candidates = [min(int(np.searchsorted(cdf, v * closest.sum())), len(x) - 1) for v in u]
        pots = [np.minimum(closest, ((x - x[c]) ** 2).sum(1)).sum() for c in candidates]
        best = candidates[int(np.argmin(pots))]
        chosen.append(best)
        closest = np.minimum(closest, ((x - x[best]) ** 2).sum(1))
    return chosen


def test_kmeans_plusplus_is_the_greedy_definition():
    x, _ = blobs(9, 30, dim=5, spread=3.0, std=1.0, seed=3)
    g = torch.Generator().manual_seed(1)
    uniforms = torch.rand(19, 2 + int(math.log(20)), generator=g, dtype=torch.float64)
    chosen = _kmeans_plusplus(x, 7, uniforms, rows=50)
    assert chosen.tolist() == greedy_kmeans_plusplus_loop(x.double().numpy(), 7, uniforms.numpy())


def test_kmeans_plusplus_picks_distinct_data_points():
    x, _ = blobs(6, 20, seed=1)
    for seed in range(3):
        centroids = kmeans(x, 40, n_iters=0, seed=seed).centroids
        assert len(torch.unique(centroids, dim=0)) == 40
        assert (centroids[:, None] == x[None]).all(-1).any(1).all()  # every centroid is a row of x


def test_kmeans_plusplus_init_beats_random_init_on_blobs():
    x, _ = blobs(15, 40, spread=10.0, std=0.5, seed=2)
    pp = [kmeans(x, 15, n_iters=0, seed=s).sse for s in range(6)]
    rand = [kmeans(x, 15, n_iters=0, init="random", seed=s).sse for s in range(6)]
    assert np.mean(pp) < 0.3 * np.mean(rand)


def test_random_init_takes_distinct_data_points():
    x, _ = blobs(4, 10, seed=4)
    centroids = kmeans(x, 25, n_iters=0, init="random", seed=5).centroids
    assert len(torch.unique(centroids, dim=0)) == 25
    assert (centroids[:, None] == x[None]).all(-1).any(1).all()  # every centroid is a row of x


# ----------------------------------------------------------------------------------------------------- k-means


def test_assign_is_the_nearest_centroid_in_any_chunking():
    x, _ = blobs(5, 40, seed=6)
    centroids = torch.randn(13, 8, generator=torch.Generator().manual_seed(7)) * 5
    a_full, d_full = assign(x, centroids)
    a_chunk, d_chunk = assign(x, centroids, chunk_size=7)
    assert torch.equal(a_full, a_chunk) and torch.equal(d_full, d_chunk)
    dist = torch.cdist(x.double(), centroids.double()) ** 2
    assert torch.equal(a_full, dist.argmin(1))
    torch.testing.assert_close(d_full.double(), dist.min(1).values, rtol=1e-5, atol=1e-5)


def test_kmeans_converges_on_planted_blobs():
    x, labels = blobs(6, [50, 40, 30, 30, 20, 10], seed=8)
    result = kmeans(x, 6, n_iters=20, seed=0, n_init=3)
    assert same_partition(result.assignment.numpy(), labels.numpy())
    assert result.sse == pytest.approx(float(result.sq_dist.double().sum()))
    means = torch.stack([x[result.assignment == c].double().mean(0) for c in range(6)]).float()
    torch.testing.assert_close(result.centroids, means, rtol=0, atol=1e-5)


def test_best_of_n_init_is_the_lowest_sse_run():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(9))  # no structure: runs end in different optima
    g = torch.Generator().manual_seed(11)
    runs = [kmeans(x, 8, n_iters=3, generator=g) for _ in range(4)]
    best = kmeans(x, 8, n_iters=3, n_init=4, seed=11)
    assert best.sse == min(r.sse for r in runs)
    assert len({r.sse for r in runs}) > 1  # the runs differ, so the choice matters


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = blobs(10, 20, spread=2.0, std=1.0, seed=10)
    a, b = kmeans(x, 10, n_iters=5, seed=3), kmeans(x, 10, n_iters=5, seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignment, b.assignment)
    assert not torch.equal(a.centroids, kmeans(x, 10, n_iters=5, seed=4).centroids)


def test_k_above_n_is_capped_with_a_warning():
    x, _ = blobs(2, 3, seed=12)
    with pytest.warns(UserWarning, match="capped at 6"):
        result = kmeans(x, 10, n_iters=2)
    assert result.centroids.shape == (6, 8)
    assert sorted(result.assignment.tolist()) == list(range(6)) and result.sse == 0


def test_float16_input_is_computed_in_float32():
    x, _ = blobs(5, 30, seed=13)
    half = kmeans(x.half(), 5, n_iters=5, seed=1, chunk_size=16)
    single = kmeans(x.half().float(), 5, n_iters=5, seed=1, chunk_size=16)
    assert half.centroids.dtype == torch.float32 and half.sq_dist.dtype == torch.float32
    assert torch.equal(half.centroids, single.centroids) and torch.equal(half.assignment, single.assignment)
    a_half, d_half = assign(x.half(), half.centroids, chunk_size=16)
    assert torch.equal(a_half, half.assignment) and torch.equal(d_half, half.sq_dist)


def test_fit_sample_fits_on_a_subset_and_assigns_everything():
    x, labels = blobs(4, 100, seed=14)
    result = kmeans(x, 4, n_iters=10, fit_sample=60, seed=2)
    assert result.assignment.shape == (400,)
    assert same_partition(result.assignment.numpy(), labels.numpy())
    assert torch.equal(result.assignment, assign(x, result.centroids)[0])
    again = kmeans(x, 4, n_iters=10, fit_sample=60, seed=2)
    assert torch.equal(result.centroids, again.centroids)
    full = kmeans(x, 4, n_iters=10, fit_sample=400, seed=2)  # no smaller than n: the plain fit
    assert torch.equal(full.centroids, kmeans(x, 4, n_iters=10, seed=2).centroids)


def test_numpy_input_is_accepted():
    x, _ = blobs(3, 20, seed=15)
    assert torch.equal(kmeans(x.numpy(), 3, seed=0).centroids, kmeans(x, 3, seed=0).centroids)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: kmeans(x, 0), "k=0"),
        (lambda x: kmeans(x, 2, init="kmeans||"), "init="),
        (lambda x: kmeans(x, 2, n_iters=-1), "n_iters"),
        (lambda x: kmeans(x, 2, init_centroids=torch.zeros(3, 8)), "init_centroids"),
        (lambda x: kmeans(x, 5, fit_sample=3), "fit_sample=3"),
        (lambda x: kmeans(x, 2, chunk_size=0), "chunk_size"),
        (lambda x: kmeans(x[0], 2), "2-D"),
        (lambda x: assign(x, torch.zeros(2, 3)), "dimensions"),
        (lambda x: hierarchical_kmeans(x, [4, 2], sample_sizes=[2]), "one sample size per level"),
        (lambda x: hierarchical_kmeans(x, [4], sample_sizes=[2], strategy="farthest"), "strategy="),
        (lambda x: hierarchical_kmeans(x, [], sample_sizes=[]), "one sample size per level"),
    ],
)
def test_bad_arguments_raise(call, match):
    x, _ = blobs(3, 10, seed=16)
    with pytest.raises(ValueError, match=match):
        call(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_raises(bad):
    x, _ = blobs(3, 10, seed=17)
    x[7, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(x, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        assign(x, x[:2])


# ------------------------------------------------------------------------------------------ hierarchical k-means


@pytest.fixture(scope="module")
def tree_data():
    x, labels = blobs(24, [60 - 2 * i for i in range(24)], dim=6, spread=4.0, std=0.7, seed=18)
    return x, labels


def hier(x, **kw):
    opts = dict(sample_sizes=[4, 2, 1], n_resamples=2, n_iters=8, seed=5) | kw
    return hierarchical_kmeans(x, [30, 8, 3], **opts)


def test_hierarchy_structure(tree_data):
    x, _ = tree_data
    levels = hier(x)
    assert [len(lv.centroids) for lv in levels] == [30, 8, 3]
    n_in = len(x)
    inputs = x
    for level in levels:
        assert level.assignment.shape == (n_in,) and level.assignment.dtype == np.int64
        assert np.array_equal(np.sort(np.concatenate(level.clusters)), np.arange(n_in))
        for c, members in enumerate(level.clusters):
            assert (level.assignment[members] == c).all()
            dist = ((inputs[members] - level.centroids[c]) ** 2).sum(1)
            assert (dist[1:] >= dist[:-1]).all()  # closest first
        # every input row sits with its nearest centroid
        assert np.array_equal(level.assignment, assign(inputs, level.centroids)[0].numpy())
        inputs, n_in = level.centroids, len(level.centroids)
    pc = point_clusters(levels)
    assert pc.shape == (len(x), 3)
    assert np.array_equal(pc[:, 1], levels[1].assignment[levels[0].assignment])
    for t in (1, 2, 3):
        sizes = flat_sizes(levels, t)
        assert sizes.sum() == len(x)
        assert np.array_equal(sizes, np.bincount(pc[:, t - 1], minlength=len(levels[t - 1].centroids)))


def test_no_resampling_level_is_a_plain_kmeans(tree_data):
    x, _ = tree_data
    (level,) = hierarchical_kmeans(x, [10], sample_sizes=[1], n_iters=6, seed=2)
    plain = kmeans(x, 10, n_iters=6, generator=level_generator(2, 1))
    assert torch.equal(level.centroids, plain.centroids)
    assert np.array_equal(level.assignment, plain.assignment.numpy())


def test_resampling_strategies_differ_and_are_deterministic(tree_data):
    x, _ = tree_data
    closest, random_ = hier(x, strategy="closest"), hier(x, strategy="random")
    assert not torch.equal(closest[0].centroids, random_[0].centroids)
    again = hier(x, strategy="random")
    assert all(torch.equal(a.centroids, b.centroids) for a, b in zip(random_, again, strict=True))
    other_seed = hier(x, strategy="random", seed=6)
    assert not torch.equal(random_[0].centroids, other_seed[0].centroids)


def assert_same_levels(a: list[Level], b: list[Level]) -> None:
    assert len(a) == len(b)
    for la, lb in zip(a, b, strict=True):
        assert torch.equal(la.centroids, lb.centroids)
        assert np.array_equal(la.assignment, lb.assignment)
        assert all(np.array_equal(ca, cb) for ca, cb in zip(la.clusters, lb.clusters, strict=True))


def test_killed_run_resumes_bit_identically(tree_data, tmp_path):
    x, _ = tree_data
    whole = hier(x)

    class Killed(Exception):
        pass

    seen = []

    def save_then_die(t, level):
        save_level(tmp_path, t, level)
        seen.append(t)
        if t == 2:
            raise Killed

    with pytest.raises(Killed):
        hier(x, on_level=save_then_die)
    done = load_levels(tmp_path)
    assert len(done) == 2 and seen == [1, 2]
    resumed = hier(x, resume_from=done, on_level=lambda t, lv: seen.append(t))
    assert seen == [1, 2, 3]
    assert_same_levels(resumed, whole)
    assert_same_levels(hier(x, resume_from=whole[:1]), whole)


def test_save_and_load_levels(tree_data, tmp_path):
    x, _ = tree_data
    levels = hier(x)
    save_levels(tmp_path, levels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["level1.npz", "level2.npz", "level3.npz"]
    assert_same_levels(load_levels(tmp_path), levels)
    save_levels(tmp_path, levels[:2])  # a shorter hierarchy replaces the longer one
    assert_same_levels(load_levels(tmp_path), levels[:2])
    assert load_levels(tmp_path / "missing") == []


def test_resume_from_inconsistent_levels_raises(tree_data):
    x, _ = tree_data
    levels = hier(x)
    with pytest.raises(ValueError, match="assigns"):
        hier(x[:100], resume_from=levels[:1])
    with pytest.raises(ValueError, match="resume from"):
        hierarchical_kmeans(x, [30], sample_sizes=[1], resume_from=levels)
    with pytest.raises(ValueError, match="clusters"):
        hierarchical_kmeans(x, [20, 8], sample_sizes=[1, 1], resume_from=levels[:1])
    with pytest.raises(ValueError, match="level number"):
        flat_sizes(levels, 4)


@pytest.mark.gpu
def test_gpu_matches_cpu(tree_data):
    x, _ = tree_data
    cpu = kmeans(x, 24, n_iters=10, seed=0)
    gpu = kmeans(x.cuda(), 24, n_iters=10, seed=0)
    assert gpu.centroids.is_cuda
    assert (gpu.assignment.cpu() == cpu.assignment).float().mean() > 0.99
    assert gpu.sse == pytest.approx(cpu.sse, rel=1e-3)
    levels = hier(x, device="cuda")
    assert [len(lv.centroids) for lv in levels] == [30, 8, 3]
