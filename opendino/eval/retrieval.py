"""Instance retrieval: database images ranked by cosine similarity to each query; mAP, recall@k, precision@k.

Protocol: DINOv2 ranks the database by the cosine similarity of frozen descriptors and reports mAP (paper §7.3;
facts sheet `dense_eval_facts.md` §3.1). The descriptor it used is not stated, so it is a choice here: the CLS token
(default) or GeM (p = 3) over the patch tokens, L2-normalised. The metric follows revisitop `compute_map` (§3.2):
junk images are taken out of the ranking, AP is the trapezoid rule over the positives' precision-recall points, a
query without positives is skipped, mP@k is revisitop's precision at min(k, rank of the last positive). recall@k (a
positive among the first k non-junk results) and precision@k (positives among them / k) are ours.

Ground truth is our JSON {query: {"positives": [...], "junk": [...], "bbox": [x1, y1, x2, y2]}} ("junk" and "bbox"
optional) or a revisitop `gnd_roxford5k.pkl` / `gnd_rparis6k.pkl` (easy / medium / hard setups; database = `imlist`,
queries = `qimlist` cropped to their box, images `<name>.jpg`). Names match the one listed image whose path ends with
them ("x.jpg", "class/x.jpg" or a full path). A query found in the database counts as junk unless it is a positive.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from opendino import dist
from opendino.eval.common import list_labelled_images, markdown_table, setup

__all__ = [
    "SETUPS",
    "GroundTruth",
    "gem",
    "load_ground_truth",
    "make_class_ground_truth",
    "rank_database",
    "retrieval_metrics",
    "run",
]

# revisitop setup -> (gnd keys of the positives, gnd keys of the junk) (rop:python/example_evaluate.py:L58-83)
SETUPS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
Box = tuple[float, float, float, float]


@dataclass
class GroundTruth:
    """Query and database images with, per setup, each query's positive and junk database indices."""

    queries: list[str]
    database: list[str]
    setups: dict[str, tuple[list[list[int]], list[list[int]]]]  # name -> (positives, junk), one list per query
    boxes: list[Box | None]  # query crop (x1, y1, x2, y2) in pixels, or None for the whole image
    kind: str  # "json" or "revisitop"


