"""Retrieval evaluation: the revisitop metric against a reference loop and scikit-learn, ground truth, end to end."""

from __future__ import annotations

import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from opendino.config import ConfigError, RetrievalEvalConfig
from opendino.data.synthetic import make_shapes_dataset
from opendino.eval.retrieval import (
    gem,
    load_ground_truth,
    make_class_ground_truth,
    rank_database,
    retrieval_metrics,
    run,
)


# ---------------------------------------------------------------------------------------------- metric
def reference_metrics(ranks, positives, junk, ks):
    """Per-query loop written from the definition (revisitop compute_map / compute_ap, plus recall and precision)."""
    aps, recall, precision, mp = [], {k: [] for k in ks}, {k: [] for k in ks}, {k: [] for k in ks}
    for ranking, pos, jk in zip(ranks, positives, junk, strict=True):
        pos, jk = set(pos), set(jk) - set(pos)
        if not pos:
            continue
        ap, found, r, at = 0.0, 0, 0, []  # at: 1-based ranks of the positives among non-junk results
        for d in ranking:
            if d in jk:
                continue
            if d in pos:
                before = 1.0 if r == 0 else found / r
                found += 1
                ap += (before + found / (r + 1)) / 2 / len(pos)
                at.append(r + 1)
            r += 1
        aps.append(ap)
        for k in ks:
            recall[k].append(float(min(at) <= k))
            precision[k].append(sum(a <= k for a in at) / k)
            kq = min(max(at), k)
            mp[k].append(sum(a <= kq for a in at) / kq)
    out = {"map": float(np.mean(aps)), "queries": len(aps), "skipped": len(ranks) - len(aps)}
    for k in ks:
        out |= {f"recall@{k}": np.mean(recall[k]), f"precision@{k}": np.mean(precision[k]), f"mp@{k}": np.mean(mp[k])}
    return out


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_reference_loop_on_random_rankings(seed):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    m, n, ks = 9, 40, (1, 3, 10)
    ranks = torch.stack([torch.randperm(n, generator=g) for _ in range(m)])
    positives = [rng.sample(range(n), rng.choice([0, 1, 2, 5, 12])) for _ in range(m)]
    junk = [rng.sample(range(n), rng.choice([0, 1, 4, 10])) for _ in range(m)]  # may overlap the positives
    positives[0] = [] if seed % 2 else positives[0]
    got = retrieval_metrics(ranks, positives, junk, ks, chunk_size=4)
    want = reference_metrics(ranks.tolist(), positives, junk, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert torch.isnan(got["ap"]).sum().item() == want["skipped"]


def test_trapezoid_ap_relates_to_sklearn_step_ap():
    """Without junk: trapezoid AP = (sklearn's AP + mean precision just before each positive) / 2."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 30
        relevant = rng.random(n) < 0.3
        relevant[rng.integers(n)] = True
        order = rng.permutation(n)
        positives = np.flatnonzero(relevant).tolist()
        got = retrieval_metrics(torch.from_numpy(order)[None], [positives], [[]], ks=(1,))["map"]
        scores = np.empty(n)
        scores[order] = -np.arange(n)  # rank 0 has the highest score, no ties
        ranked = relevant[order]
        at = np.flatnonzero(ranked)  # 0-based ranks of the positives
        before = [1.0 if r == 0 else j / r for j, r in enumerate(at)]
        assert got == pytest.approx((average_precision_score(relevant, scores) + np.mean(before)) / 2, abs=1e-12)


def test_hand_computed_cases():
    ranks = torch.tensor([[0, 1, 2, 3], [3, 0, 1, 2], [0, 1, 2, 3]])
    # query 0: positives at ranks 0 and 2 -> (1 + 1) / 4 + (1/2 + 2/3) / 4; query 1: the leading junk is removed
    # (database 3) and the positives 0, 2 then sit at ranks 0 and 2 again; query 2: a perfect ranking
    out = retrieval_metrics(ranks, [[0, 2], [0, 2], [0, 1]], [[], [3], []], ks=(1, 2))
    expected = 0.5 + (0.5 + 2 / 3) / 4
    assert out["ap"].tolist() == pytest.approx([expected, expected, 1.0])
    assert out["map"] == pytest.approx((2 * expected + 1) / 3)
    assert out["recall@1"] == 1.0
    assert out["precision@2"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert out["mp@2"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    # revisitop's mP@k divides by min(k, rank of the last positive): one positive at rank 1 -> mP@10 = 1
    assert retrieval_metrics(torch.arange(5)[None], [[0]], [[]], ks=(10,))["mp@10"] == 1.0
    assert retrieval_metrics(torch.arange(5)[None], [[0]], [[]], ks=(10,))["precision@10"] == pytest.approx(0.1)


def test_no_positive_queries_are_skipped():
    out = retrieval_metrics(torch.arange(4)[None].repeat(2, 1), [[], [1]], [[], []], ks=(1,))
    # the one positive at rank 1: trapezoid between precision 0 (rank 0) and 1/2 -> 0.25 (step AP would say 0.5)
    assert out["skipped"] == 1 and out["queries"] == 1 and out["map"] == pytest.approx(0.25)
    empty = retrieval_metrics(torch.arange(4)[None], [[]], [[]], ks=(1,))
    assert empty["queries"] == 0 and np.isnan(empty["map"])
    with pytest.raises(ValueError, match="rankings"):
        retrieval_metrics(torch.arange(4)[None], [[0], [1]], [[]], ks=(1,))


def test_rank_database_and_gem():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    db = torch.tensor([[0.0, 1.0], [3.0, 0.1], [1.0, 1.0]])
    ranks, scores = rank_database(q, db)
    assert ranks.tolist() == [[1, 2, 0], [0, 2, 1]]
    assert scores[:, 0].tolist() == pytest.approx([3 / np.hypot(3, 0.1), 1.0])
    with pytest.raises(ValueError, match="descriptors"):
        rank_database(q, db[:, :1])
    patch = torch.tensor([[[1.0, -5.0], [2.0, 3.0]]])  # (1, 2 tokens, 2): negatives clamp to ~0
    assert gem(patch)[0].tolist() == pytest.approx([((1 + 8) / 2) ** (1 / 3), (27 / 2) ** (1 / 3)], rel=1e-5)


# ---------------------------------------------------------------------------------------------- ground truth
def _images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name)


def test_json_ground_truth_names_and_errors(tmp_path):
    _images(tmp_path / "q", ["a.png", "b.png"])
    _images(tmp_path / "db", ["x/1.png", "y/1.png", "2.png", "a.png"])
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"a.png": {"positives": ["x/1.png"], "junk": ["2.png"]},
                                   str(tmp_path / "q" / "b.png"): {"positives": ["y/1.png", "2.png"]}}))  # fmt: skip
    gt = load_ground_truth(gt_file, str(tmp_path / "q"), str(tmp_path / "db"))
    pos, junk = gt.setups["all"]
    names = [p.split("db/")[1] for p in gt.database]
    assert [[names[i] for i in row] for row in pos] == [["x/1.png"], ["y/1.png", "2.png"]]
    assert [[names[i] for i in row] for row in junk] == [["2.png"], []]  # a.png (query) != db/a.png (other file)
    assert gt.kind == "json" and gt.boxes == [None, None]

    def check(data, match):
        gt_file.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            load_ground_truth(gt_file, str(tmp_path / "q"), str(tmp_path / "db"))

    check({"a.png": {"positives": ["1.png"]}, "b.png": {"positives": []}}, "give more of its path")
    check({"a.png": {"positives": ["nope.png"]}, "b.png": {"positives": []}}, "not among the 4 database")
    check({"a.png": {"positives": []}}, "1 query images have no entry")
    check({"a.png": {"positive": []}, "b.png": {"positives": []}}, "must be")
    check({"a.png": {"positives": [], "bbox": [5, 5, 1, 9]}, "b.png": {"positives": []}}, "x1 < x2")
    check([], "JSON object")
    with pytest.raises(ValueError, match=r"\.json file"):
        load_ground_truth(tmp_path / "gt.txt", str(tmp_path / "q"), str(tmp_path / "db"))


def test_query_in_database_is_junk_unless_positive(tmp_path):
    _images(tmp_path / "db", ["a.png", "b.png", "c.png"])
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"a.png": {"positives": ["b.png"]}, "b.png": {"positives": ["b.png"]}}))
    queries = tmp_path / "q.txt"
    queries.write_text("db/a.png\ndb/b.png\n")
    gt = load_ground_truth(gt_file, str(queries), str(tmp_path / "db"))
    assert gt.setups["all"] == ([[1], [1]], [[0], []])


def _revisitop_pickle(path, protocol):
    gnd = {
        "imlist": ["d0", "d1", "d2", "d3"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"easy": np.array([0]), "hard": np.array([1]), "junk": np.array([2]), "bbx": np.array([0.0, 0, 10, 10])},
            {
                "easy": np.array([], dtype=np.int64),
                "hard": np.array([3, 1]),
                "junk": np.array([], dtype=np.int64),
                "bbx": np.array([1.0, 2, 30, 20]),
            },
        ],
    }
    with open(path, "wb") as f:
        pickle.dump(gnd, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_revisitop_ground_truth_setups(tmp_path, protocol):
    _images(tmp_path / "jpg", [f"{n}.jpg" for n in ("d0", "d1", "d2", "d3", "q0", "q1")])
    _revisitop_pickle(tmp_path / "gnd.pkl", protocol)
    gt = load_ground_truth(tmp_path / "gnd.pkl", str(tmp_path / "jpg"), str(tmp_path / "jpg"))
    assert [p.split("/")[-1] for p in gt.database] == ["d0.jpg", "d1.jpg", "d2.jpg", "d3.jpg"]
    assert [p.split("/")[-1] for p in gt.queries] == ["q0.jpg", "q1.jpg"]
    assert gt.setups["easy"] == ([[0], []], [[1, 2], [1, 3]])
    assert gt.setups["medium"] == ([[0, 1], [1, 3]], [[2], []])
    assert gt.setups["hard"] == ([[1], [1, 3]], [[0, 2], []])
    assert gt.boxes == [(0.0, 0.0, 10.0, 10.0), (1.0, 2.0, 30.0, 20.0)]


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-opendino-test",))


def test_revisitop_pickle_cannot_run_code(tmp_path):
    _images(tmp_path / "jpg", ["q0.jpg"])
    with open(tmp_path / "gnd.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": ["q0"], "gnd": [_Evil()]}, f)
    with pytest.raises(ValueError, match="not allowed"):
        load_ground_truth(tmp_path / "gnd.pkl", str(tmp_path / "jpg"), str(tmp_path / "jpg"))


def test_make_class_ground_truth(tmp_path):
    make_shapes_dataset(tmp_path / "val", n_per_class=4, size=32)
    qfile, gfile = make_class_ground_truth(tmp_path / "val", tmp_path / "bench", queries_per_class=2, seed=3)
    queries = qfile.read_text().split()
    gt = json.loads(gfile.read_text())
    assert len(queries) == 20 and len(gt) == 20
    for key, entry in gt.items():
        cls = key.split("/")[0]
        assert entry["junk"] == [key] and key not in entry["positives"] and len(entry["positives"]) == 3
        assert all(p.split("/")[0] == cls for p in entry["positives"])
    again = make_class_ground_truth(tmp_path / "val", tmp_path / "bench2", queries_per_class=2, seed=3)[0]
    assert again.read_text() == qfile.read_text()
    loaded = load_ground_truth(gfile, str(qfile), str(tmp_path / "val"))
    assert all(len(p) == 3 and len(j) == 1 for p, j in zip(*loaded.setups["all"], strict=True))


# ---------------------------------------------------------------------------------------------- end to end
def _cfg(tmp_path, **kw):
    base = dict(backbone="debug", resize_size=64, crop_size=64, cache_dir=str(tmp_path / "cache"), num_workers=0,
                out=str(tmp_path / "out"), batch_size=16, ks=(1, 5))  # fmt: skip
    return RetrievalEvalConfig(**(base | kw))


def test_run_exact_duplicates_give_map_one(tmp_path):
    items = make_shapes_dataset(tmp_path / "db", n_per_class=2, size=64)
    (tmp_path / "q").mkdir()
    gt = {}
    for path, _ in items[::3]:
        name = path.split("/")[-1]
        shutil.copy(path, tmp_path / "q" / name)
        gt[name] = {"positives": [name]}
    (tmp_path / "db" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    cfg = _cfg(
        tmp_path, queries=str(tmp_path / "q"), database=str(tmp_path / "db"), ground_truth=str(tmp_path / "gt.json")
    )
    record = run(cfg)
    m = record["metrics"]["all"]
    assert m["map"] == pytest.approx(1.0) and m["recall@1"] == 1.0 and m["queries"] == len(gt)
    assert m["precision@5"] == pytest.approx(0.2) and m["mp@5"] == 1.0
    assert [b[0].split("/")[-1] for b in record["bad_images"]] == ["broken.png"]
    assert (tmp_path / "out" / "top5_all.png").stat().st_size > 0
    assert "| all |" in (tmp_path / "out" / "results.md").read_text()
    first = next(iter(record["extra"]["top5"].items()))
    assert first[1][0].split("/")[-1] == first[0].split("/")[-1]  # each query's first neighbour is its copy


def test_run_revisitop_crops_queries_to_their_box(tmp_path):
    """Each query is a database image pasted into a larger canvas at its box: cropped, it is an exact duplicate."""
    items = make_shapes_dataset(tmp_path / "shapes", n_per_class=1, size=64)
    (tmp_path / "jpg").mkdir()
    names = [f"d{i}" for i in range(len(items))]
    for name, (path, _) in zip(names, items, strict=True):
        Image.open(path).save(tmp_path / "jpg" / f"{name}.jpg", quality=100)
    gnd = {"imlist": names, "qimlist": ["q0", "q1"], "gnd": []}
    rng = np.random.default_rng(0)
    for qi, di in enumerate((2, 7)):
        canvas = Image.fromarray(rng.integers(0, 255, (150, 170, 3), dtype=np.uint8))
        canvas.paste(Image.open(tmp_path / "jpg" / f"d{di}.jpg"), (30 + qi, 40))
        canvas.save(tmp_path / "jpg" / f"q{qi}.png")
        (tmp_path / "jpg" / f"q{qi}.png").rename(tmp_path / "jpg" / f"q{qi}.jpg")  # revisitop names are .jpg
        gnd["gnd"].append(
            {"easy": [di], "hard": [(di + 1) % len(names)], "junk": [], "bbx": [30 + qi, 40, 94 + qi, 104]}
        )
    with open(tmp_path / "gnd.pkl", "wb") as f:
        pickle.dump(gnd, f)
    jpg, gnd_file = str(tmp_path / "jpg"), str(tmp_path / "gnd.pkl")
    cfg = _cfg(tmp_path, queries=jpg, database=jpg, ground_truth=gnd_file, crop_size=0)
    record = run(cfg)
    assert set(record["metrics"]) == {"easy", "medium", "hard"}
    assert record["metrics"]["easy"]["map"] == pytest.approx(1.0)
    assert record["metrics"]["easy"]["recall@1"] == 1.0
    assert record["metrics"]["hard"]["queries"] == 2
    assert (tmp_path / "out" / "top5_medium.png").exists()
    assert len(list((tmp_path / "cache" / "retrieval-crops").glob("*.png"))) == 2


def test_run_gem_descriptor(tmp_path):
    make_shapes_dataset(tmp_path / "val", n_per_class=2, size=64)
    qfile, gfile = make_class_ground_truth(tmp_path / "val", tmp_path / "bench", queries_per_class=1)
    cfg = _cfg(tmp_path, queries=str(qfile), database=str(tmp_path / "val"), ground_truth=str(gfile), feature="gem")
    record = run(cfg)
    m = record["metrics"]["all"]
    assert m["queries"] == 10 and 0.0 < m["map"] <= 1.0
    assert record["dataset"]["descriptor"].startswith("gem")


def test_config_checks():
    kw = dict(backbone="debug", queries="q", database="d", ground_truth="g.json")
    with pytest.raises(ConfigError, match="feature"):
        RetrievalEvalConfig(**kw, feature="mean")
    with pytest.raises(ConfigError, match="crop_size"):
        RetrievalEvalConfig(**kw, crop_size=-1)
    with pytest.raises(ConfigError, match="ks"):
        RetrievalEvalConfig(**kw, ks=(0,))
