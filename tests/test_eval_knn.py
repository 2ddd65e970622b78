"""`opendino eval knn`: the official weighted kNN (parity with numbers from the official `KnnModule`, an independent
scikit-learn computation), the chunked search (same neighbours whatever the chunks, ties to the lower index), bad
input, and the command end to end on images whose answer is known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from sklearn.neighbors import KNeighborsClassifier

from opendino.cli import main
from opendino.eval.knn import knn_accuracy, knn_scores, knn_search, neighbour_scores

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official" / "knn_scores.safetensors"
COLOURS = {"blue": (30, 40, 210), "green": (40, 190, 50), "red": (210, 40, 30)}


def make_colour_folders(root: Path, n_train: int = 6, n_val: int = 3, size: int = 40, seed: int = 0) -> Path:
    """root/{train,val}/<colour>/<i>.png: noisy, unevenly lit plain colours, easy for any backbone to tell apart."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.array(rgb) * rng.uniform(0.7, 1.1) + rng.normal(0, 20, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def dyadic_features(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Unit vectors with four entries of +-1/2: every cosine similarity is a multiple of 1/4, computed exactly in any
    summation order, so exact ties are everywhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dim)
    for row in x:
        row[torch.randperm(dim, generator=g)[:4]] = torch.where(torch.rand(4, generator=g) < 0.5, -0.5, 0.5)
    return x


# ---------------------------------------------------------------------------------------------- parity
def test_scores_match_the_official_knn_module():
    data = load_file(str(FIXTURE))
    with safe_open(str(FIXTURE), "pt") as f:
        meta = json.loads(f.metadata()["cases"])
    for case, spec in meta["cases"].items():
        for chunks in ({}, {"chunk_size": 7, "train_chunk_size": 50}):
            got = knn_scores(data["in.train"], data["in.train_labels"], data["in.queries"], ks=spec["ks"],
                             temperature=spec["temperature"], num_classes=meta["num_classes"], **chunks)  # fmt: skip
            assert list(got) == spec["ks"]
            for k in spec["ks"]:
                torch.testing.assert_close(got[k], data[f"out.{case}.k{k}"], rtol=1e-5, atol=1e-6)


