#!/usr/bin/env python
"""Generate the curation k-means / balanced-sampling parity fixtures from the REFERENCE code of Vo et al. 2024.

This script is ours and is never imported by opendino or its tests; they only read the numbers it writes. It imports
`src/kmeans_gpu.py`, `src/hierarchical_kmeans_gpu.py`, `src/hierarchical_sampling.py` and `src/clusters.py` from a
copy of facebookresearch/ssl-data-curation (the committed files were made from f5405376435b0b8ff46c440bc3fdb2d34ac1bd1f)
and runs them on CPU tensors. Two patches, none touching the algorithms: `np.Inf` (gone in numpy 2) is set to
`np.inf`; `kmeans_gpu.kmeans_plusplus` is replaced, for the Lloyd cases only, by a function returning given initial
centroids. The reference draws from numpy's global RNG (unseeded); it is seeded here so reruns give the same numbers.

`kmeans_reference.safetensors` (data from `torch.Generator().manual_seed(0)`, float32):
- `lloyd.x` (300 x 8: six Gaussian blobs of unequal sizes, overlapping) and, per case, `lloyd.<case>.init` (k x 8),
  `.centroids` and `.assignment` from the reference `_kmeans` (float64 accumulation, chunk_size 64) started at init:
  k = 7 distinct data rows with 0, 1, 3 and 50 iterations; "empty": k = 5 with one initial centroid far from all data.
- per case, on `lloyd.x`: `kpp.<case>.first`, `.uniforms` ((k - 1) x (2 + int(ln k)) draws) and
  `.indices` (the k rows the reference greedy k-means++ chose from a `RandomState(seed)` that makes exactly these
  draws), k = 10 and 40, seeds 0..2.
- `hier.x` (331 x 8: 12 tight blobs of 15..40 points in 3 far-apart groups of 3, 4 and 5 blobs) and, for resampling
  strategies closest and random, `hier.<strategy>.level<t>.centroids` / `.assignment` from
  `hierarchical_kmeans_with_resampling(n_clusters=[12, 3], sample_sizes=[5, 2], n_resamples=3)`.

`sampling_reference.json`:
- `water_filling`: `find_subcluster_target_size(sizes, n, multiplier)` run 300 times per case; `lo` / `hi` are the
  per-cluster minimum / maximum counts seen (equal where the result is not random).
- `trees`: a 3-level tree (400 points, 30 / 8 / 3 clusters; cluster lists in stored order) and, per (n, multiplier,
  strategy), 100 runs of `hierarchical_sampling`: `total` (the sample size), `picks_lo[t]` / `picks_hi[t]` (the
  range of the picks per level-(t+1) cluster over the runs) and `indices` (sorted) when every run gave the same
  sample.

Usage (from the repository root, CPU; a rerun writes identical files):

    python tools/make_kmeans_fixtures.py --reference /path/to/ssl-data-curation --out tests/fixtures/curation
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REFERENCE_COMMIT = "f5405376435b0b8ff46c440bc3fdb2d34ac1bd1f"
# (n, multiplier) of the tree cases; 108, 324, 360 (x1) and 108, 270, 432, 708 (x2) split without a random +1
CASES_TREE = [(n, 1) for n in (90, 108, 150, 240, 324, 360, 400, 500)] + [(n, 2) for n in (108, 270, 432, 600, 708)]
CASES_TREE += [(1000, 3)]


def _reference(path: Path):
    sys.path.insert(0, str(path))
    np.Inf = np.inf  # type: ignore[attr-defined]  # the reference's kmeans() still spells it the numpy-1 way
    from src import hierarchical_kmeans_gpu, hierarchical_sampling, kmeans_gpu
    from src.clusters import HierarchicalCluster

    return kmeans_gpu, hierarchical_kmeans_gpu, hierarchical_sampling, HierarchicalCluster


def _blobs(g: torch.Generator, sizes: list[int], centres: torch.Tensor, std: float) -> torch.Tensor:
    x = torch.cat([centres[i] + std * torch.randn(s, centres.shape[1], generator=g) for i, s in enumerate(sizes)])
    return x[torch.randperm(len(x), generator=g)].contiguous()


def _lloyd(kmg, g: torch.Generator) -> dict[str, torch.Tensor]:
    x = _blobs(g, [80, 60, 50, 45, 40, 25], 3.0 * torch.randn(6, 8, generator=g), 1.5)
    out = {"lloyd.x": x}
    original = kmg.kmeans_plusplus
    init7 = x[torch.randperm(len(x), generator=g)[:7]].clone()
    far = torch.cat([x[torch.randperm(len(x), generator=g)[:4]], torch.full((1, 8), 100.0)])
    cases = {"it0": (init7, 0), "it1": (init7, 1), "it3": (init7, 3), "it50": (init7, 50), "empty": (far, 50)}
    try:
        for case, (init, n_iters) in cases.items():
            kmg.kmeans_plusplus = lambda X, n_clusters, *a, _init=init, **kw: (_init.clone(), None)
            centroids, _, assignment, _ = kmg._kmeans(
                x, len(init), n_iters, chunk_size=64, init_method="kmeans++", high_precision=torch.float64
            )
            out[f"lloyd.{case}.init"] = init.clone()
            out[f"lloyd.{case}.centroids"] = centroids.float().contiguous()
            out[f"lloyd.{case}.assignment"] = torch.from_numpy(np.asarray(assignment, dtype=np.int64))
    finally:
        kmg.kmeans_plusplus = original
    return out


def _kmeans_plusplus(kmg, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    x_sq = torch.linalg.vector_norm(x, dim=1) ** 2
    for k in (10, 40):
        n_trials = 2 + int(np.log(k))
        for seed in range(3):
            _, indices = kmg.kmeans_plusplus(
                x, k, x_sq, "l2", random_state=np.random.RandomState(seed), high_precision=torch.float64
            )
            replay = np.random.RandomState(seed)  # the same draws in the same order as inside kmeans_plusplus
            first = replay.randint(len(x))
            uniforms = np.stack([replay.uniform(size=n_trials) for _ in range(k - 1)])
            out[f"kpp.k{k}_s{seed}.first"] = torch.tensor(first, dtype=torch.int64)
            out[f"kpp.k{k}_s{seed}.uniforms"] = torch.from_numpy(uniforms)
            out[f"kpp.k{k}_s{seed}.indices"] = torch.from_numpy(indices.astype(np.int64))
    return out


def _hierarchical(hkg, g: torch.Generator) -> dict[str, torch.Tensor]:
    groups = 40.0 * torch.randn(3, 8, generator=g)
    blob_sizes = [15, 40, 22, 31, 18, 27, 35, 20, 24, 38, 16, 45]
    group_of_blob = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]  # groups of 3, 4 and 5 blobs: no two equal cluster counts
    centres = torch.stack([groups[j] + 6.0 * torch.randn(8, generator=g) for j in group_of_blob])
    x = _blobs(g, blob_sizes, centres, 0.3)
    out = {"hier.x": x}
    for strategy in ("closest", "random"):
        np.random.seed(0)
        with contextlib.redirect_stdout(io.StringIO()):  # the reference's progress bars
            levels = hkg.hierarchical_kmeans_with_resampling(
                x, [12, 3], 2, [5, 2], n_resamples=3, sample_strategy=strategy, verbose=False
            )
        for t, level in enumerate(levels, start=1):
            out[f"hier.{strategy}.level{t}.centroids"] = level["centroids"].float().contiguous()
            out[f"hier.{strategy}.level{t}.assignment"] = torch.from_numpy(np.asarray(level["assignment"], np.int64))
        point_blob = torch.cdist(x, centres).argmin(1).numpy()
        sizes1 = np.bincount(levels[0]["assignment"], minlength=12)
        pairs = set(zip(point_blob.tolist(), levels[0]["assignment"].tolist(), strict=True))
        if sorted(sizes1) != sorted(blob_sizes) or len(pairs) != 12:
            raise RuntimeError(f"the reference did not recover the planted blobs ({strategy}): {sizes1}")
    return out


def _water_filling(hs) -> list[dict]:
    rng = np.random.default_rng(0)
    tail = np.maximum(1, (400 / np.arange(1, 31) ** 1.2).astype(np.int64))
    tail[7] = 0  # an empty cluster
    cases = [([100, 50, 10, 3, 1], n, 1) for n in (64, 20, 0, 1, 164, 500)]
    cases += [([100, 50, 10, 3, 1], 64, 2), ([7, 7, 7, 7], 10, 1), (tail.tolist(), 100, 1), (tail.tolist(), 777, 3)]
    cases += [(rng.integers(0, 60, 25).tolist(), 300, 1)]
    np.random.seed(0)
    out = []
    for sizes, n, multiplier in cases:
        runs = np.stack([hs.find_subcluster_target_size(np.array(sizes), n, multiplier) for _ in range(300)])
        out.append(dict(sizes=sizes, n=n, multiplier=multiplier, lo=runs.min(0).tolist(), hi=runs.max(0).tolist()))
    return out


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _tree(rng: np.random.Generator) -> list[list[list[int]]]:
    """Cluster lists of a 3-level tree: 400 points in 30 long-tailed leaves, in 8 then 3 clusters."""
    leaf_sizes = np.maximum(2, (150 / np.arange(1, 31) ** 1.1).astype(np.int64))
    leaf_sizes[0] += 400 - leaf_sizes.sum()
    points = rng.permutation(400)
    leaves = np.split(points, np.cumsum(leaf_sizes)[:-1])
    mid = np.split(rng.permutation(30), [3, 7, 9, 15, 18, 24, 27])
    top = np.split(rng.permutation(8), [2, 5])
    return [[c.tolist() for c in level] for level in (leaves, mid, top)]


def _sampling_trees(hs, HierarchicalCluster) -> list[dict]:
    tree = _tree(np.random.default_rng(1))
    cluster_of_point = np.empty((400, 3), np.int64)  # the level-1, 2 and 3 cluster of every point
    for top_id, mids in enumerate(tree[2]):
        for m in mids:
            for leaf in tree[1][m]:
                cluster_of_point[tree[0][leaf]] = (leaf, m, top_id)
    clusters = HierarchicalCluster.from_dict([{"clusters": _object_array([np.array(c) for c in lv])} for lv in tree])
    cases = []
    for n, multiplier in CASES_TREE:
        for strategy in ("closest", "random"):
            np.random.seed(0)
            random.seed(0)
            with contextlib.redirect_stdout(io.StringIO()):
                runs = [np.sort(hs.hierarchical_sampling(clusters, n, multiplier, strategy[0])) for _ in range(100)]
            lo, hi = [], []
            for t in range(3):
                counts = np.stack([np.bincount(cluster_of_point[r, t], minlength=len(tree[t])) for r in runs])
                lo.append(counts.min(0).tolist())
                hi.append(counts.max(0).tolist())
            case: dict = dict(
                n=n, multiplier=multiplier, strategy=strategy, total=len(runs[0]), picks_lo=lo, picks_hi=hi
            )
            if all(np.array_equal(r, runs[0]) for r in runs):
                case["indices"] = runs[0].tolist()
            cases.append(case)
    return [dict(clusters=tree, cases=cases)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="copy of facebookresearch/ssl-data-curation")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/curation"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    kmg, hkg, hs, HierarchicalCluster = _reference(args.reference)
    g = torch.Generator().manual_seed(0)
    tensors = _lloyd(kmg, g)
    tensors |= _kmeans_plusplus(kmg, tensors["lloyd.x"])
    tensors |= _hierarchical(hkg, g)
    meta = {"reference_commit": REFERENCE_COMMIT, "torch": torch.__version__, "numpy": np.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    # one metadata entry: safetensors writes several in a random order, and a rerun must give the same bytes
    save_file(tensors, str(args.out / "kmeans_reference.safetensors"), metadata={"info": json.dumps(meta)})
    sampling = dict(meta, water_filling=_water_filling(hs), trees=_sampling_trees(hs, HierarchicalCluster))
    (args.out / "sampling_reference.json").write_text(json.dumps(sampling, indent=1) + "\n")
    print(f"wrote {args.out}/kmeans_reference.safetensors ({len(tensors)} tensors) and sampling_reference.json")


if __name__ == "__main__":
    main()
