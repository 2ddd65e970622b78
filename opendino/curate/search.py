"""Nearest-neighbour search over L2-normalised embeddings with faiss: the engine of deduplication and retrieval.

DINOv2 searches its pool with faiss GPU inverted-file indices with product-quantisation codes (IVF-PQ; paper Sec. 3
"Implementation details", facts sheet §3, §7); nlist, nprobe and the PQ code size are not published, so the
automatic values below are ours. Rows are unit vectors, so cosine similarity is the inner product and every index
here is an inner-product index. Which index for which pool (memory for d = 384 in parentheses):

| pool size n | `kind` | bytes per vector | similarities returned |
|---|---|---|---|
| below `FLAT_MAX` (200k) | "flat" | 4d (1.5 KiB) | exact, all n compared |
| `FLAT_MAX` .. ~50M, while 4d·n fits | "ivf" (IVF-Flat) | 4d + 8 (1.5 KiB) | exact, of the nprobe nearest lists |
| beyond, or memory short | "ivfpq" (the paper's) | pq_m + 8 (56 at pq_m = 48) | from 8-bit PQ codes: approximate |

"auto" picks "flat" below `FLAT_MAX` and "ivf" above; "ivfpq" is asked for explicitly. IVF indexes also hold nlist
centroids (4d·nlist B) and train on a seeded sample (4d·train_size B while training). Automatic values:
nlist = 4·sqrt(n) (at most 65,536 and n/39), nprobe = 2·sqrt(nlist), train_size = 64·nlist (at least 10,000 for PQ),
pq_m = the largest divisor of d up to d/8. The faiss k-means seeds are set from `seed` (faiss's own default is 1234).

Inputs are numpy arrays or `np.memmap`s (float16 on disk) of shape (n, d): they are read and converted to float32 one
batch at a time, and every batch is checked (finite, unit norm). faiss runs with `torch.get_num_threads()` OpenMP
threads, so it follows `torch.set_num_threads` / OMP_NUM_THREADS and does not oversubscribe. With a faiss GPU build
and `device` "auto" or "cuda" the index lives on GPU 0 (`StandardGpuResources`; IVF k-means is trained there too).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

__all__ = [
    "FLAT_MAX",
    "build_index",
    "check_rows",
    "checked_rows",
    "faiss_threads",
    "iter_batches",
    "load_faiss",
    "search",
]

FLAT_MAX = 200_000  # "auto": exact flat search below this many vectors, IVF-Flat from here on
NORM_TOLERANCE = 1e-2  # |‖x‖² - 1| allowed: float16 storage alone moves ‖x‖² by about 1e-3
GPU_MAX_K = 2048  # faiss GPU indexes return at most this many neighbours (and probe at most this many lists)
_KINDS = ("auto", "flat", "ivf", "ivfpq")
_DEVICES = ("auto", "cpu", "cuda")


def load_faiss() -> Any:
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("curation needs faiss: pip install 'opendino[curate]' (faiss-cpu)") from error
    return faiss


@contextmanager
def faiss_threads() -> Iterator[None]:
    """Run faiss with as many OpenMP threads as torch uses, then restore faiss's setting."""
    faiss = load_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def check_rows(x: Any, name: str) -> np.ndarray:
    """`x` as a 2-D floating numpy array (no copy: a memmap stays a memmap); a torch tensor is viewed on the CPU."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in (torch.float16, torch.float32, torch.float64):
            raise TypeError(f"{name}: float16/32/64 vectors expected, got a {x.dtype} tensor")
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: a numpy array, np.memmap or tensor of vectors expected, got {type(x).__name__}")
    if x.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{name}: float16/32/64 vectors expected, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: a non-empty (n, d) array of vectors expected, got shape {x.shape}")
    return x


def checked_rows(x: np.ndarray, rows: np.ndarray | range, name: str) -> np.ndarray:
    """Rows `rows` of `x` as contiguous float32, checked to be finite unit vectors."""
    picked = x[rows.start : rows.stop] if isinstance(rows, range) else x[rows]
    batch = np.ascontiguousarray(picked, dtype=np.float32)
    sq_norms = np.einsum("ij,ij->i", batch, batch)
    bad = np.flatnonzero(~np.isfinite(sq_norms) | (np.abs(sq_norms - 1) > NORM_TOLERANCE))
    if len(bad):
        first = bad[0]
        what = "NaN or infinite values" if not np.isfinite(batch[first]).all() else f"squared norm {sq_norms[first]}"
        raise ValueError(
            f"{name}: row {rows[first]} has {what} ({len(bad)} such rows among {len(batch)} read together); "
            "L2-normalised finite embeddings are expected"
        )
    return batch


def iter_batches(
    x: np.ndarray, batch_size: int, name: str, *, progress: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 rows) of `x` in batches of `batch_size`, each checked to be finite unit vectors."""
    _check_positive(batch_size, "batch_size")
    starts = range(0, len(x), batch_size)
    for start in tqdm(starts, desc=name, unit="batch", dynamic_ncols=True, disable=not progress):
        yield start, checked_rows(x, range(start, min(start + batch_size, len(x))), name)


def _check_positive(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r}: an integer >= {minimum} expected")
    return int(value)


def _auto_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), 65536, n // 39))


def _auto_pq_m(d: int) -> int:
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


