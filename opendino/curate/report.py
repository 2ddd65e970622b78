"""The curation report: what every stage did, in numbers and pictures, as a static page that needs no network.

``write_report`` reads the stage outputs under a curation folder (``dedup/dedup.npz``, ``retrieve/<name>.npz``,
``balance/levels``, ``balance/selection.npz``) and writes ``report/``:

- ``report.json``: counts per stage and the balance statistics (below), for scripts;
- ``counts.png``: images left after every stage;
- ``cluster_sizes.png``: per hierarchy level, cluster sizes sorted from largest to smallest before balancing (images
  of the balanced input per cluster) and after (images selected per cluster), on a log scale;
- ``duplicates.png``: duplicate groups (the kept image framed green, the removed ones red);
  ``eval_duplicates.png``: evaluation images (blue) beside the pool images removed as their near-copies;
- ``retrieval_<name>.png``: seed images (blue) with pool images they retrieved;
- ``clusters.png``: balanced top-level clusters, one row each, with images selected from them;
- ``index.html``: all of it on one page (relative links only).

Balance statistics, over the clusters of the top level: the ratio of the largest to the median cluster and the
normalised entropy of the distribution of images over clusters (1 = all clusters equal), before and after.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["balance_statistics", "write_report"]

KEPT = (0.15, 0.65, 0.25)
REMOVED = (0.85, 0.15, 0.15)
QUERY = (0.15, 0.35, 0.85)
_THUMB = 96


def balance_statistics(sizes: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Largest / median cluster and normalised entropy of a distribution of images over clusters."""
    s = np.asarray(sizes, dtype=np.float64)
    s = s[s > 0]
    if len(s) == 0:
        return {"clusters": 0, "max_over_median": 0.0, "normalised_entropy": 0.0}
    p = s / s.sum()
    entropy = float(-(p * np.log(p)).sum() / np.log(len(s))) if len(s) > 1 else 1.0
    return {"clusters": len(s), "max_over_median": float(s.max() / np.median(s)), "normalised_entropy": entropy}


def _thumb(path: str, colour: tuple[float, float, float] | None) -> np.ndarray | None:
    from opendino.data.sources import BadImageError
    from opendino.eval.pictures import thumbnail

    try:
        return thumbnail(path, colour, size=_THUMB, fit="crop")
    except (BadImageError, OSError):
        return None  # a file that went away or broke after embedding: an empty cell, not a failed report


def _grid(rows: list[list[np.ndarray | None]], path: Path, row_titles: Sequence[str] = ()) -> str | None:
    from opendino.eval.pictures import save_image_grid

    rows = [r for r in rows if any(c is not None for c in r)]
    if not rows:
        return None
    save_image_grid(rows, path, row_titles=list(row_titles)[: len(rows)], cell_size=1.3)
    return path.name


def _load(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _counts_figure(counts: list[tuple[str, int]], path: Path) -> str:
    from opendino.eval.pictures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(counts) + 1))
    labels = [c[0] for c in counts][::-1]
    values = [c[1] for c in counts][::-1]
    bars = ax.barh(labels, values, color="#4a7ab5")
    ax.bar_label(bars, labels=[f"{v:,}" for v in values], padding=3, fontsize=8)
    ax.set_xlabel("images")
    ax.set_title("Images after each stage")
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlim(0, max([*values, 1]) * 1.15)
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path.name


def _sizes_figure(before: list[np.ndarray], after: list[np.ndarray], path: Path) -> str:
    from opendino.eval.pictures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(before), figsize=(4.2 * len(before), 3.4), squeeze=False)
    for t, (b, a, ax) in enumerate(zip(before, after, axes[0], strict=True)):
        order = np.argsort(-b, kind="stable")
        ranks = np.arange(1, len(b) + 1)
        ax.plot(ranks, np.maximum(b[order], 0.8), label="before (balanced input)", color="#888888")
        ax.plot(ranks, np.maximum(np.sort(a)[::-1], 0.8), label="after (selected)", color="#d0592a")
        ax.set_yscale("log")
        ax.set_xlabel(f"level-{t + 1} clusters, largest first")
        ax.set_ylabel("images per cluster")
        ax.set_title(f"Level {t + 1}: {len(b)} clusters")
        ax.spines[["top", "right"]].set_visible(False)
        if t == 0:
            ax.legend(fontsize=8, frameon=False)
    fig.suptitle("Cluster sizes before and after balancing")
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path.name