# ---------------------------------------------------------------------------------------------- ground truth
class _Names:
    """Find the one path of a list that ends with a name (whole path components)."""

    def __init__(self, paths: Sequence[str], what: str) -> None:
        self.paths, self.what = list(paths), what
        self.by_base: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(self.paths):
            self.by_base[os.path.basename(p)].append(i)

    def find(self, name: str) -> int | None:
        parts = Path(os.path.normpath(name)).parts
        found = [i for i in self.by_base.get(parts[-1], []) if Path(self.paths[i]).parts[-len(parts) :] == parts]
        if len(found) > 1:
            raise ValueError(f"{name!r} matches {len(found)} {self.what} images ({self.paths[found[0]]}, ...): "
                             "give more of its path")  # fmt: skip
        return found[0] if found else None

    def find_all(self, names: Sequence[str], source: str) -> list[int]:
        found = [self.find(str(n)) for n in names]
        missing = [str(n) for n, i in zip(names, found, strict=True) if i is None]
        if missing:
            raise ValueError(f"{source}: {len(missing)} names are not among the {len(self.paths)} {self.what} "
                             f"images, e.g. {missing[:3]}")  # fmt: skip
        return [i for i in found if i is not None]


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays only: a ground-truth file must not run code."""

    _NUMPY = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
    _ALLOWED = (
        {(module, name) for module in _NUMPY for name in ("_reconstruct", "scalar", "_frombuffer")}
        | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # _codecs.encode: bytes in protocol 2
        | {
            (module, name)
            for module in ("builtins", "__builtin__")
            for name in ("bytes", "bytearray", "set", "frozenset")
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed (only lists, dicts and numpy arrays)")


def _load_pickle(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _GroundTruthUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a readable revisitop ground-truth pickle ({e})") from e


def _json_ground_truth(path: str, queries: list[str], database: list[str]) -> GroundTruth:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f'{path}: expected a JSON object {{query: {{"positives": [...], "junk": [...]}}}}')
    qnames, dnames = _Names(queries, "query"), _Names(database, "database")
    entries: dict[int, dict] = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - {"positives", "junk", "bbox"} or "positives" not in entry:
            raise ValueError(f'{path}: entry {key!r} must be {{"positives": [...], "junk": [...], "bbox": [...]}} '
                             f"(junk and bbox optional), got {str(entry)[:80]}")  # fmt: skip
        qi = qnames.find_all([key], path)[0]
        if qi in entries:
            raise ValueError(f"{path}: two entries name the query {queries[qi]}")
        entries[qi] = entry
    without = [queries[i] for i in range(len(queries)) if i not in entries]
    if without:
        raise ValueError(f"{path}: {len(without)} query images have no entry, e.g. {without[:3]}")
    positives = [dnames.find_all(list(entries[i]["positives"]), path) for i in range(len(queries))]
    junk = [dnames.find_all(list(entries[i].get("junk", [])), path) for i in range(len(queries))]
    boxes = [_box(entries[i].get("bbox"), path) for i in range(len(queries))]
    return GroundTruth(queries, database, {"all": (positives, junk)}, boxes, "json")


def _box(value: Any, source: str) -> Box | None:
    if value is None:
        return None
    box = [float(v) for v in np.asarray(value).reshape(-1)]
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{source}: a query box must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2, got {value!r}")
    return (box[0], box[1], box[2], box[3])


def _revisitop_ground_truth(path: str, queries: list[str], database: list[str]) -> GroundTruth:
    gnd = _load_pickle(path)
    if not isinstance(gnd, dict) or not {"imlist", "qimlist", "gnd"} <= set(gnd):
        raise ValueError(f"{path}: a revisitop ground truth is a dict with imlist, qimlist and gnd")
    if len(gnd["gnd"]) != len(gnd["qimlist"]):
        raise ValueError(f"{path}: {len(gnd['gnd'])} gnd entries for {len(gnd['qimlist'])} queries")
    db = [database[i] for i in _Names(database, "database").find_all([f"{n}.jpg" for n in gnd["imlist"]], path)]
    qs = [queries[i] for i in _Names(queries, "query").find_all([f"{n}.jpg" for n in gnd["qimlist"]], path)]
    setups = {}
    for name, (pos_keys, junk_keys) in SETUPS.items():
        lists = []
        for keys in (pos_keys, junk_keys):
            per_query = [
                sorted({int(i) for k in keys for i in np.asarray(g.get(k, [])).reshape(-1)}) for g in gnd["gnd"]
            ]
            if any(i < 0 or i >= len(db) for q in per_query for i in q):
                raise ValueError(f"{path}: {'/'.join(keys)} indices outside imlist (0..{len(db) - 1})")
            lists.append(per_query)
        setups[name] = (lists[0], lists[1])
    return GroundTruth(qs, db, setups, [_box(g.get("bbx"), path) for g in gnd["gnd"]], "revisitop")


def load_ground_truth(path: str | os.PathLike[str], queries: str, database: str) -> GroundTruth:
    """Read a JSON or revisitop ground truth against the images of `queries` and `database` (folders or lists)."""
    from opendino.data.sources import list_images

    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".pkl"):
        raise ValueError(f"{path}: ground truth must be a .json file (our format) or a revisitop gnd_*.pkl")
    qs, db = list_images(queries), list_images(database)
    gt = (_json_ground_truth if suffix == ".json" else _revisitop_ground_truth)(path, qs, db)
    where = {p: i for i, p in enumerate(gt.database)}
    for positives, junk in gt.setups.values():  # a query that is also a database image: junk unless a positive
        for qi, q in enumerate(gt.queries):
            if q in where and where[q] not in positives[qi] and where[q] not in junk[qi]:
                junk[qi].append(where[q])
    return gt


def make_class_ground_truth(
    folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, queries_per_class: int = 5, seed: int = 0
) -> tuple[Path, Path]:
    """A class-level retrieval benchmark from a labelled folder (<folder>/<class>/<image>).

    `queries_per_class` images of each class drawn at random (seeded) are the queries, the whole folder is the
    database, positives are the other images of the query's class and the query itself is junk. Writes
    `out_dir/queries.txt` (absolute paths) and `out_dir/ground_truth.json` (paths relative to `folder`); returns both.
    """
    if queries_per_class <= 0:
        raise ValueError(f"queries_per_class={queries_per_class}: must be positive")
    data = list_labelled_images(folder)
    root = Path(folder).resolve()
    names = [os.path.relpath(p, root) for p in data.paths]
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(data.labels.tolist()):
        by_class[label].append(i)
    rng = random.Random(seed)
    chosen = sorted(i for idx in by_class.values() for i in rng.sample(idx, min(queries_per_class, len(idx))))
    gt = {names[q]: {"positives": [names[i] for i in by_class[int(data.labels[q])] if i != q], "junk": [names[q]]}
          for q in chosen}  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "queries.txt").write_text("".join(f"{os.path.abspath(data.paths[q])}\n" for q in chosen))
    (out / "ground_truth.json").write_text(json.dumps(gt, indent=1) + "\n")
    return out / "queries.txt", out / "ground_truth.json"


# ---------------------------------------------------------------------------------------------- metrics
def gem(patch: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised-mean pooling (Radenović et al.): (n, tokens, D) -> (n, D), (mean of clamp(x, eps)^p)^(1/p)."""
    return patch.float().clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


