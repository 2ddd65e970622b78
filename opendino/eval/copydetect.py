"""Copy detection on a synthetic benchmark built from any image folder, scored with the DISC21 metrics.

DINOv2 uses copy detection only to deduplicate its data (SSCD embeddings) and reports no DISC21 result (facts sheet
`dense_eval_facts.md` §5.1); this evaluation measures how well frozen features find edited copies. Benchmark (ours):
the folder's images are split, from `seed`, into distractor sources and references (the database); each of
`n_queries` queries is a strong edit (`opendino.eval.edits`) of a distinct reference and each of
`n_distractor_queries` an edit of a distractor source, which has no match in the database. The queries are written
once to a folder named by a hash of (images, seed, settings), so their features are cached like any image's.

Metrics follow facebookresearch/isc2021 `isc/metrics.py` (§5.2): every query keeps its k nearest references as
(query, reference, score) predictions, pooled over all queries and sorted by decreasing score, ties negatives first;
micro-AP = sum over the list of (recall_i - recall_{i-1}) * precision_i with recall over all ground-truth pairs;
recall at precision 0.9 = the highest recall of a prefix whose precision is >= 0.9; recall@r counts a ground-truth
pair found when fewer than r of its query's predictions score >= its own. Descriptors are CLS tokens, L2-normalised;
the score is their cosine similarity (isc's default, minus the L2 distance, orders unit vectors identically).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from opendino import dist
from opendino.eval.common import markdown_table, setup
from opendino.eval.edits import EDITS, random_edits

__all__ = [
    "CopyBenchmark",
    "build_benchmark",
    "copydetect_metrics",
    "micro_average_precision",
    "precision_recall",
    "recall_at_precision",
    "recall_at_rank",
    "run",
    "search",
]

BENCHMARK_VERSION = 1  # bump when the edits or the split change meaning (it is part of the query folder's name)


# ---------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def search(queries: Tensor, references: Tensor, k: int, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(scores, indices), both (m, min(k, n)): each query's most similar references by cosine, best first."""
    if queries.ndim != 2 or references.ndim != 2 or queries.shape[1] != references.shape[1]:
        raise ValueError(
            f"descriptors (m, D) and (n, D) expected, got {tuple(queries.shape)}, {tuple(references.shape)}"
        )
    refs = F.normalize(references.float(), dim=1)
    k = min(k, refs.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        sims = F.normalize(queries[start : start + chunk_size].float(), dim=1) @ refs.T  # (c, n)
        s, i = sims.topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def precision_recall(
    scores: np.ndarray | Tensor, positive: np.ndarray | Tensor, n_ground_truth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and score after each prediction of the list sorted by decreasing score, ties negatives
    first (the worst case); recall is over `n_ground_truth` pairs, retrieved or not."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(f"{scores.size} scores but {positive.size} labels")
    if n_ground_truth < positive.sum():
        raise ValueError(f"{positive.sum()} correct predictions but only {n_ground_truth} ground-truth pairs")
    order = np.lexsort((positive, -scores))  # primary: decreasing score; then negatives (False) first
    hits = np.cumsum(positive[order])
    precision = hits / np.arange(1, len(order) + 1)
    recall = hits / max(n_ground_truth, 1)
    return precision, recall, scores[order]


def micro_average_precision(scores: np.ndarray | Tensor, positive: np.ndarray | Tensor, n_ground_truth: int) -> float:
    """Micro-AP (isc2021 uAP): sum of (recall_i - recall_{i-1}) * precision_i over the pooled sorted predictions."""
    precision, recall, _ = precision_recall(scores, positive, n_ground_truth)
    return float((np.diff(recall, prepend=0.0) * precision).sum())


def recall_at_precision(
    precision: np.ndarray, recall: np.ndarray, thresholds: np.ndarray, target: float = 0.9
) -> tuple[float | None, float | None]:
    """(recall, score threshold) of the highest-recall point with precision >= target; (None, None) if none."""
    ok = np.flatnonzero(precision >= target)
    if ok.size == 0:
        return None, None
    best = ok[np.argmax(recall[ok])]
    return float(recall[best]), float(thresholds[best])


def recall_at_rank(
    scores: Tensor, indices: Tensor, ground_truth: Tensor, ranks: Sequence[int] = (1, 10)
) -> dict[int, float]:
    """{r: fraction of ground-truth pairs found at rank < r} (isc2021 recall@rank).

    `scores` / `indices` (m, k): each query's predictions; `ground_truth` (m,): the matching reference index, or -1
    for a distractor query (no pair). A pair's rank is the number of its query's predictions scoring >= its own
    minus one (ties count against); a pair missing from the predictions is never found.
    """
    has = ground_truth >= 0
    if not has.any():
        raise ValueError("no ground-truth pairs: every query is a distractor")
    match = indices[has] == ground_truth[has, None]  # (p, k), at most one True per row
    found = match.any(dim=1)
    own = torch.where(match, scores[has], -torch.inf).amax(dim=1, keepdim=True)  # the pair's score
    rank = torch.where(found, (scores[has] >= own).sum(dim=1) - 1, torch.iinfo(torch.long).max)
    return {r: (rank < r).double().mean().item() for r in ranks}


def copydetect_metrics(
    scores: Tensor, indices: Tensor, ground_truth: Tensor, ranks: Sequence[int] = (1, 10)
) -> dict[str, Any]:
    """micro_ap, recall_at_p90 and threshold_at_p90 (None when precision 0.9 is never reached), recall@r; plus the
    precision-recall curve ("curve": precision, recall, thresholds) of the pooled predictions."""
    positive = indices == ground_truth[:, None]
    n_gt = int((ground_truth >= 0).sum())
    precision, recall, thresholds = precision_recall(scores.flatten(), positive.flatten(), n_gt)
    r90, t90 = recall_at_precision(precision, recall, thresholds, 0.9)
    out: dict[str, Any] = {"micro_ap": float((np.diff(recall, prepend=0.0) * precision).sum()),
                           "recall_at_p90": r90, "threshold_at_p90": t90}  # fmt: skip
    out |= {f"recall@{r}": v for r, v in recall_at_rank(scores, indices, ground_truth, ranks).items()}
    return out | {"curve": (precision, recall, thresholds)}


# ---------------------------------------------------------------------------------------------- benchmark
@dataclass
class CopyBenchmark:
    """The synthetic benchmark: references (the database), edited queries and which reference each one copies."""

    folder: Path
    references: list[str]
    queries: list[str]  # edited images (files in `folder`)
    sources: list[str]  # the image each query was made from
    ground_truth: list[int]  # index into `references` of each query's source; -1 for a distractor query
    edits: list[list[str]]  # descriptions of each query's edits
    bad: list[tuple[str, str]]  # (path, reason) of sources that could not be read (their queries are missing)


def _split(n_images: int, n_queries: int, n_distractors: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """(references, query sources, distractor sources) as image indices, drawn from `seed`."""
    if n_queries + n_distractors > n_images:
        raise ValueError(f"{n_images} images cannot give {n_queries} queries of distinct references and "
                         f"{n_distractors} distractor sources outside the database")  # fmt: skip
    order = list(range(n_images))
    random.Random(seed).shuffle(order)
    distractors = order[:n_distractors]
    return sorted(order[n_distractors:]), order[n_distractors : n_distractors + n_queries], distractors


def _load(path: str) -> tuple[Image.Image | None, str | None]:
    from opendino.data.sources import BadImageError, load_image

    try:
        return load_image(path), None
    except BadImageError as e:
        return None, e.reason


def _image_or_none(path: str) -> Image.Image | None:
    return _load(path)[0]


def _write_benchmark(images: Sequence[str], folder: Path, settings: dict[str, Any]) -> None:
    """Draw the split, write the queries and benchmark.json into a temporary folder, then move it into place."""
    refs, query_src, distractor_src = _split(len(images), settings["n_queries"], settings["n_distractor_queries"],
                                             settings["seed"])  # fmt: skip
    ref_index = {img: i for i, img in enumerate(refs)}
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries, bad = [], []
    jobs = [(s, ref_index[s]) for s in query_src] + [(s, -1) for s in distractor_src]
    for qi, (src, ref) in enumerate(tqdm(jobs, desc="copy queries", unit="img", disable=None)):
        rng = random.Random(f"{settings['seed']}:{qi}")
        image, reason = _load(images[src])
        if image is None:
            bad.append((images[src], reason))
            continue
        pool = [d for d in distractor_src if d != src]
        other = functools.partial(_image_or_none, images[rng.choice(pool)]) if pool else None  # loaded when used
        edited, described = random_edits(image, rng, edits=settings["edits"], min_edits=settings["min_edits"],
                                         max_edits=settings["max_edits"], other=other)  # fmt: skip
        name = f"q{qi:06d}.png"
        edited.save(tmp / name)
        entries.append({"file": name, "source": images[src], "reference": ref, "edits": described})
    record = {"settings": settings, "references": [images[i] for i in refs], "queries": entries, "bad": bad}
    (tmp / "benchmark.json").write_text(json.dumps(record, indent=1) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # built meanwhile by another run: keep that one
        shutil.rmtree(tmp, ignore_errors=True)


def build_benchmark(
    images: Sequence[str],
    root: str | os.PathLike[str],
    *,
    n_queries: int,
    n_distractor_queries: int,
    seed: int = 0,
    edits: Sequence[str] = EDITS,
    min_edits: int = 2,
    max_edits: int = 4,
) -> CopyBenchmark:
    """The benchmark of `images` for these settings, read from `root/<hash>/` or built there first.

    The folder name hashes the image list (with file sizes and modification times), the settings and
    `BENCHMARK_VERSION`; it is written by the main process only (others wait at a barrier).
    """
    settings = {"version": BENCHMARK_VERSION, "seed": seed, "n_queries": n_queries,
                "n_distractor_queries": n_distractor_queries, "edits": list(edits), "min_edits": min_edits,
                "max_edits": max_edits}  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in images:
        st = os.stat(p) if os.path.exists(p) else None
        digest.update(f"{p}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode())
    folder = Path(root) / f"copydetect-{digest.hexdigest()[:20]}"
    if dist.is_main() and not (folder / "benchmark.json").exists():
        _write_benchmark(list(images), folder, settings)
    dist.barrier()
    record = json.loads((folder / "benchmark.json").read_text())
    queries = record["queries"]
    return CopyBenchmark(
        folder=folder,
        references=record["references"],
        queries=[str(folder / q["file"]) for q in queries],
        sources=[q["source"] for q in queries],
        ground_truth=[q["reference"] for q in queries],
        edits=[q["edits"] for q in queries],
        bad=[tuple(b) for b in record["bad"]],
    )


# ---------------------------------------------------------------------------------------------- run
def _save_pictures(ctx, bench: CopyBenchmark, kept: list[int], refs: list[str], gt: Tensor, scores, indices, result):
    from opendino.eval.pictures import pyplot, save_figure, save_image_grid, thumbnail

    plt = pyplot()

    copies = [r for r in range(len(kept)) if gt[r] >= 0]
    distractors = [r for r in range(len(kept)) if gt[r] < 0]
    shown = [copies[int(t)] for t in np.linspace(0, len(copies) - 1, min(6, len(copies)))] if copies else []
    shown += distractors[:2]
    rows, titles = [], []
    for r in shown:
        q = kept[r]
        top = int(indices[r, 0])
        colour = (0.1, 0.7, 0.1) if top == gt[r] else (0.85, 0.1, 0.1)
        reference = thumbnail(refs[gt[r]]) if gt[r] >= 0 else np.ones((112, 112, 3), np.float32)  # none: blank
        rows.append([reference, thumbnail(bench.queries[q]), thumbnail(refs[top], colour)])
        titles.append(("distractor\n" if gt[r] < 0 else "") + "\n".join(bench.edits[q]) + f"\nscore {scores[r, 0]:.2f}")
    if rows:
        save_image_grid(rows, ctx.picture_path("copies.png"), column_titles=["reference", "query", "top-1"],
                        row_titles=titles, cell_size=1.8)  # fmt: skip
    precision, recall, _ = result["curve"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(recall, precision)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    title = f"micro-AP {result['micro_ap']:.3f} (top-{indices.shape[1]} predictions pooled)"
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    try:
        save_figure(fig, ctx.picture_path("precision_recall.png"))
    finally:
        plt.close(fig)


def _per_edit(bench: CopyBenchmark, kept: list[int], gt: Tensor, indices: Tensor) -> list[list[Any]]:
    """[edit, queries with it, recall@1 of those] over copy queries (top-1 correct = rank-1 hit without ties)."""
    names = [{e.split("(")[0] for e in bench.edits[q]} or {"(none)"} for q in kept]
    rows = []
    for name in [*EDITS, "(none)"]:
        sel = [r for r in range(len(kept)) if gt[r] >= 0 and name in names[r]]
        if sel:
            rows.append([name, len(sel), (indices[sel, 0] == gt[sel]).double().mean().item()])
    return rows


def run(cfg) -> dict[str, Any]:
    """`opendino eval copydetect` (config: `CopydetectEvalConfig`)."""
    from opendino.data.augment import make_eval_transform
    from opendino.data.sources import list_images

    ctx = setup("copydetect", cfg)
    images = list_images(cfg.images)
    bench = build_benchmark(images, ctx.cache_dir or ctx.out, n_queries=cfg.n_queries,
                            n_distractor_queries=cfg.n_distractor_queries, seed=cfg.seed, edits=cfg.edits,
                            min_edits=cfg.min_edits, max_edits=cfg.max_edits)  # fmt: skip
    transform = make_eval_transform(cfg.resize_size, cfg.crop_size)
    all_fs = ctx.features(images, transform, desc="references")  # the whole folder: a cache entry shared with others
    q_fs = ctx.features(bench.queries, transform, desc="queries")
    row = {p: i for i, p in enumerate(all_fs.paths)}
    refs = [p for p in bench.references if p in row]
    ref_index = {p: i for i, p in enumerate(refs)}
    q_row = {p: i for i, p in enumerate(q_fs.paths)}
    kept = [i for i, q in enumerate(bench.queries) if q in q_row]
    gt = torch.tensor([ref_index.get(bench.sources[i], -1) if bench.ground_truth[i] >= 0 else -1 for i in kept])
    ref_feats = torch.from_numpy(all_fs.features["cls"][[row[p] for p in refs]])
    q_feats = torch.from_numpy(q_fs.features["cls"][[q_row[bench.queries[i]] for i in kept]])
    scores, indices = search(q_feats, ref_feats, cfg.k)
    ranks = sorted({1, cfg.k})
    result = copydetect_metrics(scores, indices, gt, ranks)
    if dist.is_main():
        _save_pictures(ctx, bench, kept, refs, gt, scores, indices, result)
    curve = result.pop("curve")
    metrics = result | {"queries": int((gt >= 0).sum()), "distractor_queries": int((gt < 0).sum()),
                        "references": len(refs)}  # fmt: skip
    headers = ["queries", "distractors", "references", "micro-AP", "recall@P90", *(f"recall@{r}" for r in ranks)]
    r90 = "not reached" if result["recall_at_p90"] is None else result["recall_at_p90"]
    table = markdown_table(headers, [[metrics["queries"], metrics["distractor_queries"], len(refs),
                                      result["micro_ap"], r90, *(result[f"recall@{r}"] for r in ranks)]])  # fmt: skip
    edit_table = markdown_table(["edit", "copy queries", "top-1 correct"], _per_edit(bench, kept, gt, indices))
    dataset = {"images": cfg.images, "n_images": len(images), "queries_folder": str(bench.folder),
               "edits": f"{cfg.min_edits}-{cfg.max_edits} of {', '.join(cfg.edits) or '(none: exact copies)'}",
               "descriptor": "cls, L2-normalised, cosine similarity", "k": cfg.k,
               "transform": f"resize {cfg.resize_size}, centre crop {cfg.crop_size}"}  # fmt: skip
    precision, recall, thresholds = curve
    step = max(1, len(precision) // 200)
    extra = {"curve": {"precision": precision[::step], "recall": recall[::step], "thresholds": thresholds[::step]},
             "queries": [{"file": Path(bench.queries[i]).name, "source": bench.sources[i], "edits": bench.edits[i],
                          "top1": refs[int(indices[r, 0])], "score": round(float(scores[r, 0]), 6)}
                         for r, i in enumerate(kept)]}  # fmt: skip
    bad = list({p: (p, reason) for p, reason in [*bench.bad, *all_fs.bad, *q_fs.bad]}.values())
    return ctx.write_results(dataset=dataset, metrics=metrics, tables=[table, edit_table], extra=extra, bad_images=bad)
