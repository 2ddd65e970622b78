"""`bench/curate.py` runs end to end on a small pool and its record says what it measured (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "curate.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_curate", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_pool_has_its_planted_copies():
    x, planted = _bench().clustered_embeddings(3000, 384, seed=0)
    assert x.shape == (3000, 384) and len(planted) == 30 and (planted[:, 1] >= 2970).all()
    a, b = x[planted[:, 0]].astype("float32"), x[planted[:, 1]].astype("float32")
    assert ((a * b).sum(axis=1) > 0.95).all()


@pytest.mark.parametrize("index", [["--index", "flat"], ["--index", "ivf", "--nlist", "8", "--nprobe", "8"]])
def test_bench_finds_every_planted_copy_and_writes_its_record(tmp_path, capsys, index):
    out = tmp_path / "r.json"
    args = ["--n", "3000", "--dim", "384", "--k", "8", "--levels", "20", "4", "--resamples", "2", "--iters", "5",
            "--device", "cpu", "--json", str(out), *index]  # fmt: skip
    record = _bench().main(args)
    assert json.loads(out.read_text()) == record
    assert record["dedup"]["planted"] == 30 and record["dedup"]["planted_found"] == 1.0
    assert record["dedup"]["removed"] == 30  # the copies and nothing else: the clusters are far below 0.95
    if "ivf" in index:
        assert (record["dedup"]["nlist"], record["dedup"]["nprobe"]) == (8, 8)
    assert record["kmeans"]["clusters"] == [20, 4]
    assert set(record["steps"]) >= {"dedup: build index", "k-means levels [20, 4]"}
    assert "planted copies" in capsys.readouterr().out