@torch.no_grad()
def rank_database(queries: Tensor, database: Tensor) -> tuple[Tensor, Tensor]:
    """(ranks, similarities), both (m, n): database indices by decreasing cosine similarity, and the sorted scores."""
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"descriptors (m, D) and (n, D) expected, got {tuple(queries.shape)}, {tuple(database.shape)}")
    sims = F.normalize(queries.float(), dim=1) @ F.normalize(database.float(), dim=1).T  # (m, n)
    scores, ranks = sims.sort(dim=1, descending=True, stable=True)
    return ranks, scores


def retrieval_metrics(
    ranks: Tensor,
    positives: Sequence[Sequence[int]],
    junk: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
) -> dict[str, Any]:
    """mAP (revisitop trapezoid AP, junk removed), recall@k, precision@k and revisitop mP@k of full rankings.

    `ranks` (m, n): each row a permutation of the n database indices, best first; `positives[i]` / `junk[i]`: the
    database indices of query i (an index in both counts as positive). Queries without positives are skipped by
    every mean. Returns {"map", "recall@k", "precision@k", "mp@k", "queries" (evaluated), "skipped", "ap" ((m,)
    float64 tensor, NaN for skipped queries)}.
    """
    m, n = ranks.shape
    if len(positives) != m or len(junk) != m:
        raise ValueError(f"{m} rankings but {len(positives)} positive and {len(junk)} junk lists")
    ap = torch.full((m,), float("nan"), dtype=torch.float64)
    sums = {f"{name}@{k}": 0.0 for name in ("recall", "precision", "mp") for k in ks}
    for start in range(0, m, chunk_size):
        rows = range(start, min(m, start + chunk_size))
        labels = torch.zeros(len(rows), n, dtype=torch.int8)  # 1 positive, -1 junk, 0 negative
        for r, i in enumerate(rows):
            labels[r, list(junk[i])] = -1
            labels[r, list(positives[i])] = 1
        ranked = labels.gather(1, ranks[start : start + len(rows)])  # (c, n) labels in ranked order
        pos = ranked == 1
        rank = ((ranked != -1).cumsum(dim=1) - 1).double()  # 0-based rank among non-junk results
        j = (pos.cumsum(dim=1) - 1).double()  # 0-based index of each positive among the positives
        n_pos = pos.sum(dim=1)
        p0 = torch.where(rank == 0, 1.0, j / rank.clamp(min=1))  # precision just before the positive
        p1 = (j + 1) / (rank + 1).clamp(min=1)  # precision at the positive
        trapezoids = torch.where(pos, (p0 + p1) / 2, 0.0)  # (c, n), non-zero at the positives only
        valid = n_pos > 0
        ap[start : start + len(rows)][valid] = (trapezoids.sum(dim=1) / n_pos.clamp(min=1))[valid]
        last = torch.where(pos, rank + 1, 0.0).amax(dim=1)  # 1-based rank of the last positive
        for k in ks:
            hits = (pos & (rank < k)).sum(dim=1).double()
            kq = last.clamp(max=k).clamp(min=1)
            sums[f"recall@{k}"] += (hits > 0)[valid].double().sum().item()
            sums[f"precision@{k}"] += (hits / k)[valid].sum().item()
            sums[f"mp@{k}"] += ((pos & (rank + 1 <= kq[:, None])).sum(dim=1) / kq)[valid].sum().item()
    evaluated = int((~ap.isnan()).sum())
    out: dict[str, Any] = {"map": ap.nanmean().item() if evaluated else float("nan")}
    out |= {key: value / evaluated if evaluated else float("nan") for key, value in sums.items()}
    return out | {"queries": evaluated, "skipped": m - evaluated, "ap": ap}