def test_predictions_match_scikit_learn_neighbours():
    """sklearn's brute-force cosine kNN weighted by exp(similarity / T) normalises over each k, the official over
    max(ks): the probabilities agree once our scores are normalised per query."""
    g = torch.Generator().manual_seed(1)
    train, queries = torch.randn(200, 10, generator=g), torch.randn(30, 10, generator=g)
    labels = torch.randint(0, 5, (200,), generator=g)
    ours = knn_scores(train, labels, queries, ks=(3, 20), temperature=0.1)
    for k in (3, 20):
        weights = lambda d: np.exp((1 - d) / 0.1)  # noqa: E731  # d = 1 - cosine similarity
        sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute", weights=weights)
        sk.fit(train.numpy(), labels.numpy())
        probs = torch.from_numpy(sk.predict_proba(queries.numpy())).float()
        torch.testing.assert_close(ours[k] / ours[k].sum(dim=1, keepdim=True), probs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- chunked search
def test_chunked_search_equals_the_unchunked_one_exactly_with_ties_to_the_lower_index():
    features = dyadic_features(300)
    train = torch.cat([features[:200], features[:40]])  # plus exact duplicates: ties across training chunks
    queries = features[200:]
    reference = torch.sort(-(queries @ train.T), dim=1, stable=True)  # similarity, then the lower index
    whole = knn_search(train, queries, 30, chunk_size=1000, train_chunk_size=1000)
    assert torch.equal(whole[1], reference.indices[:, :30]) and torch.equal(whole[0], -reference.values[:, :30])
    for chunk_size, train_chunk_size in ((7, 11), (100, 1), (1, 239), (33, 30)):
        sims, index = knn_search(train, queries, 30, chunk_size=chunk_size, train_chunk_size=train_chunk_size)
        assert torch.equal(index, whole[1]) and torch.equal(sims, whole[0])


def test_chunked_search_on_random_features_finds_the_same_neighbours():
    g = torch.Generator().manual_seed(2)
    train, queries = torch.randn(2000, 32, generator=g), torch.randn(100, 32, generator=g)
    whole = knn_search(train, queries, 50)
    expected = (F.normalize(queries, dim=1) @ F.normalize(train, dim=1).T).topk(50)
    assert torch.equal(whole[1], expected.indices)
    sims, index = knn_search(train, queries, 50, chunk_size=30, train_chunk_size=257)
    assert torch.equal(index, whole[1])
    torch.testing.assert_close(sims, whole[0], rtol=0, atol=1e-6)  # the matmul's rounding depends on the shapes


@pytest.mark.gpu
def test_search_on_gpu_finds_the_cpu_neighbours():
    g = torch.Generator().manual_seed(6)
    train, queries = torch.randn(5000, 64, generator=g), torch.randn(300, 64, generator=g)
    cpu = knn_search(train, queries, 20)
    for source in (train, train.cuda()):  # CPU features copied block by block, or already on the device
        sims, index = knn_search(source, queries, 20, chunk_size=128, train_chunk_size=1000, device="cuda")
        assert sims.device.type == index.device.type == "cpu"
        assert (index == cpu[1]).float().mean() > 0.99  # TF32 / other rounding may swap near-equal neighbours
        torch.testing.assert_close(sims, cpu[0], rtol=0, atol=1e-3)
    ties = dyadic_features(400)
    expected = knn_search(ties[:300], ties[300:], 25)
    got = knn_search(ties[:300], ties[300:], 25, chunk_size=9, train_chunk_size=31, device="cuda")
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


def test_k_larger_than_the_training_set_uses_all_of_it():
    g = torch.Generator().manual_seed(3)
    train, queries, labels = torch.randn(12, 8, generator=g), torch.randn(5, 8, generator=g), torch.arange(12) % 3
    sims, index = knn_search(train, queries, 100, train_chunk_size=5)
    assert sims.shape == index.shape == (5, 12) and torch.equal(
        index.sort(dim=1).values, torch.arange(12).expand(5, -1)
    )
    scores = knn_scores(train, labels, queries, ks=(100, 4, 50), train_chunk_size=5)
    assert list(scores) == [4, 12]  # keyed by the neighbours used: min(k, 12)
    torch.testing.assert_close(scores[12].sum(dim=1), torch.ones(5))
    torch.testing.assert_close(scores[12], knn_scores(train, labels, queries, ks=(12,))[12])
    assert (scores[4].sum(dim=1) < 1).all()  # the official softmax is over max(ks) neighbours


def test_neighbour_scores_by_a_loop():
    g = torch.Generator().manual_seed(4)
    sims = torch.rand(6, 9, generator=g).sort(dim=1, descending=True).values
    labels = torch.randint(0, 4, (6, 9), generator=g)
    got = neighbour_scores(sims, labels, (2, 9), temperature=0.05, num_classes=5)
    for i in range(6):
        w = [float(torch.exp(s / 0.05)) for s in sims[i]]
        for k in (2, 9):
            expected = torch.zeros(5)
            for j in range(k):
                expected[labels[i, j]] += w[j] / sum(w)
            torch.testing.assert_close(got[k][i], expected)


def test_knn_accuracy_on_separable_features():
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(10)
    train = centres[labels] + 0.1 * torch.randn(40, 16, generator=g)
    queries = centres[torch.arange(4).repeat(3)] + 0.1 * torch.randn(12, 16, generator=g)
    assert knn_accuracy(train, labels, queries, torch.arange(4).repeat(3), ks=(1, 5, 100)) == {1: 1.0, 5: 1.0, 40: 1.0}


@pytest.mark.parametrize(
    ("train", "queries", "kwargs", "match"),
    [
        (torch.zeros(0, 4), torch.ones(2, 4), {}, "needs training and query"),
        (torch.ones(3, 4), torch.ones(2, 5), {}, r"\(n, D\) and queries"),
        (torch.ones(3, 4), torch.full((2, 4), float("nan")), {}, "NaN"),
        (torch.ones(3, 4), torch.ones(2, 4), {"ks": (0, 5)}, "positive integer"),
        (torch.ones(3, 4), torch.ones(2, 4), {"temperature": 0.0}, "temperature"),
        (torch.ones(3, 4), torch.ones(2, 4), {"num_classes": 1}, "num_classes=1"),
    ],
)
def test_bad_input_is_refused(train, queries, kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn_scores(train, torch.tensor([0, 1, 0])[: len(train)], queries, **kwargs)


# ---------------------------------------------------------------------------------------------- end to end
def test_eval_knn_command_end_to_end(tmp_path):
    root = make_colour_folders(tmp_path / "data")
    out = tmp_path / "out"
    args = ["eval", "knn", "--backbone", "debug", "--train", str(root / "train"), "--val", str(root / "val"),
            "--out", str(out), "--num-workers", "0", "--resize-size", "40", "--crop-size", "32", "device=cpu",
            "ks=[1, 3, 50]"]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "results.json").read_text())
    metrics = record["metrics"]
    assert metrics["top1"] == metrics["mean_per_class"] == 1.0 and metrics["best_k"] == 1
    assert set(metrics["by_k"]) == {"1", "3", "18"} and all(m["top1"] == 1.0 for m in metrics["by_k"].values())
    assert record["dataset"]["train_images"] == 18 and record["dataset"]["val_images"] == 9
    assert record["extra"]["per_k"]["3"]["confusion"] == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    assert (out / "confusion_k1.png").stat().st_size > 0
    assert "| 18 (all) | 1.0000 | 1.0000 | 1.0000 |" in (out / "results.md").read_text()


_DIST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from opendino import dist
    from opendino.config import KnnEvalConfig
    from opendino.eval.knn import run
    root, out = sys.argv[1], sys.argv[2]
    cfg = KnnEvalConfig(backbone="debug", train=f"{root}/train", val=f"{root}/val", out=out, cache_dir="",
                        num_workers=0, device="cpu", resize_size=40, crop_size=32, ks=(1, 5, 20), chunk_size=2,
                        train_chunk_size=7)
    record = run(cfg)
    if dist.rank() == 1:
        with open(f"{out}/rank1.json", "w") as f:
            json.dump(record["metrics"], f)
    dist.cleanup()
    """
)


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_split_the_queries_and_agree_with_one(tmp_path):
    from opendino.config import KnnEvalConfig
    from opendino.eval.knn import run

    root = make_colour_folders(tmp_path / "data", n_train=8, n_val=5, seed=1)
    (tmp_path / "run.py").write_text(_DIST_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(tmp_path / "run.py"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(root), str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = KnnEvalConfig(backbone="debug", train=str(root / "train"), val=str(root / "val"),
                        out=str(tmp_path / "one"), cache_dir="", num_workers=0, device="cpu", resize_size=40,
                        crop_size=32, ks=(1, 5, 20))  # fmt: skip
    one = run(cfg)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["dataset"]["world_size"] == 2
    assert two["metrics"] == one["metrics"] == json.loads((tmp_path / "two" / "rank1.json").read_text())
