"""Copy-detection evaluation: isc2021 metrics against reference loops and scikit-learn, edits, benchmark, end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from opendino.config import ConfigError, CopydetectEvalConfig
from opendino.data.synthetic import make_shapes_dataset
from opendino.eval.copydetect import (
    build_benchmark,
    copydetect_metrics,
    micro_average_precision,
    precision_recall,
    recall_at_precision,
    recall_at_rank,
    run,
    search,
)
from opendino.eval.edits import EDITS, apply_edits, random_edits


# ---------------------------------------------------------------------------------------------- metrics
def reference_micro_ap(scores, positive, n_gt):
    """The definition as a loop: sort by score (ties: negatives first), sum (recall_i - recall_{i-1}) * precision_i."""
    pairs = sorted(zip(scores.tolist(), positive.tolist(), strict=True), key=lambda p: (-p[0], p[1]))
    ap, hits, previous = 0.0, 0, 0.0
    for i, (_, pos) in enumerate(pairs, start=1):
        hits += pos
        ap += (hits / n_gt - previous) * hits / i
        previous = hits / n_gt
    return ap


def reference_ranks(scores, indices, ground_truth):
    """isc2021's rank of each ground-truth pair: predictions of its query scoring >= its own, minus one."""
    ranks = []
    for s, idx, g in zip(scores.tolist(), indices.tolist(), ground_truth.tolist(), strict=True):
        if g < 0:
            continue
        ranks.append(sum(x >= s[idx.index(g)] for x in s) - 1 if g in idx else 10**9)
    return np.array(ranks)


def _random_predictions(seed, m=12, n=30, k=5, levels=None):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(m)])
    scores = torch.rand(m, k, generator=g).sort(dim=1, descending=True).values
    if levels:  # coarse scores: many ties
        scores = (scores * levels).floor() / levels
    ground_truth = torch.randint(0, n, (m,), generator=g)
    ground_truth[torch.rand(m, generator=g) < 0.3] = -1  # distractor queries
    hit = torch.rand(m, generator=g) < 0.6  # put the true reference among most queries' predictions
    for i in range(m):
        if hit[i] and ground_truth[i] >= 0 and ground_truth[i] not in indices[i]:
            indices[i, torch.randint(0, k, (1,), generator=g)] = ground_truth[i]
    return scores, indices, ground_truth


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 4])
def test_micro_ap_and_recall_at_rank_match_reference_loops(seed, levels):
    scores, indices, gt = _random_predictions(seed, levels=levels)
    positive = indices == gt[:, None]
    n_gt = int((gt >= 0).sum())
    got = copydetect_metrics(scores, indices, gt, ranks=(1, 3))
    assert got["micro_ap"] == pytest.approx(reference_micro_ap(scores.flatten(), positive.flatten(), n_gt), abs=1e-12)
    ranks = reference_ranks(scores, indices, gt)
    assert got["recall@1"] == pytest.approx((ranks == 0).mean())
    assert got["recall@3"] == pytest.approx((ranks < 3).mean())
    assert micro_average_precision(scores, positive, n_gt) == pytest.approx(got["micro_ap"])