def _balance_pictures(out: Path, report: Path, pool_paths: Sequence[str], n_rows: int, per_row: int,
                      seed: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:  # fmt: skip
    from opendino.curate.kmeans import flat_sizes, load_levels, point_clusters

    sel = _load(out / "balance" / "selection.npz")
    levels_dir = out / "balance" / "levels"
    if sel is None or not levels_dir.exists() or not any(levels_dir.iterdir()):
        return {}, []
    levels = load_levels(levels_dir)
    stats: dict[str, Any] = {}
    ids = _balance_ids(out, levels)
    if ids is None:
        return {}, []
    by_input = point_clusters(levels)  # (n_input, T)
    row_of = {int(p): i for i, p in enumerate(ids)}
    sel_rows = np.array([row_of[int(p)] for p in sel["pool_ids"]], dtype=np.int64)
    before, after = [], []
    for t in range(len(levels)):
        sizes = flat_sizes(levels, t + 1)
        picked = np.bincount(by_input[sel_rows, t], weights=sel["counts"], minlength=len(sizes)) if len(sel_rows) else \
            np.zeros(len(sizes))  # fmt: skip
        before.append(sizes.astype(np.float64))
        after.append(picked)
        stats[f"level{t + 1}"] = {"before": balance_statistics(sizes), "after": balance_statistics(picked)}
    pictures = [(_sizes_figure(before, after, report / "cluster_sizes.png"), "Cluster sizes before and after")]
    top = len(levels) - 1
    rng = np.random.default_rng(seed)
    non_empty = np.flatnonzero(after[top] > 0)
    chosen = np.sort(rng.choice(non_empty, size=min(n_rows, len(non_empty)), replace=False)) if n_rows else []
    rows, titles = [], []
    for c in chosen:
        members = sel["pool_ids"][by_input[sel_rows, top] == c][:per_row]
        rows.append([_thumb(pool_paths[p], None) for p in members])
        titles.append(f"cluster {c}\n{int(before[top][c])} -> {int(after[top][c])}")
    name = _grid(rows, report / "clusters.png", titles)
    if name:
        pictures.append((name, f"Selected images of {len(rows)} top-level clusters (images before -> after)"))
    return stats, pictures


def _balance_ids(out: Path, levels: list) -> np.ndarray | None:
    """Pool indices of the balanced input, in the row order the levels were computed on."""
    got = _load(out / "balance" / "input.npz")
    if got is None or len(got["pool_ids"]) != len(levels[0].assignment):
        return None
    return got["pool_ids"]


def _dedup_pictures(out: Path, report: Path, pool_paths: Sequence[str], examples: list[list[int]], per_row: int,
                    n_eval_rows: int, seed: int) -> list[tuple[str, str]]:  # fmt: skip
    pictures = []
    rows = [[_thumb(pool_paths[i], KEPT if j == 0 else REMOVED) for j, i in enumerate(group[:per_row])]
            for group in examples]  # fmt: skip
    name = _grid(rows, report / "duplicates.png")
    if name:
        pictures.append((name, "Near-duplicate groups: the kept image (green) and the removed ones (red)"))
    dedup = _load(out / "dedup" / "dedup.npz")
    eval_paths_file = out / "dedup" / "eval_paths.txt"
    if dedup is None or not eval_paths_file.exists() or not dedup["removed_eval"].any():
        return pictures
    eval_paths = eval_paths_file.read_text().splitlines()
    matched = dedup["matched_ref"]
    refs = np.unique(matched[dedup["removed_eval"]])
    refs = np.sort(np.random.default_rng(seed).choice(refs, size=min(n_eval_rows, len(refs)), replace=False))
    rows = [[_thumb(eval_paths[r], QUERY)] + [_thumb(pool_paths[i], REMOVED)
                                               for i in np.flatnonzero(matched == r)[: per_row - 1]]
            for r in refs]  # fmt: skip
    name = _grid(rows, report / "eval_duplicates.png")
    if name:
        pictures.append((name, "Evaluation images (blue) and the pool images removed as their near-copies (red)"))
    return pictures


def _retrieval_pictures(out: Path, report: Path, cfg: Any, pool_paths: Sequence[str]) -> list[tuple[str, str]]:
    from opendino.extract import load_extracted

    pictures = []
    for s in cfg.seeds:
        got = _load(out / "retrieve" / f"{s.name}.npz")
        if got is None or not len(got["pool_ids"]):
            continue
        seeds = load_extracted(out / "embed" / "seeds" / s.name)
        seed_paths = seeds["paths"]
        per_row = cfg.report.images_per_row
        if (got["best_seed"] < 0).all():  # cluster-based: one row per chosen cluster, its seeds then its images
            km = _load(out / "retrieve" / "pool_kmeans.npz")
            if km is None:
                continue
            from opendino.curate.retrieve import nearest_centroid

            seed_cluster = nearest_centroid(seeds["cls"], km["centroids"])[0]
            clusters = np.unique(got["cluster"])[: cfg.report.retrieval_examples]
            rows = []
            for c in clusters:
                mine = [_thumb(seed_paths[q], QUERY) for q in np.flatnonzero(seed_cluster == c)[: per_row // 2]]
                taken = got["pool_ids"][got["cluster"] == c][: per_row - len(mine)]
                rows.append(mine + [_thumb(pool_paths[p], None) for p in taken])
            name = _grid(rows, report / f"retrieval_{s.name}.png", [f"cluster {c}" for c in clusters])
            if name:
                pictures.append((name, f"Seed set {s.name}: pool clusters taken, their seed images (blue) first"))
            continue
        with_hits = np.unique(got["best_seed"][got["best_seed"] >= 0])
        rng = np.random.default_rng(cfg.seed)
        chosen = np.sort(rng.choice(with_hits, size=min(cfg.report.retrieval_examples, len(with_hits)),
                                    replace=False))  # fmt: skip
        rows = []
        for q in chosen:
            mine = np.flatnonzero(got["best_seed"] == q)
            mine = mine[np.argsort(-got["similarity"][mine], kind="stable")][: per_row - 1]
            rows.append([_thumb(seed_paths[q], QUERY)] + [_thumb(pool_paths[got["pool_ids"][i]], None) for i in mine])
        name = _grid(rows, report / f"retrieval_{s.name}.png")
        if name:
            pictures.append((name, f"Seed set {s.name}: seed images (blue) and pool images retrieved for them"))
    return pictures


def _html(counts: list[tuple[str, int]], summaries: dict[str, Any], stats: dict[str, Any],
          pictures: list[tuple[str, str]], cfg: Any) -> str:  # fmt: skip
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:,}</td></tr>" for k, v in counts)
    stat_rows = "".join(
        f"<tr><td>{esc(level)}</td><td>{s['before']['clusters']}</td>"
        f"<td>{s['before']['max_over_median']:.2f}</td><td>{s['after']['max_over_median']:.2f}</td>"
        f"<td>{s['before']['normalised_entropy']:.3f}</td><td>{s['after']['normalised_entropy']:.3f}</td></tr>"
        for level, s in stats.items()
    )
    stat_table = (
        "<h2>Balance</h2><table><tr><th>level</th><th>clusters</th><th>largest / median before</th>"
        f"<th>after</th><th>normalised entropy before</th><th>after</th></tr>{stat_rows}</table>"
        if stats
        else ""
    )
    figures = "".join(
        f'<figure><img src="{esc(name)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'
        for name, caption in pictures
    )
    settings = esc(json.dumps(summaries, indent=2, default=str))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>opendino curation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }}