# ---------------------------------------------------------------------------------------------- run
def _query_images(gt: GroundTruth, folder: Path) -> list[str]:
    """The queries as fed to the backbone: a crop file (written once, on the main process) for a query with a box."""
    from opendino.data.sources import BadImageError, load_image

    paths = []
    for path, box in zip(gt.queries, gt.boxes, strict=True):
        if box is None:
            paths.append(path)
            continue
        tag = hashlib.sha256(f"{path}\0{box}".encode()).hexdigest()[:12]
        crop = folder / f"{Path(path).stem}-{tag}.png"
        if dist.is_main() and not crop.exists():
            try:
                img = load_image(path)
            except BadImageError:  # left for feature extraction to report
                paths.append(path)
                continue
            x1, y1, x2, y2 = (round(v) for v in box)
            x1, y1, x2, y2 = max(0, x1), max(0, y1), min(img.width, max(x2, x1 + 1)), min(img.height, max(y2, y1 + 1))
            folder.mkdir(parents=True, exist_ok=True)
            tmp = crop.with_name(f".{crop.name}.{os.getpid()}.tmp.png")
            img.crop((x1, y1, x2, y2)).save(tmp)
            os.replace(tmp, crop)
        paths.append(str(crop))
    dist.barrier()
    return [p if os.path.exists(p) else q for p, q in zip(paths, gt.queries, strict=True)]


def _keep_database(lists: list[list[int]], keep: list[int]) -> list[list[int]]:
    new = {old: i for i, old in enumerate(keep)}
    return [[new[i] for i in row if i in new] for row in lists]


_COLOURS = {1: (0.1, 0.7, 0.1), 0: (0.85, 0.1, 0.1), -1: (0.6, 0.6, 0.6)}  # positive, negative, junk


def _save_topk(path: Path, queries, database, ranks, positives, junk, ap: Tensor, n_cols: int, n_rows: int = 6):
    from opendino.eval.pictures import save_image_grid, thumbnail

    shown = [i for i in range(len(queries)) if not ap[i].isnan()]
    shown = [shown[int(t)] for t in np.linspace(0, len(shown) - 1, min(n_rows, len(shown)))] if shown else []
    rows, titles = [], []
    for i in shown:
        label = {d: -1 for d in junk[i]} | {d: 1 for d in positives[i]}
        row = [thumbnail(queries[i], None, fit="crop")]
        row += [thumbnail(database[d], _COLOURS[label.get(d, 0)], fit="crop") for d in ranks[i, :n_cols].tolist()]
        rows.append(row)
        titles.append(f"{Path(queries[i]).name[:22]}\nAP {ap[i].item():.2f}")
    if rows:
        cols = ["query", *(f"#{r + 1}" for r in range(n_cols))]
        save_image_grid(rows, path, column_titles=cols, row_titles=titles, cell_size=1.6)


