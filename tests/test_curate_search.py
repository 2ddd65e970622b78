"""faiss index building and batched search (opendino.curate.search) against brute-force numpy."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from opendino.curate.search import FLAT_MAX, build_index, faiss_threads, load_faiss, search  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, d: int, n_centres: int, spread: float = 0.5) -> np.ndarray:
    """Unit vectors around random centres: structure an IVF index can use."""
    centres = unit(rng, n_centres, d)
    x = centres[rng.integers(0, n_centres, n)] + spread * unit(rng, n, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ x.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


def test_flat_search_is_exact():
    rng = np.random.default_rng(0)
    x, queries = unit(rng, 500, 48), unit(rng, 37, 48)
    index = build_index(x, kind="flat")
    sims, ids = search(index, queries, 10, batch_size=8)
    ref_sims, ref_ids = brute_force(x, queries, 10)
    assert sims.dtype == np.float32 and ids.dtype == np.int64 and sims.shape == ids.shape == (37, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    own_sims, own_ids = search(index, x[:20], 1)
    np.testing.assert_array_equal(own_ids[:, 0], np.arange(20))  # every vector finds itself first
    np.testing.assert_allclose(own_sims[:, 0], 1, atol=1e-5)


def test_missing_neighbours_are_minus_one_and_minus_inf():
    x = unit(np.random.default_rng(1), 5, 16)
    sims, ids = search(build_index(x), x, 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(sims[:, 5:]).all()
    assert (np.sort(ids[:, :5], axis=1) == np.arange(5)).all()


def test_auto_picks_flat_below_the_threshold_and_ivf_above():
    x = clustered(np.random.default_rng(2), 2000, 32, 20)
    assert FLAT_MAX == 200_000
    assert isinstance(build_index(x), faiss.IndexFlatIP)
    assert isinstance(build_index(x, flat_max=2001), faiss.IndexFlatIP)
    index = build_index(x, flat_max=2000)
    assert isinstance(index, faiss.IndexIVFFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.nlist == min(round(4 * np.sqrt(2000)), 2000 // 39) and index.ntotal == 2000
    assert index.nprobe == round(2 * np.sqrt(index.nlist))
    explicit = build_index(x, kind="ivf", nlist=16, nprobe=3)
    assert (explicit.nlist, explicit.nprobe) == (16, 3)


def test_ivf_agrees_with_flat_on_clustered_data():
    rng = np.random.default_rng(3)
    x = clustered(rng, 4000, 64, 40)
    queries = x[rng.choice(4000, 200, replace=False)]
    flat_ids = search(build_index(x, kind="flat"), queries, 20)[1]
    ivf_sims, ivf_ids = search(build_index(x, kind="ivf"), queries, 20)
    assert recall(ivf_ids, flat_ids) > 0.9
    # IVF-Flat similarities are exact inner products of the vectors it finds
    np.testing.assert_allclose(ivf_sims, np.einsum("md,mkd->mk", queries, x[ivf_ids]), atol=1e-5)


def test_ivfpq_finds_near_duplicates_with_approximate_similarities():
    rng = np.random.default_rng(4)
    x = clustered(rng, 3000, 64, 30)
    copies = x[:100] + 0.1 * unit(rng, 100, 64)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    index = build_index(x, kind="ivfpq", pq_m=16, nprobe=8)
    assert isinstance(index, faiss.IndexIVFPQ) and index.pq.M == 16
    sims, ids = search(index, copies, 1)
    assert np.mean(ids[:, 0] == np.arange(100)) >= 0.95
    assert np.abs(sims[:, 0] - np.einsum("nd,nd->n", copies, x[:100])).max() < 0.1
    assert build_index(x, kind="ivfpq").pq.M == 8  # automatic: the largest divisor of 64 up to 64 / 8


def test_float16_memmap_input(tmp_path):
    rng = np.random.default_rng(5)
    x = unit(rng, 3000, 32).astype(np.float16)
    disk = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=x.shape)
    disk[:] = x
    disk.flush()
    disk = np.load(tmp_path / "x.npy", mmap_mode="r")
    for kind in ("flat", "ivf"):
        from_disk = search(build_index(disk, kind=kind, batch_size=256), disk[:50], 5, batch_size=16)
        in_memory = search(build_index(x.astype(np.float32), kind=kind), x[:50].astype(np.float32), 5)
        np.testing.assert_array_equal(from_disk[1], in_memory[1])
        np.testing.assert_array_equal(from_disk[0], in_memory[0])
    flat = search(build_index(x.astype(np.float32)), x[:50].astype(np.float32), 5)
    from_torch = search(build_index(torch.from_numpy(x)), torch.from_numpy(x[:50]), 5)
    np.testing.assert_array_equal(from_torch[1], flat[1])


def test_ivf_is_deterministic_for_a_seed():
    rng = np.random.default_rng(6)
    x = clustered(rng, 3000, 32, 30)
    first = search(build_index(x, kind="ivf", seed=7), x[:300], 10)
    second = search(build_index(x, kind="ivf", seed=7), x[:300], 10)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    indexes = [build_index(x, kind="ivf", nlist=30, seed=s) for s in (7, 8)]
    centroids = [index.quantizer.reconstruct_n(0, 30) for index in indexes]
    assert not np.array_equal(*centroids)  # the seed reaches faiss's k-means


def test_faiss_follows_torch_threads_and_restores():
    before = faiss.omp_get_max_threads()
    with faiss_threads():
        assert faiss.omp_get_max_threads() == torch.get_num_threads() == 1  # the one_thread fixture
    assert faiss.omp_get_max_threads() == before


def test_bad_input_is_rejected():
    rng = np.random.default_rng(8)
    x = unit(rng, 100, 16)
    index = build_index(x)
    with pytest.raises(ValueError, match="dimension 8"):
        search(index, unit(rng, 3, 8), 2)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k="):
            search(index, x, k)
    nan = x.copy()
    nan[42, 3] = np.nan
    with pytest.raises(ValueError, match="row 42 has NaN"):
        build_index(nan)
    with pytest.raises(ValueError, match="row 42 has NaN"):
        build_index(nan, kind="ivf", nlist=2)
    with pytest.raises(ValueError, match="queries: row 0 has squared norm 4"):
        search(index, 2 * x[:3], 1)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        build_index(x[0])
    with pytest.raises(TypeError, match="dtype int64"):
        build_index(np.ones((4, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="list"):
        build_index(x.tolist())
    with pytest.raises(ValueError, match="kind="):
        build_index(x, kind="hnsw")
    with pytest.raises(ValueError, match="device="):
        build_index(x, device="tpu")
    with pytest.raises(ValueError, match="nlist=200"):
        build_index(x, kind="ivf", nlist=200)
    with pytest.raises(ValueError, match="pq_m=5"):
        build_index(x, kind="ivfpq", nlist=2, pq_m=5)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="no GPU"):
            build_index(x, device="cuda")


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"opendino\[curate\]"):
        load_faiss()