</style></head><body>
<h1>Curation report</h1>
<p>Backbone <code>{esc(cfg.backbone)}</code>; pool {esc(", ".join(cfg.pool))};
manifest <code>{esc(cfg.manifest)}</code>.</p>
<h2>Images after each stage</h2><table><tr><th>stage</th><th>images</th></tr>{rows}</table>
{stat_table}{figures}
<h2>Stage summaries</h2><pre>{settings}</pre>
</body></html>
"""


def _stage_counts(summaries: dict[str, Any], manifest_counts: dict[str, int]) -> list[tuple[str, int]]:
    counts: list[tuple[str, int]] = []
    embed = summaries.get("embed", {}).get("pool")
    if embed:
        counts += [("pool images listed", embed["n_images"]), ("pool images readable", embed["n_features"])]
    dedup = summaries.get("dedup", {})
    if dedup:
        counts.append(("after removing near-duplicates", dedup["pool"] - dedup["removed_as_duplicates"]))
        counts.append(("after removing evaluation near-copies", dedup["kept"]))
    for name, r in summaries.get("retrieve", {}).items():
        if isinstance(r, dict):
            counts.append((f"retrieved for {name} ({r['method']})", r["retrieved"]))
    balance = summaries.get("balance", {})
    if balance:
        counts.append((f"balanced input ({balance['applied_to']})", balance["input"]))
        counts.append(("selected by balancing", balance.get("selected_unique", balance["selected"])))
    counts.append(("manifest rows", manifest_counts["rows"]))
    return counts


def write_report(out: str | os.PathLike[str], cfg: Any, summaries: dict[str, Any], *,
                 manifest_counts: dict[str, int], pool_paths: Sequence[str]) -> Path:  # fmt: skip
    """Write ``out/report/`` (see the module docstring) from the stage outputs; returns the path of index.html."""
    out = Path(out)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    counts = _stage_counts(summaries, manifest_counts)
    pictures = [(_counts_figure(counts, report / "counts.png"), "Images after each stage")]
    r = cfg.report
    examples = summaries.get("dedup", {}).get("examples", [])
    pictures += _dedup_pictures(out, report, pool_paths, examples, r.images_per_row, r.retrieval_examples, cfg.seed)
    pictures += _retrieval_pictures(out, report, cfg, pool_paths)
    stats, balance_pics = _balance_pictures(out, report, pool_paths, r.clusters, r.images_per_row, cfg.seed)
    pictures += balance_pics
    record = {"counts": dict(counts), "manifest": manifest_counts, "balance": stats,
              "pictures": [name for name, _ in pictures]}  # fmt: skip
    tmp = report / f".report.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, report / "report.json")
    page = report / "index.html"
    tmp = report / f".index.{os.getpid()}.tmp"
    tmp.write_text(_html(counts, summaries, stats, pictures, cfg))
    os.replace(tmp, page)
    return page
