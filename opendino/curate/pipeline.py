"""`opendino curate`: the five stages from a raw image pool to a training manifest, each resumable and rerunnable.

Stages and what each writes under ``out`` (every file atomically; a stage is finished once its ``stage.json`` exists):

1. ``embed/``: L2-normalised float16 CLS features of the pool (``embed/pool``), of every seed set
   (``embed/seeds/<name>``) and of every evaluation set (``embed/eval/<i>``), as ``opendino extract`` shards with
   their paths and unreadable images (skipped, counted); resumable per shard; split over processes under torchrun.
2. ``dedup/``: the pool's k-NN graph, its near-duplicate components (one image kept per component) and the pool
   images that are near-duplicates of an evaluation image (removed with their component): ``dedup.npz``.
3. ``retrieve/``: per seed set, the pool images retrieved around it (sample-based: the k nearest pool images of every
   seed image; cluster-based: images of the pool clusters that hold more than ``min_seeds`` seed images).
4. ``balance/``: hierarchical k-means with resampling of the balanced set (one file per level, so a killed run keeps
   the finished levels) and a balanced sample drawn top level down (``selection.npz``).
5. the manifest (``out/<manifest>``: path, weight, source, cluster ids, similarity) that ``opendino train`` reads,
   and ``report/`` (``index.html``, counts, cluster-size histograms, image grids, ``report.json``).

A stage's ``stage.json`` records a fingerprint of everything that decides its output (its settings, the seed and
the fingerprint of the stage before it). Running the pipeline again skips every stage whose fingerprint matches and
redoes the others, so changing a dedup threshold redoes dedup and what follows but not the embedding; ``force``
redoes the listed stages anyway. A stage whose input stage is missing or out of date and not listed is an error.
Only the embedding uses several processes; the later stages run on process 0 (faiss and k-means on one device).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opendino import dist
from opendino.config import CURATE_STAGES, ConfigError, CurateConfig, ExtractConfig, dump_yaml, to_dict

__all__ = ["CurateError", "EmbeddedSet", "load_embedded", "run_curate", "stage_done"]

STAGE_FILE = "stage.json"
PROGRESS_MIN = 50_000  # progress bars for searches and k-means over at least this many images


class CurateError(RuntimeError):
    """A curation run that cannot go on (a stage's input is missing, nothing left to curate); one line for the user."""

    exit_code = 2


@dataclass
class EmbeddedSet:
    """Embedded images: ``paths`` (readable ones, in source order), unit ``x`` (n, d) float16 and unreadable ones."""

    paths: list[str]
    x: np.ndarray
    bad: list[tuple[str, str]] = field(default_factory=list)


def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_done(out: str | os.PathLike[str], stage: str) -> dict[str, Any] | None:
    """The ``stage.json`` record of a finished stage (fingerprint, summary, seconds), or None."""
    path = Path(out) / stage / STAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None


# ------------------------------------------------------------------------------------------------------ embedding
def _extract_config(cfg: CurateConfig, data: str, out: Path, overwrite: bool) -> ExtractConfig:
    e = cfg.embed
    return ExtractConfig(
        backbone=cfg.backbone,
        data=data,
        out=str(out),
        resize_size=e.resize_size,
        crop_size=e.crop_size,
        batch_size=e.batch_size,
        num_workers=e.num_workers,
        shard_size=e.shard_size,
        format="npy",
        cls=True,
        save_dtype="float16",
        normalize=True,
        device=e.device,
        amp=e.amp,
        compile=e.compile,
        max_image_pixels=e.max_image_pixels,
        overwrite=overwrite,
    )


def _pool_list(cfg: CurateConfig) -> list[str]:
    """Every image of the pool sources, in source order, a path listed twice kept once."""
    from opendino.data.sources import list_images

    seen: set[str] = set()
    paths: list[str] = []
    for source in cfg.pool:
        for p in list_images(source):
            if p not in seen:
                seen.add(p)
                paths.append(p)
    return paths


def _embedding_jobs(cfg: CurateConfig, root: Path) -> list[tuple[str, str, Path]]:
    """(label, image source, extraction folder) of the pool, the seed sets and the evaluation sets."""
    jobs = [("pool", str(root / "pool.txt"), root / "pool")]
    jobs += [(f"seed set {s.name}", s.data, root / "seeds" / s.name) for s in cfg.seeds]
    jobs += [(f"evaluation set {src}", src, root / "eval" / str(i)) for i, src in enumerate(cfg.dedup.eval_sets)]
    return jobs


def load_embedded(folder: str | os.PathLike[str]) -> EmbeddedSet:
    """An embedding folder written by the embed stage (a complete ``opendino extract`` output)."""
    from opendino.extract import load_extracted

    folder = Path(folder)
    got = load_extracted(folder)
    bad_file = folder / "bad_images.tsv"
    bad = [tuple(line.split("\t", 1)) for line in bad_file.read_text().splitlines()] if bad_file.exists() else []
    return EmbeddedSet(paths=got["paths"], x=got["cls"], bad=bad)  # type: ignore[arg-type]


def _stage_embed(run: _Run) -> dict[str, Any]:
    root = run.out / "embed"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        _write_atomic(root / "pool.txt", "".join(p + "\n" for p in _pool_list(run.cfg)))
    dist.barrier()
    from opendino.extract import ExtractionMismatch, run_extract

    summary: dict[str, Any] = {}
    for label, data, folder in _embedding_jobs(run.cfg, root):
        dist.print0(f"[embed] {label}")
        try:  # resumes a killed embedding of the same images and settings
            got = run_extract(_extract_config(run.cfg, data, folder, overwrite=run.force("embed")))
        except ExtractionMismatch:  # other images or settings than last time: this stage starts that set afresh
            dist.print0(f"[embed] {label}: images or settings changed since the last run, embedding it again")
            got = run_extract(_extract_config(run.cfg, data, folder, overwrite=True))
        summary[str(folder.relative_to(root))] = {k: got[k] for k in ("n_images", "n_features", "n_bad")}
    return summary


# ----------------------------------------------------------------------------------------------------------- dedup
def _build_pool_index(run: _Run, x: np.ndarray, *, progress: bool = False) -> Any:
    """The faiss index over pool rows `x` with the `dedup` section's index settings (shared by dedup and retrieve)."""
    from opendino.curate.search import build_index

    c = run.cfg.dedup
    try:
        return build_index(x, kind=c.index, nlist=c.nlist, nprobe=c.nprobe, pq_m=c.pq_m, seed=run.cfg.seed,
                           progress=progress)  # fmt: skip
    except ValueError as e:  # settings that do not fit this pool (nlist > n, pq_m not dividing d, ...)
        settings = f"index={c.index}, nlist={c.nlist}, nprobe={c.nprobe}, pq_m={c.pq_m}"
        raise CurateError(f"dedup index ({settings}) over {len(x)} pool images: {e}") from None


def _stage_dedup(run: _Run) -> dict[str, Any]:
    from opendino.curate.dedup import duplicate_examples, knn_graph, relative_dedup, self_dedup

    c = run.cfg.dedup
    pool = run.pool()
    n = len(pool.paths)
    if n < 2:
        raise CurateError(f"the pool has {n} readable image(s): nothing to deduplicate or curate")
    print(f"[dedup] k-NN graph of {n} pool images (k={min(c.k, n - 1)})")
    progress = n >= PROGRESS_MIN
    index = _build_pool_index(run, pool.x, progress=progress)
    graph = knn_graph(pool.x, k=min(c.k, n - 1), index=index, progress=progress)
    own = self_dedup(pool.x, threshold=c.threshold, graph=graph)
    removed_eval = np.zeros(n, dtype=bool)
    matched_ref = np.full(n, -1, dtype=np.int64)
    ref_paths: list[str] = []
    if c.eval_sets:
        refs = [load_embedded(run.out / "embed" / "eval" / str(i)) for i in range(len(c.eval_sets))]
        ref_paths = [p for r in refs for p in r.paths]
        ref_x = np.concatenate([r.x for r in refs])
        rel = relative_dedup(
            pool.x,
            ref_x,
            k=min(c.k, n),
            threshold=c.eval_threshold,
            pool_graph=graph,
            expand_components=c.expand_components,
            index=index,
            progress=progress,
        )
        removed_eval, matched_ref = rel.removed, rel.matched_ref
    keep = own.keep & ~removed_eval
    examples = duplicate_examples(own.component, c.examples, seed=run.cfg.seed) if c.examples else []
    _save_npz(
        run.out / "dedup" / "dedup.npz",
        keep=keep,
        component=own.component,
        removed_eval=removed_eval,
        matched_ref=matched_ref,
        graph_sims=graph[0].astype(np.float16),
        graph_ids=graph[1],
    )
    _write_atomic(run.out / "dedup" / "eval_paths.txt", "".join(p + "\n" for p in ref_paths))
    summary = {
        "pool": n,
        "duplicate_groups": int((np.bincount(own.component) > 1).sum()),
        "removed_as_duplicates": own.n_removed,
        "removed_as_eval_duplicates": int((removed_eval & own.keep).sum()),
        "eval_images": len(ref_paths),
        "kept": int(keep.sum()),
        "examples": examples,
    }
    if not keep.any():
        raise CurateError("deduplication removed every pool image; raise dedup.threshold / dedup.eval_threshold")
    print(f"[dedup] kept {summary['kept']} of {n}: {own.n_removed} duplicates, "
          f"{summary['removed_as_eval_duplicates']} near-copies of evaluation images")  # fmt: skip
    return summary


# -------------------------------------------------------------------------------------------------------- retrieve
def _seed_method(run: _Run, seed_set: Any, n_seeds: int) -> str:
    if seed_set.method != "auto":
        return seed_set.method
    return "sample" if n_seeds >= run.cfg.retrieve.auto_sample_min else "cluster"


def _pool_kmeans(run: _Run, kept: np.ndarray, pool_x: np.ndarray) -> dict[str, np.ndarray]:
    """Flat k-means of the kept pool for cluster-based retrieval (computed once, shared by the seed sets)."""
    from opendino.curate.kmeans import kmeans

    path = run.out / "retrieve" / "pool_kmeans.npz"
    if path.exists():
        return _load_npz(path)
    r = run.cfg.retrieve
    k = r.n_clusters or max(1, len(kept) // 100)
    print(f"[retrieve] k-means of the {len(kept)} kept pool images into {k} clusters")
    res = kmeans(
        pool_x[kept],
        k,
        n_iters=r.kmeans_iters,
        seed=run.cfg.seed,
        device=run.device(),
        progress=len(kept) >= PROGRESS_MIN,
    )
    got = {
        "centroids": res.centroids.cpu().numpy(),
        "assignment": res.assignment.cpu().numpy(),
        "sq_dist": res.sq_dist.cpu().numpy(),
    }
    _save_npz(path, **got)
    return got


def _stage_retrieve(run: _Run) -> dict[str, Any]:
    from opendino.curate.retrieve import cluster_retrieval, sample_retrieval

    r = run.cfg.retrieve
    pool, kept = run.pool(), run.kept()
    (run.out / "retrieve" / "pool_kmeans.npz").unlink(missing_ok=True)  # settings may have changed
    summary: dict[str, Any] = {}
    index = None
    for s in run.cfg.seeds:
        seeds = load_embedded(run.out / "embed" / "seeds" / s.name)
        if not seeds.paths:
            raise CurateError(f"seed set {s.name!r} has no readable image")
        method = _seed_method(run, s, len(seeds.paths))
        if method == "sample":
            if index is None:
                index = _build_pool_index(run, pool.x[kept])
            min_sim = None if r.min_similarity <= -1 else r.min_similarity
            got = sample_retrieval(index, seeds.x, k=s.k, min_similarity=min_sim)
        else:
            km = _pool_kmeans(run, kept, pool.x)
            got = cluster_retrieval(
                km["assignment"],
                km["centroids"],
                seeds.x,
                min_seeds=r.min_seeds,
                per_cluster=r.per_cluster,
                cap=r.cap,
                strategy=r.strategy,
                pool_sq_dist=km["sq_dist"],
                seed=run.cfg.seed,
            )
        ids = kept[got.pool_ids]  # back to pool indices
        _save_npz(run.out / "retrieve" / f"{s.name}.npz", pool_ids=ids, hits=got.hits, cluster=got.cluster,
                  similarity=got.best_similarity, best_seed=got.best_seed)  # fmt: skip
        summary[s.name] = {"method": method, "seed_images": len(seeds.paths), "retrieved": len(ids),
                           "retrieved_with_repeats": int(np.asarray(got.hits).sum())}  # fmt: skip
        print(f"[retrieve] {s.name}: {len(ids)} pool images ({method}-based, {len(seeds.paths)} seed images)")
    union = np.unique(np.concatenate([run.retrieved(s.name)["pool_ids"] for s in run.cfg.seeds] or [[]]))
    summary["union"] = len(union)
    return summary


# --------------------------------------------------------------------------------------------------------- balance
def _balance_input(run: _Run) -> tuple[str, np.ndarray]:
    """What is balanced ("pool" / "retrieved" / "none") and the pool indices of its images."""
    mode = run.cfg.balance.apply_to
    if mode == "auto":
        mode = "retrieved" if run.cfg.seeds else "pool"
    if mode == "retrieved" or (mode == "none" and run.cfg.seeds):
        ids = np.unique(np.concatenate([run.retrieved(s.name)["pool_ids"] for s in run.cfg.seeds]))
        return mode, ids.astype(np.int64)
    return mode, run.kept()


def default_levels(n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Automatic (clusters per level, resampling sample sizes) for n images: n/20 then n/100 clusters, r = 10, 3.

    The reference's random-embedding config uses 5000 and 1000 clusters for 100k points (averages of 20 and 5
    children) with r = 10 and 3, about half the average cluster size (curation facts sheet §5).
    """
    k1 = max(1, n // 20)
    k2 = max(1, min(k1, n // 100))
    return (k1, k2), (10, 3)


def _stage_balance(run: _Run) -> dict[str, Any]:
    from opendino.curate.kmeans import flat_sizes, hierarchical_kmeans, load_levels, save_level
    from opendino.curate.sample import balanced_sample

    b = run.cfg.balance
    mode, ids = _balance_input(run)
    folder = run.out / "balance"
    _save_npz(folder / "input.npz", pool_ids=ids)
    if mode == "none":
        _save_npz(folder / "selection.npz", pool_ids=ids, counts=np.ones(len(ids), dtype=np.int64))
        return {"applied_to": mode, "input": len(ids), "selected": len(ids)}
    n_clusters, sample_sizes = (b.n_clusters, b.sample_sizes) if b.n_clusters else default_levels(len(ids))
    if not sample_sizes:
        sample_sizes = tuple([10, 3, *([3] * max(0, len(n_clusters) - 2))][: len(n_clusters)])
    levels_dir = folder / "levels"
    marker = folder / "levels.json"  # the fingerprint the level files belong to
    if levels_dir.exists() and (not marker.exists() or json.loads(marker.read_text()) != run.fingerprint_now):
        shutil.rmtree(levels_dir)  # levels of other settings (or a forced rerun): start afresh
    _write_atomic(marker, json.dumps(run.fingerprint_now))
    resume = load_levels(levels_dir) if levels_dir.exists() else []
    if resume:
        print(f"[balance] resuming after level {len(resume)}")
    print(f"[balance] hierarchical k-means of {len(ids)} images, clusters per level {list(n_clusters)}")
    levels = hierarchical_kmeans(
        run.pool().x[ids],
        n_clusters,
        sample_sizes=sample_sizes,
        n_resamples=b.n_resamples,
        strategy=b.resample_strategy,
        n_iters=b.n_iters,
        seed=run.cfg.seed,
        fit_sample=b.fit_sample or None,
        device=run.device(),
        resume_from=resume,
        on_level=lambda t, level: save_level(levels_dir, t, level),
        progress=len(ids) >= PROGRESS_MIN,
    )
    target = b.target or max(1, len(ids) // 2)
    picked = balanced_sample(levels, target, multiplier=b.multiplier, strategy=b.leaf_strategy, seed=run.cfg.seed)
    uniq, counts = np.unique(picked.indices, return_counts=True)
    _save_npz(folder / "selection.npz", pool_ids=ids[uniq], counts=counts.astype(np.int64))
    top = len(levels)
    summary = {
        "applied_to": mode,
        "input": len(ids),
        "clusters_per_level": [len(level.clusters) for level in levels],
        "sample_sizes": list(sample_sizes),
        "target": target,
        "selected": len(picked.indices),
        "selected_unique": len(uniq),
        "shortfall": picked.shortfall,
        "top_level_sizes": flat_sizes(levels, top).tolist(),
        "top_level_picks": np.asarray(picked.picks[top - 1]).tolist(),
    }
    if picked.shortfall:
        print(f"[balance] warning: asked for {target} images, the input gives only {len(picked.indices)}")
    print(
        f"[balance] selected {len(picked.indices)} of {len(ids)} images over {summary['clusters_per_level']} clusters"
    )
    return summary


# -------------------------------------------------------------------------------------------------------- manifest
def _stage_manifest(run: _Run) -> dict[str, Any]:
    from opendino.curate.kmeans import load_levels, point_clusters
    from opendino.curate.report import write_report
    from opendino.data.manifest import write_manifest

    pool = run.pool()
    sel = _load_npz(run.out / "balance" / "selection.npz")
    ids = _load_npz(run.out / "balance" / "input.npz")["pool_ids"]
    mode = stage_done(run.out, "balance")["summary"]["applied_to"]
    counts = dict(zip(sel["pool_ids"].tolist(), sel["counts"].tolist(), strict=True))
    sources: dict[int, list[str]] = {}
    similarity: dict[int, float] = {}
    for s in run.cfg.seeds:
        got = run.retrieved(s.name)
        for p, sim in zip(got["pool_ids"].tolist(), got["similarity"].tolist(), strict=True):
            if mode == "pool":  # the pool was balanced: the retrieved images come on top of its sample
                counts.setdefault(p, 1)
            sources.setdefault(p, []).append(s.name)
            if sim == sim:  # NaN for cluster-based retrieval, which does not rank by seed
                similarity[p] = max(similarity.get(p, -1.0), float(sim))
    chosen = sorted(counts)
    levels_dir = run.out / "balance" / "levels"
    clusters = None
    if mode != "none" and levels_dir.exists() and chosen:
        by_input = point_clusters(load_levels(levels_dir))  # (len(ids), T): the clusters of the balanced input
        row_of = {int(p): i for i, p in enumerate(ids)}
        clusters = np.stack([by_input[row_of[p]] for p in chosen])
    n_levels = clusters.shape[1] if clusters is not None else 0
    paths: list[str] = []
    weights: list[int] = []
    source_col: list[str] = []
    sim_col: list[float] = []
    level_cols: list[list[int]] = []
    for s in run.cfg.seeds:
        if s.include:
            seeds = load_embedded(run.out / "embed" / "seeds" / s.name)
            paths += seeds.paths
            weights += [1] * len(seeds.paths)
            source_col += [f"seed:{s.name}"] * len(seeds.paths)
            sim_col += [1.0] * len(seeds.paths)
            level_cols += [[-1] * n_levels] * len(seeds.paths)
    for i, p in enumerate(chosen):
        paths.append(pool.paths[p])
        weights.append(int(counts[p]))
        source_col.append("retrieved:" + "+".join(sources[p]) if p in sources else "pool")
        sim_col.append(round(similarity.get(p, -1.0), 4))
        level_cols.append(clusters[i].tolist() if clusters is not None else [])
    if not paths:
        raise CurateError("the curated set is empty: nothing retrieved or selected (see the stage summaries)")
    extra: dict[str, list[Any]] = {"source": source_col, "similarity": sim_col}
    for t in range(len(level_cols[0]) if level_cols else 0):
        extra[f"cluster_l{t + 1}"] = [row[t] for row in level_cols]
    manifest = run.out / run.cfg.manifest
    write_manifest(manifest, paths, weights=weights, extra_columns=extra)
    counts = {
        "rows": len(paths),
        "seed_rows": sum(1 for s in source_col if s.startswith("seed:")),
        "pool_rows": sum(1 for s in source_col if not s.startswith("seed:")),
        "weight_total": int(sum(weights)),
    }
    report = write_report(run.out, run.cfg, run.summaries(), manifest_counts=counts, pool_paths=pool.paths)
    print(f"[manifest] wrote {manifest} ({len(paths)} rows) and {report}")
    return {**counts, "manifest": str(manifest), "report": str(report)}


# ------------------------------------------------------------------------------------------------------ the runner
_STAGE_FNS = {
    "embed": _stage_embed,
    "dedup": _stage_dedup,
    "retrieve": _stage_retrieve,
    "balance": _stage_balance,
    "manifest": _stage_manifest,
}


class _Run:
    """One `run_curate` call: the config, the output folder and what the stages load from each other (cached)."""

    def __init__(self, cfg: CurateConfig, backbone_identity: dict[str, Any]) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.identity = backbone_identity
        self.fingerprint_now = ""  # of the stage running
        self._pool: EmbeddedSet | None = None
        self._dedup: dict[str, np.ndarray] | None = None

    def force(self, stage: str) -> bool:
        return self.cfg.force and stage in self.cfg.stages

    def device(self) -> str:
        from opendino.eval.features import pick_device

        return str(pick_device(self.cfg.balance.device))

    def pool(self) -> EmbeddedSet:
        if self._pool is None:
            self._pool = load_embedded(self.out / "embed" / "pool")
        return self._pool

    def kept(self) -> np.ndarray:
        if self._dedup is None:
            self._dedup = _load_npz(self.out / "dedup" / "dedup.npz")
        return np.flatnonzero(self._dedup["keep"]).astype(np.int64)

    def retrieved(self, name: str) -> dict[str, np.ndarray]:
        return _load_npz(self.out / "retrieve" / f"{name}.npz")

    def summaries(self) -> dict[str, Any]:
        return {s: (stage_done(self.out, s) or {}).get("summary", {}) for s in CURATE_STAGES if s != "manifest"}

    def fingerprint(self, stage: str, upstream: str | None) -> str:
        c = self.cfg
        parts: dict[str, Any] = {"stage": stage, "upstream": upstream, "seed": c.seed if stage != "embed" else None}
        if stage == "embed":
            parts.update(backbone=self.identity, embed=to_dict(c.embed), pool=list(c.pool),
                         seeds=[[s.name, s.data] for s in c.seeds], eval_sets=list(c.dedup.eval_sets))  # fmt: skip
        elif stage == "dedup":
            parts.update({k: v for k, v in to_dict(c.dedup).items() if k != "examples"})
        elif stage == "retrieve":
            parts.update(retrieve=to_dict(c.retrieve), seeds=[[s.name, s.method, s.k] for s in c.seeds])
        elif stage == "balance":
            parts.update(balance=to_dict(c.balance), seeds=bool(c.seeds))
        else:
            parts.update(seeds=[[s.name, s.include] for s in c.seeds], manifest=c.manifest,
                         report=to_dict(c.report), examples=c.dedup.examples)  # fmt: skip
        return _digest(parts)


def _backbone_identity(source: str) -> dict[str, Any]:
    from opendino.extract import _backbone_identity as identity

    return identity(source)


def run_curate(cfg: CurateConfig) -> dict[str, Any]:
    """Run the listed stages (skipping up-to-date ones); returns {stage: its stage.json record} (on process 0)."""
    run = _Run(cfg, _backbone_identity(cfg.backbone))
    if dist.is_main():
        run.out.mkdir(parents=True, exist_ok=True)
        _write_atomic(run.out / "curate.yaml", dump_yaml(cfg, header="opendino curate: the resolved configuration"))
    records: dict[str, Any] = {}
    upstream: str | None = None
    for stage in CURATE_STAGES:
        fp = run.fingerprint(stage, upstream)
        done = stage_done(run.out, stage)
        up_to_date = done is not None and done.get("fingerprint") == fp
        if stage not in cfg.stages or (up_to_date and not run.force(stage)):
            if stage in cfg.stages:
                dist.print0(f"[{stage}] up to date")
            elif not up_to_date and any(CURATE_STAGES.index(s) > CURATE_STAGES.index(stage) for s in cfg.stages):
                what = "has not run" if done is None else "is out of date (its settings or input changed)"
                raise CurateError(f"stage {stage!r} {what}: add it to stages (it comes before {list(cfg.stages)})")
            if done is not None:
                records[stage] = done
            upstream = fp
            continue
        if stage != "embed":
            if not dist.is_main():
                break  # only the embedding is shared between processes
            if dist.is_distributed():
                dist.cleanup()
        started = time.perf_counter()
        folder = run.out / stage
        if dist.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / STAGE_FILE).unlink(missing_ok=True)
            if run.force(stage) and stage == "balance":
                shutil.rmtree(folder / "levels", ignore_errors=True)
        dist.barrier()
        run.fingerprint_now = fp
        summary = _STAGE_FNS[stage](run)
        record = {"fingerprint": fp, "seconds": round(time.perf_counter() - started, 2), "summary": summary}
        if dist.is_main():
            _write_atomic(folder / STAGE_FILE, json.dumps(record, indent=2, default=_jsonable))
        records[stage] = record
        upstream = fp
    return records


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def check_config(cfg: CurateConfig) -> None:
    """Checks that need the file system: every pool / seed / evaluation source exists (before any work)."""
    from opendino.data.sources import source_kind

    for label, source in [*(("pool", p) for p in cfg.pool), *((f"seeds[{s.name}]", s.data) for s in cfg.seeds),
                          *(("dedup.eval_sets", e) for e in cfg.dedup.eval_sets)]:  # fmt: skip
        try:
            source_kind(source)
        except ValueError as e:
            raise ConfigError(f"{label}: {e}") from None
