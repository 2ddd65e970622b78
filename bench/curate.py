"""Time and peak memory of the curation engine: deduplication + 2-level hierarchical k-means on synthetic embeddings.

The embeddings are random but clustered like real ones: `--n` unit vectors of dimension `--dim` (float16, as the
embed stage stores them) around n/100 centres whose sizes follow a power law (a long tail), plus 1 % planted
near-duplicates (a copy plus small noise, cosine about 0.99). Nothing is read from disk. The script runs what
`opendino curate` runs on them:

1. dedup: `build_index` (flat or IVF, `--index`), `knn_graph` with k = `--k`, `self_dedup` at `--threshold`;
   it reports the recall of the planted copies and the other removals as a sanity check;
2. balance: `hierarchical_kmeans` with `--levels` clusters per level (default n/100 and n/1000), resampling sample
   sizes `--sample-sizes`, `--resamples` rounds, `--iters` Lloyd iterations, optionally fitted on `--fit-sample`
   points, on `--device`.

and prints one line per step (seconds, peak resident memory of the process, peak GPU memory) and a JSON record.

    python bench/curate.py --n 100000                       # CPU here: ~10 min on 2 cores
    python bench/curate.py --n 1000000 --device cuda        # the 1M goal on one GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from opendino.curate.dedup import knn_graph, self_dedup
from opendino.curate.kmeans import hierarchical_kmeans
from opendino.curate.search import build_index
from opendino.eval.features import pick_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="embeddings")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=64, help="neighbours per image in the k-NN graph")
    p.add_argument("--threshold", type=float, default=0.95, help="dedup cosine threshold")
    p.add_argument("--index", default="auto", choices=("auto", "flat", "ivf", "ivfpq"))
    p.add_argument("--nlist", type=int, default=0, help="IVF inverted lists (0: automatic, 4·sqrt(n))")
    p.add_argument("--nprobe", type=int, default=0, help="IVF lists searched per query (0: automatic, 2·sqrt(nlist))")
    p.add_argument("--levels", type=int, nargs="+", default=None, help="clusters per level (default n/100, n/1000)")
    p.add_argument("--sample-sizes", type=int, nargs="+", default=None, help="resampling r per level (default 1 3)")
    p.add_argument("--resamples", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--fit-sample", type=int, default=0, help="fit level 1 on this many points (0: all)")
    p.add_argument("--device", default="auto", help="k-means and faiss device")
    p.add_argument("--skip-dedup", action="store_true")
    p.add_argument("--skip-kmeans", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the record here")
    return p.parse_args(argv)


def clustered_embeddings(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x float16 (n, dim) unit rows, planted (m, 2) pairs (original, copy)): power-law clusters + 1 % copies."""
    rng = np.random.default_rng(seed)
    n_copies = n // 100
    n_base = n - n_copies
    n_centres = max(1, n // 100)
    centres = rng.standard_normal((n_centres, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_centres + 1) ** 0.8  # a long tail of cluster sizes
    labels = rng.choice(n_centres, size=n_base, p=weights / weights.sum())
    x = np.empty((n, dim), dtype=np.float16)
    block = 100_000
    for start in range(0, n_base, block):  # in blocks: float32 only for one block at a time
        stop = min(start + block, n_base)
        rows = centres[labels[start:stop]] + 0.06 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        x[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    originals = rng.choice(n_base, size=n_copies, replace=False)
    copies = x[originals].astype(np.float32) + 0.004 * rng.standard_normal((n_copies, dim), dtype=np.float32)
    x[n_base:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return x, np.stack([originals, np.arange(n_base, n)], axis=1)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _step(name: str, fn, device: torch.device, record: dict):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    record["steps"][name] = {"seconds": round(seconds, 2), "peak_rss_gib": round(_peak_rss_gib(), 2),
                             "peak_gpu_gib": None if gpu is None else round(gpu, 2)}  # fmt: skip
    gpu_text = f", peak GPU {gpu:.2f} GiB" if gpu is not None else ""
    print(f"{name:<28} {seconds:9.1f} s   peak RSS {_peak_rss_gib():.2f} GiB{gpu_text}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    faiss_device = "cuda" if device.type == "cuda" else "cpu"
    record: dict = {
        "command": "python " + shlex.join(["bench/curate.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "args": vars(args),
        "steps": {},
    }
    try:
        import faiss

        record["faiss"] = faiss.__version__
    except ImportError:
        record["faiss"] = None
    x, planted = _step("synthetic embeddings", lambda: clustered_embeddings(args.n, args.dim, args.seed), device,
                       record)  # fmt: skip
    print(f"{args.n} x {args.dim} float16 ({x.nbytes / 2**30:.2f} GiB), {len(planted)} planted copies")
    if not args.skip_dedup:
        index = _step("dedup: build index", lambda: build_index(x, kind=args.index, nlist=args.nlist,
                      nprobe=args.nprobe, seed=args.seed, device=faiss_device), device, record)  # fmt: skip
        graph = _step(f"dedup: k-NN graph (k={args.k})", lambda: knn_graph(x, k=args.k, index=index), device, record)
        dedup = _step("dedup: components", lambda: self_dedup(x, threshold=args.threshold, graph=graph), device,
                      record)  # fmt: skip
        found = float(np.mean(dedup.component[planted[:, 0]] == dedup.component[planted[:, 1]]))
        record["dedup"] = {"index": type(index).__name__, "nlist": getattr(index, "nlist", None),
                           "nprobe": getattr(index, "nprobe", None), "removed": dedup.n_removed,
                           "planted": len(planted), "planted_found": round(found, 4)}  # fmt: skip
        if hasattr(index, "nprobe"):
            print(f"IVF: nlist {index.nlist}, nprobe {index.nprobe}")
        print(f"dedup removed {dedup.n_removed} ({len(planted)} planted copies, {found:.1%} of them found)")
        del index, graph
    if not args.skip_kmeans:
        levels = args.levels or [max(2, args.n // 100), max(2, args.n // 1000)]
        sizes = args.sample_sizes or [1, 3][: len(levels)] + [3] * max(0, len(levels) - 2)
        got = _step(
            f"k-means levels {levels}",
            lambda: hierarchical_kmeans(
                x,
                levels,
                sample_sizes=sizes,
                n_resamples=args.resamples,
                n_iters=args.iters,
                seed=args.seed,
                fit_sample=args.fit_sample or None,
                device=device,
                progress=True,
            ),
            device,
            record,
        )
        record["kmeans"] = {"levels": levels, "sample_sizes": sizes, "clusters": [len(lv.clusters) for lv in got]}
    record["total_seconds"] = round(sum(s["seconds"] for s in record["steps"].values()), 1)
    print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