def _use_gpu(faiss: Any, device: str) -> bool:
    if device not in _DEVICES:
        raise ValueError(f"device={device!r}: one of {_DEVICES} expected")
    available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device == "cuda" and not available:
        raise RuntimeError("device='cuda' but this faiss has no GPU support or sees no GPU (faiss-cpu is installed?)")
    return device != "cpu" and available


def _train_sample(x: np.ndarray, size: int, seed: int, batch_size: int) -> np.ndarray:
    """`size` rows drawn without replacement by a seeded generator, read in pool order, as checked float32."""
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    sample = np.empty((size, x.shape[1]), dtype=np.float32)
    for start in range(0, size, batch_size):
        picked = rows[start : start + batch_size]
        sample[start : start + len(picked)] = checked_rows(x, picked, "x (IVF training sample)")
    return sample


def build_index(
    x: Any,
    *,
    kind: str = "auto",
    nlist: int = 0,
    nprobe: int = 0,
    pq_m: int = 0,
    train_size: int = 0,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 65536,
    flat_max: int | None = None,
    progress: bool = False,
) -> Any:
    """An inner-product faiss index holding the rows of `x` (n, d), ids 0..n-1 in row order.

    kind: "auto" ("flat" below `flat_max`, default `FLAT_MAX`, vectors; "ivf" from there on), "flat", "ivf",
    "ivfpq". nlist, nprobe, pq_m, train_size: 0 = automatic (module docstring). seed: the IVF training sample and the
    faiss k-means seeds. device: "auto" (GPU when faiss can use one), "cpu", "cuda" (an error without GPU faiss).
    """
    faiss = load_faiss()
    x = check_rows(x, "x")
    n, d = x.shape
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: one of {_KINDS} expected")
    if kind == "auto":
        kind = "flat" if n < (FLAT_MAX if flat_max is None else flat_max) else "ivf"
    for value, field in ((nlist, "nlist"), (nprobe, "nprobe"), (pq_m, "pq_m"), (train_size, "train_size")):
        _check_positive(value, field, minimum=0)
    gpu = _use_gpu(faiss, device)
    with faiss_threads():
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            index = _ivf_index(
                faiss,
                x,
                kind,
                nlist=nlist,
                nprobe=nprobe,
                pq_m=pq_m,
                train_size=train_size,
                seed=seed,
                gpu=gpu,
                batch_size=batch_size,
            )
        if gpu:
            index = _to_gpu(faiss, index, kind)
        for _, batch in iter_batches(x, batch_size, "x", progress=progress):
            index.add(batch)
    return index


def _ivf_index(
    faiss: Any,
    x: np.ndarray,
    kind: str,
    *,
    nlist: int,
    nprobe: int,
    pq_m: int,
    train_size: int,
    seed: int,
    gpu: bool,
    batch_size: int,
) -> Any:
    """A trained, empty IVF-Flat or IVF-PQ index (trained on CPU, its k-means assignment on the GPU if `gpu`)."""
    n, d = x.shape
    nlist = nlist or _auto_nlist(n)
    if nlist > n:
        raise ValueError(f"nlist={nlist} inverted lists for {n} vectors: at most one list per vector")
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train_size = train_size or min(n, 64 * nlist)
    else:
        pq_m = pq_m or _auto_pq_m(d)
        if d % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the dimension d={d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = seed
        train_size = train_size or min(n, max(64 * nlist, 10_000))
        if min(train_size, n) < 256:
            raise ValueError(f"ivfpq trains 256 codes per sub-vector: needs >= 256 training vectors, got {train_size}")
    index.cp.seed = seed  # spherical k-means (faiss sets cp.spherical for inner product); faiss's default seed is 1234
    index.nprobe = min(nlist, nprobe or max(1, round(2 * math.sqrt(nlist))), GPU_MAX_K if gpu else nlist)
    sample = _train_sample(x, min(train_size, n), seed, batch_size)
    if gpu:  # k-means assignment on the GPU; both objects stay referenced here while faiss uses them
        resources = faiss.StandardGpuResources()
        clustering_index = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(d))
        index.clustering_index = clustering_index
    index.train(sample)
    if gpu:
        index.clustering_index = None
    return index


def _to_gpu(faiss: Any, index: Any, kind: str) -> Any:
    options = faiss.GpuClonerOptions()
    options.useFloat16 = kind == "ivfpq"  # float16 PQ lookup tables: large pq_m does not fit in shared memory otherwise
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, 0, index, options)
    gpu_index.referenced_objects = [resources]  # the resources must live as long as the index
    return gpu_index


def search(
    index: Any, queries: Any, k: int, *, batch_size: int = 16384, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar indexed vectors of every query row, best first.

    Returns (sims float32 (m, k), ids int64 (m, k)); where fewer than k are found (k > ntotal, or too few vectors in
    the probed IVF lists) the missing entries are id -1, similarity -inf.
    """
    k = _check_positive(k, "k")
    queries = check_rows(queries, "queries")
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the index holds dimension {index.d}")
    if type(index).__name__.startswith("Gpu") and k > GPU_MAX_K:
        raise ValueError(f"k={k}: faiss GPU indexes return at most {GPU_MAX_K} neighbours")
    m = len(queries)
    sims = np.empty((m, k), dtype=np.float32)
    ids = np.empty((m, k), dtype=np.int64)
    with faiss_threads():
        for start, batch in iter_batches(queries, batch_size, "queries", progress=progress):
            sims[start : start + len(batch)], ids[start : start + len(batch)] = index.search(batch, k)
    sims[ids < 0] = -np.inf
    return sims, ids