def _ranked(ctx, cfg, gt: GroundTruth) -> tuple[list[int], list[int], Tensor, list[tuple[str, str]]]:
    """Kept query and database indices (readable images), the ranking (queries x database) and the bad images."""
    from opendino.data.augment import make_eval_transform, make_resize_transform

    query_paths = _query_images(gt, (ctx.cache_dir or ctx.out) / "retrieval-crops")
    if cfg.crop_size:
        transform = make_eval_transform(cfg.resize_size, cfg.crop_size)
    else:
        transform = make_resize_transform(cfg.resize_size)
    in_db = set(gt.database)
    union = gt.database + [p for p in dict.fromkeys(query_paths) if p not in in_db]  # database first: shared cache
    fs = ctx.features(union, transform, outputs=("patch",) if cfg.feature == "gem" else ("cls",), desc="retrieval")
    if cfg.feature == "gem":
        feats = gem(torch.from_numpy(fs.features["patch"]))
    else:
        feats = torch.from_numpy(fs.features["cls"])
    row = {p: i for i, p in enumerate(fs.paths)}
    q_keep = [i for i, p in enumerate(query_paths) if p in row]
    d_keep = [i for i, p in enumerate(gt.database) if p in row]
    if not q_keep or not d_keep:
        raise ValueError(f"no readable {'query' if not q_keep else 'database'} images: {fs.bad[:3]}")
    q_rows = [row[query_paths[i]] for i in q_keep]
    d_rows = [row[gt.database[i]] for i in d_keep]
    ranks, _ = rank_database(feats[q_rows], feats[d_rows])
    return q_keep, d_keep, ranks, fs.bad


def run(cfg) -> dict[str, Any]:
    """`opendino eval retrieval` (config: `RetrievalEvalConfig`)."""
    ctx = setup("retrieval", cfg)
    gt = load_ground_truth(cfg.ground_truth, cfg.queries, cfg.database)
    q_keep, d_keep, ranks, bad = _ranked(ctx, cfg, gt)
    queries = [gt.queries[i] for i in q_keep]
    database = [gt.database[i] for i in d_keep]
    metrics, per_query, rows, pictures = {}, {}, [], []
    n_cols = min(max(cfg.ks), 8)
    for name, (positives, junk) in gt.setups.items():
        pos = _keep_database([positives[i] for i in q_keep], d_keep)
        jk = _keep_database([junk[i] for i in q_keep], d_keep)
        scores = retrieval_metrics(ranks, pos, jk, cfg.ks)
        ap = scores.pop("ap")
        metrics[name] = scores
        per_query[name] = dict(zip(queries, [None if a.isnan() else round(a.item(), 6) for a in ap], strict=True))
        rows.append([name, scores["queries"], scores["skipped"], scores["map"],
                     *(scores[f"{m}@{k}"] for m in ("recall", "precision", "mp") for k in cfg.ks)])  # fmt: skip
        if dist.is_main() and (name == "medium" or len(gt.setups) == 1):
            picture = ctx.picture_path(f"top{n_cols}_{name}.png")
            _save_topk(picture, queries, database, ranks, pos, jk, ap, n_cols)
            pictures.append(picture.name)
    headers = ["setup", "queries", "skipped (no positives)", "mAP",
               *(f"{m}@{k}" for m in ("recall", "precision", "mP") for k in cfg.ks)]  # fmt: skip
    top = min(max(cfg.ks), 10)
    neighbours = {q: [database[d] for d in ranks[i, :top].tolist()] for i, q in enumerate(queries)}
    size = f"resize {cfg.resize_size}, centre crop {cfg.crop_size}" if cfg.crop_size else f"{cfg.resize_size} square"
    dataset = {"queries": cfg.queries, "database": cfg.database, "ground_truth": cfg.ground_truth,
               "ground_truth_kind": gt.kind, "n_queries": len(queries), "n_database": len(database),
               "descriptor": f"{cfg.feature}, L2-normalised, cosine similarity", "transform": size}  # fmt: skip
    extra = {"ap": per_query, f"top{top}": neighbours, "pictures": pictures}
    table = markdown_table(headers, rows)
    return ctx.write_results(dataset=dataset, metrics=metrics, tables=[table], extra=extra, bad_images=bad)