def test_micro_ap_relation_to_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.permutation(40) / 40.0  # distinct scores
    positive = rng.random(40) < 0.3
    positive[0] = True
    n_pos = int(positive.sum())
    sk = average_precision_score(positive, scores)
    # every ground-truth pair among the predictions, no ties: micro-AP is sklearn's (step) AP
    assert micro_average_precision(scores, positive, n_pos) == pytest.approx(sk, abs=1e-12)
    # pairs missing from the predictions only shrink every recall step: micro-AP = sklearn AP * retrieved / all
    assert micro_average_precision(scores, positive, n_pos + 7) == pytest.approx(sk * n_pos / (n_pos + 7), abs=1e-12)
    # ties: sklearn puts a tied group at one threshold, isc orders its negatives first (never better)
    tied_scores, tied_positive = np.array([0.5, 0.5, 0.5]), np.array([True, True, False])
    assert average_precision_score(tied_positive, tied_scores) == pytest.approx(2 / 3)
    assert micro_average_precision(tied_scores, tied_positive, 2) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_recall_at_precision_and_errors():
    precision, recall, thresholds = precision_recall(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 0, 1]), 4)
    assert precision.tolist() == pytest.approx([1, 1, 2 / 3, 3 / 4])
    assert recall.tolist() == pytest.approx([0.25, 0.5, 0.5, 0.75])
    assert recall_at_precision(precision, recall, thresholds, 0.9) == (0.5, 0.8)
    assert recall_at_precision(precision, recall, thresholds, 0.7) == (0.75, 0.6)
    assert recall_at_precision(precision[2:3], recall[2:3], thresholds[2:3], 0.9) == (None, None)
    with pytest.raises(ValueError, match="ground-truth pairs"):
        precision_recall(np.ones(3), np.ones(3), 2)
    with pytest.raises(ValueError, match="distractor"):
        recall_at_rank(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.tensor([-1, -1]))
    # a tie with the true reference counts against it (isc: ties count against)
    tie = recall_at_rank(torch.tensor([[0.5, 0.5]]), torch.tensor([[3, 1]]), torch.tensor([1]), ranks=(1, 2))
    assert tie == {1: 0.0, 2: 1.0}


def test_search_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(7, 5, generator=g), torch.randn(20, 5, generator=g)
    scores, indices = search(q, r, k=4, chunk_size=3)
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T
    assert torch.equal(indices, sims.topk(4, dim=1).indices)
    assert torch.allclose(scores, sims.topk(4, dim=1).values)
    assert search(q, r, k=50)[1].shape == (7, 20)
    with pytest.raises(ValueError, match="descriptors"):
        search(q, r[:, :2], k=2)


