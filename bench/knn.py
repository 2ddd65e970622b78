"""Throughput of the chunked weighted kNN (`opendino.eval.knn.knn_scores`) on random features.

The ImageNet-1k shape of the official protocol is 1,281,167 training x 50,000 validation features of dimension D
(384 for ViT-S, 1536 for ViT-g) with 1000 classes and k up to 200. This script draws random unit features of a
chosen size (nothing is read from disk), places the training features on the device once (as `opendino eval knn`
does), runs `knn_scores` with the official ks and reports seconds, queries/s and peak device memory. It also runs
the unchunked computation (one similarity matrix, what fits in memory only for small sets) when `--naive` is given.

    python bench/knn.py                                   # GPU: 1.28M x 50k x 384, the ImageNet-1k shape
    python bench/knn.py --device cpu --n-train 100000 --n-queries 2000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from opendino.eval.features import pick_device
from opendino.eval.knn import knn_scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1_281_167)
    p.add_argument("--n-queries", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--chunk-size", type=int, default=1024, help="queries per chunk")
    p.add_argument("--train-chunk-size", type=int, default=65536, help="training features per chunk")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="storage of the features")
    p.add_argument("--device", default="auto")
    p.add_argument("--naive", action="store_true", help="also time the one-matrix computation (small sets only)")
    p.add_argument("--json", default=None, metavar="PATH")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> tuple[float, float | None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    train = torch.randn(args.n_train, args.dim, generator=g).to(device=device, dtype=dtype)
    queries = torch.randn(args.n_queries, args.dim, generator=g).to(dtype=dtype)
    labels = torch.randint(0, args.classes, (args.n_train,), generator=g)
    kw = dict(ks=args.ks, num_classes=args.classes, chunk_size=args.chunk_size, train_chunk_size=args.train_chunk_size)
    knn_scores(train[:4096], labels[:4096], queries[:256], device=device, **kw)  # warm-up
    seconds, peak = _time(lambda: knn_scores(train, labels, queries, device=device, **kw), device)
    rows = [{"method": "chunked", "seconds": round(seconds, 3), "queries_per_s": round(args.n_queries / seconds, 1),
             "peak_gib": None if peak is None else round(peak, 2)}]  # fmt: skip
    if args.naive:

        def naive() -> None:
            sims = (
                torch.nn.functional.normalize(queries.to(device).float(), dim=1)
                @ torch.nn.functional.normalize(train.float(), dim=1).T
            )
            sims.topk(max(args.ks), dim=1)

        seconds, peak = _time(naive, device)
        rows.append({"method": "one matrix", "seconds": round(seconds, 3),
                     "queries_per_s": round(args.n_queries / seconds, 1),
                     "peak_gib": None if peak is None else round(peak, 2)})  # fmt: skip
    env = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "shape": f"{args.n_train} train x {args.n_queries} queries x {args.dim} dims, {args.classes} classes, "
        f"ks {args.ks}, {args.dtype}",
    }
    print(json.dumps(env, indent=2))
    print("| method | seconds | queries/s | peak GiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']} | {r['queries_per_s']} | {r['peak_gib']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