# ---------------------------------------------------------------------------------------------- edits
def _picture(seed=0, size=(60, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("name", EDITS)
def test_each_edit_changes_the_image_deterministically(name):
    img = _picture()
    a, da = apply_edits(img, [name], random.Random(1))
    b, db = apply_edits(img, [name], random.Random(1))
    assert a.mode == "RGB" and da == db and len(da) == 1 and da[0].startswith(name)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != img.size or not np.array_equal(np.asarray(a), np.asarray(img))


def test_random_edits_compose_in_a_fixed_order_and_follow_the_seed():
    img = _picture()
    outs = [random_edits(img, random.Random(s), min_edits=2, max_edits=4, other=_picture(9)) for s in (5, 5, 6)]
    assert outs[0][1] == outs[1][1] and np.array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    assert outs[0][1] != outs[2][1] or not np.array_equal(np.asarray(outs[0][0]), np.asarray(outs[2][0]))
    for s in range(20):
        described = random_edits(img, random.Random(s), min_edits=2, max_edits=4)[1]
        names = [d.split("(")[0] for d in described]
        assert 2 <= len(names) <= 4 and names == sorted(names, key=EDITS.index)
    same, none = random_edits(img, random.Random(0), edits=())
    assert none == [] and np.array_equal(np.asarray(same), np.asarray(img))
    with pytest.raises(ValueError, match="unknown edits"):
        apply_edits(img, ["warp"], random.Random(0))
    calls = []
    load = lambda: calls.append(1) or _picture(3)  # noqa: E731
    apply_edits(img, ["flip", "jpeg"], random.Random(0), other=load)
    assert calls == []  # the second picture is loaded only for the edits that use it
    apply_edits(img, ["flip", "background"], random.Random(0), other=load)
    assert calls == [1]
    assert CopydetectEvalConfig(backbone="debug", images="x").edits == EDITS  # the config offers the same edits


# ---------------------------------------------------------------------------------------------- benchmark
def _folder(tmp_path, n_per_class=3):
    make_shapes_dataset(tmp_path / "img", n_per_class=n_per_class, size=64)
    return sorted(str(p) for p in (tmp_path / "img").rglob("*.png"))


def test_benchmark_split_and_determinism(tmp_path):
    images = _folder(tmp_path)
    kw = dict(n_queries=8, n_distractor_queries=5, seed=3)
    a = build_benchmark(images, tmp_path / "a", **kw)
    b = build_benchmark(images, tmp_path / "b", **kw)
    assert a.folder.name == b.folder.name and a.edits == b.edits and a.ground_truth == b.ground_truth
    for qa, qb in zip(a.queries, b.queries, strict=True):
        assert np.array_equal(np.asarray(Image.open(qa)), np.asarray(Image.open(qb)))
    assert len(a.references) == len(images) - 5 and len(a.queries) == 13
    copies = [i for i, g in enumerate(a.ground_truth) if g >= 0]
    assert len(copies) == 8 and len({a.ground_truth[i] for i in copies}) == 8
    assert all(a.references[a.ground_truth[i]] == a.sources[i] for i in copies)
    assert not {a.sources[i] for i, g in enumerate(a.ground_truth) if g < 0} & set(a.references)
    other = build_benchmark(images, tmp_path / "a", **(kw | {"seed": 4}))
    assert other.folder != a.folder and other.sources != a.sources
    assert len(list((tmp_path / "a").iterdir())) == 2  # no temporary folders left behind
    with pytest.raises(ValueError, match="cannot give"):
        build_benchmark(images, tmp_path / "c", n_queries=25, n_distractor_queries=6)


# ---------------------------------------------------------------------------------------------- end to end
def _cfg(tmp_path, **kw):
    base = dict(backbone="debug", images=str(tmp_path / "img"), resize_size=64, crop_size=64, num_workers=0,
                cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "out"), n_queries=10, n_distractor_queries=6,
                k=5, batch_size=16)  # fmt: skip
    return CopydetectEvalConfig(**(base | kw))


def test_run_exact_copies_are_all_found_and_a_bad_image_is_reported(tmp_path):
    _folder(tmp_path)
    (tmp_path / "img" / "zz_broken.png").write_bytes(b"\x89PNG truncated")
    record = run(_cfg(tmp_path, edits=()))
    m = record["metrics"]
    assert m["micro_ap"] == pytest.approx(1.0) and m["recall@1"] == 1.0 and m["recall_at_p90"] == 1.0
    assert m["queries"] + m["distractor_queries"] + len(record["bad_images"]) == 16
    assert [b[0].rsplit("/", 1)[-1] for b in record["bad_images"]] == ["zz_broken.png"]
    for name in ("copies.png", "precision_recall.png", "results.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["extra"]["queries"]) == m["queries"] + m["distractor_queries"]


def test_run_with_edits_reports_per_edit_recall(tmp_path):
    _folder(tmp_path)
    record = run(_cfg(tmp_path, edits=("flip", "jpeg", "text"), min_edits=1, max_edits=2))
    m = record["metrics"]
    assert m["queries"] == 10 and m["distractor_queries"] == 6 and m["references"] == 24
    assert 0.0 <= m["micro_ap"] <= 1.0 and 0.0 <= m["recall@1"] <= m["recall@5"] <= 1.0
    assert "| flip |" in (tmp_path / "out" / "results.md").read_text()
    again = run(_cfg(tmp_path, edits=("flip", "jpeg", "text"), min_edits=1, max_edits=2))  # benchmark + features cached
    assert again["metrics"] == m


def test_config_checks():
    with pytest.raises(ConfigError, match="edits"):
        CopydetectEvalConfig(backbone="debug", images="x", edits=("warp",))
    with pytest.raises(ConfigError, match="max_edits"):
        CopydetectEvalConfig(backbone="debug", images="x", min_edits=3, max_edits=2)
